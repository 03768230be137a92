"""A built-in synthetic Cell Painting-style screen with a known mechanism of action and tunable batch effects.

Why it exists: training and evaluation need a screen on a fresh machine with no download, and the
batch effect CDCL removes must be present and controllable. Everything is drawn procedurally with
numpy from one seed:

- **Biology.** Each field of view holds a handful of cells: a nucleus (channel 0, DNA) and a
  cytoplasm whose compartments show up in the other channels (diffuse fill, perinuclear
  concentration, cortical rim, texture). A mechanism of action (MoA) is a direction in a small space
  of morphology parameters (nucleus size / shape / lobulation / fragmentation, DNA brightness,
  cytoplasm spread / shape, texture, cortex, cell count, channel-specific intensity). Each compound of
  an MoA follows that direction with its own magnitude and a small off-target part; its dose sets the
  strength through a Hill curve, so low doses look almost like DMSO. Cells respond unevenly.
- **Layout.** Plates are grouped into batches; every plate carries DMSO control wells, and each
  treatment (compound @ concentration) sits on several plates spread over different batches, so every
  image has same-treatment partners in other domains. Well positions are shuffled per plate.
- **Acquisition / batch effects** (scaled by `batch_effect_strength`; 0 switches them all off):
  per-batch and per-plate channel gains and offsets, illumination gradients / vignetting, defocus
  blur, camera noise level, and a small biological drift (cell density and size per batch), which is
  the part per-plate intensity normalisation cannot undo. Shot and read noise are always present.

Public API: `SyntheticScreenConfig`, `generate_synthetic_screen`, `synthetic_screen_dataset`,
`config_for_num_images`, `raw_pixel_features`, `same_label_neighbour_rate`, and the CLI
`python -m cdcl_hf.synthetic_screen --output_dir DIR`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .cli import (
    CommandParser,
    add_debug_argument,
    command_errors,
    non_negative_float,
    non_negative_int,
    positive_int,
)
from .outputs import OutputSafetyError, staged_directory, write_output_marker

CONTROL_COMPOUND = "DMSO"
# BBBC021 labels its vehicle controls with moa "DMSO" too; evaluations drop them by `is_control`.
CONTROL_MOA = "DMSO"
CONTROL_CONCENTRATION = 0.0

# ----------------------------------------------------------------------------------------------
# Morphology model
# ----------------------------------------------------------------------------------------------

# The per-cell morphology parameters an MoA moves. "log_" ones act multiplicatively; all are 0 in DMSO.
MORPHOLOGY_PARAMETERS: tuple[str, ...] = (
    "log_cell_density",  # cells per field of view (toxicity / proliferation)
    "log_nucleus_radius",
    "nucleus_elongation",  # log aspect ratio added to the cell's own
    "nucleus_lobulation",  # amplitude of the nucleus boundary's angular harmonics
    "fragmentation",  # probability that a cell's nucleus is condensed into apoptotic bodies
    "log_dna_intensity",
    "log_cytoplasm_spread",  # cytoplasm radius relative to the nucleus
    "cytoplasm_elongation",
    "cytoplasm_irregularity",
    "log_texture_contrast",  # cytoplasm channels' texture
    "log_texture_scale",
    "log_cortex",  # brightness of the cortical rim (actin / AGP-like channels)
)
_P = {name: index for index, name in enumerate(MORPHOLOGY_PARAMETERS)}


@dataclass(frozen=True)
class MoAPhenotype:
    """What a mechanism of action does at full strength.

    Args:
        morphology (`dict[str, float]`):
            Shifts of the `MORPHOLOGY_PARAMETERS`.
        channel_intensity (`dict[str, float]`, *optional*):
            Channel-specific log-intensity shifts keyed by channel profile name (see
            `CHANNEL_PROFILES`).
    """

    morphology: dict[str, float]
    channel_intensity: dict[str, float] = field(default_factory=dict)

    def vector(self) -> np.ndarray:
        unknown = set(self.morphology) - set(MORPHOLOGY_PARAMETERS)
        if unknown:
            raise ValueError(f"unknown morphology parameters {sorted(unknown)}")
        return np.array([self.morphology.get(name, 0.0) for name in MORPHOLOGY_PARAMETERS])


# Loosely modelled on BBBC021's classes, so the phenotypes differ the way real ones do: some by
# shape, some by texture, some by intensity of one channel, some by cell count.
MOA_PHENOTYPES: dict[str, MoAPhenotype] = {
    # Mitotic arrest: rounded cells with condensed, bright chromatin and diffuse tubulin.
    "microtubule_destabilizer": MoAPhenotype(
        {
            "log_cell_density": -0.15,
            "log_nucleus_radius": -0.15,
            "log_dna_intensity": 0.35,
            "log_cytoplasm_spread": -0.35,
            "cytoplasm_irregularity": -0.04,
            "log_texture_contrast": -0.7,
        },
        {"tubulin": 0.15},
    ),
    # Bundled microtubules (coarse, contrasted texture) and lobed / multi-part nuclei.
    "microtubule_stabilizer": MoAPhenotype(
        {
            "log_cell_density": -0.1,
            "log_nucleus_radius": 0.1,
            "nucleus_lobulation": 0.16,
            "log_texture_contrast": 0.5,
            "log_texture_scale": 0.45,
        },
        {"tubulin": 0.2},
    ),
    # Lost cortical actin, ragged cell outlines, granular actin texture.
    "actin_disruptor": MoAPhenotype(
        {
            "log_cortex": -0.9,
            "cytoplasm_irregularity": 0.14,
            "log_cytoplasm_spread": -0.1,
            "log_texture_scale": -0.35,
        },
        {"actin": -0.3, "agp": -0.3},
    ),
    # G2 arrest: fewer, larger cells with enlarged nuclei.
    "dna_damage": MoAPhenotype(
        {
            "log_cell_density": -0.3,
            "log_nucleus_radius": 0.28,
            "log_dna_intensity": 0.12,
            "log_cytoplasm_spread": 0.12,
        },
    ),
    # Apoptosis: condensed, fragmented nuclei in shrunken cells; fewer cells.
    "apoptosis_inducer": MoAPhenotype(
        {
            "fragmentation": 0.55,
            "log_cell_density": -0.3,
            "log_cytoplasm_spread": -0.15,
            "log_dna_intensity": 0.15,
        },
    ),
    # Flattened, elongated, spread cells.
    "kinase_inhibitor": MoAPhenotype(
        {
            "nucleus_elongation": 0.35,
            "log_cytoplasm_spread": 0.3,
            "cytoplasm_elongation": 0.45,
            "log_cell_density": -0.05,
        },
    ),
    # Dimmer RNA / ER / cytoskeleton stains, slightly smaller cells.
    "protein_synthesis_inhibitor": MoAPhenotype(
        {"log_cell_density": -0.15, "log_cytoplasm_spread": -0.12, "log_nucleus_radius": -0.06},
        {"rna": -0.5, "er": -0.35, "tubulin": -0.3, "actin": -0.2, "mito": -0.15},
    ),
    # Mitochondrial stress: brighter, punctate (fine, contrasted) mitochondria; slight rounding.
    "mitochondrial_uncoupler": MoAPhenotype(
        {"log_texture_scale": -0.3, "log_texture_contrast": 0.3, "log_cytoplasm_spread": -0.08},
        {"mito": 0.45, "tubulin": -0.12, "er": 0.1},
    ),
}

DEFAULT_MOAS: tuple[str, ...] = (
    "microtubule_destabilizer",
    "microtubule_stabilizer",
    "actin_disruptor",
    "dna_damage",
    "apoptosis_inducer",
    "kinase_inhibitor",
)


@dataclass(frozen=True)
class ChannelProfile:
    """How a cytoplasm channel is distributed within the cell (weights of the compartments).

    Args:
        brightness (`float`):
            Brightness relative to the nucleus in the DNA channel.
        fill (`float`):
            Uniform cytoplasm.
        perinuclear (`float`):
            Highest next to the nucleus, fading to the cell edge.
        cortex (`float`):
            Rim under the cell membrane.
        nucleus (`float`):
            Signal inside the nucleus (e.g. RNA stains nucleoli).
        nuclear_exclusion (`float`):
            Fraction of the cytoplasm signal missing over the nucleus.
        texture_scale (`float`):
            Texture scale in px at 64 x 64.
        texture_contrast (`float`):
            Texture contrast.
    """

    brightness: float  # relative to the nucleus in the DNA channel
    fill: float  # uniform cytoplasm
    perinuclear: float  # highest next to the nucleus, fading to the cell edge
    cortex: float  # rim under the cell membrane
    nucleus: float  # signal inside the nucleus (e.g. RNA stains nucleoli)
    nuclear_exclusion: float  # fraction of the cytoplasm signal missing over the nucleus
    texture_scale: float  # px at 64 x 64
    texture_contrast: float


CHANNEL_PROFILES: dict[str, ChannelProfile] = {
    "tubulin": ChannelProfile(0.55, 0.7, 0.5, 0.0, 0.0, 0.6, 1.3, 0.45),
    "actin": ChannelProfile(0.5, 0.45, 0.0, 1.0, 0.0, 0.5, 1.0, 0.35),
    "er": ChannelProfile(0.5, 0.3, 1.0, 0.0, 0.05, 0.8, 0.9, 0.4),
    "rna": ChannelProfile(0.45, 0.6, 0.3, 0.0, 0.45, 0.3, 1.6, 0.3),
    "agp": ChannelProfile(0.45, 0.3, 0.3, 0.9, 0.0, 0.6, 1.2, 0.4),
    "mito": ChannelProfile(0.5, 0.4, 0.7, 0.0, 0.0, 0.9, 0.7, 0.6),
}
# Channel names of the common layouts, and the profile that renders each.
CHANNEL_SETS: dict[int, tuple[str, ...]] = {
    2: ("DNA", "Actin"),
    3: ("DNA", "Tubulin", "Actin"),  # BBBC021
    5: ("DNA", "ER", "RNA", "AGP", "Mito"),  # Cell Painting
}
# Cytoplasm channels without a known name cycle through these.
_GENERIC_PROFILE_ORDER = ("tubulin", "actin", "er", "mito", "rna", "agp")

# Size scale at a 64 x 64 field of view; everything spatial scales with image_size / 64.
_NUCLEUS_RADIUS_PX = 4.6
_CYTOPLASM_TO_NUCLEUS = 2.1
_CELLS_PER_FIELD = 9.0
_MAX_CELLS_PER_FIELD = 30

# Camera: 12-bit range like most high-content imagers.
_FULL_SCALE_12BIT = 4095
_CAMERA_OFFSET = 110.0  # dark level in ADU
_READ_NOISE = 5.0  # ADU
_SHOT_NOISE_ADU_PER_PHOTON = 0.6  # variance of the signal = 0.6 * signal (ADU)
_DNA_PEAK_ADU = 2300.0  # a typical nucleus' brightness in the DNA channel


@dataclass
class SyntheticScreenConfig:
    """Everything that defines a synthetic screen; the same config (and seed) gives the same bytes.

    Images: `num_batches * plates_per_batch` plates, each with `control_wells_per_plate` DMSO wells
    plus one well per treatment placed on that plate, `sites_per_well` fields of view per well.
    Treatments = `moas` x `compounds_per_moa` x `concentrations`.

    Args:
        num_channels (`int`, *optional*, defaults to 3):
            The number of channels, 2..8 (DNA + cytoplasm stains).
        channel_names (`tuple[str, ...]`, *optional*):
            Defaults from `CHANNEL_SETS` / "DNA", "ch1", ...
        image_size (`int`, *optional*, defaults to 64):
            The side of the square images, at least 16.
        num_batches (`int`, *optional*, defaults to 4):
            The number of batches.
        plates_per_batch (`int`, *optional*, defaults to 2):
            The number of plates per batch.
        moas (`tuple[str, ...]`, *optional*, defaults to `DEFAULT_MOAS`):
            The MoAs, keys of `MOA_PHENOTYPES`.
        compounds_per_moa (`int`, *optional*, defaults to 2):
            The number of compounds per MoA.
        concentrations (`tuple[float, ...]`, *optional*, defaults to `(0.3, 1.0, 3.0)`):
            In µM; the compounds' EC50s lie around 0.2-1 µM.
        control_wells_per_plate (`int`, *optional*, defaults to 4):
            The number of DMSO wells per plate.
        sites_per_well (`int`, *optional*, defaults to 3):
            The number of fields of view per well.
        plates_per_treatment (`int`, *optional*):
            The number of plates each treatment is on (`None`: every plate), spread over as many
            batches as possible.
        batch_effect_strength (`float`, *optional*, defaults to 1.0):
            0: none; 1: realistic; 2+: severe.
        dtype (`str`, *optional*, defaults to `"uint16"`):
            `"uint16"` (12-bit range) or `"uint8"`.
        seed (`int`, *optional*, defaults to 0):
            The seed everything is drawn from.
    """

    num_channels: int = 3
    channel_names: tuple[str, ...] | None = None  # defaults from CHANNEL_SETS / "DNA", "ch1", ...
    image_size: int = 64
    num_batches: int = 4
    plates_per_batch: int = 2
    moas: tuple[str, ...] = DEFAULT_MOAS
    compounds_per_moa: int = 2
    concentrations: tuple[float, ...] = (0.3, 1.0, 3.0)  # µM; the compounds' EC50s lie around 0.2-1 µM
    control_wells_per_plate: int = 4
    sites_per_well: int = 3
    plates_per_treatment: int | None = None
    batch_effect_strength: float = 1.0  # 0: none; 1: realistic; 2+: severe
    dtype: str = "uint16"  # "uint16" (12-bit range) or "uint8"
    seed: int = 0

    def __post_init__(self) -> None:
        self.moas = tuple(self.moas)
        self.concentrations = tuple(float(c) for c in self.concentrations)
        if self.channel_names is not None:
            self.channel_names = tuple(self.channel_names)
        self.validate()

    @property
    def num_plates(self) -> int:
        return self.num_batches * self.plates_per_batch

    @property
    def num_treatments(self) -> int:
        return len(self.moas) * self.compounds_per_moa * len(self.concentrations)

    @property
    def num_images(self) -> int:
        placements = self.num_treatments * (self.plates_per_treatment or self.num_plates)
        return (placements + self.num_plates * self.control_wells_per_plate) * self.sites_per_well

    def resolved_channel_names(self) -> tuple[str, ...]:
        if self.channel_names is not None:
            return self.channel_names
        return CHANNEL_SETS.get(
            self.num_channels, ("DNA",) + tuple(f"ch{i}" for i in range(1, self.num_channels))
        )

    def validate(self) -> None:
        if not 2 <= self.num_channels <= 8:
            raise ValueError(f"num_channels must be 2..8 (DNA + cytoplasm stains), got {self.num_channels}")
        if self.channel_names is not None and len(self.channel_names) != self.num_channels:
            raise ValueError(f"{len(self.channel_names)} channel_names for {self.num_channels} channels")
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {self.image_size}")
        if self.num_batches < 1 or self.plates_per_batch < 1 or self.num_plates < 2:
            raise ValueError("need at least 2 plates in total (cross-domain partners need two domains)")
        if not self.moas:
            raise ValueError("moas must not be empty")
        unknown = [m for m in self.moas if m not in MOA_PHENOTYPES]
        if unknown:
            raise ValueError(f"unknown MoA(s) {unknown}; choose from {sorted(MOA_PHENOTYPES)}")
        if len(set(self.moas)) != len(self.moas):
            raise ValueError(f"moas has duplicates: {self.moas}")
        if self.compounds_per_moa < 1 or not self.concentrations or min(self.concentrations) <= 0:
            raise ValueError("need compounds_per_moa >= 1 and at least one positive concentration")
        if len(set(self.concentrations)) != len(self.concentrations):
            raise ValueError(f"concentrations has duplicates: {self.concentrations}")
        if self.control_wells_per_plate < 1:
            raise ValueError("every plate needs at least one DMSO control well")
        if self.sites_per_well < 1:
            raise ValueError("sites_per_well must be >= 1")
        if self.plates_per_treatment is not None and not 2 <= self.plates_per_treatment <= self.num_plates:
            raise ValueError(
                f"plates_per_treatment must be in [2, {self.num_plates}] so that every treatment has "
                f"partners on another plate, got {self.plates_per_treatment}"
            )
        treatments_per_plate = np.zeros(self.num_plates, dtype=int)
        for treatment in range(self.num_treatments):
            treatments_per_plate[_plates_for_treatment(treatment, self)] += 1
        wells = self.control_wells_per_plate + int(treatments_per_plate.max())
        if wells > 384:
            raise ValueError(f"{wells} wells per plate do not fit a 384-well plate")
        if self.batch_effect_strength < 0:
            raise ValueError("batch_effect_strength must be >= 0")
        if self.dtype not in ("uint16", "uint8"):
            raise ValueError(f"dtype must be 'uint16' or 'uint8', got {self.dtype!r}")


def config_for_num_images(num_images: int, **overrides) -> SyntheticScreenConfig:
    """A config whose image count is close to `num_images`, keeping the plate layout balanced.

    `sites_per_well` is chosen first; when one site per well is still too many, plates per batch and
    then batches are reduced (down to 2 plates). The count is approximate (it moves in steps of one
    site per well across the screen, and cannot go below one site on 2 plates); read
    `config.num_images` for the exact number.

    Args:
        num_images (`int`):
            The wanted number of images.
        **overrides:
            Other `SyntheticScreenConfig` fields; a `sites_per_well` among them is ignored.

    Returns:
        `SyntheticScreenConfig`: the config.
    """
    if num_images < 1:
        raise ValueError("num_images must be positive")
    overrides.pop("sites_per_well", None)
    config = SyntheticScreenConfig(**{**overrides, "sites_per_well": 1})
    while config.num_images > num_images and config.num_plates > 2:
        if config.plates_per_batch > 1:
            smaller = {"plates_per_batch": config.plates_per_batch - 1}
        else:
            smaller = {"num_batches": config.num_batches - 1}
        try:
            config = dataclasses.replace(config, **smaller)
        except ValueError:  # e.g. plates_per_treatment no longer fits
            break
    sites = max(1, round(num_images / config.num_images))
    return dataclasses.replace(config, sites_per_well=sites)


# ----------------------------------------------------------------------------------------------
# Layout: plates, wells, treatments
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Compound:
    name: str
    moa: str
    direction: np.ndarray  # morphology shift at full strength
    channel_shift: np.ndarray  # per-channel log-intensity shift at full strength (DNA first, 0)
    ec50: float
    hill: float

    def strength(self, concentration: float) -> float:
        """Fraction of the full phenotype reached at this concentration (Hill curve)."""
        ratio = (concentration / self.ec50) ** self.hill
        return ratio / (1.0 + ratio)


def _profile_keys(channel_names: Sequence[str]) -> list[str]:
    """The `CHANNEL_PROFILES` key of each cytoplasm channel (every channel but the first, DNA).

    By name where it is a known stain, else cycling through the generic order.
    """
    return [
        name.lower()
        if name.lower() in CHANNEL_PROFILES
        else _GENERIC_PROFILE_ORDER[i % len(_GENERIC_PROFILE_ORDER)]
        for i, name in enumerate(channel_names[1:])
    ]


def _compound_prefixes(moas: Sequence[str]) -> dict[str, str]:
    """Short compound-name prefix per MoA ("dna_damage" -> "DD"); the full name if initials collide."""
    initials = {moa: "".join(word[0] for word in moa.split("_")).upper() for moa in moas}
    if len(set(initials.values())) < len(initials):
        return {moa: moa for moa in moas}
    return initials


def _draw_compounds(config: SyntheticScreenConfig, rng: np.random.Generator) -> list[_Compound]:
    profile_keys = _profile_keys(config.resolved_channel_names())
    prefixes = _compound_prefixes(config.moas)
    compounds = []
    for moa in config.moas:
        phenotype = MOA_PHENOTYPES[moa]
        moa_vector = phenotype.vector()
        moa_channels = np.array([0.0] + [phenotype.channel_intensity.get(k, 0.0) for k in profile_keys])
        for index in range(config.compounds_per_moa):
            # Same MoA, not the same molecule: its own efficacy, a small off-target signature, its own EC50.
            efficacy = float(np.exp(rng.normal(0.0, 0.15)))
            off_target = rng.normal(0.0, 0.03, size=moa_vector.shape)
            off_target[_P["fragmentation"]] = 0.0
            channel_off_target = rng.normal(0.0, 0.03, size=moa_channels.shape)
            channel_off_target[0] = 0.0
            compounds.append(
                _Compound(
                    name=f"{prefixes[moa]}-{index + 1:02d}",
                    moa=moa,
                    direction=efficacy * moa_vector + off_target,
                    channel_shift=efficacy * moa_channels + channel_off_target,
                    ec50=float(np.exp(rng.uniform(np.log(0.2), np.log(1.0)))),
                    hill=float(rng.uniform(1.2, 2.0)),
                )
            )
    return compounds


def _well_names(count: int) -> list[str]:
    rows, columns = (8, 12) if count <= 96 else (16, 24)
    return [f"{string.ascii_uppercase[r]}{c + 1:02d}" for r in range(rows) for c in range(columns)]


def _plates_for_treatment(treatment_index: int, config: SyntheticScreenConfig) -> list[int]:
    """Plate indices (batch-major) of one treatment, spread over as many batches as possible."""
    if config.plates_per_treatment is None:
        return list(range(config.num_plates))
    # Interleave plates by batch (b0p0, b1p0, ..., b0p1, ...) so consecutive picks change batch.
    interleaved = [
        batch * config.plates_per_batch + plate
        for plate in range(config.plates_per_batch)
        for batch in range(config.num_batches)
    ]
    start = treatment_index % config.num_plates
    return [interleaved[(start + k) % config.num_plates] for k in range(config.plates_per_treatment)]


def _build_layout(
    config: SyntheticScreenConfig, compounds: list[_Compound], rng: np.random.Generator
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Metadata rows plus, per row, its compound index (-1 for DMSO) and plate index."""
    treatments = [(c, conc) for c in range(len(compounds)) for conc in config.concentrations]
    wells_of_plate: list[list[tuple[int, float]]] = [
        [(-1, CONTROL_CONCENTRATION)] * config.control_wells_per_plate for _ in range(config.num_plates)
    ]
    for t_index, treatment in enumerate(treatments):
        for plate in _plates_for_treatment(t_index, config):
            wells_of_plate[plate].append(treatment)

    rows, compound_of_row, plate_of_row = [], [], []
    for plate, contents in enumerate(wells_of_plate):
        batch = plate // config.plates_per_batch
        # Randomised plate map, as in real screens, so that well position is not confounded with MoA.
        names = _well_names(len(contents))
        positions = rng.permutation(len(names))[: len(contents)]
        for slot, (compound_index, concentration) in enumerate(contents):
            well = names[positions[slot]]
            for site in range(config.sites_per_well):
                if compound_index < 0:
                    compound, moa = CONTROL_COMPOUND, CONTROL_MOA
                else:
                    compound, moa = compounds[compound_index].name, compounds[compound_index].moa
                rows.append(
                    {
                        "plate": f"plate{plate + 1:02d}",
                        "well": well,
                        "site": str(site + 1),
                        "batch": f"batch{batch + 1:02d}",
                        "compound": compound,
                        "concentration": concentration,
                        "treatment": f"{compound}@{concentration:g}",
                        "moa": moa,
                        "is_control": compound_index < 0,
                    }
                )
                compound_of_row.append(compound_index)
                plate_of_row.append(plate)
    metadata = pd.DataFrame(rows)
    site_number = metadata["site"].astype(int).to_numpy()
    order = np.lexsort((site_number, metadata["well"].to_numpy(), np.array(plate_of_row)))
    metadata = metadata.iloc[order].reset_index(drop=True)
    return metadata, np.asarray(compound_of_row)[order], np.asarray(plate_of_row)[order]


# ----------------------------------------------------------------------------------------------
# Batch effects
# ----------------------------------------------------------------------------------------------


@dataclass
class _PlateAcquisition:
    """How one plate was stained and imaged.

    Identity (gain 1, offset 0, flat field, no blur) at strength 0 apart from the shared camera noise.
    """

    gain: np.ndarray  # (C,)
    offset: np.ndarray  # (C,) ADU on top of the camera dark level
    illumination: np.ndarray  # (C, H, W) multiplicative field
    blur_sigma: float  # px
    noise_scale: float
    biology_drift: np.ndarray  # (P,) morphology shift (same units as MoA directions)


def _illumination_field(coefficients: np.ndarray, size: int) -> np.ndarray:
    """(C, H, W) field 1 + gx*x + gy*y + v*r^2 + q*x*y from per-channel coefficients (C, 4)."""
    axis = np.linspace(-1.0, 1.0, size)
    y, x = np.meshgrid(axis, axis, indexing="ij")
    basis = np.stack([x, y, x**2 + y**2 - 2.0 / 3.0, x * y])  # r^2 centred so vignetting keeps the mean
    field_ = 1.0 + np.tensordot(coefficients, basis, axes=1)
    return np.clip(field_, 0.2, None)


def _draw_acquisitions(config: SyntheticScreenConfig, rng: np.random.Generator) -> list[_PlateAcquisition]:
    """Per-batch effects plus smaller per-plate deviations, all proportional to the strength.

    Draws are standard-normal and scaled afterwards, so changing the strength changes the size of
    the batch effects but not their direction.
    """
    s = config.batch_effect_strength
    channels = config.num_channels
    num_params = len(MORPHOLOGY_PARAMETERS)
    drifting = [
        _P["log_cell_density"],
        _P["log_nucleus_radius"],
        _P["log_cytoplasm_spread"],
        _P["log_dna_intensity"],
    ]

    def batch_like() -> dict[str, np.ndarray | float]:
        return {
            "log_gain": rng.standard_normal(channels),
            "offset": rng.standard_normal(channels),
            # gradient x, gradient y, vignetting (mostly darker edges), saddle
            "illumination": rng.standard_normal((1, 4)) + 0.3 * rng.standard_normal((channels, 4)),
            "blur": rng.uniform(0.0, 1.0),
            "log_noise": rng.standard_normal(),
            "drift": rng.standard_normal(num_params),
        }

    illumination_scale = np.array([0.12, 0.12, 0.10, 0.06])
    vignetting_bias = np.array([0.0, 0.0, -0.12, 0.0])
    acquisitions = []
    for _batch in range(config.num_batches):
        batch = batch_like()
        for _plate in range(config.plates_per_batch):
            plate = batch_like()
            drift = np.zeros(num_params)
            drift[drifting] = 0.06 * batch["drift"][drifting] + 0.02 * plate["drift"][drifting]
            acquisitions.append(
                _PlateAcquisition(
                    gain=np.exp(s * (0.25 * batch["log_gain"] + 0.07 * plate["log_gain"])),
                    offset=s * (60.0 * np.abs(batch["offset"]) + 15.0 * plate["offset"]),
                    illumination=_illumination_field(
                        s
                        * (
                            illumination_scale * batch["illumination"]
                            + vignetting_bias
                            + 0.25 * illumination_scale * plate["illumination"]
                        ),
                        config.image_size,
                    ),
                    blur_sigma=s * (1.1 * batch["blur"] + 0.25 * plate["blur"]),
                    noise_scale=float(np.exp(s * (0.3 * batch["log_noise"] + 0.08 * plate["log_noise"]))),
                    biology_drift=s * drift,
                )
            )
    return acquisitions


def _gaussian_blur(stack: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over the last two axes with reflected borders (no wrap-around)."""
    if sigma < 0.2:
        return stack
    radius = max(1, int(math.ceil(3.0 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(stack.dtype)
    for axis in (-2, -1):
        pad = [(0, 0)] * stack.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(stack, pad, mode="reflect")
        length = stack.shape[axis]
        out = np.zeros_like(stack)
        for offset, weight in enumerate(taps):
            out += weight * np.take(padded, np.arange(offset, offset + length), axis=axis)
        stack = out
    return stack


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


@dataclass
class _Shapes:
    """Irregular ellipses, one per object.

    Each is an ellipse (radius, aspect, angle) whose radius is modulated by angular harmonics
    k = 2..4 (`harmonics`: (n, 3, 2) cos/sin amplitudes).
    """

    center_y: np.ndarray
    center_x: np.ndarray
    radius: np.ndarray
    aspect: np.ndarray
    angle: np.ndarray
    harmonics: np.ndarray

    def extent(self) -> np.ndarray:
        """A bound on each object's half-width in px."""
        # |a cos(k phi) + b sin(k phi)| <= sqrt(a^2 + b^2) for each harmonic.
        return (
            self.radius * np.sqrt(self.aspect) * (1.0 + np.sqrt((self.harmonics**2).sum(axis=2)).sum(axis=1))
        )

    def take(self, index: np.ndarray) -> _Shapes:
        return _Shapes(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


def _shape_maps(shapes: _Shapes, top: np.ndarray, left: np.ndarray, window: int, edge_px: float):
    """Render each object in its own `window` x `window` patch whose top-left pixel is (top, left).

    Rendering patches instead of whole fields of view is what keeps ~1k images within seconds.
    cos(k phi) and sin(k phi) come from products of cos(phi), sin(phi), far cheaper than arctan2 + cos.

    Returns:
        `tuple[np.ndarray, np.ndarray, np.ndarray]`: float32 (n, window, window) maps: soft mask in
        [0, 1], radial position relative to the boundary (0 centre, 1 edge), depth inside the
        boundary in px.
    """
    f32 = np.float32
    offsets = np.arange(window, dtype=f32) + f32(0.5)
    dy = (top.astype(f32)[:, None] + offsets[None] - shapes.center_y.astype(f32)[:, None])[:, :, None]
    dx = (left.astype(f32)[:, None] + offsets[None] - shapes.center_x.astype(f32)[:, None])[:, None, :]
    expand = (slice(None), None, None)
    cos_a, sin_a = np.cos(shapes.angle).astype(f32)[expand], np.sin(shapes.angle).astype(f32)[expand]
    inv_major = (1.0 / (shapes.radius * np.sqrt(shapes.aspect))).astype(f32)[expand]
    inv_minor = (np.sqrt(shapes.aspect) / shapes.radius).astype(f32)[expand]
    u = (dx * cos_a + dy * sin_a) * inv_major
    v = (dy * cos_a - dx * sin_a) * inv_minor
    rho = np.sqrt(u * u + v * v) + f32(1e-6)
    c1, s1 = u / rho, v / rho
    c2, s2 = c1 * c1 - s1 * s1, f32(2.0) * c1 * s1
    c3, s3 = c2 * c1 - s2 * s1, s2 * c1 + c2 * s1
    c4, s4 = c2 * c2 - s2 * s2, f32(2.0) * c2 * s2
    h = shapes.harmonics.astype(f32)[:, :, :, None, None]
    boundary = (
        1.0
        + h[:, 0, 0] * c2
        + h[:, 0, 1] * s2
        + h[:, 1, 0] * c3
        + h[:, 1, 1] * s3
        + h[:, 2, 0] * c4
        + h[:, 2, 1] * s4
    )
    relative = rho / boundary
    depth = (f32(1.0) - relative) * shapes.radius.astype(f32)[expand]
    mask = np.clip(depth * f32(1.0 / edge_px) + f32(0.5), 0.0, 1.0)
    return mask, relative, depth


def _paste_max(
    num_images: int, size: int, image_of_object: np.ndarray, shapes: _Shapes, maps_fn, edge_px: float
) -> np.ndarray:
    """Render objects in patches and combine them per image by maximum -> (num_images, M, size, size).

    `maps_fn(mask, relative, depth, objects)` returns the (n, M, w, w) maps to paste for the object
    indices `objects` (mask etc. as from `_shape_maps`). Max, not sum: cells in a monolayer sit
    side by side, and stacking would make overlaps glow.
    """
    canvas = None
    # Objects are rendered in a few size classes, each with one (vectorised) patch size that fits its
    # largest member, so that a few big cells do not make every patch big.
    by_size = np.argsort(shapes.extent(), kind="stable")
    for objects in np.array_split(by_size, min(4, len(by_size))):
        group = shapes.take(objects)
        window = int(min(2 * math.ceil(group.extent().max() + 2 * edge_px) + 2, size))
        # Keep patches inside the frame: an object that pokes out of the frame loses only what would
        # be cropped anyway, because a patch shifted inward still holds the in-frame part of it.
        top = np.clip(np.floor(group.center_y).astype(int) - window // 2, 0, size - window)
        left = np.clip(np.floor(group.center_x).astype(int) - window // 2, 0, size - window)
        maps = maps_fn(*_shape_maps(group, top, left, window, edge_px), objects)
        if canvas is None:
            canvas = np.zeros((num_images, maps.shape[1], size, size), dtype=np.float32)
        for image, y, x, patch in zip(image_of_object[objects], top, left, maps, strict=True):
            target = canvas[image, :, y : y + window, x : x + window]
            np.maximum(target, patch, out=target)
    return canvas


def _texture_fields(
    rng: np.random.Generator, count: int, channels: int, size: int, scale_px: np.ndarray
) -> np.ndarray:
    """Unit-variance Gaussian random fields (count, channels, H, W), smoothed at `scale_px` (count, channels)."""
    noise = rng.standard_normal((count, channels, size, size), dtype=np.float32)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    freq2 = (fy * fy + fx * fx)[None, None]
    transfer = np.exp(-2.0 * np.pi**2 * freq2 * (scale_px[..., None, None] ** 2))
    fields = np.fft.irfft2(np.fft.rfft2(noise) * transfer, s=(size, size)).astype(np.float32)
    fields -= fields.mean(axis=(-2, -1), keepdims=True)
    fields /= fields.std(axis=(-2, -1), keepdims=True) + 1e-6
    return fields


def _render_chunk(
    rng: np.random.Generator,
    config: SyntheticScreenConfig,
    profiles: list[ChannelProfile],
    image_shift: np.ndarray,
    image_drift: np.ndarray,
    image_channel_shift: np.ndarray,
) -> np.ndarray:
    """Noise-free fluorescence (B, C, H, W), float32, in units of a typical nucleus' DNA brightness.

    Args:
        rng (`np.random.Generator`):
            The random source.
        config (`SyntheticScreenConfig`):
            The screen.
        profiles (`list[ChannelProfile]`):
            The profile of each cytoplasm channel.
        image_shift (`np.ndarray` of shape `(B, P)`):
            Treatment effect (compound direction x dose strength).
        image_drift (`np.ndarray` of shape `(B, P)`):
            Batch/plate/well drift.
        image_channel_shift (`np.ndarray` of shape `(B, C)`):
            Log-intensity shift per channel.
    """
    count = image_shift.shape[0]
    size = config.image_size
    scale = size / 64.0
    mean_params = image_drift + image_shift

    # --- cells: how many per image, and each cell's own parameters ------------------------------
    expected_cells = _CELLS_PER_FIELD * scale**2 * np.exp(mean_params[:, _P["log_cell_density"]])
    cells_per_image = np.clip(rng.poisson(expected_cells), 1, _MAX_CELLS_PER_FIELD * scale**2).astype(int)
    image_of_cell = np.repeat(np.arange(count), cells_per_image)
    num_cells = image_of_cell.size
    # Cells respond unevenly to the same treatment; and vary on their own.
    response = np.clip(rng.normal(1.0, 0.35, num_cells), 0.0, 2.0)
    cell_params = image_drift[image_of_cell] + response[:, None] * image_shift[image_of_cell]
    P = _P

    center_y = rng.uniform(-0.1 * size, 1.1 * size, num_cells)
    center_x = rng.uniform(-0.1 * size, 1.1 * size, num_cells)
    nucleus_radius = (
        _NUCLEUS_RADIUS_PX
        * scale
        * np.exp(cell_params[:, P["log_nucleus_radius"]] + rng.normal(0, 0.12, num_cells))
    )
    nucleus_aspect = np.exp(
        np.abs(rng.normal(0.15, 0.12, num_cells)) + cell_params[:, P["nucleus_elongation"]]
    )
    nucleus_angle = rng.uniform(0, np.pi, num_cells)
    dna_brightness = np.exp(cell_params[:, P["log_dna_intensity"]] + rng.normal(0, 0.12, num_cells))
    # A few cells die spontaneously in every well; the treatment raises that probability.
    fragment_probability = np.clip(0.03 + cell_params[:, P["fragmentation"]], 0.0, 0.95)
    fragmented = rng.random(num_cells) < fragment_probability

    # --- nuclei: one irregular ellipse per healthy cell, 3-6 small bright bodies per apoptotic one --
    bodies = np.where(fragmented, rng.integers(3, 7, num_cells), 1)
    cell_of_body = np.repeat(np.arange(num_cells), bodies)
    is_fragment = fragmented[cell_of_body]
    num_bodies = cell_of_body.size
    spread_angle = rng.uniform(0, 2 * np.pi, num_bodies)
    spread_distance = (
        np.where(is_fragment, rng.uniform(0.3, 1.0, num_bodies), 0.0) * nucleus_radius[cell_of_body]
    )
    body_radius = nucleus_radius[cell_of_body] * np.where(is_fragment, rng.uniform(0.3, 0.5, num_bodies), 1.0)
    lobulation = 0.05 + np.maximum(cell_params[cell_of_body, P["nucleus_lobulation"]], 0.0)
    body_harmonics = rng.normal(0.0, 1.0, (num_bodies, 3, 2)) * (lobulation / np.sqrt(3.0))[:, None, None]
    body_harmonics[is_fragment] *= 0.3  # condensed apoptotic bodies are round
    nuclei = _Shapes(
        center_y=center_y[cell_of_body] + spread_distance * np.sin(spread_angle),
        center_x=center_x[cell_of_body] + spread_distance * np.cos(spread_angle),
        radius=body_radius,
        aspect=np.where(is_fragment, 1.0, nucleus_aspect[cell_of_body]),
        angle=nucleus_angle[cell_of_body],
        harmonics=body_harmonics,
    )
    # Chromatin is a little brighter in the middle; condensed bodies are much brighter.
    body_brightness = (dna_brightness[cell_of_body] * np.where(is_fragment, 1.8, 1.0)).astype(np.float32)

    def nucleus_maps(mask, relative, depth, objects):
        signal = mask * (1.0 - 0.25 * np.clip(relative, 0.0, 1.0) ** 2) * body_brightness[objects, None, None]
        return np.stack([signal, mask], axis=1)

    dna, nucleus_coverage = _paste_max(
        count, size, image_of_cell[cell_of_body], nuclei, nucleus_maps, edge_px=0.9 * scale
    ).transpose(1, 0, 2, 3)

    # --- cytoplasm: compartments (fill, perinuclear, cortex) of one irregular shape per cell --------
    spread = _CYTOPLASM_TO_NUCLEUS * np.exp(
        cell_params[:, P["log_cytoplasm_spread"]] + rng.normal(0, 0.15, num_cells)
    )
    spread = np.where(fragmented, 0.65 * spread, spread)  # apoptotic cells shrink
    irregularity = np.clip(0.12 + cell_params[:, P["cytoplasm_irregularity"]], 0.02, 0.4)
    offset = rng.normal(0.0, 0.25, (num_cells, 2)) * nucleus_radius[:, None]
    cells = _Shapes(
        center_y=center_y + offset[:, 0],
        center_x=center_x + offset[:, 1],
        radius=nucleus_radius * spread,
        aspect=np.exp(np.abs(rng.normal(0.2, 0.15, num_cells)) + cell_params[:, P["cytoplasm_elongation"]]),
        angle=nucleus_angle + rng.normal(0, 0.3, num_cells),  # cells elongate roughly along their nucleus
        harmonics=rng.normal(0.0, 1.0, (num_cells, 3, 2)) * (irregularity / np.sqrt(3.0))[:, None, None],
    )
    cell_brightness = np.exp(rng.normal(0, 0.2, num_cells)).astype(np.float32)
    cortex_strength = np.exp(cell_params[:, P["log_cortex"]]).astype(np.float32)
    rim_width = np.float32(1.5 * scale)

    def cytoplasm_maps(mask, relative, depth, objects):
        fill = mask * cell_brightness[objects, None, None]
        perinuclear = fill * np.clip(1.0 - relative, 0.0, 1.0)
        rim = fill * np.clip(1.0 - depth / rim_width, 0.0, 1.0) * cortex_strength[objects, None, None]
        return np.stack([fill, perinuclear, rim], axis=1)

    fill, perinuclear, rim = _paste_max(
        count, size, image_of_cell, cells, cytoplasm_maps, edge_px=1.2 * scale
    ).transpose(1, 0, 2, 3)

    # --- textures and channel assembly --------------------------------------------------------
    num_cyto = len(profiles)
    base_scale = np.array([p.texture_scale for p in profiles]) * scale
    base_contrast = np.array([p.texture_contrast for p in profiles])
    texture_scale = base_scale[None] * np.exp(mean_params[:, P["log_texture_scale"], None])
    texture_contrast = (base_contrast[None] * np.exp(mean_params[:, P["log_texture_contrast"], None])).astype(
        np.float32
    )
    textures = _texture_fields(
        rng,
        count,
        num_cyto + 1,
        size,
        np.concatenate([np.full((count, 1), 0.8 * scale), texture_scale], axis=1),
    )
    # Log-normal texture keeps intensities positive; the -c^2/2 keeps the mean brightness unchanged.
    contrast = texture_contrast[..., None, None]
    texture_gain = np.exp(contrast * textures[:, 1:] - 0.5 * contrast**2)

    images = np.empty((count, num_cyto + 1, size, size), dtype=np.float32)
    images[:, 0] = dna * (1.0 + 0.12 * textures[:, 0])  # chromatin texture
    channel_gain = np.exp(image_channel_shift).astype(np.float32)
    for k, profile in enumerate(profiles):
        compartments = profile.fill * fill + profile.perinuclear * perinuclear + profile.cortex * rim
        cytoplasm = compartments * texture_gain[:, k] * (1.0 - profile.nuclear_exclusion * nucleus_coverage)
        images[:, k + 1] = profile.brightness * (cytoplasm + profile.nucleus * dna)
    images *= channel_gain[:, :, None, None]
    images[:, 1:] += 0.03  # autofluorescence of medium and plastic
    return images


def _to_counts(signal: np.ndarray, acquisition: _PlateAcquisition, rng: np.random.Generator) -> np.ndarray:
    """Microscope + camera for one plate: illumination, optics blur, gain, offset, shot/read noise (ADU)."""
    adu = signal * np.float32(_DNA_PEAK_ADU)
    adu *= acquisition.illumination.astype(np.float32)[None]
    adu = _gaussian_blur(adu, acquisition.blur_sigma)
    adu *= acquisition.gain.astype(np.float32)[None, :, None, None]
    shot_sd = np.sqrt(np.maximum(adu, 0.0) * _SHOT_NOISE_ADU_PER_PHOTON)
    noise = rng.standard_normal(adu.shape, dtype=np.float32)
    adu += acquisition.noise_scale * np.sqrt(shot_sd**2 + _READ_NOISE**2) * noise
    adu += (_CAMERA_OFFSET + acquisition.offset).astype(np.float32)[None, :, None, None]
    return adu


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

_RENDER_CHUNK = 64  # images rendered together: big enough to vectorise, small enough for cache / RAM


def generate_synthetic_screen(config: SyntheticScreenConfig | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """Draw a synthetic screen; the same config gives identical bytes.

    Args:
        config (`SyntheticScreenConfig`, *optional*):
            The screen; the default config when `None`.

    Returns:
        `tuple[np.ndarray, pd.DataFrame]`: `images` (N, C, H, W) uint16 (12-bit range) or uint8, and
        `metadata`: a DataFrame with the screen schema columns (plate, well, site, batch, compound,
        concentration, treatment, moa, is_control), one row per image, sorted by plate, well, site.
    """
    config = config or SyntheticScreenConfig()
    config.validate()
    # One independent stream per purpose, so that e.g. more sites per well do not reshuffle the batch effects.
    layout_seq, compound_seq, acquisition_seq, well_seq, cell_seq, noise_seq = np.random.SeedSequence(
        config.seed
    ).spawn(6)
    channel_names = config.resolved_channel_names()
    profiles = [CHANNEL_PROFILES[key] for key in _profile_keys(channel_names)]
    compounds = _draw_compounds(config, np.random.default_rng(compound_seq))
    metadata, compound_of_row, plate_of_row = _build_layout(
        config, compounds, np.random.default_rng(layout_seq)
    )
    acquisitions = _draw_acquisitions(config, np.random.default_rng(acquisition_seq))

    num_images = len(metadata)
    num_params = len(MORPHOLOGY_PARAMETERS)
    concentration = metadata["concentration"].to_numpy()
    image_shift = np.zeros((num_images, num_params))
    image_channel_shift = np.zeros((num_images, config.num_channels))
    for index, compound in enumerate(compounds):
        rows = np.flatnonzero(compound_of_row == index)
        strength = np.array([compound.strength(c) for c in concentration[rows]])
        image_shift[rows] = strength[:, None] * compound.direction
        image_channel_shift[rows] = strength[:, None] * compound.channel_shift
    image_drift = np.stack([acquisitions[p].biology_drift for p in plate_of_row])
    # Wells differ a little in seeding density even within a plate.
    well_keys = pd.factorize(metadata["plate"] + "/" + metadata["well"])[0]
    well_density = np.random.default_rng(well_seq).normal(0.0, 0.08, well_keys.max() + 1)
    image_drift[:, _P["log_cell_density"]] += well_density[well_keys]

    cell_rng = np.random.default_rng(cell_seq)
    signal = np.empty(
        (num_images, config.num_channels, config.image_size, config.image_size), dtype=np.float32
    )
    for start in range(0, num_images, _RENDER_CHUNK):
        chunk = slice(start, start + _RENDER_CHUNK)
        signal[chunk] = _render_chunk(
            cell_rng, config, profiles, image_shift[chunk], image_drift[chunk], image_channel_shift[chunk]
        )

    noise_rng = np.random.default_rng(noise_seq)
    full_scale = _FULL_SCALE_12BIT if config.dtype == "uint16" else 255
    images = np.empty(signal.shape, dtype=np.dtype(config.dtype))
    for plate, acquisition in enumerate(acquisitions):
        rows = np.flatnonzero(plate_of_row == plate)
        if rows.size == 0:
            continue
        adu = _to_counts(signal[rows], acquisition, noise_rng)
        if config.dtype == "uint8":
            adu *= np.float32(255.0 / _FULL_SCALE_12BIT)
        images[rows] = np.clip(np.rint(adu), 0, full_scale).astype(config.dtype)
    return images, metadata


def synthetic_screen_dataset(config: SyntheticScreenConfig | None = None, **overrides):
    """The synthetic screen as a screen-schema `datasets.Dataset` (see docs/dataset-schema.md).

    Args:
        config (`SyntheticScreenConfig`, *optional*):
            The screen; the default config when `None`.
        **overrides:
            Replace fields of `config` (or of the default config), e.g.
            `synthetic_screen_dataset(batch_effect_strength=2.0, seed=3)`.
    """
    # Imported here so that generating arrays does not pay for importing datasets / pyarrow.
    from cdcl_hf.screen_data import dataset_from_arrays

    config = dataclasses.replace(config or SyntheticScreenConfig(), **overrides)
    images, metadata = generate_synthetic_screen(config)
    return dataset_from_arrays(images, metadata, channel_names=list(config.resolved_channel_names()))


# ----------------------------------------------------------------------------------------------
# Baseline features: what "raw pixels" see, used to show the batch effect
# ----------------------------------------------------------------------------------------------


def raw_pixel_features(images: np.ndarray, grid: int = 4) -> np.ndarray:
    """Simple, learning-free image features, standardised per column.

    Per channel: mean, standard deviation, 5/50/95 % quantiles, mean absolute gradient (texture /
    sharpness), and the mean intensity on a coarse `grid` x `grid` tiling (sees illumination
    gradients). Batch effects dominate this kind of representation, which is what the tests and the
    docs use it to show.

    Args:
        images (`np.ndarray` of shape `(N, C, H, W)`):
            The images.
        grid (`int`, *optional*, defaults to 4):
            The side of the tiling; 0 leaves the tile means out.

    Returns:
        `np.ndarray` of shape `(N, F)`: the features.
    """
    x = images.astype(np.float32)
    n, c, h, w = x.shape
    flat = x.reshape(n, c, -1)
    gradient = 0.5 * (
        np.abs(np.diff(x, axis=-1)).mean(axis=(-2, -1)) + np.abs(np.diff(x, axis=-2)).mean(axis=(-2, -1))
    )
    parts = [
        flat.mean(-1, keepdims=True),
        flat.std(-1, keepdims=True),
        np.quantile(flat, [0.05, 0.5, 0.95], axis=-1).transpose(1, 2, 0),
        gradient[..., None],
    ]
    if grid:
        tiles = x[:, :, : h - h % grid, : w - w % grid].reshape(n, c, grid, h // grid, grid, w // grid)
        parts.append(tiles.mean(axis=(3, 5)).reshape(n, c, -1))
    features = np.concatenate(parts, axis=-1).reshape(n, -1).astype(np.float64)
    features -= features.mean(axis=0)
    return features / (features.std(axis=0) + 1e-8)


def same_label_neighbour_rate(
    features: np.ndarray, labels: Sequence, exclude: Sequence | None = None
) -> float:
    """Fraction of rows whose Euclidean nearest neighbour (itself excluded) has the same label.

    Args:
        features (`np.ndarray` of shape `(N, F)`):
            One feature vector per row.
        labels (`Sequence`):
            The label of each row.
        exclude (`Sequence`, *optional*):
            A group per row; neighbours from the row's own group are not considered (e.g. pass the
            compound to ask "is the nearest *other* compound of the same MoA?").
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    squared = (features**2).sum(axis=1)
    distances = squared[:, None] + squared[None, :] - 2.0 * features @ features.T
    np.fill_diagonal(distances, np.inf)
    if exclude is not None:
        exclude = np.asarray(exclude)
        distances[exclude[:, None] == exclude[None, :]] = np.inf
    nearest = distances.argmin(axis=1)
    return float((labels[nearest] == labels).mean())


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = SyntheticScreenConfig()
    parser = CommandParser(
        prog="python -m cdcl_hf.synthetic_screen",
        description="Generate the built-in synthetic screen and save it with datasets' save_to_disk.",
    )
    parser.add_argument("--output_dir", required=True, help="where to save the dataset (save_to_disk)")
    parser.add_argument(
        "--num_images",
        type=positive_int,
        default=None,
        help=f"approximate number of images (default layout: {defaults.num_images})",
    )
    parser.add_argument(
        "--batch_effect_strength",
        type=non_negative_float,
        default=defaults.batch_effect_strength,
        help="0 = no batch effects, 1 = realistic, 2+ = severe",
    )
    parser.add_argument("--num_channels", type=positive_int, default=defaults.num_channels)
    parser.add_argument("--image_size", type=positive_int, default=defaults.image_size)
    parser.add_argument("--num_batches", type=positive_int, default=defaults.num_batches)
    parser.add_argument("--plates_per_batch", type=positive_int, default=defaults.plates_per_batch)
    parser.add_argument("--compounds_per_moa", type=positive_int, default=defaults.compounds_per_moa)
    parser.add_argument("--moas", nargs="+", default=list(defaults.moas), choices=sorted(MOA_PHENOTYPES))
    parser.add_argument("--dtype", choices=("uint16", "uint8"), default=defaults.dtype)
    parser.add_argument("--seed", type=non_negative_int, default=defaults.seed)
    add_debug_argument(parser)
    return parser.parse_args(argv)


# The synthetic screen the training and evaluation commands use by default ("--dataset_name synthetic"): each
# treatment on 2 plates in different batches, so cross-domain partners exist and NSCB is defined.
DEFAULT_CLI_SCREEN = {"num_images": 960, "image_size": 64, "num_channels": 3, "batch_effect_strength": 1.0,
                      "plates_per_treatment": 2}


def add_synthetic_screen_arguments(parser: argparse.ArgumentParser, default_seed: int = 0) -> None:
    """Add the `--synthetic_*` flags describing the screen that `--dataset_name synthetic` stands for.

    Args:
        parser (`argparse.ArgumentParser`):
            The parser to extend.
        default_seed (`int`, *optional*, defaults to 0):
            The default of `--synthetic_seed`.
    """
    group = parser.add_argument_group("synthetic screen (--dataset_name synthetic)")
    group.add_argument("--synthetic_num_images", type=positive_int, default=DEFAULT_CLI_SCREEN["num_images"],
                       help="approximate image count (the plate layout stays balanced)")
    group.add_argument("--synthetic_image_size", type=positive_int, default=DEFAULT_CLI_SCREEN["image_size"])
    group.add_argument("--synthetic_num_channels", type=positive_int, default=DEFAULT_CLI_SCREEN["num_channels"])
    group.add_argument("--synthetic_batch_effect_strength", type=non_negative_float,
                       default=DEFAULT_CLI_SCREEN["batch_effect_strength"])
    group.add_argument("--synthetic_plates_per_treatment", type=non_negative_int,
                       default=DEFAULT_CLI_SCREEN["plates_per_treatment"], help="0: every treatment on every plate")
    group.add_argument("--synthetic_seed", type=non_negative_int, default=default_seed,
                       help="draws plates, batch effects and compounds; another seed is a held-out screen")


def synthetic_screen_from_args(args: argparse.Namespace):
    """The `datasets.Dataset` described by the flags of `add_synthetic_screen_arguments`."""
    config = config_for_num_images(
        args.synthetic_num_images,
        image_size=args.synthetic_image_size,
        num_channels=args.synthetic_num_channels,
        batch_effect_strength=args.synthetic_batch_effect_strength,
        plates_per_treatment=args.synthetic_plates_per_treatment or None,
        seed=args.synthetic_seed,
    )
    return synthetic_screen_dataset(config)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    fields = {
        "batch_effect_strength": args.batch_effect_strength,
        "num_channels": args.num_channels,
        "image_size": args.image_size,
        "num_batches": args.num_batches,
        "plates_per_batch": args.plates_per_batch,
        "compounds_per_moa": args.compounds_per_moa,
        "moas": tuple(args.moas),
        "dtype": args.dtype,
        "seed": args.seed,
    }
    config = (
        config_for_num_images(args.num_images, **fields)
        if args.num_images
        else SyntheticScreenConfig(**fields)
    )
    started = time.perf_counter()
    with command_errors("python -m cdcl_hf.synthetic_screen", args.debug):
        output = Path(args.output_dir)
        if output.exists() and (not output.is_dir() or any(output.iterdir())):
            raise OutputSafetyError(f"--output_dir {output} exists and is not empty; choose a new or empty folder")
        dataset = synthetic_screen_dataset(config)
        with staged_directory(output) as staging:  # the dataset appears whole or not at all
            dataset.save_to_disk(str(staging))
            write_output_marker(staging, "screen_dataset")
    print(
        f"saved {len(dataset)} images ({config.num_channels}x{config.image_size}x{config.image_size} {config.dtype}, "
        f"{config.num_plates} plates in {config.num_batches} batches, {config.num_treatments} treatments + DMSO, "
        f"batch_effect_strength={config.batch_effect_strength:g}) to {args.output_dir} "
        f"in {time.perf_counter() - started:.1f}s"
    )


if __name__ == "__main__":
    main()
