"""Intensity normalisation: the one contract shared by training, the exported image processor and profiling.

Fluorescence intensities are not comparable across plates (stain batches, exposure, lamp age), so CDCL normalises
every image with its own plate's per-channel statistics (the paper's data pre-processing):
`(image - mean[plate]) / std[plate]`, the statistics taken over the plate's negative controls or all its images. A `PlateNormalization` holds those
statistics and the std floor, and is what

- training calls on every decoded image (`PlateNormalization.load_normalized`, before augmentation, so that the
  gain / offset noise is in units of the plate's spread);
- the export writes into the checkpoint's `CDCLImageProcessor` (`processor_kwargs`: the average plate, the best
  default for a plate nobody has statistics of);
- evaluation re-creates for the screen it embeds (`for_processor`) and passes per plate to the processor
  (`processor_call_kwargs`), so that an evaluated image is normalised exactly as a training image was.

`"per_image"` mode standardises each channel of each image by its own statistics instead, with the processor's
rule (`standardize_per_image`), so that training and inference agree there too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from .image_io import ImageShapeError, decode_image
from .image_processing_cdcl import standardize_per_image
from .screen_data import IMAGE_COLUMN, MissingColumnError

__all__ = [
    "PlateStatistics",
    "plate_statistics",
    "NORMALIZATION_MODES",
    "PLATE_STATISTICS_SOURCES",
    "PLATE_STD_FLOOR",
    "PlateNormalization",
]

# Training's `--normalization` values.
NORMALIZATION_MODES = ("plate_controls", "plate_all", "per_image")
# Evaluation's `--plate_normalization` values: where a per-plate checkpoint's statistics come from ("none" keeps
# the processor's saved average plate).
PLATE_STATISTICS_SOURCES = ("controls", "all", "none")
# A constant channel (an empty stain, a saturated plate) has std 0; the floor keeps its normalised pixels finite.
PLATE_STD_FLOOR = 1e-6

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Per-plate intensity statistics
# --------------------------------------------------------------------------------------------


STATISTICS_VERSION = 1  # bump when the computation changes, to invalidate old cache files


@dataclass
class PlateStatistics:
    """Per-channel intensity mean and standard deviation of one plate (over all pixels)."""

    plate: str
    mean: np.ndarray  # float64, (C,)
    std: np.ndarray  # float64, (C,), population std
    num_images: int
    source: str  # "controls" or "all": what the numbers were computed over

    def to_json(self) -> dict[str, Any]:
        return {"plate": self.plate, "mean": self.mean.tolist(), "std": self.std.tolist(), "num_images": self.num_images, "source": self.source}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PlateStatistics:
        return cls(data["plate"], np.asarray(data["mean"], dtype=np.float64), np.asarray(data["std"], dtype=np.float64), int(data["num_images"]), data["source"])


@dataclass
class _RunningMoments:
    """Per-channel count/mean/M2, merged image by image (Chan et al.), so large uint16 sums stay exact."""

    count: float = 0.0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None
    images: int = 0

    def add(self, pixels: np.ndarray) -> None:
        flat = pixels.reshape(pixels.shape[0], -1).astype(np.float64)
        n = float(flat.shape[1])
        mean = flat.mean(axis=1)
        m2 = ((flat - mean[:, None]) ** 2).sum(axis=1)
        self.images += 1
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        if mean.shape != self.mean.shape:
            raise ImageShapeError(f"images of one plate have {self.mean.shape[0]} and {mean.shape[0]} channels")
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def statistics(self, plate: str, source: str) -> PlateStatistics:
        return PlateStatistics(plate, self.mean.copy(), np.sqrt(self.m2 / self.count), self.images, source)


_STATISTICS_MEMORY: dict[str, dict[str, PlateStatistics]] = {}


def _dataset_identity(dataset: datasets.Dataset | datasets.IterableDataset) -> str | None:
    """A string that changes whenever the dataset's content does, or None if there is none."""
    if isinstance(dataset, datasets.Dataset):
        return dataset._fingerprint
    # A streamed Hub dataset reads files resolved to a commit ("hf://datasets/org/name@<sha>/..."),
    # so its file list identifies the content; a local stream's files carry no version, so no identity.
    files = []
    iterable = getattr(dataset, "_ex_iterable", None)
    while iterable is not None:
        kwargs = getattr(iterable, "kwargs", None) or {}
        for value in kwargs.values():
            if isinstance(value, (list, tuple)):
                files.extend(str(v) for v in value if isinstance(v, str) or hasattr(v, "__fspath__"))
        iterable = getattr(iterable, "ex_iterable", None)
    commit_pinned = [f for f in files if re.search(r"@[0-9a-f]{40}/", f)]
    if commit_pinned and len(commit_pinned) == len(files):
        return "stream:" + ",".join(sorted(files)) + f":{dataset.split}"
    return None


def plate_statistics(
    dataset: datasets.Dataset | datasets.IterableDataset,
    source: str = "controls",
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, PlateStatistics]:
    """Per-plate, per-channel mean/std of the raw intensities, computed once and cached.

    ``source="controls"`` uses the plate's control images (``is_control``); a plate without any
    falls back to all its images (``PlateStatistics.source`` says which). ``source="all"`` uses every
    image. Results are memoised in the process and, when the dataset has a stable identity (its
    fingerprint, or a Hub stream pinned to a commit), written to
    ``cache_dir`` (default: ``<HF datasets cache>/cdcl_plate_statistics``) as JSON.
    """
    if source not in ("controls", "all"):
        raise ValueError(f"source must be 'controls' or 'all', got {source!r}")
    identity = _dataset_identity(dataset)
    cache_file = None
    if identity is not None:
        key = hashlib.sha256(f"{STATISTICS_VERSION}:{source}:{identity}".encode()).hexdigest()[:32]
        if key in _STATISTICS_MEMORY:
            return dict(_STATISTICS_MEMORY[key])
        directory = Path(cache_dir) if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE) / "cdcl_plate_statistics"
        cache_file = directory / f"{key}.json"
        if cache_file.is_file():
            stored = json.loads(cache_file.read_text())
            result = {plate: PlateStatistics.from_json(v) for plate, v in stored["plates"].items()}
            _STATISTICS_MEMORY[key] = result
            return dict(result)
    if dataset.column_names is not None:
        missing = [c for c in (IMAGE_COLUMN, "plate", "is_control") if c not in dataset.column_names]
        if missing:
            raise MissingColumnError(f"plate_statistics needs column(s) {missing}; dataset has {dataset.column_names}")
    columns = dataset.select_columns([IMAGE_COLUMN, "plate", "is_control"])
    controls: dict[str, _RunningMoments] = {}
    everything: dict[str, _RunningMoments] = {}
    rows = columns.iter(batch_size=64) if isinstance(columns, datasets.Dataset) else columns.iter(batch_size=64)
    for batch in rows:
        for image, plate, is_control in zip(batch[IMAGE_COLUMN], batch["plate"], batch["is_control"], strict=True):
            pixels = decode_image(image)
            everything.setdefault(plate, _RunningMoments()).add(pixels)
            if source == "controls" and is_control:
                controls.setdefault(plate, _RunningMoments()).add(pixels)
    if not everything:
        raise ValueError("the screen has no images to compute per-plate intensity statistics from")
    result = {}
    for plate in sorted(everything):
        if source == "controls" and plate in controls:
            result[plate] = controls[plate].statistics(plate, "controls")
        else:
            if source == "controls":
                logger.warning("plate %s has no control images; its statistics use all %d images", plate, everything[plate].images)
            result[plate] = everything[plate].statistics(plate, "all")
    for plate, statistics in result.items():  # before caching: NaN statistics must not be stored
        _check_plate_statistics(plate, statistics.mean, statistics.std, statistics, PLATE_STD_FLOOR)
    if identity is not None:
        _STATISTICS_MEMORY[key] = result
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"source": source, "plates": {p: s.to_json() for p, s in result.items()}}))
        os.replace(temporary, cache_file)  # atomic, so a concurrent reader never sees half a file
    return dict(result)


_REPORTED_CONSTANT: set[tuple] = set()


def _check_plate_statistics(
    plate: str, mean: np.ndarray, std: np.ndarray, statistics: PlateStatistics | None, std_floor: float
) -> None:
    """Refuse statistics nothing can be normalised with; warn (once) about a channel constant over a plate.

    A NaN or infinite mean / std (float pixels holding NaN, a corrupted cache) would turn every image of the plate
    into NaN, and a plate of 0 images has no statistics at all: both raise. A std of 0 (at or below the floor) is
    suspicious but not fatal: an empty stain or a saturated channel is constant; the floor keeps the normalised
    pixels finite, but any image of the plate that differs from the constant is scaled by 1 / floor.
    """
    over = ""
    if statistics is not None:
        kind = "control " if statistics.source == "controls" else ""
        over = f" over the plate's {statistics.num_images} {kind}image(s)"
    if statistics is not None and statistics.num_images < 1:
        raise ValueError(f"plate {plate!r} has no usable image to compute intensity statistics from; drop the plate "
                         "or recompute the statistics on the screen being normalised")
    for what, values in (("mean", mean), ("std", std)):
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise ValueError(
                f"plate {plate!r}, channel {int(bad[0])}: intensity {what} is {values[bad[0]]}{over}; its images hold "
                "NaN or infinite pixels (or the statistics are corrupted): fix or drop those images"
            )
    for channel in np.flatnonzero(std <= std_floor):
        key = (plate, int(channel), float(mean[channel]), float(std[channel]))
        if key in _REPORTED_CONSTANT:
            continue
        _REPORTED_CONSTANT.add(key)
        logger.warning(
            "plate %r, channel %d: constant intensity %g%s (std %g); the std floor %g keeps it finite, but check the "
            "plate (an empty or saturated stain?)", plate, int(channel), float(mean[channel]), over,
            float(std[channel]), std_floor,
        )


# --------------------------------------------------------------------------------------------
# The normalisation
# --------------------------------------------------------------------------------------------


class PlateNormalization:
    r"""
    Per-plate, per-channel intensity normalisation (or per-image standardisation).

    Args:
        mode (`str`): `"plate_controls"`, `"plate_all"` (per-plate statistics of the controls / of all images) or
            `"per_image"`.
        statistics (`Mapping[str, PlateStatistics]`, *optional*): Statistics per plate; required for the plate
            modes. Values may also be `(mean, std)` pairs of per-channel sequences.
        std_floor (`float`, defaults to `PLATE_STD_FLOOR`): Lower bound applied to every plate's std.
        plate_column (`str`, defaults to `"plate"`): The screen column `load_normalized` reads the plate from.
    """

    def __init__(
        self,
        mode: str,
        statistics: Mapping[str, Any] | None = None,
        std_floor: float = PLATE_STD_FLOOR,
        plate_column: str = "plate",
    ):
        if mode not in NORMALIZATION_MODES:
            raise ValueError(f"normalization mode must be one of {NORMALIZATION_MODES}, got {mode!r}")
        if mode != "per_image" and not statistics:
            raise ValueError(f"normalization {mode!r} needs per-plate statistics, got none")
        self.mode = mode
        self.std_floor = float(std_floor)
        self.plate_column = plate_column
        # Raw float64 statistics (what the processor stores) and their float32 (C, 1, 1) tensors with the floor
        # applied (what images are normalised with).
        self.statistics: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._mean_std: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for plate, value in (statistics or {}).items():
            mean, std = (value.mean, value.std) if isinstance(value, PlateStatistics) else value
            mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
            if mean.shape != std.shape or mean.ndim != 1:
                raise ValueError(f"plate {plate!r}: mean and std must be per-channel vectors of one length")
            _check_plate_statistics(str(plate), mean, std, value if isinstance(value, PlateStatistics) else None,
                                    self.std_floor)
            self.statistics[str(plate)] = (mean, std)
            self._mean_std[str(plate)] = (
                torch.as_tensor(mean.astype(np.float32)).view(-1, 1, 1),
                torch.as_tensor(std.astype(np.float32)).view(-1, 1, 1).clamp_min(self.std_floor),
            )

    @classmethod
    def from_screen(cls, screen: Any, mode: str, plate_column: str = "plate") -> PlateNormalization:
        """The normalisation `mode` of `screen` (per-plate statistics computed once and cached, see
        `cdcl_hf.screen_data.plate_statistics`)."""
        if mode == "per_image":
            return cls(mode, plate_column=plate_column)
        source = "controls" if mode == "plate_controls" else "all"
        return cls(mode, plate_statistics(screen, source=source), plate_column=plate_column)

    @classmethod
    def for_processor(cls, processor: Any, screen: Any, source: str = "controls") -> PlateNormalization | None:
        """What evaluation normalises `screen` with for a checkpoint whose image processor is `processor`.

        A checkpoint trained with per-plate statistics saves a processor with `normalization="per_channel"` whose
        mean / std are the average training plate; training itself normalised each image by its own plate. This
        returns that rule for the plates of `screen` (statistics from its controls or from all its images), or
        `None` to use the processor as saved: for `source="none"` and for processors that normalise each image on
        their own (per-image, none, or a non-CDCL processor).
        """
        if source not in PLATE_STATISTICS_SOURCES:
            raise ValueError(f"plate statistics source must be one of {PLATE_STATISTICS_SOURCES}, got {source!r}")
        if source == "none" or getattr(processor, "normalization", None) != "per_channel":
            return None
        return cls.from_screen(screen, "plate_controls" if source == "controls" else "plate_all")

    @property
    def per_plate(self) -> bool:
        return self.mode != "per_image"

    @property
    def plates(self) -> list[str]:
        return sorted(self._mean_std)

    def _plate_mean_std(self, plate: Any) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self._mean_std[str(plate)]
        except KeyError:
            raise KeyError(
                f"no intensity statistics for plate {plate!r} ({len(self._mean_std)} plates known); "
                "compute them on the screen being normalised"
            ) from None

    def normalize(self, image: torch.Tensor, plate: Any = None) -> torch.Tensor:
        """A (C, H, W) image in raw intensity units, normalised as float32."""
        if not self.per_plate:
            return standardize_per_image(image.float())
        mean, std = self._plate_mean_std(plate)
        if image.shape[0] != mean.shape[0]:
            raise ValueError(f"image has {image.shape[0]} channels, plate {plate!r} statistics have {mean.shape[0]}")
        return (image.float() - mean) / std

    def load_normalized(self, row: Mapping[str, Any], image_column: str = "image") -> torch.Tensor:
        """A screen row (schema of docs/dataset-schema.md) -> its normalised float32 (C, H, W) image."""
        image = torch.from_numpy(decode_image(row[image_column]).astype(np.float32))
        return self.normalize(image, row.get(self.plate_column) if self.per_plate else None)

    def processor_kwargs(self) -> dict[str, Any]:
        """The `CDCLImageProcessor` settings a checkpoint trained with this normalisation is saved with.

        Per-plate modes store the average plate's mean and std; pass a new plate's own statistics per call
        (`processor(images, **normalization.processor_call_kwargs(plate))`) to reproduce training exactly.
        """
        if not self.per_plate:
            return {"normalization": "per_image"}
        means, stds = zip(*self.statistics.values(), strict=True)
        return {
            "normalization": "per_channel",
            "image_mean": np.mean(means, axis=0).tolist(),
            "image_std": np.mean(stds, axis=0).tolist(),
        }

    def processor_call_kwargs(self, plate: Any) -> dict[str, list[float]]:
        """`image_mean` / `image_std` for one `CDCLImageProcessor` call on images of `plate` (floor applied)."""
        mean, std = self._plate_mean_std(plate)
        return {"image_mean": mean.flatten().double().tolist(), "image_std": std.flatten().double().tolist()}
