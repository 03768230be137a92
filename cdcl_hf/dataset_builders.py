"""Build screen datasets (cdcl_hf.screen_data schema) from images on disk.

Three layouts are read into a :class:`ScreenSource` (a list of rows, each naming its image file(s)):

* :func:`folder_source`: a metadata CSV naming one multi-channel file or one file per channel per
  row (npy / tif / tiff / png or another format Pillow reads; see :mod:`cdcl_hf.image_io`);
* :func:`bbbc021_source`: the official BBBC021 download (``BBBC021_v1_image.csv``,
  ``BBBC021_v1_moa.csv`` and the per-week TIFF folders);
* :func:`rxrx1_source`: the RxRx1 download (``metadata.csv`` + ``images/<experiment>/Plate<n>/
  <well>_s<site>_w<channel>.png``).

:func:`build_screen_dataset` then checks every row, decodes and re-encodes the pixels in worker
processes (``Dataset.from_generator(num_proc=...)``), splits, writes the dataset with
``save_to_disk`` into a temporary folder beside the output and renames it into place, writes a
dataset card, and optionally pushes parquet shards + card to the Hub.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import pandas as pd
from huggingface_hub import DatasetCard, DatasetCardData

from cdcl_hf.image_io import ChannelAxis, read_image
from cdcl_hf.outputs import (
    OUTPUT_MARKER,
    OutputSafetyError,
    check_output_not_an_input,
    is_cdcl_output,
    remove_stale_temporaries,
    temporary_prefix,
    write_output_marker,
)
from cdcl_hf.screen_data import (
    CHANNEL_NAMES_COLUMN,
    IMAGE_COLUMN,
    METADATA_FEATURES,
    NULLABLE_COLUMNS,
    REQUIRED_COLUMNS,
    DuplicateRowError,
    ImageReadError,
    ImageShapeError,
    MissingColumnError,
    MissingImageError,
    ScreenDataError,
    _extra_feature_for,
    check_metadata,
    check_pixel_array,
    default_channel_names,
    encode_image,
    screen_features,
)

logger = logging.getLogger(__name__)

SKIPPED_ROWS_FILE = "skipped_rows.csv"
CARD_FILE = "README.md"
# The output marker's kind (cdcl_hf.outputs): only a folder marked so is ever replaced (--overwrite).
OUTPUT_KIND = "screen_dataset"
OnError = Literal["raise", "skip"]


@dataclass
class ScreenRecord:
    """One output row: where its pixels are and its (already normalised) metadata."""

    label: str  # names the row for humans, e.g. "metadata.csv line 12"
    files: list[str]  # one multi-channel file, or one file per channel in channel order
    metadata: dict[str, Any]


@dataclass
class ScreenSource:
    """Everything a build needs from one layout."""

    records: list[ScreenRecord]
    channel_names: list[str] | None  # None: channel_0..channel_{C-1} once C is known
    extra_features: dict[str, Any]
    name: str
    description: str
    license: str | None = None
    homepage: str | None = None
    citation: str | None = None
    channel_axis: ChannelAxis = "auto"
    # Rows rejected while reading the table (bad metadata): {label: reason}; honoured by on_error.
    rejected: dict[str, str] = field(default_factory=dict)
    # The files and folders the layout was read from, by command-line flag ({"--image_root": path, ...}): an output
    # that is, holds or lies inside one of them is refused (it could destroy the input).
    inputs: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Reading pixels
# --------------------------------------------------------------------------------------------


def load_record_pixels(record: ScreenRecord, channel_axis: ChannelAxis = "auto") -> np.ndarray:
    """The (C, H, W) pixels of one record, checked to be uint8/uint16.

    Args:
        record (`ScreenRecord`):
            The row: one multi-channel file, or one single-channel file per channel.
        channel_axis (`str`, defaults to `"auto"`):
            Where the channels are in a multi-channel file (see :func:`cdcl_hf.image_io.to_channels_first`).

    Returns:
        `np.ndarray`: The (C, H, W) uint8 or uint16 pixels.

    Raises:
        ScreenDataError: ``MissingImageError``, ``ImageReadError`` or ``ImageShapeError``, naming the row
            and the file.
    """
    pixels = read_image(record.files, channel_axis, where=record.label)
    files = f"file {record.files[0]}" if len(record.files) == 1 else f"files {record.files}"
    return check_pixel_array(pixels, f"{record.label}, {files}")


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------


def _csv_labels(csv_path: Path, rows: int) -> list[str]:
    return [f"{csv_path.name} line {i + 2}" for i in range(rows)]  # line 1 is the header


def _records_from_table(
    table: pd.DataFrame,
    files_per_row: list[list[str]],
    labels: list[str],
    problems: dict[int, str],
) -> tuple[list[ScreenRecord], dict[str, str], dict[str, Any]]:
    extra_columns = [c for c in table.columns if c not in REQUIRED_COLUMNS and c not in (IMAGE_COLUMN, CHANNEL_NAMES_COLUMN)]
    extra_features = {c: _extra_feature_for(table[c]) for c in extra_columns}
    columns = [*REQUIRED_COLUMNS, *extra_columns]
    values = table[columns].astype(object).where(table[columns].notna(), None).to_dict(orient="records")
    records, rejected = [], {}
    for position, (label, files, metadata) in enumerate(zip(labels, files_per_row, values, strict=True)):
        if position in problems:
            rejected[label] = problems[position]
        else:
            records.append(ScreenRecord(label, files, metadata))
    return records, rejected, extra_features


def _select_rows(table: pd.DataFrame, select: Mapping[str, Sequence[str]] | None) -> pd.Series:
    keep = pd.Series(True, index=table.index)
    for column, allowed in (select or {}).items():
        if column not in table.columns:
            raise MissingColumnError(f"select names column {column!r}, which the table lacks; columns: {list(table.columns)}")
        keep &= table[column].astype(str).isin([str(v) for v in allowed])
    return keep


def _resolve(root: Path, name: str) -> str:
    path = Path(name)
    return str(path if path.is_absolute() else root / path)


def folder_source(
    metadata_csv: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    image_columns: Sequence[str] | None = None,
    channel_names: Sequence[str] | None = None,
    column_mapping: Mapping[str, str] | None = None,
    control_compounds: Sequence[str] = ("DMSO",),
    channel_axis: ChannelAxis = "auto",
    select: Mapping[str, Sequence[str]] | None = None,
    name: str | None = None,
    license: str | None = None,  # noqa: A002 - the card field's name
    description: str | None = None,
) -> ScreenSource:
    """A folder of images plus a metadata CSV naming the file(s) of each row.

    ``image_columns``: the column(s) holding file names, relative to ``image_root`` (default: the
    CSV's folder). One column = one multi-channel file per row (H, W, C or C, H, W, see
    ``channel_axis``); several = one single-channel file each, in channel order. Default: a column
    named ``file`` / ``file_name`` / ``path`` / ``image``, else every ``<channel>_file`` column (the
    channel names then default to the ``<channel>`` prefixes).
    ``is_control`` defaults to ``compound in control_compounds`` when the table has no such column.
    """
    csv_path = Path(metadata_csv)
    if not csv_path.is_file():
        raise FileNotFoundError(f"metadata CSV {csv_path} does not exist")
    root = Path(image_root) if image_root is not None else csv_path.parent
    raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False, na_values=[""])
    labels = _csv_labels(csv_path, len(raw))
    if image_columns is None:
        single = [c for c in ("file", "file_name", "path", "image") if c in raw.columns]
        per_channel = [c for c in raw.columns if re.fullmatch(r".+_file(_name)?", c)]
        if single:
            image_columns = single[:1]
        elif per_channel:
            image_columns = per_channel
            if channel_names is None:
                channel_names = [re.sub(r"_file(_name)?$", "", c) for c in per_channel]
        else:
            raise MissingColumnError(
                f"{csv_path}: no image column found; name it 'file' (one multi-channel file per row) or "
                f"'<channel>_file' (one file per channel), or pass image_columns; columns: {list(raw.columns)}"
            )
    missing = [c for c in image_columns if c not in raw.columns]
    if missing:
        raise MissingColumnError(f"{csv_path}: image column(s) {missing} not found; columns: {list(raw.columns)}")
    if channel_names is not None and len(image_columns) > 1 and len(channel_names) != len(image_columns):
        raise ImageShapeError(f"{len(channel_names)} channel names for {len(image_columns)} per-channel image columns")
    keep = _select_rows(apply_mapping_names(raw, column_mapping), select)
    raw, labels = raw[keep.to_numpy()].reset_index(drop=True), [lb for lb, k in zip(labels, keep, strict=True) if k]
    files_per_row = [[_resolve(root, row[c]) if isinstance(row[c], str) else "" for c in image_columns] for _, row in raw.iterrows()]
    metadata = _with_numeric_extras(raw.drop(columns=list(image_columns)), column_mapping)
    mapped = apply_mapping_names(metadata, column_mapping)
    if "is_control" not in mapped.columns and "compound" in mapped.columns:
        controls = {str(c) for c in control_compounds}
        metadata = metadata.assign(is_control=mapped["compound"].isin(controls).to_numpy())
    table, problems = check_metadata(metadata, column_mapping, labels)
    for position, files in enumerate(files_per_row):
        if any(f == "" for f in files):
            problems.setdefault(position, f"{labels[position]}: empty image file name in column(s) {list(image_columns)}")
    records, rejected, extra = _records_from_table(table, files_per_row, labels, problems)
    return ScreenSource(
        records=records,
        channel_names=list(channel_names) if channel_names is not None else None,
        extra_features=extra,
        name=name or csv_path.parent.name,
        description=description or f"Images under `{root.name}/` described by `{csv_path.name}`.",
        license=license,
        channel_axis=channel_axis,
        rejected=rejected,
        # The CSV's folder, the default root, is not an input folder of its own: an output beside the CSV (screen/
        # dataset next to screen/metadata.csv and screen/images/) is fine; the images' own folders are checked.
        inputs={"--metadata_csv": str(csv_path), **({"--image_root": str(root)} if image_root is not None else {})},
    )


def _with_numeric_extras(table: pd.DataFrame, column_mapping: Mapping[str, str] | None) -> pd.DataFrame:
    """Extra (non-standard) columns that are all integers or all numbers get a numeric type.

    The table is read as text so that ids such as plate "01" survive; only extras are converted.
    """
    standard = set(REQUIRED_COLUMNS)
    table = table.copy()
    for column in table.columns:
        if (column_mapping or {}).get(column, column) in standard:
            continue
        values = table[column]
        numbers = pd.to_numeric(values, errors="coerce")
        if values.notna().sum() == 0 or numbers[values.notna()].isna().any():
            continue
        if (numbers.dropna() % 1 == 0).all() and not values.dropna().str.contains(r"[.eE]").any():
            table[column] = numbers.astype("Int64")
        else:
            table[column] = numbers.astype("float64")
    return table


def apply_mapping_names(table: pd.DataFrame, column_mapping: Mapping[str, str] | None) -> pd.DataFrame:
    """The table with user columns renamed (no checks; :func:`check_metadata` does those)."""
    return table.rename(columns=dict(column_mapping)) if column_mapping else table


BBBC021_CHANNELS = ("DAPI", "Tubulin", "Actin")
BBBC021_CITATION = (
    "Caie PD et al. High-content phenotypic profiling of drug response signatures across distinct cancer "
    "cells. Mol Cancer Ther 9(6):1913-26 (2010). Ljosa V, Sokolnicki KL, Carpenter AE. Annotated "
    "high-throughput microscopy image sets for validation. Nat Methods 9(7):637 (2012)."
)


def bbbc021_source(
    image_csv: str | os.PathLike,
    moa_csv: str | os.PathLike,
    image_root: str | os.PathLike,
    select: Mapping[str, Sequence[str]] | None = None,
    license: str | None = "cc0-1.0",  # noqa: A002 - as rehosted in Cell Painting Gallery cpg0010
) -> ScreenSource:
    """The official BBBC021 download: one row per field, three single-channel TIFFs each.

    ``image_root`` holds the ``Week<N>/Week<N>_<plate>/`` folders named by ``Image_PathName_*``.
    MoA comes from ``moa_csv`` by (compound, concentration); DMSO rows are the controls.
    """
    image_csv, moa_csv, root = Path(image_csv), Path(moa_csv), Path(image_root)
    for path in (image_csv, moa_csv):
        if not path.is_file():
            raise FileNotFoundError(f"BBBC021 table {path} does not exist")
    table = pd.read_csv(image_csv, dtype=str, keep_default_na=False, na_values=[""])
    needed = [f"Image_{kind}_{channel}" for channel in BBBC021_CHANNELS for kind in ("FileName", "PathName")]
    needed += ["Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI", "Image_Metadata_Compound", "Image_Metadata_Concentration"]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise MissingColumnError(f"{image_csv}: BBBC021 column(s) {missing} missing; columns: {list(table.columns)}")
    labels = _csv_labels(image_csv, len(table))
    moa_table = pd.read_csv(moa_csv)
    moa_missing = [c for c in ("compound", "concentration", "moa") if c not in moa_table.columns]
    if moa_missing:
        raise MissingColumnError(f"{moa_csv}: column(s) {moa_missing} missing; columns: {list(moa_table.columns)}")
    moa_by_treatment = {(c, round(float(x), 9)): m for c, x, m in moa_table[["compound", "concentration", "moa"]].itertuples(index=False)}
    metadata = pd.DataFrame(
        {
            "plate": table["Image_Metadata_Plate_DAPI"],
            "well": table["Image_Metadata_Well_DAPI"],
            # File names are "<well>_s<site>_w<channel><uuid>.tif".
            "site": [m.group(1) if (m := re.search(r"_s(\d+)_", str(f))) else None for f in table["Image_FileName_DAPI"]],
            "batch": [str(p).split("/")[0] for p in table["Image_PathName_DAPI"]],
            "compound": table["Image_Metadata_Compound"],
            "concentration": table["Image_Metadata_Concentration"],
            "is_control": table["Image_Metadata_Compound"] == "DMSO",
        }
    )
    concentrations = pd.to_numeric(metadata["concentration"], errors="coerce")
    metadata["moa"] = [
        moa_by_treatment.get((c, round(float(x), 9))) if not math.isnan(x) else None
        for c, x in zip(metadata["compound"], concentrations, strict=True)
    ]
    for source, target in (("Replicate", "replicate"), ("TableNumber", "table_number"), ("ImageNumber", "image_number")):
        if source in table.columns:
            metadata[target] = pd.to_numeric(table[source], errors="coerce").astype("Int64")
    keep = _select_rows(metadata, select).to_numpy()
    table, metadata = table[keep].reset_index(drop=True), metadata[keep].reset_index(drop=True)
    labels = [lb for lb, k in zip(labels, keep, strict=True) if k]
    files_per_row = [
        [str(root / str(row[f"Image_PathName_{ch}"]) / str(row[f"Image_FileName_{ch}"])) for ch in BBBC021_CHANNELS]
        for _, row in table.iterrows()
    ]
    checked, problems = check_metadata(metadata, row_labels=labels)
    records, rejected, extra = _records_from_table(checked, files_per_row, labels, problems)
    return ScreenSource(
        records=records,
        channel_names=list(BBBC021_CHANNELS),
        extra_features=extra,
        name="BBBC021",
        description=(
            "BBBC021v1 (Broad Bioimage Benchmark Collection): MCF-7 breast cancer cells treated with 113 "
            "compounds at 8 concentrations, imaged in DAPI, tubulin and actin channels; MoA annotations from "
            "BBBC021_v1_moa.csv."
        ),
        license=license,
        homepage="https://bbbc.broadinstitute.org/BBBC021",
        citation=BBBC021_CITATION,
        channel_axis="first",
        rejected=rejected,
        inputs={"--image_csv": str(image_csv), "--moa_csv": str(moa_csv), "--image_root": str(root)},
    )


RXRX1_CHANNELS = ("Hoechst", "ConA", "Phalloidin", "SYTO14", "MitoTracker", "WGA")
RXRX1_COLUMNS = ("site_id", "well_id", "cell_type", "dataset", "experiment", "plate", "well", "site", "well_type", "sirna", "sirna_id")
RXRX1_CITATION = (
    "Sypetkowski M et al. RxRx1: A Dataset for Evaluating Experimental Batch Correction Methods. "
    "CVPR Workshops (2023)."
)


def rxrx1_source(
    root: str | os.PathLike,
    control_well_types: Sequence[str] = ("negative_control", "positive_control"),
    select: Mapping[str, Sequence[str]] | None = None,
    license: str | None = "cc-by-nc-sa-4.0",  # noqa: A002
) -> ScreenSource:
    """The RxRx1 download: ``metadata.csv`` + ``images/<experiment>/Plate<n>/<well>_s<site>_w<1..6>.png``.

    Mapping: batch = experiment; plate = ``<experiment>_<plate>`` (RxRx1 numbers plates 1-4 within
    each experiment); compound = treatment = sirna; concentration and moa are missing (None; not
    applicable); is_control = well_type in ``control_well_types``. The original columns are kept
    (``plate`` as ``plate_number``).
    """
    root = Path(root)
    csv_path = root / "metadata.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"RxRx1 metadata {csv_path} does not exist")
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, na_values=[""])
    missing = [c for c in RXRX1_COLUMNS if c not in table.columns]
    if missing:
        raise MissingColumnError(f"{csv_path}: RxRx1 column(s) {missing} missing; columns: {list(table.columns)}")
    labels = _csv_labels(csv_path, len(table))
    metadata = pd.DataFrame(
        {
            "plate": [f"{e}_{p}" for e, p in zip(table["experiment"], table["plate"], strict=True)],
            "well": table["well"],
            "site": table["site"],
            "batch": table["experiment"],
            "compound": table["sirna"],
            "concentration": math.nan,
            "treatment": table["sirna"],
            "moa": None,
            "is_control": table["well_type"].isin(list(control_well_types)),
            "experiment": table["experiment"],
            "plate_number": pd.to_numeric(table["plate"], errors="coerce").astype("Int64"),
            "site_id": table["site_id"],
            "well_id": table["well_id"],
            "cell_type": table["cell_type"],
            "dataset": table["dataset"],
            "well_type": table["well_type"],
            "sirna_id": pd.to_numeric(table["sirna_id"], errors="coerce").astype("Int64"),
        }
    )
    keep = _select_rows(metadata, select).to_numpy()
    table, metadata = table[keep].reset_index(drop=True), metadata[keep].reset_index(drop=True)
    labels = [lb for lb, k in zip(labels, keep, strict=True) if k]
    files_per_row = [
        [
            str(root / "images" / str(row["experiment"]) / f"Plate{row['plate']}" / f"{row['well']}_s{row['site']}_w{channel}.png")
            for channel in range(1, len(RXRX1_CHANNELS) + 1)
        ]
        for _, row in table.iterrows()
    ]
    checked, problems = check_metadata(metadata, row_labels=labels, nullable=(*NULLABLE_COLUMNS, "concentration"))
    records, rejected, extra = _records_from_table(checked, files_per_row, labels, problems)
    return ScreenSource(
        records=records,
        channel_names=list(RXRX1_CHANNELS),
        extra_features=extra,
        name="RxRx1",
        description=(
            "RxRx1 (Recursion): siRNA knockdowns of 1,138 genes in four cell types (HUVEC, RPE, HepG2, U2OS), "
            "51 experiments, six-channel Cell Painting-style fluorescence images."
        ),
        license=license,
        homepage="https://www.rxrx.ai/rxrx1",
        citation=RXRX1_CITATION,
        channel_axis="first",
        rejected=rejected,
        inputs={"--root": str(root)},
    )


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


@dataclass
class BuildResult:
    """What a build produced."""

    dataset: datasets.DatasetDict
    output_dir: Path | None
    repo_id: str | None
    skipped: dict[str, str]  # row label -> reason
    channel_names: list[str]
    image_shape: tuple[int, int, int]
    dtype: str


def _check_duplicates_and_files(records: list[ScreenRecord]) -> dict[str, ScreenDataError]:
    """Row label -> error, for rows repeating an earlier row's image(s) or naming a missing file."""
    problems: dict[str, ScreenDataError] = {}
    first_seen: dict[tuple[str, ...], str] = {}
    for record in records:
        key = tuple(os.path.normpath(f) for f in record.files)
        if key in first_seen:
            problems[record.label] = DuplicateRowError(
                f"{record.label}: duplicate row, names the same image file(s) as {first_seen[key]}: {list(key)}"
            )
            continue
        first_seen[key] = record.label
        for path in record.files:
            if not os.path.isfile(path):
                problems[record.label] = MissingImageError(f"{record.label}: image file {path} does not exist")
                break
    return problems


def _generate_rows(
    records: list[ScreenRecord],
    channel_axis: ChannelAxis,
    reference: tuple[tuple[int, ...], str],
    channel_names: Sequence[str],
    on_error: OnError,
    skip_log_dir: str,
) -> Iterator[dict[str, Any]]:
    """Dataset.from_generator body; runs in worker processes, each on a slice of ``records``."""
    expected_shape, expected_dtype = reference
    skip_log = None
    try:
        for record in records:
            try:
                pixels = load_record_pixels(record, channel_axis)
                if pixels.shape != expected_shape or pixels.dtype.str != expected_dtype:
                    raise ImageShapeError(
                        f"{record.label}, file(s) {record.files}: expected (channels, height, width) = "
                        f"{expected_shape} {np.dtype(expected_dtype)} like the first row, got {pixels.shape} {pixels.dtype}"
                    )
            except ScreenDataError as error:
                # Errors go to a file rather than up the stack: from a worker process datasets would
                # re-raise them as a generic DatasetGenerationError, losing the type and message.
                if skip_log is None:
                    skip_log = open(Path(skip_log_dir) / f"{uuid.uuid4().hex}.jsonl", "w")  # noqa: SIM115
                entry = {"row": record.label, "files": record.files, "reason": str(error), "error": type(error).__name__}
                skip_log.write(json.dumps(entry) + "\n")
                skip_log.flush()
                if on_error == "raise":
                    return  # the parent raises it once the workers are done
                continue
            yield {IMAGE_COLUMN: encode_image(pixels), CHANNEL_NAMES_COLUMN: list(channel_names), **record.metadata}
    finally:
        if skip_log is not None:
            skip_log.close()


_ERROR_TYPES = {cls.__name__: cls for cls in (ScreenDataError, ImageReadError, ImageShapeError, MissingImageError, DuplicateRowError, MissingColumnError)}


def _unwrap_generation_errors(function, *args, **kwargs):
    """Call ``function``; re-raise our own error if ``datasets`` wrapped it in DatasetGenerationError."""
    try:
        return function(*args, **kwargs)
    except datasets.exceptions.DatasetGenerationError as error:
        cause = error.__cause__ or error.__context__
        while cause is not None and not isinstance(cause, ScreenDataError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise


def _split(dataset: datasets.Dataset, split_column, holdout_values, holdout_fraction, holdout_split, seed) -> datasets.DatasetDict:
    if split_column is None:
        if holdout_values or holdout_fraction:
            raise ValueError("holdout_values / holdout_fraction need split_column")
        return datasets.DatasetDict({"train": dataset})
    if split_column not in dataset.column_names:
        raise MissingColumnError(f"split_column {split_column!r} is not a column; columns: {dataset.column_names}")
    values = [str(v) for v in dataset[split_column]]
    groups = sorted(set(values))
    if holdout_values:
        held = {str(v) for v in holdout_values}
        unknown = sorted(held - set(groups))
        if unknown:
            raise ValueError(f"holdout_values {unknown} do not occur in column {split_column!r}; values: {groups}")
    elif holdout_fraction:
        if not 0 < holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
        count = min(max(1, round(holdout_fraction * len(groups))), len(groups) - 1)
        held = set(np.random.default_rng(seed).choice(groups, size=count, replace=False).tolist())
    else:  # one split per value, e.g. RxRx1's train/test "dataset" column
        return datasets.DatasetDict(
            {g: dataset.select([i for i, v in enumerate(values) if v == g]) for g in groups}
        )
    test_rows = [i for i, v in enumerate(values) if v in held]
    train_rows = [i for i, v in enumerate(values) if v not in held]
    if not train_rows:
        raise ValueError(f"holding out {sorted(held)} of {split_column!r} leaves no training rows")
    return datasets.DatasetDict({"train": dataset.select(train_rows), holdout_split: dataset.select(test_rows)})


def _count_summary(splits: datasets.DatasetDict) -> dict[str, Any]:
    def unique(column: str) -> int:
        return len({v for split in splits.values() for v in split[column]})

    return {
        "rows": {name: split.num_rows for name, split in splits.items()},
        "plates": unique("plate"),
        "batches": unique("batch"),
        "wells": len({(p, w) for split in splits.values() for p, w in zip(split["plate"], split["well"], strict=True)}),
        "compounds": unique("compound"),
        "treatments": unique("treatment"),
        "moas": len({v for split in splits.values() for v in split["moa"] if v is not None}),
        "controls": sum(sum(split["is_control"]) for split in splits.values()),
    }


def dataset_card(
    source: ScreenSource,
    splits: datasets.DatasetDict,
    channel_names: list[str],
    image_shape: tuple[int, int, int],
    dtype: str,
    skipped: Mapping[str, str],
    card_data: DatasetCardData | None = None,
) -> DatasetCard:
    """The dataset card: origin, licence, schema, channels and counts."""
    counts = _count_summary(splits)
    total = sum(counts["rows"].values())
    size_category = next(
        (label for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")) if total < limit),
        "n>1M",
    )
    data = card_data or DatasetCardData()
    data.license = source.license or "unknown"
    data.pretty_name = f"{source.name} (cdcl-hf screen dataset)"
    data.tags = sorted({*(getattr(data, "tags", None) or []), "biology", "microscopy", "cell-painting", "high-content-screening", "cdcl-hf"})
    data.size_categories = [size_category]
    data.task_categories = ["image-feature-extraction"]
    features = splits[next(iter(splits))].features
    schema_rows = "\n".join(f"| `{name}` | `{feature!r}` |" for name, feature in features.items())
    split_rows = "\n".join(f"| {name} | {rows:,} |" for name, rows in counts["rows"].items())
    channel_rows = "\n".join(f"| {i} | {name} |" for i, name in enumerate(channel_names))
    body = f"""# {source.name}

{source.description}

Built with cdcl-hf's `cdcl-build-dataset` (`hub/build_dataset.py`) on {datetime.now(timezone.utc):%Y-%m-%d}.

## Source and licence

- Source: {source.homepage or "user-provided images and metadata table"}
- Licence: `{data.license}`{" (no licence was given to the builder: pass `--license`)" if source.license is None else ""}
{f"- Citation: {source.citation}" if source.citation else ""}

## Images

Each row is one field of view (or crop). `image` holds one lossless single-channel PNG per channel, in
channel order; pixels are `{dtype}`, shape (channels, height, width) = {image_shape}. Decode with
`cdcl_hf.screen_data.decode_image(row["image"])`, which returns a (C, H, W) array in the original dtype.

| index | channel |
|---|---|
{channel_rows}

## Schema

| column | feature |
|---|---|
{schema_rows}

Standard metadata columns: {", ".join(f"`{c}`" for c in METADATA_FEATURES)}; see `docs/dataset-schema.md`.

## Counts

| split | rows |
|---|---|
{split_rows}

{counts["plates"]:,} plates, {counts["batches"]:,} batches, {counts["wells"]:,} wells, {counts["compounds"]:,} compounds,
{counts["treatments"]:,} treatments, {counts["moas"]:,} mechanisms of action, {counts["controls"]:,} control images.
Rows skipped during the build: {len(skipped):,}{f" (listed in `{SKIPPED_ROWS_FILE}`)" if skipped else ""}.
"""
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


_ARROW_FILE = re.compile(r"data-\d{5}-of-\d{5}\.arrow")


def _is_saved_screen_split(folder: Path) -> bool:
    """A ``save_to_disk`` folder of one split with the screen schema, holding nothing else."""
    if not folder.is_dir():
        return False
    names = {entry.name for entry in folder.iterdir()}
    if not {"state.json", "dataset_info.json"} <= names:
        return False
    if any(not _ARROW_FILE.fullmatch(name) for name in names - {"state.json", "dataset_info.json"}):
        return False
    if any((folder / name).is_dir() for name in names):
        return False
    try:
        features = json.loads((folder / "dataset_info.json").read_text()).get("features") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return CHANNEL_NAMES_COLUMN in features and IMAGE_COLUMN in features


def is_built_screen_dataset(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a screen dataset this package wrote, which ``--overwrite`` may replace.

    True only when the folder holds exactly what ``cdcl-build-dataset`` writes: ``dataset_dict.json`` and one
    ``save_to_disk`` folder per split it lists (``state.json``, ``dataset_info.json`` with the screen's ``image`` and
    ``channel_names`` features, ``data-*.arrow`` shards, nothing else), ``README.md`` / ``skipped_rows.csv``, and
    the output marker of kind ``"screen_dataset"``, or no marker at all (a dataset built by a cdcl-hf older than the
    marker). Anything more (a user's notes, ``map`` caches, a marker of another kind) and the folder is not replaced.

    Args:
        folder (`str` or `os.PathLike`): The folder to look at.

    Returns:
        `bool`: Whether the folder may be replaced as a dataset this package wrote.
    """
    folder = Path(folder)
    index = folder / "dataset_dict.json"
    if not index.is_file():
        return False
    try:
        splits = [str(name) for name in json.loads(index.read_text())["splits"]]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    names = {entry.name for entry in folder.iterdir()}
    if not names <= {"dataset_dict.json", CARD_FILE, SKIPPED_ROWS_FILE, OUTPUT_MARKER, *splits}:
        return False
    if OUTPUT_MARKER in names and not is_cdcl_output(folder, OUTPUT_KIND):
        return False
    return bool(splits) and all(_is_saved_screen_split(folder / split) for split in splits)


def check_output_dir(output: Path, source: ScreenSource, overwrite: bool) -> None:
    """Refuse an output folder that could destroy data: one that is, holds or lies inside an input of ``source``
    (its table, its image root, any folder of its images), a file, or a non-empty folder that is not a screen
    dataset this package wrote (see :func:`is_built_screen_dataset`), whatever ``overwrite`` says.

    Args:
        output (`Path`): The resolved output folder.
        source (`ScreenSource`): What the dataset is built from.
        overwrite (`bool`): Whether an earlier screen dataset there may be replaced.

    Raises:
        OutputSafetyError: The output would overwrite or mix with an input or a folder the package did not write.
        FileExistsError: The output is an earlier screen dataset and ``overwrite`` is false.
    """
    check_output_not_an_input(output, source.inputs)
    # Images may lie outside the declared roots (absolute paths in the CSV, or the CSV's folder as the default
    # root): an output that is or holds a folder of images is refused too (a few hundred folders for BBBC021's
    # 39,600 files). A new output inside such a folder destroys nothing and is allowed.
    folders: dict[str, ScreenRecord] = {}
    for record in source.records:
        for file in record.files:
            if file:
                folders.setdefault(os.path.dirname(os.path.abspath(file)), record)
    for folder, record in folders.items():
        if Path(folder).resolve().is_relative_to(output):
            raise OutputSafetyError(
                f"output folder {output} {'is' if Path(folder).resolve() == output else 'holds'} the folder {folder} "
                f"of the screen's images ({record.label}: {record.files[0]}); writing there could destroy the images. "
                "Choose an output folder that holds no input."
            )
    if not output.exists():
        return
    if not output.is_dir():
        raise OutputSafetyError(f"output {output} is a file, not a folder; choose another --output_dir")
    if not any(output.iterdir()):
        return  # an empty folder: nothing to lose
    if not is_built_screen_dataset(output):
        what = (
            "a screen dataset plus files cdcl-build-dataset did not write" if is_cdcl_output(output, OUTPUT_KIND)
            else "another kind of cdcl-hf output" if is_cdcl_output(output)
            else "files cdcl-build-dataset did not write"
        )
        raise OutputSafetyError(
            f"output folder {output} holds {what}; it is never replaced, with or without --overwrite. "
            "Choose a new or empty --output_dir."
        )
    if not overwrite:
        raise FileExistsError(
            f"output {output} already exists (a screen dataset); pass overwrite=True (--overwrite) to replace it"
        )


def _write_skip_list(path: Path, skipped: Mapping[str, str], files: Mapping[str, list[str]]) -> None:
    rows = [{"row": label, "files": ";".join(files.get(label, [])), "reason": reason} for label, reason in skipped.items()]
    pd.DataFrame(rows, columns=["row", "files", "reason"]).to_csv(path, index=False)


def build_screen_dataset(
    source: ScreenSource,
    output_dir: str | os.PathLike | None = None,
    push_to_hub: str | None = None,
    *,
    max_shard_size: str | int = "500MB",
    num_shards: int | None = None,
    split_column: str | None = None,
    holdout_values: Sequence[str] | None = None,
    holdout_fraction: float | None = None,
    holdout_split: str = "test",
    seed: int = 0,
    num_proc: int = 1,
    on_error: OnError = "raise",
    overwrite: bool = False,
    private: bool | None = None,
    token: str | None = None,
) -> BuildResult:
    """Build, check and write a screen dataset from ``source``.

    ``output_dir``: written atomically (a temporary folder beside it is renamed into place at the
    end, so an interrupted build leaves nothing that loads as complete; the next build there removes
    what a killed one left), and marked as a cdcl-hf screen dataset. It is refused when it is, holds
    or lies inside an input, or is a non-empty folder that is not a screen dataset this package wrote
    (see :func:`check_output_dir`); an earlier screen dataset is replaced only with ``overwrite=True``,
    and only once the new one is complete. ``push_to_hub``: a repo
    id to push parquet shards + card to. ``split_column``: hold out whole groups (values given by
    ``holdout_values``, or a random ``holdout_fraction`` of the groups) as ``holdout_split``;
    without either, one split per value. ``on_error="skip"``: bad rows are skipped and listed with
    reasons in ``skipped_rows.csv`` inside the output; the default stops at the first bad row with
    an error naming it.
    """
    if output_dir is None and push_to_hub is None:
        raise ValueError("give output_dir, push_to_hub or both")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    output = Path(output_dir).expanduser().resolve() if output_dir is not None else None
    if output is not None:
        check_output_dir(output, source, overwrite)

    skipped: dict[str, str] = {}
    if source.rejected:
        if on_error == "raise":
            raise ScreenDataError(next(iter(source.rejected.values())))
        skipped.update(source.rejected)
    row_problems = _check_duplicates_and_files(source.records)
    if row_problems and on_error == "raise":
        raise next(iter(row_problems.values()))
    skipped.update({label: str(error) for label, error in row_problems.items()})
    records = [r for r in source.records if r.label not in row_problems]

    # The first readable row fixes channel count, size and dtype for the rest.
    reference = None
    for record in records:
        try:
            pixels = load_record_pixels(record, source.channel_axis)
        except ScreenDataError as error:
            if on_error == "raise":
                raise
            skipped[record.label] = str(error)
            continue
        reference = (pixels.shape, pixels.dtype.str)
        break
    if reference is None:
        raise ScreenDataError(f"no readable rows in {source.name}: {len(skipped)} of {len(source.records) + len(source.rejected)} rows are bad")
    channel_names = list(source.channel_names) if source.channel_names else default_channel_names(reference[0][0])
    if len(channel_names) != reference[0][0]:
        raise ImageShapeError(f"{len(channel_names)} channel names {channel_names} but the images have {reference[0][0]} channels")
    records = [r for r in records if r.label not in skipped]

    parent = output.parent if output is not None else Path.cwd()
    parent.mkdir(parents=True, exist_ok=True)
    if output is not None:
        remove_stale_temporaries(parent)  # what a killed build left beside the output
    # Beside the output, so that the final rename stays on one file system.
    work_dir = Path(tempfile.mkdtemp(prefix=temporary_prefix(), dir=parent))
    (work_dir / "skips").mkdir(parents=True)
    try:
        features = screen_features(source.extra_features)
        generated = _unwrap_generation_errors(
            datasets.Dataset.from_generator,
            _generate_rows,
            features=features,
            gen_kwargs={
                "records": records,
                "channel_axis": source.channel_axis,
                "reference": reference,
                "channel_names": tuple(channel_names),  # a list would be sharded across workers
                "on_error": on_error,
                "skip_log_dir": str(work_dir / "skips"),
            },
            cache_dir=str(work_dir / "cache"),
            num_proc=max(1, min(num_proc, len(records))) if num_proc > 1 else None,
        )
        files_by_label = {r.label: r.files for r in source.records}
        worker_errors = [json.loads(line) for log in (work_dir / "skips").glob("*.jsonl") for line in log.read_text().splitlines()]
        position = {r.label: i for i, r in enumerate(records)}
        worker_errors.sort(key=lambda entry: position[entry["row"]])
        if worker_errors and on_error == "raise":
            first = worker_errors[0]
            raise _ERROR_TYPES.get(first["error"], ScreenDataError)(first["reason"])
        for entry in worker_errors:
            skipped[entry["row"]] = entry["reason"]
        if generated.num_rows == 0:
            raise ScreenDataError(f"every row of {source.name} was skipped; first reasons: {list(skipped.values())[:3]}")
        splits = _split(generated, split_column, holdout_values, holdout_fraction, holdout_split, seed)
        card = dataset_card(source, splits, channel_names, reference[0], str(np.dtype(reference[1])), skipped)

        if output is not None:
            staged = work_dir / "dataset"
            splits.save_to_disk(str(staged), max_shard_size=max_shard_size if num_shards is None else None,
                                num_shards={k: num_shards for k in splits} if num_shards else None)
            card.save(staged / CARD_FILE)
            if on_error == "skip":
                _write_skip_list(staged / SKIPPED_ROWS_FILE, skipped, files_by_label)
            write_output_marker(staged, OUTPUT_KIND)
            # Checked again just before the swap: the folder may have changed during a long build.
            check_output_dir(output, source, overwrite)
            if output.exists():  # overwrite: move the old one aside first so the swap is two renames
                retired = work_dir / "previous"
                os.replace(output, retired)
            os.replace(staged, output)
            result_splits = datasets.load_from_disk(str(output))
        else:
            result_splits = splits

        if push_to_hub is not None:
            _push(splits, push_to_hub, source, channel_names, reference, skipped, files_by_label, work_dir,
                  max_shard_size=max_shard_size, num_shards=num_shards, private=private, token=token, on_error=on_error)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    if skipped:
        logger.warning("skipped %d row(s); see %s", len(skipped), output / SKIPPED_ROWS_FILE if output else "the Hub repo")
    return BuildResult(result_splits, output, push_to_hub, skipped, channel_names, reference[0], str(np.dtype(reference[1])))


def _push(splits, repo_id, source, channel_names, reference, skipped, files_by_label, work_dir, *,
          max_shard_size, num_shards, private, token, on_error) -> None:
    from huggingface_hub import HfApi

    splits.push_to_hub(
        repo_id, private=private, token=token, max_shard_size=max_shard_size if num_shards is None else None,
        num_shards={k: num_shards for k in splits} if num_shards else None,
    )
    # push_to_hub wrote a card holding dataset_info/configs YAML; keep that metadata, add ours.
    existing = DatasetCard.load(repo_id, repo_type="dataset", token=token)
    card = dataset_card(source, splits, channel_names, reference[0], str(np.dtype(reference[1])), skipped, card_data=existing.data)
    api = HfApi(token=token)
    operations_files = {CARD_FILE: str(card).encode()}
    if on_error == "skip":
        skip_path = work_dir / SKIPPED_ROWS_FILE
        _write_skip_list(skip_path, skipped, files_by_label)
        operations_files[SKIPPED_ROWS_FILE] = skip_path.read_bytes()
    from huggingface_hub import CommitOperationAdd

    api.create_commit(
        repo_id, repo_type="dataset",
        operations=[CommitOperationAdd(path, content) for path, content in operations_files.items()],
        commit_message="Add cdcl-hf dataset card",
    )
