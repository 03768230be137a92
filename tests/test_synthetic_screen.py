"""The built-in synthetic screen: determinism, schema, layout, and the two properties CDCL relies on:
batch effects dominate raw-pixel neighbours, while the MoA signal is there underneath."""

import dataclasses

import datasets
import numpy as np
import pandas as pd
import pytest

from cdcl_hf.synthetic_screen import (
    CONTROL_COMPOUND,
    DEFAULT_MOAS,
    MOA_PHENOTYPES,
    SyntheticScreenConfig,
    config_for_num_images,
    generate_synthetic_screen,
    main,
    raw_pixel_features,
    same_label_neighbour_rate,
    synthetic_screen_dataset,
)

SCHEMA_COLUMNS = [
    "plate",
    "well",
    "site",
    "batch",
    "compound",
    "concentration",
    "treatment",
    "moa",
    "is_control",
]

# 3 batches x 2 plates, 6 MoAs x 2 compounds x 3 doses + 2 DMSO wells, 2 sites: 456 images, ~0.5 s.
SMALL = SyntheticScreenConfig(
    num_batches=3, plates_per_batch=2, sites_per_well=2, control_wells_per_plate=2, seed=0
)


@pytest.fixture(scope="module")
def screens():
    """The small screen at batch-effect strengths 0 (none), 1 (realistic) and 2 (strong)."""
    return {
        strength: generate_synthetic_screen(dataclasses.replace(SMALL, batch_effect_strength=strength))
        for strength in (0.0, 1.0, 2.0)
    }


def chance_rate(labels, exclude=None) -> float:
    """Expected same-label nearest-neighbour rate of a neighbour picked at random among the candidates."""
    labels = np.asarray(labels)
    same = labels[:, None] == labels[None, :]
    allowed = ~np.eye(len(labels), dtype=bool)
    if exclude is not None:
        exclude = np.asarray(exclude)
        allowed &= exclude[:, None] != exclude[None, :]
    return float(((same & allowed).sum(1) / allowed.sum(1)).mean())


# ---------------------------------------------------------------------------------------------
# Determinism, shapes, schema
# ---------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_other_seed_differs():
    config = dataclasses.replace(SMALL, num_batches=2, plates_per_batch=1)
    images_a, metadata_a = generate_synthetic_screen(config)
    images_b, metadata_b = generate_synthetic_screen(config)
    assert images_a.tobytes() == images_b.tobytes()
    pd.testing.assert_frame_equal(metadata_a, metadata_b)

    images_c, _ = generate_synthetic_screen(dataclasses.replace(config, seed=1))
    assert images_c.shape == images_a.shape
    assert not np.array_equal(images_a, images_c)


def test_shapes_dtype_and_schema(screens):
    images, metadata = screens[1.0]
    assert images.shape == (SMALL.num_images, 3, 64, 64) == (456, 3, 64, 64)
    assert images.dtype == np.uint16
    assert images.max() <= 4095  # 12-bit camera range
    # Real signal, not blank or saturated frames: cells are much brighter than the background
    # (in nearly every image; a field of view may fall between nuclei or be confluent).
    per_image = images.reshape(len(images), 3, -1)
    contrast = np.percentile(per_image, 99, axis=-1) / np.percentile(per_image, 5, axis=-1)
    assert (contrast > 2).mean(axis=0).min() >= 0.95
    assert (images == 4095).mean() < 0.01

    assert list(metadata.columns) == SCHEMA_COLUMNS
    assert len(metadata) == len(images)
    assert metadata["concentration"].dtype == np.float64
    assert metadata["is_control"].dtype == bool
    for column in ("plate", "well", "site", "batch", "compound", "treatment", "moa"):
        assert all(isinstance(value, str) for value in metadata[column]), column
    assert not metadata.duplicated(["plate", "well", "site"]).any()
    expected_treatment = [
        f"{c}@{x:g}" for c, x in zip(metadata["compound"], metadata["concentration"], strict=True)
    ]
    assert metadata["treatment"].tolist() == expected_treatment
    # One treatment per well.
    assert (metadata.groupby(["plate", "well"])["treatment"].nunique() == 1).all()

    controls = metadata[metadata["is_control"]]
    assert (controls["compound"] == CONTROL_COMPOUND).all()
    assert (controls["concentration"] == 0.0).all()
    assert (controls["moa"] == "DMSO").all()
    assert not (metadata.loc[~metadata["is_control"], "compound"] == CONTROL_COMPOUND).any()


def test_uint8_five_channels_and_other_sizes():
    config = SyntheticScreenConfig(
        num_channels=5,
        image_size=48,
        dtype="uint8",
        num_batches=2,
        plates_per_batch=1,
        moas=("protein_synthesis_inhibitor", "mitochondrial_uncoupler"),
        sites_per_well=1,
    )
    images, metadata = generate_synthetic_screen(config)
    assert images.shape == (config.num_images, 5, 48, 48)
    assert images.dtype == np.uint8
    assert config.resolved_channel_names() == ("DNA", "ER", "RNA", "AGP", "Mito")
    assert set(metadata["moa"]) == {"protein_synthesis_inhibitor", "mitochondrial_uncoupler", "DMSO"}
    assert images.reshape(len(images), 5, -1).std(axis=-1).min() > 1  # every channel carries structure


# ---------------------------------------------------------------------------------------------
# Layout: MoAs, controls, cross-domain replicates
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plates_per_treatment", [None, 2, 3])
def test_layout_has_all_moas_controls_on_every_plate_and_cross_batch_replicates(plates_per_treatment):
    config = dataclasses.replace(SMALL, plates_per_treatment=plates_per_treatment, sites_per_well=1)
    _, metadata = generate_synthetic_screen(config)
    treated = metadata[~metadata["is_control"]]

    assert set(treated["moa"]) == set(DEFAULT_MOAS)
    assert (treated.groupby("moa")["compound"].nunique() == config.compounds_per_moa).all()
    assert (treated.groupby("compound")["concentration"].nunique() == len(config.concentrations)).all()
    assert treated["treatment"].nunique() == config.num_treatments

    assert metadata["plate"].nunique() == config.num_plates
    assert metadata.groupby("plate")["batch"].nunique().eq(1).all()
    assert metadata.groupby("batch")["plate"].nunique().eq(config.plates_per_batch).all()
    control_wells = metadata[metadata["is_control"]].groupby("plate")["well"].nunique()
    assert len(control_wells) == config.num_plates
    assert (control_wells == config.control_wells_per_plate).all()

    # Every treatment has partners in other batches: that is what CDCL pairs up.
    expected_plates = plates_per_treatment or config.num_plates
    assert (treated.groupby("treatment")["plate"].nunique() == expected_plates).all()
    assert (treated.groupby("treatment")["batch"].nunique() == min(expected_plates, config.num_batches)).all()
    assert len(metadata) == config.num_images


# ---------------------------------------------------------------------------------------------
# The phenomenon CDCL exists to fix, and the signal underneath it
# ---------------------------------------------------------------------------------------------


def test_strong_batch_effects_make_raw_pixel_neighbours_come_from_the_same_batch(screens):
    rates = {}
    for strength, (images, metadata) in screens.items():
        rates[strength] = same_label_neighbour_rate(raw_pixel_features(images), metadata["batch"])
    chance = chance_rate(screens[0.0][1]["batch"])
    assert chance == pytest.approx(1 / 3, abs=0.01)

    assert rates[2.0] >= 0.9, rates  # strong: nearly every image's neighbour is from its own batch
    assert rates[1.0] >= 0.75, rates  # realistic: still mostly
    # Without batch effects batches are indistinguishable: the rate is at chance level.
    assert rates[0.0] <= chance + 0.1, rates


def test_moa_signal_is_present_and_batch_effects_mask_it(screens):
    def moa_rate(images, metadata):
        # Nearest neighbour among treated images of *other* compounds (so a compound cannot match itself).
        treated = ~metadata["is_control"].to_numpy()
        features = raw_pixel_features(images[treated], grid=0)
        return same_label_neighbour_rate(
            features, metadata["moa"][treated], exclude=metadata["compound"][treated]
        )

    _, metadata = screens[0.0]
    treated = metadata[~metadata["is_control"]]
    chance = chance_rate(treated["moa"], exclude=treated["compound"])
    assert chance == pytest.approx(1 / 11, abs=0.01)  # 1 other compound of the same MoA among 11

    clean = moa_rate(*screens[0.0])
    strong = moa_rate(*screens[2.0])
    assert clean >= 3 * chance, (clean, chance)
    assert clean < 0.9  # visible, not trivial: single images of one MoA still vary a lot
    assert strong < clean - 0.05, (strong, clean)


def test_dose_scales_phenotype_strength(screens):
    images, metadata = screens[0.0]
    features = pd.DataFrame(raw_pixel_features(images, grid=0))
    profiles = features.groupby(metadata["treatment"].to_numpy()).mean()
    distance_to_dmso = pd.Series(
        np.linalg.norm(profiles.to_numpy() - profiles.loc[f"{CONTROL_COMPOUND}@0"].to_numpy(), axis=1),
        index=profiles.index,
    )
    treated = metadata[~metadata["is_control"]].drop_duplicates("treatment")
    increasing = []
    for _, doses in treated.groupby("compound"):
        doses = doses.sort_values("concentration")
        increasing.append(
            distance_to_dmso[doses["treatment"].iloc[-1]] > distance_to_dmso[doses["treatment"].iloc[0]]
        )
    assert np.mean(increasing) >= 0.9, increasing


# ---------------------------------------------------------------------------------------------
# Config, dataset, CLI
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_channels": 1},
        {"num_batches": 1, "plates_per_batch": 1},
        {"moas": ("not_a_moa",)},
        {"moas": ()},
        {"control_wells_per_plate": 0},
        {"plates_per_treatment": 1},
        {"batch_effect_strength": -1.0},
        {"dtype": "float32"},
        {"channel_names": ("DNA", "Actin")},
        {"concentrations": (0.0, 1.0)},
    ],
)
def test_invalid_config_is_rejected(overrides):
    with pytest.raises(ValueError):
        SyntheticScreenConfig(**overrides)


def test_every_library_moa_renders():
    config = SyntheticScreenConfig(
        moas=tuple(MOA_PHENOTYPES),
        num_batches=2,
        plates_per_batch=1,
        compounds_per_moa=1,
        concentrations=(3.0,),
        sites_per_well=1,
        batch_effect_strength=0.0,
    )
    images, metadata = generate_synthetic_screen(config)
    assert set(metadata["moa"]) == set(MOA_PHENOTYPES) | {"DMSO"}
    assert images.shape[0] == config.num_images


@pytest.mark.parametrize("requested", [100, 1000, 5000])
def test_config_for_num_images_is_close_to_the_request(requested):
    config = config_for_num_images(requested, batch_effect_strength=0.5)
    assert config.batch_effect_strength == 0.5
    per_site = config.num_images // config.sites_per_well
    assert abs(config.num_images - requested) <= max(per_site / 2, 0.25 * requested)


def test_dataset_round_trips_through_the_screen_schema():
    from cdcl_hf.image_io import decode_image
    from cdcl_hf.screen_data import screen_channel_names

    config = dataclasses.replace(
        SMALL, num_batches=2, plates_per_batch=1, sites_per_well=1, moas=DEFAULT_MOAS[:2]
    )
    images, metadata = generate_synthetic_screen(config)
    dataset = synthetic_screen_dataset(config)
    assert isinstance(dataset, datasets.Dataset)
    assert len(dataset) == len(images)
    assert set(SCHEMA_COLUMNS) <= set(dataset.column_names)
    assert screen_channel_names(dataset) == ["DNA", "Tubulin", "Actin"]
    for index in (0, len(dataset) - 1):
        row = dataset[index]
        decoded = decode_image(row["image"])
        assert decoded.dtype == np.uint16
        np.testing.assert_array_equal(decoded, images[index])
        assert row["treatment"] == metadata["treatment"][index]
        assert row["is_control"] == metadata["is_control"][index]

    # Overrides replace config fields.
    smaller = synthetic_screen_dataset(config, moas=DEFAULT_MOAS[:1], concentrations=(1.0,))
    assert set(smaller["moa"]) == {DEFAULT_MOAS[0], "DMSO"}


def test_cli_saves_a_loadable_dataset(tmp_path, capsys):
    output_dir = tmp_path / "synthetic"
    main(
        [
            "--output_dir",
            str(output_dir),
            "--num_images",
            "60",
            "--batch_effect_strength",
            "0.5",
            "--num_batches",
            "2",
            "--plates_per_batch",
            "1",
            "--compounds_per_moa",
            "1",
            "--moas",
            "dna_damage",
            "kinase_inhibitor",
            "--image_size",
            "32",
            "--seed",
            "3",
        ]
    )
    assert "saved" in capsys.readouterr().out
    dataset = datasets.load_from_disk(str(output_dir))
    assert 30 <= len(dataset) <= 90
    assert set(dataset["moa"]) == {"dna_damage", "kinase_inhibitor", "DMSO"}
    assert set(dataset["batch"]) == {"batch01", "batch02"}
