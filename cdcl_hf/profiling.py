"""Profiles from embeddings: extraction, aggregation (image -> well -> treatment), correction, parquet I/O.

A *profile table* is a pandas DataFrame in the layout pycytominer and copairs expect: metadata in
columns prefixed ``Metadata_`` (``Metadata_plate``, ``Metadata_well``, ``Metadata_treatment``...),
every other column a numeric feature. :func:`extract_embeddings` writes embedding features as
``emb_0000``, ``emb_0001``...; any other feature names (e.g. CellProfiler's) work everywhere too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA

from .embedding import pooled_embedding
from .image_io import decode_image
from .normalization import PlateNormalization

logger = logging.getLogger(__name__)

METADATA_PREFIX = "Metadata_"
EMBEDDING_PREFIX = "emb_"
# Columns of a screen dataset that are pixels or bookkeeping, not per-image metadata.
NON_METADATA_DATASET_COLUMNS = ("image", "channel_names")
# The schema's plate column: per-plate normalisation keys its statistics by it, whatever --plate_column says.
PLATE_COLUMN = "plate"

AGGREGATION_METHODS = ("mean", "median")
CORRECTION_METHODS = ("none", "zscore", "mad", "tvn", "sphering")
# Scale factor that makes the median absolute deviation a consistent estimator of the standard
# deviation for normally distributed data (as pycytominer's "mad_robustize" uses).
MAD_TO_STD = 1.4826

__all__ = [
    "METADATA_PREFIX",
    "AGGREGATION_METHODS",
    "CORRECTION_METHODS",
    "metadata_name",
    "feature_columns",
    "metadata_columns",
    "split_profiles",
    "write_profiles",
    "read_profiles",
    "aggregate_profiles",
    "correct_profiles",
    "load_feature_extractor",
    "model_num_channels",
    "check_channel_count",
    "extract_embeddings",
    "tile_offsets",
]


# ---------------------------------------------------------------------------------------------
# Table layout helpers
# ---------------------------------------------------------------------------------------------


def metadata_name(column: str) -> str:
    """``"plate"`` -> ``"Metadata_plate"`` (already prefixed names are returned unchanged)."""
    return column if column.startswith(METADATA_PREFIX) else METADATA_PREFIX + column


def metadata_columns(profiles: pd.DataFrame) -> list[str]:
    return [c for c in profiles.columns if str(c).startswith(METADATA_PREFIX)]


def feature_columns(profiles: pd.DataFrame) -> list[str]:
    """Every column that is not ``Metadata_``-prefixed; raises if one of them is not numeric."""
    columns = [c for c in profiles.columns if not str(c).startswith(METADATA_PREFIX)]
    not_numeric = [c for c in columns if not pd.api.types.is_numeric_dtype(profiles[c])]
    if not_numeric:
        raise ValueError(
            f"non-numeric feature column(s) {not_numeric[:5]}: metadata columns must be prefixed '{METADATA_PREFIX}'"
        )
    if not columns:
        raise ValueError("profile table has no feature column (every column is Metadata_-prefixed)")
    return columns


def split_profiles(profiles: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """(features as a float64 matrix, metadata columns as a DataFrame with a fresh index)."""
    features = profiles[feature_columns(profiles)].to_numpy(dtype=np.float64)
    return features, profiles[metadata_columns(profiles)].reset_index(drop=True)


def _require_columns(profiles: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in profiles.columns]
    if missing:
        raise ValueError(f"{what} needs column(s) {missing}; the table has {metadata_columns(profiles)}")


def write_profiles(profiles: pd.DataFrame, path: str | Path) -> Path:
    """Write a profile table to parquet (collected metadata such as batch lists become list columns)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    profiles.to_parquet(path, index=False)
    return path


def read_profiles(path: str | Path) -> pd.DataFrame:
    """Read a profile table written by :func:`write_profiles` (or by pycytominer to parquet)."""
    profiles = pd.read_parquet(path)
    # Parquet list columns come back as numpy arrays; tuples keep them hashable for grouping.
    for column in metadata_columns(profiles):
        if profiles[column].map(lambda v: isinstance(v, np.ndarray)).any():
            profiles[column] = profiles[column].map(lambda v: tuple(v) if isinstance(v, np.ndarray) else v)
    return profiles


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------


def aggregate_profiles(
    profiles: pd.DataFrame,
    by: Sequence[str],
    method: str = "mean",
    collect: Sequence[str] = (),
    count_column: str = "Metadata_n_profiles",
) -> pd.DataFrame:
    """Aggregate profiles per group: image -> well (``by=["Metadata_plate", "Metadata_well"]``),
    well -> treatment (``by=["Metadata_treatment"]``), ...

    Features: mean or median over the group's rows. Metadata: the ``by`` columns; every other
    metadata column that is constant within every group (e.g. MoA per treatment); the columns in
    ``collect`` as a sorted tuple of the group's distinct values (e.g. ``Metadata_batch`` at
    treatment level, which NSCB needs); ``count_column`` = rows per group. Metadata that varies
    within a group and is not collected is dropped, as pycytominer does.
    """
    if method not in AGGREGATION_METHODS:
        raise ValueError(f"method must be one of {AGGREGATION_METHODS}, got {method!r}")
    by = list(by)
    _require_columns(profiles, [*by, *collect], "aggregation")
    features = feature_columns(profiles)
    if profiles[features].isna().to_numpy().any():
        raise ValueError("profiles contain NaN features; aggregation would hide them")
    missing_keys = profiles[by].isna().any(axis=1)
    if missing_keys.any():
        raise ValueError(f"{int(missing_keys.sum())} profile(s) have a missing value in the group columns {by}")

    grouped = profiles.groupby(by, sort=True, dropna=False)
    aggregated = getattr(grouped[features], method)()
    other_metadata = [c for c in metadata_columns(profiles) if c not in by and c not in collect]
    constant = [c for c in other_metadata if (grouped[c].nunique(dropna=False) <= 1).all()]
    metadata = grouped[constant].first() if constant else pd.DataFrame(index=aggregated.index)
    for column in collect:
        metadata[column] = grouped[column].agg(_sorted_distinct)
    metadata[count_column] = grouped.size()
    return pd.concat([metadata, aggregated], axis=1).reset_index()


def _sorted_distinct(values: pd.Series) -> tuple:
    distinct = set()
    for value in values:
        distinct.update(value if isinstance(value, (tuple, list, np.ndarray)) else [value])
    return tuple(sorted(distinct, key=str))


# ---------------------------------------------------------------------------------------------
# Correction
# ---------------------------------------------------------------------------------------------


def correct_profiles(
    profiles: pd.DataFrame,
    method: str = "none",
    control_column: str = "Metadata_is_control",
    plate_column: str = "Metadata_plate",
    per_plate: bool = False,
    epsilon: float = 1e-6,
) -> pd.DataFrame:
    """Correct features against the negative controls; metadata is returned unchanged.

    * ``"none"``: unchanged copy.
    * ``"zscore"``: per plate, (x - mean of the plate's controls) / std of the plate's controls.
    * ``"mad"``: per plate, robust version: (x - median) / (1.4826 x MAD) of the plate's controls.
    * ``"tvn"``: typical variation normalisation (Ando et al. 2017): PCA whitening fitted on the
      control profiles, applied to all; features become the whitened principal components (at most
      number of controls - 1 of them). With ``per_plate=True`` each plate is first centred and scaled
      by its own controls (``"zscore"``), so that the whitening sees plate-free control variation;
      a separate PCA per plate is not used, because its axes would differ between plates.
    * ``"sphering"``: ZCA whitening fitted on the controls (pycytominer's "spherize"):
      x -> W (x - mean_controls), W = C^-1/2 regularised by ``epsilon`` on the eigenvalues; keeps
      the original feature axes and dimension. ``per_plate=True`` z-scores per plate first.

    A feature with zero spread among a plate's controls is only centred there (its scale is 1):
    dividing by zero spread would create infinities. A plate without control raises ``ValueError``.
    """
    if method not in CORRECTION_METHODS:
        raise ValueError(f"correction must be one of {CORRECTION_METHODS}, got {method!r}")
    features = feature_columns(profiles)
    matrix = profiles[features].to_numpy(dtype=np.float64)
    if not np.isfinite(matrix).all():
        raise ValueError("profiles contain NaN or infinite features; correct or drop them first")
    if method == "none":
        return profiles.copy()
    _require_columns(profiles, [control_column], f"correction {method!r}")
    is_control = profiles[control_column].astype(bool).to_numpy()
    if not is_control.any():
        raise ValueError(f"correction {method!r} needs negative controls but '{control_column}' marks none")

    if method in ("zscore", "mad") or per_plate:
        _require_columns(profiles, [plate_column], f"correction {method!r}")
        robust = method == "mad"
        matrix = _standardise_per_plate(matrix, profiles[plate_column].to_numpy(), is_control, robust)
    if method == "tvn":
        n_components = min(int(is_control.sum()) - 1, matrix.shape[1])
        if n_components < 1:
            raise ValueError("TVN needs at least two control profiles to fit a whitening")
        whitening = PCA(n_components=n_components, whiten=True).fit(matrix[is_control])
        matrix = whitening.transform(matrix)
        features = [f"tvn_{i:04d}" for i in range(n_components)]
    elif method == "sphering":
        matrix = _zca_whiten(matrix, is_control, epsilon)

    corrected = pd.DataFrame(matrix, columns=features, index=profiles.index)
    return pd.concat([profiles[metadata_columns(profiles)], corrected], axis=1)


def _standardise_per_plate(matrix: np.ndarray, plates: np.ndarray, is_control: np.ndarray, robust: bool) -> np.ndarray:
    corrected = np.empty_like(matrix)
    for plate in pd.unique(plates):
        on_plate = plates == plate
        controls = matrix[on_plate & is_control]
        if len(controls) == 0:
            raise ValueError(f"plate {plate!r} has no negative control profile to standardise against")
        if robust:
            centre = np.median(controls, axis=0)
            scale = MAD_TO_STD * np.median(np.abs(controls - centre), axis=0)
        else:
            centre = controls.mean(axis=0)
            scale = controls.std(axis=0, ddof=1) if len(controls) > 1 else np.zeros(matrix.shape[1])
        scale = np.where(scale > 0, scale, 1.0)
        corrected[on_plate] = (matrix[on_plate] - centre) / scale
    return corrected


def _zca_whiten(matrix: np.ndarray, is_control: np.ndarray, epsilon: float) -> np.ndarray:
    controls = matrix[is_control]
    if len(controls) < 2:
        raise ValueError("sphering needs at least two control profiles to estimate a covariance")
    centre = controls.mean(axis=0)
    covariance = np.cov(controls - centre, rowvar=False).reshape(matrix.shape[1], matrix.shape[1])
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    whitening = eigenvectors @ np.diag(1.0 / np.sqrt(np.clip(eigenvalues, 0, None) + epsilon)) @ eigenvectors.T
    return (matrix - centre) @ whitening


# ---------------------------------------------------------------------------------------------
# Embedding extraction
# ---------------------------------------------------------------------------------------------


def load_feature_extractor(
    model_name_or_path: str, trust_remote_code: bool = False, revision: str | None = None
) -> tuple[Any, Any]:
    """(model, image processor) from a CDCL checkpoint directory, a Hub id or any AutoModel checkpoint.

    The processor is ``None`` when the checkpoint has none; :func:`extract_embeddings` then uses a
    per-image-standardising :class:`~cdcl_hf.CDCLImageProcessor` at the model's image size.
    """
    # The CDCL classes are registered with the Auto classes by cdcl_hf/__init__.py, already imported here.
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    try:
        processor = AutoImageProcessor.from_pretrained(
            model_name_or_path, trust_remote_code=trust_remote_code, revision=revision
        )
    except (OSError, ValueError) as error:
        logger.info("no image processor with %s (%s); using a default one", model_name_or_path, error)
        processor = None
    return model, processor


def model_num_channels(model: Any) -> int | None:
    """The input channel count a model's config declares (``None`` if it declares none)."""
    return getattr(getattr(model, "config", None), "num_channels", None)


def check_channel_count(model: Any, processor: Any, num_channels: int) -> None:
    """Raise ``ValueError`` when images of ``num_channels`` channels do not fit ``model`` or ``processor``."""
    expected = model_num_channels(model)
    if expected is not None and num_channels != expected:
        raise ValueError(
            f"the dataset's images have {num_channels} channels but the model expects {expected}; "
            "use a checkpoint trained on this stain set or rebuild the patch embedding "
            "(CDCLModel.from_vit_checkpoint(..., num_channels=...))"
        )
    processor_channels = getattr(processor, "num_channels", None)
    if processor_channels is not None and num_channels != processor_channels:
        raise ValueError(
            f"the dataset's images have {num_channels} channels but the checkpoint's image processor expects "
            f"{processor_channels}"
        )


def tile_offsets(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` every ``stride`` pixels, the last one flush with the edge."""
    if tile > length:
        raise ValueError(f"tile size {tile} is larger than the image side {length}")
    offsets = list(range(0, length - tile + 1, stride))
    if offsets[-1] != length - tile:
        offsets.append(length - tile)
    return offsets


def _tiles(image: np.ndarray, tile_size: int | None, tile_stride: int | None) -> list[np.ndarray]:
    if tile_size is None:
        return [image]
    stride = tile_stride or tile_size
    _, height, width = image.shape
    return [
        image[:, top : top + tile_size, left : left + tile_size]
        for top in tile_offsets(height, tile_size, stride)
        for left in tile_offsets(width, tile_size, stride)
    ]


def _default_processor(model: Any, num_channels: int) -> Any:
    from .image_processing_cdcl import CDCLImageProcessor

    image_size = getattr(model.config, "image_size", 224)
    return CDCLImageProcessor(num_channels=num_channels, size={"height": image_size, "width": image_size},
                              normalization="per_image")


def _pixel_values(
    processor: Any, tiles: list[np.ndarray], plates: list[str] | None, normalization: PlateNormalization | None
) -> Any:
    """The processor's ``pixel_values`` for ``tiles``; with a per-plate ``normalization``, one processor call per
    plate with that plate's mean/std, so each tile is normalised by its own plate whatever the batch mixes."""
    import torch

    if normalization is None:
        return processor(tiles, return_tensors="pt")["pixel_values"]
    by_plate: dict[str, list[int]] = {}
    for index, plate in enumerate(plates):
        by_plate.setdefault(plate, []).append(index)
    rows: list[Any] = [None] * len(tiles)
    for plate, indices in by_plate.items():
        values = processor(
            [tiles[i] for i in indices], return_tensors="pt", **normalization.processor_call_kwargs(plate)
        )["pixel_values"]
        for index, row in zip(indices, values, strict=True):
            rows[index] = row
    return torch.stack(rows)


def _embed(model: Any, pixel_values: Any) -> np.ndarray:
    return pooled_embedding(model(pixel_values=pixel_values)).float().cpu().numpy()


def extract_embeddings(
    model: Any,
    dataset: Any,
    processor: Any = None,
    batch_size: int = 32,
    device: str | None = None,
    tile_size: int | None = None,
    tile_stride: int | None = None,
    progress: bool = True,
    normalization: PlateNormalization | None = None,
) -> pd.DataFrame:
    """Embed every image of a screen dataset; one row per image, metadata as ``Metadata_*`` columns.

    ``model``: a CDCL model or any transformers image model whose output has ``pooler_output``
    (else its first token is used). ``dataset``: a screen ``datasets.Dataset`` / ``IterableDataset``
    (schema: docs/dataset-schema.md). With ``tile_size`` each image is cut into ``tile_size`` squares every
    ``tile_stride`` pixels (default: non-overlapping, the last tile flush with the edge); the image's
    embedding is the mean of its tiles' embeddings (multi-crop averaging for large fields).
    ``normalization``: a per-plate `cdcl_hf.normalization.PlateNormalization` (see
    `PlateNormalization.for_processor`); each image is then processed with its plate's ``image_mean`` /
    ``image_std``, as training normalised it. Runs on ``device`` (default: CUDA when available), in inference mode, with a tqdm
    progress bar (a streamed dataset has no length, so the bar only counts).
    Raises ``ValueError`` when the images' channel count differs from the model's.
    """
    import torch
    from tqdm.auto import tqdm


    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    total = len(dataset) if hasattr(dataset, "__len__") else None

    embeddings: list[np.ndarray] = []
    metadata_rows: list[dict[str, Any]] = []
    with torch.inference_mode(), tqdm(total=total, desc="embedding", unit="img", disable=not progress) as bar:
        for batch in dataset.iter(batch_size=batch_size):
            images = [decode_image(value) for value in batch["image"]]
            channels = images[0].shape[0]
            check_channel_count(model, processor, channels)
            if processor is None:
                processor = _default_processor(model, channels)
            tiles_per_image = [_tiles(image, tile_size, tile_stride) for image in images]
            flat_tiles = [tile for tiles in tiles_per_image for tile in tiles]
            tile_plates = None
            if normalization is not None:
                if PLATE_COLUMN not in batch:
                    raise ValueError(
                        f"per-plate normalisation needs the dataset's {PLATE_COLUMN!r} column; it has {list(batch)}"
                    )
                tile_plates = [
                    str(plate)
                    for plate, tiles in zip(batch[PLATE_COLUMN], tiles_per_image, strict=True)
                    for _ in tiles
                ]
            pixel_values = _pixel_values(processor, flat_tiles, tile_plates, normalization).to(device)
            tile_embeddings = _embed(model, pixel_values)
            start = 0
            for tiles in tiles_per_image:
                embeddings.append(tile_embeddings[start : start + len(tiles)].mean(axis=0))
                start += len(tiles)
            keys = [k for k in batch if k not in NON_METADATA_DATASET_COLUMNS]
            metadata_rows.extend({metadata_name(k): batch[k][i] for k in keys} for i in range(len(images)))
            bar.update(len(images))

    if not embeddings:
        raise ValueError("the dataset is empty: nothing to embed")
    matrix = np.stack(embeddings)
    if not np.isfinite(matrix).all():
        raise ValueError("the model produced NaN or infinite embeddings; check the checkpoint and the input scaling")
    features = pd.DataFrame(matrix, columns=[f"{EMBEDDING_PREFIX}{i:04d}" for i in range(matrix.shape[1])])
    return pd.concat([pd.DataFrame(metadata_rows), features], axis=1)
