"""The screen dataset schema: one row per field of view (or crop), pixels next to their metadata.

Layout (see docs/dataset-schema.md for the user-facing description):

* ``image``: ``List(Image())``: one single-channel lossless PNG per channel, in channel order. PNG
  stores 8- and 16-bit greyscale exactly, so uint8 and uint16 pixels round-trip bit for bit and the
  decoded dtype is the original one. A plain ``Image()`` cannot hold more than 4 channels or 16-bit
  colour, and ``Array3D`` comes back as int64 from the numpy/torch formatters, hence the list.
* ``channel_names``: ``List(string)``: the channel names, repeated on every row. A per-row column is
  the one place that survives every path a dataset takes (save_to_disk, parquet shards on the Hub,
  streaming, ``map``/``filter``/``concatenate``); parquet dictionary-encodes it, so it costs next to
  nothing. Read it with :func:`screen_channel_names`.
* the standard metadata columns in :data:`METADATA_FEATURES`, all required. Extra columns are kept.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
from PIL import Image as PILImage

# Image decoding and the pixel errors live in image_io, which cannot import this module; they are
# re-exported here because the package, its tests and users import them from screen_data.
from .image_io import (  # noqa: F401
    SUPPORTED_DTYPES,
    ImageReadError,
    ImageShapeError,
    MissingImageError,
    ScreenDataError,
    decode_image,
)

logger = logging.getLogger(__name__)

IMAGE_COLUMN = "image"
CHANNEL_NAMES_COLUMN = "channel_names"

# Order matters only for readability of the saved schema.
METADATA_FEATURES: dict[str, datasets.Value] = {
    "plate": datasets.Value("string"),
    "well": datasets.Value("string"),
    "site": datasets.Value("string"),
    "batch": datasets.Value("string"),
    "compound": datasets.Value("string"),
    "concentration": datasets.Value("float64"),
    "treatment": datasets.Value("string"),
    "moa": datasets.Value("string"),
    "is_control": datasets.Value("bool"),
}
REQUIRED_COLUMNS: tuple[str, ...] = tuple(METADATA_FEATURES)
# Columns a user may leave out of their table because they have a well-defined default.
DERIVABLE_COLUMNS: tuple[str, ...] = ("treatment", "moa")
# A missing value is allowed only in these columns (moa is unknown for many screens).
NULLABLE_COLUMNS: tuple[str, ...] = ("moa",)

PNG_COMPRESS_LEVEL = 3  # zlib level: lossless either way; 3 is ~3x faster than 6 at ~3% bigger files


class MissingColumnError(ScreenDataError):
    """A required metadata column is absent."""


class DuplicateRowError(ScreenDataError):
    """Two metadata rows name the same image(s)."""


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


def screen_features(extra_features: Mapping[str, Any] | None = None) -> datasets.Features:
    """The ``datasets.Features`` of a screen dataset, with optional extra (kept) columns."""
    features = {
        IMAGE_COLUMN: datasets.List(datasets.Image()),
        CHANNEL_NAMES_COLUMN: datasets.List(datasets.Value("string")),
        **METADATA_FEATURES,
    }
    for name, feature in (extra_features or {}).items():
        if name not in features:
            features[name] = feature
    return datasets.Features(features)


def default_treatment(compound: str, concentration: float) -> str:
    """The treatment id used when the table has none: ``"taxol@0.3"``; ``"DMSO@0"`` for vehicle."""
    return f"{compound}@{float(concentration):g}"


def default_channel_names(num_channels: int) -> list[str]:
    return [f"channel_{index}" for index in range(num_channels)]


def apply_column_mapping(table: pd.DataFrame, column_mapping: Mapping[str, str] | None) -> pd.DataFrame:
    """Rename the user's columns to the standard names: ``{"Metadata_Plate": "plate", ...}``.

    A mapping whose source column is absent is an error (a typo would otherwise silently leave a
    required column missing); so is mapping two columns onto one standard name.
    """
    if not column_mapping:
        return table
    missing = [source for source in column_mapping if source not in table.columns]
    if missing:
        raise MissingColumnError(
            f"column_mapping names column(s) {missing} that the table does not have; "
            f"table columns: {list(table.columns)}"
        )
    targets = list(column_mapping.values())
    duplicated = sorted({t for t in targets if targets.count(t) > 1})
    if duplicated:
        raise ScreenDataError(f"column_mapping maps several columns onto {duplicated}")
    clashing = [
        t for source, t in column_mapping.items() if t in table.columns and t not in column_mapping and t != source
    ]
    if clashing:
        raise ScreenDataError(
            f"column_mapping renames onto {clashing}, but the table already has column(s) of that name"
        )
    return table.rename(columns=dict(column_mapping))


def _parse_pairs(pairs: Iterable[str] | None, syntax: str) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for entry in pairs or ():
        key, sep, value = entry.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"expected {syntax}, got {entry!r}")
        if key in parsed:
            raise ValueError(f"{entry!r}: {key!r} is already given ({key}={parsed[key]})")
        parsed[key] = value
    return parsed


def parse_column_mapping(pairs: Iterable[str] | None) -> dict[str, str]:
    """``["Metadata_Plate=plate", ...]`` (command-line ``THEIRS=STANDARD``) -> ``{"Metadata_Plate": "plate"}``.

    The result is the ``column_mapping`` that :func:`load_screen` and the dataset builders take; empty
    for ``None`` or ``[]``. An entry without ``=``, with an empty side, or naming a column already
    mapped raises ``ValueError`` naming that entry. Everything after the first ``=`` is the target.
    """
    return _parse_pairs(pairs, "THEIRS=STANDARD (e.g. Metadata_Plate=plate)")


def parse_channel_map(pairs: Iterable[str] | None) -> dict[str, str]:
    """``["DAPI=DNA", ...]`` (command-line ``DATA=MODEL``) -> ``{"DAPI": "DNA"}``: the data's channel names renamed
    to the model's (``channel_map`` of :func:`cdcl_hf.profiling.match_channels`). Errors as in
    :func:`parse_column_mapping`.
    """
    return _parse_pairs(pairs, "DATA=MODEL channel names (e.g. DAPI=DNA)")


def parse_column_selection(pairs: Iterable[str] | None) -> dict[str, list[str]]:
    """``["plate=P1,P2", ...]`` (command-line ``COLUMN=V1,V2``) -> ``{"plate": ["P1", "P2"]}``.

    The ``select`` argument of the dataset builders: keep rows whose ``COLUMN`` is one of the values.
    Errors as in :func:`parse_column_mapping`.
    """
    return {column: allowed.split(",")
            for column, allowed in _parse_pairs(pairs, "COLUMN=V1,V2 (e.g. plate=P1,P2)").items()}


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _as_bool(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer, float, np.floating)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in {"true", "false", "1", "0", "yes", "no"}:
        return value.strip().lower() in {"true", "1", "yes"}
    raise ValueError(f"expected a boolean (true/false/1/0), got {value!r}")


def _as_text(value: Any) -> str:
    # Integers read by pandas as floats (site 1 -> 1.0) must not turn into "1.0".
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def check_metadata(
    table: pd.DataFrame,
    column_mapping: Mapping[str, str] | None = None,
    row_labels: Sequence[str] | None = None,
    nullable: Iterable[str] = NULLABLE_COLUMNS,
) -> tuple[pd.DataFrame, dict[int, str]]:
    """Coerce a metadata table to the standard schema and find its bad rows.

    Returns the coerced table (same rows, same order, index reset) and ``{row position: reason}``
    for rows with an empty required value, a non-numeric concentration or a non-boolean
    ``is_control``. A missing required *column* raises :class:`MissingColumnError` at once.
    ``treatment`` defaults to ``compound@concentration``; ``moa`` to missing.
    """
    table = apply_column_mapping(table.copy(), column_mapping).reset_index(drop=True)
    labels = list(row_labels) if row_labels is not None else [f"metadata row {i}" for i in range(len(table))]
    nullable = set(nullable)
    if "moa" not in table.columns:
        table["moa"] = None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns and c not in DERIVABLE_COLUMNS]
    if missing:
        raise MissingColumnError(
            f"required column(s) {missing} missing from the metadata table; columns present: "
            f"{list(table.columns)} (map your own names with column_mapping={{'your_name': 'plate', ...}})"
        )
    problems: dict[int, str] = {}

    def note(position: int, column: str, reason: str) -> None:
        problems.setdefault(position, f"{labels[position]}, column {column!r}: {reason}")

    for column in REQUIRED_COLUMNS:
        if column in nullable or column not in table.columns:
            continue
        for position, value in enumerate(table[column]):
            if _is_missing(value) or str(value).strip() == "":
                note(position, column, "required value is empty")
    concentrations = []
    for position, value in enumerate(table["concentration"]):
        try:
            concentrations.append(math.nan if _is_missing(value) else float(value))
        except (TypeError, ValueError):
            note(position, "concentration", f"expected a number, got {value!r}")
            concentrations.append(math.nan)
    table["concentration"] = np.asarray(concentrations, dtype="float64")
    flags = []
    for position, value in enumerate(table["is_control"]):
        try:
            flags.append(False if _is_missing(value) else _as_bool(value))
        except ValueError as error:
            note(position, "is_control", str(error))
            flags.append(False)
    table["is_control"] = flags
    for column in ("plate", "well", "site", "batch", "compound"):
        table[column] = ["" if _is_missing(v) else _as_text(v) for v in table[column]]
    if "treatment" not in table.columns:
        table["treatment"] = [
            default_treatment(c, x) if not math.isnan(x) else c
            for c, x in zip(table["compound"], table["concentration"], strict=True)
        ]
    else:
        table["treatment"] = ["" if _is_missing(v) else _as_text(v) for v in table["treatment"]]
    table["moa"] = [None if _is_missing(v) else str(v) for v in table["moa"]]
    return table, dict(sorted(problems.items()))


def normalize_metadata(
    table: pd.DataFrame,
    column_mapping: Mapping[str, str] | None = None,
    row_labels: Sequence[str] | None = None,
    nullable: Iterable[str] = NULLABLE_COLUMNS,
) -> pd.DataFrame:
    """:func:`check_metadata` that raises :class:`ScreenDataError` on the first bad row."""
    table, problems = check_metadata(table, column_mapping, row_labels, nullable)
    if problems:
        raise ScreenDataError(next(iter(problems.values())))
    return table


def validate_screen_features(features: datasets.Features | None, where: str = "dataset") -> None:
    """Raise :class:`MissingColumnError` unless ``features`` has the image and required columns."""
    if features is None:
        return  # a streamed dataset without known features; rows are checked when decoded
    missing = [c for c in (IMAGE_COLUMN, *REQUIRED_COLUMNS) if c not in features]
    if missing:
        raise MissingColumnError(
            f"{where} lacks required column(s) {missing}; it has {list(features)}. "
            "Pass column_mapping={'their_name': 'standard_name'} to rename."
        )


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------


def check_pixel_array(array: np.ndarray, where: str) -> np.ndarray:
    """Validate a (C, H, W) uint8/uint16 array; returns it C-contiguous."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise ImageShapeError(f"{where}: expected a (C, H, W) array, got shape {array.shape}")
    if array.dtype not in SUPPORTED_DTYPES:
        raise ImageShapeError(
            f"{where}: expected uint8 or uint16 pixels (stored losslessly as PNG), got {array.dtype}"
        )
    if min(array.shape) == 0:
        raise ImageShapeError(f"{where}: empty image of shape {array.shape}")
    return np.ascontiguousarray(array)


def encode_channel(plane: np.ndarray) -> dict[str, Any]:
    """One (H, W) uint8/uint16 plane as a lossless PNG in the ``Image()`` storage format."""
    buffer = io.BytesIO()
    PILImage.fromarray(np.ascontiguousarray(plane)).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return {"bytes": buffer.getvalue(), "path": None}


def encode_image(array: np.ndarray, where: str = "image") -> list[dict[str, Any]]:
    """A (C, H, W) uint8/uint16 array as the value of the ``image`` column."""
    array = check_pixel_array(array, where)
    return [encode_channel(plane) for plane in array]


# --------------------------------------------------------------------------------------------
# Building from arrays
# --------------------------------------------------------------------------------------------


def _extra_feature_for(series: pd.Series) -> Any:
    """A ``datasets`` feature for an extra column, inferred the way Arrow would infer it."""
    import pyarrow as pa

    arrow_type = pa.array(series.astype(object).where(series.notna(), None).tolist(), from_pandas=True).type
    if pa.types.is_null(arrow_type):
        return datasets.Value("string")
    return datasets.features.features.generate_from_arrow_type(arrow_type)


def dataset_from_arrays(
    images: Sequence[np.ndarray] | np.ndarray,
    metadata: pd.DataFrame,
    channel_names: Sequence[str] | None = None,
    column_mapping: Mapping[str, str] | None = None,
) -> datasets.Dataset:
    """An in-memory screen dataset from (C, H, W) uint8/uint16 arrays and a metadata table.

    ``images``: a sequence of (C, H, W) arrays or one (N, C, H, W) array; all must share channel
    count, size and dtype. ``metadata``: one row per image with the required columns (``treatment``
    and ``moa`` may be omitted); extra columns are kept.
    """
    if len(images) != len(metadata):
        raise ScreenDataError(f"got {len(images)} images but {len(metadata)} metadata rows")
    if len(metadata) == 0:
        raise ScreenDataError("cannot build a screen dataset from zero images")
    table = normalize_metadata(metadata, column_mapping)
    reference = check_pixel_array(images[0], "image 0")
    names = list(channel_names) if channel_names is not None else default_channel_names(reference.shape[0])
    if len(names) != reference.shape[0]:
        raise ImageShapeError(f"channel_names has {len(names)} names but images have {reference.shape[0]} channels")
    encoded = []
    for index, array in enumerate(images):
        array = check_pixel_array(array, f"image {index}")
        if array.shape != reference.shape or array.dtype != reference.dtype:
            raise ImageShapeError(
                f"image {index}: expected shape {reference.shape} {reference.dtype} like image 0, "
                f"got {array.shape} {array.dtype}"
            )
        encoded.append(encode_image(array))
    extra_columns = [c for c in table.columns if c not in REQUIRED_COLUMNS and c not in (IMAGE_COLUMN, CHANNEL_NAMES_COLUMN)]
    features = screen_features({c: _extra_feature_for(table[c]) for c in extra_columns})
    columns: dict[str, list] = {IMAGE_COLUMN: encoded, CHANNEL_NAMES_COLUMN: [names] * len(table)}
    for column in features:
        if column not in columns:
            columns[column] = table[column].astype(object).where(table[column].notna(), None).tolist()
    return datasets.Dataset.from_dict(columns, features=features)


def screen_channel_names(dataset: datasets.Dataset | datasets.IterableDataset | Mapping[str, Any]) -> list[str]:
    """The channel names of a screen dataset (or of one row)."""
    if isinstance(dataset, Mapping) and CHANNEL_NAMES_COLUMN in dataset:
        return list(dataset[CHANNEL_NAMES_COLUMN])
    column_names = dataset.column_names
    if column_names is not None and CHANNEL_NAMES_COLUMN not in column_names:
        raise MissingColumnError(f"dataset has no {CHANNEL_NAMES_COLUMN!r} column; columns: {column_names}")
    if isinstance(dataset, datasets.Dataset):
        if len(dataset) == 0:
            raise ScreenDataError("dataset is empty; its channel names are unknown")
        return list(dataset[0][CHANNEL_NAMES_COLUMN])
    first = next(iter(dataset.select_columns([CHANNEL_NAMES_COLUMN])), None)
    if first is None:
        raise ScreenDataError("dataset is empty; its channel names are unknown")
    return list(first[CHANNEL_NAMES_COLUMN])


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


# Suffixes of files a command reads or writes; a Hub repository name ending in one is not plausible.
_FILE_SUFFIXES = frozenset(
    ".arrow .bin .csv .gz .h5 .json .jsonl .md .npy .npz .parquet .pkl .png .pt .pth .safetensors .tar .tif .tiff "
    ".tsv .txt .yaml .yml .zip".split()
)


def looks_like_local_path(name: str | os.PathLike) -> bool:
    """Whether ``name`` can only mean a local file or folder, never a Hub repository id.

    True for a ``Path``, and for a string that starts with ``.``, ``/`` or ``~``, contains a backslash, has more
    than one ``/`` (Hub ids are ``name`` or ``org/name``) or ends in a file suffix (``.csv``, ``.parquet``, ...).
    Such a name that does not exist is a typo to report, not a repository to look up on the Hub.

    Args:
        name (`str` or `os.PathLike`):
            What the user passed (``--model``, ``--dataset_name``).

    Returns:
        `bool`: Whether ``name`` is a local path.
    """
    if isinstance(name, os.PathLike):
        return True
    text = str(name)
    return (
        text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
        or Path(text).suffix.lower() in _FILE_SUFFIXES
    )


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_dict.json", "dataset_info.json", "state.json"))


def _rename_streamed_columns(dataset: datasets.IterableDataset, column_mapping: dict[str, str]) -> datasets.IterableDataset:
    """``dataset.rename_columns(column_mapping)`` that leaves the images as they are stored.

    ``IterableDataset.rename_columns`` is a ``map``: each row is decoded before the rename (images to
    PIL) and encoded again after it, which re-compresses every image to PNG as the stream is read.
    Renaming with decoding switched off passes the stored bytes through; casting back to the original
    features (renamed) restores lazy decoding where the rows are consumed. Threaded decoding that
    ``load_dataset`` may have set up (image folders on the Hub; not parquet screens) is not restored.
    """
    features = dataset.features
    if features is None:  # nothing is decoded, so nothing is re-encoded
        return dataset.rename_columns(column_mapping)
    missing = [source for source in column_mapping if source not in features]
    if missing:  # the stream itself would only fail once iterated
        raise MissingColumnError(
            f"column_mapping names column(s) {missing} that the dataset does not have; columns: {list(features)}"
        )
    renamed_features = datasets.Features(
        {column_mapping.get(name, name): feature for name, feature in features.copy().items()}
    )
    return dataset.decode(False).rename_columns(column_mapping).cast(renamed_features)


def load_screen(
    name_or_path: str | os.PathLike,
    split: str | None = "train",
    streaming: bool = False,
    revision: str | None = None,
    column_mapping: Mapping[str, str] | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
) -> datasets.Dataset | datasets.IterableDataset | datasets.DatasetDict | datasets.IterableDatasetDict:
    """Load a screen dataset from a local folder or a Hub dataset id, checking its schema.

    * a folder written by the builder (``save_to_disk``) is memory-mapped; with ``streaming=True``
      it is turned into an ``IterableDataset`` (one shard per arrow file);
    * any other folder (e.g. a clone of a Hub repo with parquet shards) or a Hub id goes through
      ``datasets.load_dataset``; ``streaming=True`` reads the Hub parquet shards without downloading
      the dataset.

    ``split=None`` returns every split. ``column_mapping`` renames the dataset's own columns to the
    standard names (``{"Metadata_Plate": "plate"}``) before the required columns are checked.
    Decode pixels with :func:`decode_image`.
    """
    path = Path(name_or_path).expanduser()
    column_mapping = dict(column_mapping or {})
    if not path.exists() and looks_like_local_path(name_or_path):
        raise FileNotFoundError(
            f"dataset {os.fspath(name_or_path)} does not exist (a local path, so it is not looked up on the Hub); "
            "check the path"
        )
    if path.is_dir() and _is_saved_dataset(path):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict) and split is not None:
            if split not in loaded:
                raise ScreenDataError(f"{path} has no split {split!r}; splits: {list(loaded)}")
            loaded = loaded[split]
        if column_mapping:  # on the arrow table, before streaming: a rename of the schema only
            loaded = loaded.rename_columns(column_mapping)
            column_mapping = {}
        if streaming:
            if isinstance(loaded, datasets.DatasetDict):
                loaded = datasets.IterableDatasetDict(
                    {name: part.to_iterable_dataset(num_shards=max(1, len(part.cache_files))) for name, part in loaded.items()}
                )
            else:
                loaded = loaded.to_iterable_dataset(num_shards=max(1, len(loaded.cache_files)))
    elif path.exists() and not path.is_dir():
        raise ScreenDataError(f"{path} is a file; expected a dataset folder or a Hub dataset id")
    else:
        try:
            loaded = datasets.load_dataset(
                str(name_or_path), split=split, streaming=streaming, revision=revision, cache_dir=cache_dir,
                token=token,
            )
        except datasets.exceptions.DatasetNotFoundError as error:
            raise FileNotFoundError(
                f"{name_or_path} is neither a local dataset folder nor a dataset on the Hub ({error})"
            ) from error
    if column_mapping:
        if isinstance(loaded, datasets.IterableDatasetDict):
            loaded = datasets.IterableDatasetDict(
                {name: _rename_streamed_columns(part, column_mapping) for name, part in loaded.items()}
            )
        elif isinstance(loaded, datasets.IterableDataset):
            loaded = _rename_streamed_columns(loaded, column_mapping)
        else:
            loaded = loaded.rename_columns(column_mapping)
    parts = loaded.values() if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)) else [loaded]
    for part in parts:
        validate_screen_features(part.features, where=str(name_or_path))
    return loaded
