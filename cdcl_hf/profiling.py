"""Profiles from embeddings: extraction, aggregation (image -> well -> treatment), correction, parquet I/O.

A *profile table* is a pandas DataFrame in the layout pycytominer and copairs expect: metadata in
columns prefixed ``Metadata_``, every other column a numeric feature. The screen schema's columns get
the names CellProfiler / pycytominer use (:data:`METADATA_NAMES`: ``Metadata_Plate``,
``Metadata_Well``, ``Metadata_Batch``, ``Metadata_Compound``, ``Metadata_Concentration``,
``Metadata_Treatment``, ``Metadata_moa`` as in the BBBC021 CellProfiler profiles), so
``pycytominer.aggregate`` works with its default strata (``["Metadata_Plate", "Metadata_Well"]``).
:func:`extract_embeddings` writes embedding features as ``emb_0000``, ``emb_0001``...; pass them to
pycytominer as ``features=`` (:func:`feature_columns`). Any other feature names (e.g. CellProfiler's)
work everywhere too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA

from .embedding import TEST_TIME_AUGMENTATIONS, augmented_embedding, inference_forward
from .image_io import decode_image
from .normalization import PlateNormalization
from .outputs import temporary_prefix
from .screen_data import CHANNEL_NAMES_COLUMN, looks_like_local_path

logger = logging.getLogger(__name__)

METADATA_PREFIX = "Metadata_"
# Profile-table names of the screen schema's columns: CellProfiler's capitalised names, which pycytominer's defaults
# expect (aggregate's strata are Metadata_Plate / Metadata_Well); "moa" stays lower-case as in the BBBC021
# CellProfiler profiles (Metadata_moa). Any other column x becomes Metadata_x, e.g. Metadata_is_control.
METADATA_NAMES = {
    "plate": "Metadata_Plate",
    "well": "Metadata_Well",
    "site": "Metadata_Site",
    "batch": "Metadata_Batch",
    "compound": "Metadata_Compound",
    "concentration": "Metadata_Concentration",
    "treatment": "Metadata_Treatment",
    "moa": "Metadata_moa",
    "replicate": "Metadata_Replicate",
}
EMBEDDING_PREFIX = "emb_"
# Columns of a screen dataset that are pixels or bookkeeping, not per-image metadata.
NON_METADATA_DATASET_COLUMNS = ("image", "channel_names")
# The schema's plate column: per-plate normalisation keys its statistics by it, whatever --plate_column says.
PLATE_COLUMN = "plate"

AGGREGATION_METHODS = ("mean", "median")
CORRECTION_METHODS = ("none", "center", "zscore", "mad", "tvn", "sphering")
# Scale factor that makes the median absolute deviation a consistent estimator of the standard
# deviation for normally distributed data (as pycytominer's "mad_robustize" uses).
MAD_TO_STD = 1.4826
# Names a builder gives channels nobody named (screen_data.default_channel_names): they say nothing about the stain.
DEFAULT_CHANNEL_NAME = re.compile(r"channel_\d+")
# A training run's output folder: its settings are written at the start, its summary ("finished") at the end.
TRAINING_ARGS_FILE = "training_args.json"
TRAINING_SUMMARY_FILE = "training_summary.json"
PROCESSOR_FILE = "preprocessor_config.json"

__all__ = [
    "METADATA_PREFIX",
    "METADATA_NAMES",
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
    "check_model_folder",
    "load_feature_extractor",
    "default_processor",
    "permute_normalization",
    "model_num_channels",
    "model_channel_names",
    "channels_are_named",
    "match_channels",
    "check_channel_count",
    "extract_embeddings",
    "tile_offsets",
]


# ---------------------------------------------------------------------------------------------
# Table layout helpers
# ---------------------------------------------------------------------------------------------


def metadata_name(column: str) -> str:
    """The profile-table name of a dataset column.

    ``"plate"`` -> ``"Metadata_Plate"`` (the schema's columns, :data:`METADATA_NAMES`), any other name ``x`` ->
    ``"Metadata_x"``; already prefixed names are returned unchanged.

    Args:
        column (`str`): The dataset column's name.

    Returns:
        `str`: The ``Metadata_``-prefixed name.
    """
    if column.startswith(METADATA_PREFIX):
        return column
    return METADATA_NAMES.get(column, METADATA_PREFIX + column)


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
    # Written beside the target and renamed: a reader never sees half a parquet file.
    handle, temporary = tempfile.mkstemp(prefix=temporary_prefix(), suffix=".parquet", dir=path.parent)
    os.close(handle)
    try:
        profiles.to_parquet(temporary, index=False)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
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
    """Aggregate profiles per group: image -> well (``by=["Metadata_Plate", "Metadata_Well"]``),
    well -> treatment (``by=["Metadata_Treatment"]``), ...

    Features: mean or median over the group's rows. Metadata: the ``by`` columns; every other
    metadata column that is constant within every group (e.g. MoA per treatment); the columns in
    ``collect`` as a sorted tuple of the group's distinct values (e.g. ``Metadata_Batch`` at
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
    plate_column: str = "Metadata_Plate",
    per_plate: bool = False,
    epsilon: float = 1e-6,
) -> pd.DataFrame:
    """Correct features against the negative controls, or the whole screen (``"center"``); metadata is unchanged.

    * ``"none"``: unchanged copy.
    * ``"center"``: subtract each feature's mean over all profiles (controls included; no scaling), as
      scikit-learn's ``StandardScaler(with_std=False)``. Needs no controls. Cosine similarity and copairs' mAP
      compare directions, and every embedding of a screen shares a large mean component; centred, they compare
      how profiles deviate from the screen's average profile.
    * ``"zscore"``: per plate, (x - mean of the plate's controls) / std of the plate's controls. The std is the
      population one (``ddof=0``, divide by n), as pycytominer's ``normalize(method="standardize")`` computes it
      (scikit-learn's ``StandardScaler``); the two agree to rounding when called per plate with the controls as
      ``samples`` (tests/test_pycytominer_compat.py).
    * ``"mad"``: per plate, robust version: (x - median) / (1.4826 x MAD) of the plate's controls; pycytominer's
      ``normalize(method="mad_robustize")`` per plate gives the same numbers (its ``epsilon`` of 1e-18 added to the
      scale aside).
    * ``"tvn"``: typical variation normalisation (Ando et al. 2017): PCA whitening fitted on the
      control profiles, applied to all; features become the whitened principal components (at most
      number of controls - 1 of them). With ``per_plate=True`` each plate is first centred and scaled
      by its own controls (``"zscore"``), so that the whitening sees plate-free control variation;
      a separate PCA per plate is not used, because its axes would differ between plates.
    * ``"sphering"``: ZCA whitening of the *covariance* fitted on the controls:
      x -> W (x - mean_controls), W = C^-1/2 with C the controls' covariance (``ddof=1``) and ``epsilon`` added to
      its eigenvalues; keeps the original feature axes and dimension. This is pycytominer's
      ``normalize(method="spherize", spherize_method="ZCA")`` (which adds its epsilon to the singular values
      instead), *not* its default ``"ZCA-cor"``, which first standardises each feature and whitens the
      correlation matrix. ``per_plate=True`` z-scores each plate against its controls first.

    A feature with zero spread among a plate's controls is only centred there (its scale is 1):
    dividing by zero spread would create infinities. Standardising per plate (``"zscore"``, ``"mad"``,
    ``per_plate=True``) needs at least two control profiles on every plate, to estimate a spread at all: a plate with
    fewer raises ``ValueError`` naming it (and every other such plate).

    Args:
        profiles (`pd.DataFrame`):
            ``Metadata_*`` columns + numeric features.
        method (`str`, *optional*, defaults to `"none"`):
            One of :data:`CORRECTION_METHODS`.
        control_column (`str`, *optional*, defaults to `"Metadata_is_control"`):
            The boolean column marking negative controls.
        plate_column (`str`, *optional*, defaults to `"Metadata_Plate"`):
            The plate column (per-plate standardisation).
        per_plate (`bool`, *optional*, defaults to `False`):
            ``"tvn"`` / ``"sphering"``: z-score each plate against its controls first.
        epsilon (`float`, *optional*, defaults to 1e-6):
            The eigenvalue regulariser of ``"sphering"``.

    Returns:
        `pd.DataFrame`: The corrected table, metadata first.
    """
    if method not in CORRECTION_METHODS:
        raise ValueError(f"correction must be one of {CORRECTION_METHODS}, got {method!r}")
    features = feature_columns(profiles)
    matrix = profiles[features].to_numpy(dtype=np.float64)
    if not np.isfinite(matrix).all():
        raise ValueError("profiles contain NaN or infinite features; correct or drop them first")
    if method == "none":
        return profiles.copy()
    if method == "center":
        corrected = pd.DataFrame(matrix - matrix.mean(axis=0), columns=features, index=profiles.index)
        return pd.concat([profiles[metadata_columns(profiles)], corrected], axis=1)
    _require_columns(profiles, [control_column], f"correction {method!r}")
    is_control = profiles[control_column].astype(bool).to_numpy()
    if not is_control.any():
        raise ValueError(f"correction {method!r} needs negative controls but '{control_column}' marks none")

    if method in ("zscore", "mad") or per_plate:
        _require_columns(profiles, [plate_column], f"correction {method!r}")
        robust = method == "mad"
        matrix = _standardise_per_plate(
            matrix, profiles[plate_column].to_numpy(), is_control, robust, f"correction {method!r}"
            + (" with per_plate" if method not in ("zscore", "mad") else ""), control_column,
        )
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


def _standardise_per_plate(
    matrix: np.ndarray, plates: np.ndarray, is_control: np.ndarray, robust: bool, what: str, control_column: str
) -> np.ndarray:
    # Every plate is checked before any is corrected, so that one message names all the plates to fix. One control
    # gives no spread: the scale would silently become 1 and the plate would only be centred.
    counts = {plate: int((is_control & (plates == plate)).sum()) for plate in pd.unique(plates)}
    too_few = {plate: count for plate, count in counts.items() if count < 2}
    if too_few:
        listed = ", ".join(f"{plate!r} ({count})" for plate, count in list(too_few.items())[:10])
        more = f" and {len(too_few) - 10} more" if len(too_few) > 10 else ""
        zero = [plate for plate, count in too_few.items() if count == 0]
        raise ValueError(
            f"{what} standardises each plate against its negative controls, but plate(s) {listed}{more} have "
            f"{'no negative control profile' if zero else 'fewer than 2 negative control profiles'} "
            f"(counted in {control_column!r}; at least 2 per plate are needed to estimate a spread); evaluate at "
            "image level (--profile_level image) for more controls per plate, correct without per-plate "
            "standardisation (--correction tvn or sphering without --per_plate), or leave those plates out"
        )
    corrected = np.empty_like(matrix)
    for plate in counts:
        on_plate = plates == plate
        controls = matrix[on_plate & is_control]
        if robust:
            centre = np.median(controls, axis=0)
            scale = MAD_TO_STD * np.median(np.abs(controls - centre), axis=0)
        else:
            centre = controls.mean(axis=0)
            # ddof=0, the population std: pycytominer's "standardize" (scikit-learn's StandardScaler) uses it too.
            scale = controls.std(axis=0, ddof=0)
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


def check_model_folder(model_name_or_path: str | os.PathLike) -> Path | None:
    """Refuse a local model folder that cannot be (or must not be) embedded with; returns it, or None for a Hub id.

    Refused, each with one line saying what to do: a local path that does not exist (a name that can only be a path,
    see :func:`cdcl_hf.screen_data.looks_like_local_path`, is never tried as a Hub id); a file; the output folder of a
    training run that has not finished (``training_args.json`` without a ``training_summary.json`` that says
    ``"finished": true``: the folder holds no final model, or an older one); a folder without ``config.json``.

    Args:
        model_name_or_path (`str` or `os.PathLike`):
            What the user passed as the model.

    Returns:
        `Path` or `None`: The local folder, or `None` when ``model_name_or_path`` is a Hub id.
    """
    folder = Path(model_name_or_path).expanduser()
    if not folder.exists():
        if looks_like_local_path(model_name_or_path):
            raise FileNotFoundError(
                f"model {os.fspath(model_name_or_path)} does not exist (a local path, so it is not looked up on the "
                "Hub); check the path"
            )
        return None
    if not folder.is_dir():
        raise NotADirectoryError(
            f"model {folder} is a file; expected a checkpoint folder (config.json + weights) or a Hub model id"
        )
    if (folder / TRAINING_ARGS_FILE).is_file():
        summary_file = folder / TRAINING_SUMMARY_FILE
        try:
            finished = bool(json.loads(summary_file.read_text()).get("finished")) if summary_file.is_file() else False
        except (OSError, ValueError, AttributeError):
            finished = False
        if not finished:
            state = "says it has not finished" if summary_file.is_file() else f"has no {TRAINING_SUMMARY_FILE} yet"
            raise ValueError(
                f"model {folder} is the output folder of a training run that has not finished ({state}); resume it "
                f"(cdcl-train ... --output_dir {folder} --resume_from_checkpoint latest) and evaluate once it has "
                "finished"
            )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"model folder {folder} has no config.json, so it holds no model; pass a checkpoint folder written by "
            "save_pretrained (a finished cdcl-train output folder) or a Hub model id"
        )
    return folder


POOLING_HELP = (
    "a CDCL model's embedding: cls, mean (of the patch tokens) or cls+mean (both, concatenated); default: the "
    "model's config.pooling. The BBBC021 benchmark embeds with cls+mean (chosen on its tuning weeks)"
)


def set_pooling(model: Any, pooling: str, where: str = "the model") -> None:
    """Make a CDCL ``model`` return the ``pooling`` embedding (see `CDCLConfig.pooling`); refuse other models."""
    from .configuration_cdcl import POOLING_MODES

    if pooling not in POOLING_MODES:
        raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type != "cdcl":
        raise ValueError(
            f"{where} is a {model_type!r} model, which pools its own way; --pooling chooses among a CDCL model's "
            f"embeddings {POOLING_MODES}: leave it out for this model"
        )
    model.config.pooling = pooling


def load_feature_extractor(
    model_name_or_path: str,
    trust_remote_code: bool = False,
    revision: str | None = None,
    allow_default_processor: bool = False,
    pooling: str | None = None,
) -> tuple[Any, Any]:
    """(model, image processor) from a CDCL checkpoint directory, a Hub id or any AutoModel checkpoint.

    Args:
        model_name_or_path (`str`):
            A checkpoint folder or a Hub model id (checked first with :func:`check_model_folder`).
        trust_remote_code (`bool`, defaults to `False`):
            Passed to the Auto classes.
        revision (`str`, *optional*):
            Hub branch, tag or commit.
        allow_default_processor (`bool`, defaults to `False`):
            A checkpoint without an image processor (no ``preprocessor_config.json``) is refused: its images would be
            standardised per image, which is not what a model trained with per-plate statistics saw. With `True` the
            processor is returned as ``None`` and :func:`extract_embeddings` uses a per-image-standardising
            :class:`~cdcl_hf.CDCLImageProcessor` at the model's image size.
        pooling (`str`, *optional*):
            The embedding a CDCL model returns (`pooler_output`), in place of its config's: ``"cls"``, ``"mean"``
            (of the patch tokens) or ``"cls+mean"`` (both, concatenated). Training feeds the DINO head one readout;
            another may embed better, as DINO's linear evaluation reads the CLS and mean patch tokens of a model
            trained on the CLS alone. Other architectures pool their own way and are refused.

    Returns:
        `tuple`: The model and its image processor (or ``None``, see ``allow_default_processor``).

    Raises:
        FileNotFoundError, ValueError: A refused folder (see :func:`check_model_folder`), a missing processor, or a
            ``pooling`` the model cannot take.
    """
    # The CDCL classes are registered with the Auto classes by cdcl_hf/__init__.py, already imported here.
    from transformers import AutoModel

    folder = check_model_folder(model_name_or_path)
    missing = (
        f"checkpoint {model_name_or_path} has no {PROCESSOR_FILE}, so how its training normalised the images is "
        "unknown; save the image processor it was trained with into it (CDCLImageProcessor(...).save_pretrained(...)), "
        "or pass --allow_default_processor (allow_default_processor=True) to standardise each image on its own"
    )
    has_processor = folder is None or (folder / PROCESSOR_FILE).is_file()
    if not has_processor and not allow_default_processor:
        raise ValueError(missing)  # before the model is loaded: a refusal should cost nothing
    model = AutoModel.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    if pooling is not None:
        set_pooling(model, pooling, where=str(model_name_or_path))
    processor = None
    if has_processor:
        try:
            processor = _load_processor(model_name_or_path, trust_remote_code, revision)
        except OSError as error:
            # A Hub repository without a processor; any other failure (a broken processor file) is the user's to see.
            if folder is not None or PROCESSOR_FILE not in str(error):
                raise
            if not allow_default_processor:
                raise ValueError(missing) from None
    if processor is None:
        logger.warning("checkpoint %s has no image processor; standardising each image on its own "
                       "(--allow_default_processor)", model_name_or_path)
    return model, processor


def _load_processor(model_name_or_path: str, trust_remote_code: bool, revision: str | None) -> Any:
    """The checkpoint's image processor; a CDCL one whenever its config names the CDCL class.

    A published 3-channel repository's preprocessor_config.json serves two loaders (see `cdcl_hf.publishing`): its
    `auto_map` names the CDCL processor, its `image_processor_type` a stock one for the no-custom-code pipeline.
    Without trust_remote_code `AutoImageProcessor` would pick the stock one, whose fixed 8-bit normalisation is not
    what the model was trained with, so the installed CDCL class is used instead.
    """
    from transformers import AutoImageProcessor

    from .image_processing_cdcl import CDCLImageProcessor

    config, _ = CDCLImageProcessor.get_image_processor_dict(model_name_or_path, revision=revision)
    if "CDCLImageProcessor" in str(config.get("auto_map", {}).get("AutoImageProcessor", "")):
        return CDCLImageProcessor.from_pretrained(model_name_or_path, revision=revision)
    return AutoImageProcessor.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code, revision=revision)


def model_num_channels(model: Any) -> int | None:
    """The input channel count a model's config declares (``None`` if it declares none)."""
    return getattr(getattr(model, "config", None), "num_channels", None)


def channels_are_named(names: Sequence[str] | None) -> bool:
    """Whether ``names`` say which stain each channel is: not ``None``, not empty and not all default names
    (``channel_0``, ``channel_1``, ... as the builder names channels nobody named)."""
    return bool(names) and not all(DEFAULT_CHANNEL_NAME.fullmatch(str(name)) for name in names)


def model_channel_names(model: Any, processor: Any = None) -> list[str] | None:
    """The channel names a checkpoint was trained on, from its image processor or its config (``None`` if unnamed).

    Raises:
        ValueError: The processor and the config both name the channels, differently (an inconsistent checkpoint).
    """
    processor_names = getattr(processor, "channel_names", None)
    config_names = getattr(getattr(model, "config", None), "channel_names", None)
    if channels_are_named(processor_names) and channels_are_named(config_names):
        if list(processor_names) != list(config_names):
            raise ValueError(
                f"the checkpoint is inconsistent: its image processor names the channels {list(processor_names)} "
                f"but its config {list(config_names)}; fix channel_names in preprocessor_config.json or config.json"
            )
    for names in (processor_names, config_names):
        if channels_are_named(names):
            return [str(name) for name in names]
    return None


_REPORTED_UNNAMED: set[tuple] = set()


def _report_unnamed_once(data_names: Sequence[str] | None, model_names: Sequence[str] | None, where: str) -> None:
    key = (tuple(data_names or ()), tuple(model_names or ()), where)
    if key in _REPORTED_UNNAMED:
        return
    _REPORTED_UNNAMED.add(key)
    if model_names is None and channels_are_named(data_names):
        logger.warning("the model does not name its channels, so the order of the channels of %s %s is not checked",
                       where, list(data_names))
    elif model_names is not None:
        logger.warning("the channels of %s are not named, so they are taken to be in the model's order %s without a "
                       "check (name them to have the order checked)", where, list(model_names))


def _order_hint(data_names: Sequence[str], model_names: Sequence[str]) -> str:
    if sorted(data_names) == sorted(model_names) and len(set(data_names)) == len(data_names):
        return f"reorder them with --channel_order {' '.join(model_names)} (channel_order= in Python)"
    return ("say which of them feeds each model channel with --channel_order NAME_OR_INDEX ... (in the model's order), "
            "or rename them with --channel_map DATA_NAME=MODEL_NAME ... (channel_order= / channel_map= in Python)")


def match_channels(
    model: Any,
    processor: Any,
    num_channels: int,
    channel_names: Sequence[str] | None = None,
    channel_map: Mapping[str, str] | None = None,
    channel_order: Sequence[str | int] | None = None,
    where: str = "the dataset",
) -> list[int] | None:
    """Check that images of ``num_channels`` channels named ``channel_names`` fit a model, or say how to reorder them.

    Without ``channel_map`` / ``channel_order`` the data must have the model's channel count and, when both sides
    name their channels, the model's names in the model's order: any difference raises, naming both orders. A side
    whose channels are unnamed (``None`` or default names) is not checked; that is logged once.

    Args:
        model, processor:
            The checkpoint (see :func:`model_channel_names`, :func:`model_num_channels`); ``processor`` may be ``None``.
        num_channels (`int`):
            The images' channel count, as stored.
        channel_names (`Sequence[str]`, *optional*):
            The images' channel names, in stored order (a screen's ``channel_names`` column).
        channel_map (`Mapping[str, str]`, *optional*):
            ``{data name: model name}``: renames data channels (unmapped ones keep their names); the renamed channels
            must be exactly the model's, and are reordered to the model's order.
        channel_order (`Sequence[str | int]`, *optional*):
            The data channels (names, or 0-based indices) that feed the model's channels, in the model's order; may
            leave data channels out.
        where (`str`, defaults to `"the dataset"`):
            What the images are, for messages.

    Returns:
        `list[int]` or `None`: Indices of the stored channels in the model's order (``image[order]``), or ``None``
        when the images are already in the model's order.

    Raises:
        ValueError: The channels do not fit, or the options are inconsistent; the message names both orders.
    """
    model_names = model_channel_names(model, processor)
    data_names = [str(name) for name in channel_names] if channel_names is not None else None
    if data_names is not None and len(data_names) != num_channels:
        raise ValueError(f"{len(data_names)} channel names {data_names} are given for {where}, but its images have "
                         f"{num_channels} channels")
    if channel_map and channel_order:
        raise ValueError("give either a channel map (--channel_map) or a channel order (--channel_order), not both")
    order: list[int] | None = None
    if channel_order:
        order = []
        for entry in channel_order:
            text = str(entry)
            if data_names is not None and text in data_names:
                order.append(data_names.index(text))
            elif text.isdigit() and int(text) < num_channels:
                order.append(int(text))
            else:
                known = f"names {data_names} or " if data_names is not None else ""
                raise ValueError(
                    f"channel order entry {text!r} is not a channel of {where} (its {known}indices 0..{num_channels - 1})"
                )
        if len(set(order)) != len(order):
            raise ValueError(f"channel order {list(channel_order)} uses a channel of {where} more than once")
    elif channel_map:
        if not channels_are_named(data_names) or model_names is None:
            raise ValueError(
                f"a channel map needs named channels on both sides, but those of {where} are {data_names} and the model's "
                f"{model_names}; give the order instead (--channel_order NAME_OR_INDEX ...)"
            )
        unknown = [name for name in channel_map if name not in data_names]
        if unknown:
            raise ValueError(f"the channel map names {unknown}, which are not channels of {where}: {data_names}")
        renamed = [channel_map.get(name, name) for name in data_names]
        if sorted(renamed) != sorted(model_names) or len(set(renamed)) != len(renamed):
            raise ValueError(
                f"after the channel map {dict(channel_map)}, the channels of {where} are {renamed} but the model's are "
                f"{model_names}; map every data channel onto a different model channel"
            )
        order = [renamed.index(name) for name in model_names]
    elif model_names is not None and channels_are_named(data_names):
        _check_counts(model, processor, num_channels, where)
        if data_names != model_names:
            raise ValueError(
                f"the channels of {where} are {data_names} but the model was trained on {model_names}, in this order; "
                f"{_order_hint(data_names, model_names)}"
            )
        return None
    else:
        _report_unnamed_once(data_names if channels_are_named(data_names) else None, model_names, where)
    _check_counts(model, processor, len(order) if order is not None else num_channels, where)
    if order is None or order == list(range(num_channels)):
        return None
    chosen = [data_names[i] for i in order] if data_names is not None else order
    key = ("order", tuple(map(str, chosen)), tuple(model_names or ()), where)
    if key not in _REPORTED_UNNAMED:  # once, though evaluation checks before extracting and extraction again
        _REPORTED_UNNAMED.add(key)
        logger.info("feeding the channels %s of %s to the model's channels %s", chosen, where,
                    model_names if model_names is not None else list(range(len(order))))
    return order


def _check_counts(model: Any, processor: Any, num_channels: int, where: str) -> None:
    expected = model_num_channels(model)
    if expected is not None and num_channels != expected:
        raise ValueError(
            f"the images of {where} have {num_channels} channels but the model expects {expected}; "
            "use a checkpoint trained on this stain set, choose the model's channels with --channel_order, or rebuild "
            "the patch embedding (CDCLModel.from_vit_checkpoint(..., num_channels=...))"
        )
    processor_channels = getattr(processor, "num_channels", None)
    if processor_channels is not None and num_channels != processor_channels:
        raise ValueError(
            f"the images of {where} have {num_channels} channels but the checkpoint's image processor expects "
            f"{processor_channels}"
        )


def check_channel_count(model: Any, processor: Any, num_channels: int, channel_names: Sequence[str] | None = None) -> None:
    """Raise ``ValueError`` when images of ``num_channels`` channels (named ``channel_names``, in stored order) do not
    fit ``model`` or ``processor``: another channel count, or, both sides named, other names or another order.

    :func:`match_channels` without a map or an order; use that to reorder.
    """
    match_channels(model, processor, num_channels, channel_names)


def permute_normalization(normalization: PlateNormalization | None, order: Sequence[int] | None):
    """``normalization`` (statistics per stored channel) for images whose channels were reordered by ``order``."""
    if normalization is None or order is None or not normalization.per_plate:
        return normalization
    index = list(order)
    return PlateNormalization(
        normalization.mode,
        {plate: (mean[index], std[index]) for plate, (mean, std) in normalization.statistics.items()},
        std_floor=normalization.std_floor,
        plate_column=normalization.plate_column,
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


def default_processor(model: Any, num_channels: int) -> Any:
    """A per-image-standardising `CDCLImageProcessor` at the model's image size, for a checkpoint without one."""
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


def _embed(model: Any, pixel_values: Any, augmentation: str) -> np.ndarray:
    return augmented_embedding(model, pixel_values, augmentation).float().cpu().numpy()


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
    channel_map: Mapping[str, str] | None = None,
    channel_order: Sequence[str | int] | None = None,
    test_time_augmentation: str = "none",
    compile_model: bool = False,
    linear_kernel: str = "auto",
) -> pd.DataFrame:
    """Embed every image of a screen dataset; one row per image, metadata as ``Metadata_*`` columns.

    ``model``: a CDCL model or any transformers image model whose output has ``pooler_output``
    (else its first token is used). ``dataset``: a screen ``datasets.Dataset`` / ``IterableDataset``
    (schema: docs/dataset-schema.md). With ``tile_size`` each image is cut into ``tile_size`` squares every
    ``tile_stride`` pixels (default: non-overlapping, the last tile flush with the edge); the image's
    embedding is the mean of its tiles' embeddings (multi-crop averaging for large fields).
    ``normalization``: a per-plate `cdcl_hf.normalization.PlateNormalization` (see
    `PlateNormalization.for_processor`), with statistics per channel as the screen stores them; each image is then
    processed with its plate's ``image_mean`` / ``image_std``, as training normalised it. Runs on ``device``
    (default: CUDA when available), in inference mode, with a tqdm progress bar (a streamed dataset has no length, so
    the bar only counts). ``test_time_augmentation`` (``"none"``, ``"flips"`` or ``"dihedral"``, see
    `cdcl_hf.embedding.symmetry_views`): each image's (or tile's) embedding is the mean over its mirrored / turned
    copies, which all go through the model in the same forward pass. ``compile_model``: run the model through
    `cdcl_hf.embedding.compiled_for_inference` (the same embeddings to float rounding, ~2x faster on an AMD CPU once
    compiled). ``linear_kernel``: without ``compile_model``, the CPU kernel of the linear layers
    (`cdcl_hf.cpu_kernels.cpu_linear_kernel`; by default oneDNN's, ~1.9x the BLAS on an AMD CPU).

    Channels: the screen's ``channel_names`` are checked against the model's (:func:`match_channels`): another
    count, or other names or order when both sides name them, raises ``ValueError`` naming both orders, unless
    ``channel_map`` (``{data name: model name}``) or ``channel_order`` (data channels in the model's order) says
    how the screen's channels feed the model's; the images (and the normalisation statistics) are then reordered.
    Every row must carry the first row's channel names.
    """
    import torch
    from tqdm.auto import tqdm

    if test_time_augmentation not in TEST_TIME_AUGMENTATIONS:
        raise ValueError(
            f"test_time_augmentation must be one of {TEST_TIME_AUGMENTATIONS}, got {test_time_augmentation!r}"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    forward = inference_forward(model, compile_model, linear_kernel)
    total = len(dataset) if hasattr(dataset, "__len__") else None

    embeddings: list[np.ndarray] = []
    metadata_rows: list[dict[str, Any]] = []
    reference: tuple[int, list[str] | None] | None = None  # the first row's channel count and names
    order: list[int] | None = None
    with torch.inference_mode(), tqdm(total=total, desc="embedding", unit="img", disable=not progress) as bar:
        for batch in dataset.iter(batch_size=batch_size):
            images = [decode_image(value) for value in batch["image"]]
            names = batch.get(CHANNEL_NAMES_COLUMN)
            if reference is None:
                first_names = list(names[0]) if names is not None and names[0] is not None else None
                reference = (images[0].shape[0], first_names)
                order = match_channels(model, processor, images[0].shape[0], first_names, channel_map, channel_order)
                normalization = permute_normalization(normalization, order)
            for index, image in enumerate(images):
                row_names = list(names[index]) if names is not None and names[index] is not None else None
                if image.shape[0] != reference[0] or row_names != reference[1]:
                    raise ValueError(
                        f"dataset row {len(embeddings) + index} has {image.shape[0]} channels {row_names}, but the "
                        f"first row {reference[0]} channels {reference[1]}; every row of a screen must store the "
                        "same channels in the same order"
                    )
            if order is not None:
                images = [image[order] for image in images]
            if processor is None:
                processor = default_processor(model, images[0].shape[0])
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
            tile_embeddings = _embed(forward, pixel_values, test_time_augmentation)
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
