"""Profiling: aggregation, correction, parquet round trip, embedding extraction."""

import numpy as np
import pandas as pd
import pytest
import torch

from cdcl_hf.embedding import inductor_cpp_compiler
from cdcl_hf.profiling import (
    aggregate_profiles,
    correct_profiles,
    extract_embeddings,
    feature_columns,
    read_profiles,
    tile_offsets,
    write_profiles,
)


def image_table():
    """Six image profiles: two wells on plate P1 (one control), one well on P2 (week 2)."""
    return pd.DataFrame(
        {
            "Metadata_Plate": ["P1", "P1", "P1", "P1", "P2", "P2"],
            "Metadata_Well": ["A01", "A01", "A02", "A02", "A01", "A01"],
            "Metadata_Batch": ["W1", "W1", "W1", "W1", "W2", "W2"],
            "Metadata_Treatment": ["t", "t", "DMSO", "DMSO", "t", "t"],
            "Metadata_Site": ["1", "2", "1", "2", "1", "2"],
            "f1": [1.0, 3.0, 0.0, 10.0, 5.0, 7.0],
            "f2": [2.0, 2.0, 4.0, 4.0, 0.0, 1.0],
        }
    )


def test_aggregate_image_to_well_to_treatment():
    wells = aggregate_profiles(image_table(), by=["Metadata_Plate", "Metadata_Well"], method="mean")
    assert wells["f1"].tolist() == [2.0, 5.0, 6.0]
    assert "Metadata_Site" not in wells.columns  # varies within a well: dropped, as pycytominer does
    assert wells["Metadata_Batch"].tolist() == ["W1", "W1", "W2"]  # constant within a well: kept
    assert wells["Metadata_n_profiles"].tolist() == [2, 2, 2]

    treatments = aggregate_profiles(wells, by=["Metadata_Treatment"], method="median", collect=["Metadata_Batch"])
    treated = treatments.set_index("Metadata_Treatment").loc["t"]
    assert treated["f1"] == 4.0  # median of the well means 2 and 6
    assert treated["Metadata_Batch"] == ("W1", "W2")


def test_aggregate_rejects_bad_input():
    table = image_table()
    with pytest.raises(ValueError, match="method"):
        aggregate_profiles(table, by=["Metadata_Well"], method="max")
    with pytest.raises(ValueError, match="Metadata_moa"):
        aggregate_profiles(table, by=["Metadata_moa"])
    with pytest.raises(ValueError, match="NaN"):
        aggregate_profiles(table.assign(f1=np.nan), by=["Metadata_Well"])
    with pytest.raises(ValueError, match="non-numeric"):
        feature_columns(table.rename(columns={"Metadata_Site": "site"}))


def plate_table():
    """Two plates; plate P2 is P1 shifted by +100 and scaled x2, controls included."""
    base = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 2.0], [10.0, 10.0]])
    features = np.vstack([base, base * 2 + 100])
    return pd.DataFrame(
        {
            "Metadata_Plate": ["P1"] * 4 + ["P2"] * 4,
            "Metadata_is_control": [True, True, True, False] * 2,
            "f1": features[:, 0],
            "f2": features[:, 1],
        }
    )


def test_zscore_and_mad_remove_plate_effects():
    table = plate_table()
    for method in ("zscore", "mad"):
        corrected = correct_profiles(table, method)
        p1 = corrected[corrected["Metadata_Plate"] == "P1"][["f1", "f2"]].to_numpy()
        p2 = corrected[corrected["Metadata_Plate"] == "P2"][["f1", "f2"]].to_numpy()
        np.testing.assert_allclose(p1, p2)  # the shift and scale between plates are gone
    zscored = correct_profiles(table, "zscore")
    # Plate P1 f1 controls 0, 2, 4: mean 2, population std (ddof=0, as pycytominer's standardize) sqrt(8/3)
    # -> the treated well at 10 becomes 8 / sqrt(8/3) = sqrt(24); the sample std (ddof=1) would give 4.
    assert zscored.loc[3, "f1"] == pytest.approx(np.sqrt(24.0))
    robust = correct_profiles(table, "mad")
    # median 2, MAD 2 -> (10 - 2) / (1.4826 * 2)
    assert robust.loc[3, "f1"] == pytest.approx(8 / (1.4826 * 2))


def test_center_subtracts_the_screen_mean_and_needs_no_controls():
    from sklearn.preprocessing import StandardScaler

    table = image_table()  # no Metadata_is_control column at all
    centred = correct_profiles(table, "center")
    expected = StandardScaler(with_std=False).fit_transform(table[["f1", "f2"]].to_numpy())
    np.testing.assert_allclose(centred[["f1", "f2"]].to_numpy(), expected, rtol=0, atol=1e-12)
    assert centred.loc[0, "f1"] == pytest.approx(1.0 - 26.0 / 6)  # f1 mean over all six profiles: 26 / 6
    pd.testing.assert_frame_equal(centred.drop(columns=["f1", "f2"]), table.drop(columns=["f1", "f2"]))
    assert table.loc[0, "f1"] == 1.0  # the input is not modified


def test_tvn_and_sphering_whiten_the_controls():
    rng = np.random.default_rng(0)
    mixing = np.array([[3.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.0, 2.0, 1.0]])
    features = rng.normal(size=(60, 3)) @ mixing
    table = pd.DataFrame(features, columns=["a", "b", "c"]).assign(
        Metadata_is_control=[True] * 50 + [False] * 10, Metadata_Plate="P1"
    )
    for method in ("tvn", "sphering"):
        corrected = correct_profiles(table, method, epsilon=0.0)
        controls = corrected[corrected["Metadata_is_control"]].drop(columns=["Metadata_is_control", "Metadata_Plate"])
        np.testing.assert_allclose(np.cov(controls.to_numpy(), rowvar=False), np.eye(3), atol=1e-8)
        np.testing.assert_allclose(controls.mean().to_numpy(), 0.0, atol=1e-10)
    assert feature_columns(correct_profiles(table, "sphering")) == ["a", "b", "c"]  # ZCA keeps the axes
    assert feature_columns(correct_profiles(table, "tvn")) == ["tvn_0000", "tvn_0001", "tvn_0002"]


def test_correction_bad_input():
    table = plate_table()
    with pytest.raises(ValueError, match="no negative control"):
        correct_profiles(table.assign(Metadata_is_control=[True, False] * 2 + [False] * 4), "zscore")
    with pytest.raises(ValueError, match="marks none"):
        correct_profiles(table.assign(Metadata_is_control=False), "tvn")
    with pytest.raises(ValueError, match="Metadata_is_control"):
        correct_profiles(table.drop(columns="Metadata_is_control"), "mad")
    with pytest.raises(ValueError, match="NaN"):
        correct_profiles(table.assign(f1=np.nan), "none")
    with pytest.raises(ValueError, match="correction must be"):
        correct_profiles(table, "combat")


def test_parquet_round_trip_keeps_collected_batches(tmp_path):
    wells = aggregate_profiles(image_table(), by=["Metadata_Plate", "Metadata_Well"])
    treatments = aggregate_profiles(wells, by=["Metadata_Treatment"], collect=["Metadata_Batch"])
    path = write_profiles(treatments, tmp_path / "profiles.parquet")
    again = read_profiles(path)
    pd.testing.assert_frame_equal(again, treatments, check_dtype=False)


def test_tile_offsets_cover_the_image():
    assert tile_offsets(68, 32, 32) == [0, 32, 36]
    assert tile_offsets(64, 32, 16) == [0, 16, 32]
    with pytest.raises(ValueError, match="larger"):
        tile_offsets(16, 32, 32)


# ---------------------------------------------------------------------------------------------
# Extraction with a tiny random CDCL model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_screen():
    from cdcl_hf.screen_data import dataset_from_arrays

    rng = np.random.default_rng(0)
    images = rng.integers(0, 4000, size=(5, 3, 48, 48), dtype=np.uint16)
    metadata = pd.DataFrame(
        {
            "plate": ["P1"] * 3 + ["P2"] * 2,
            "well": ["A01", "A01", "A02", "A01", "A02"],
            "site": ["1", "2", "1", "1", "1"],
            "batch": ["W1"] * 3 + ["W2"] * 2,
            "compound": ["DMSO", "DMSO", "taxol", "DMSO", "taxol"],
            "concentration": [0.0, 0.0, 1.0, 0.0, 1.0],
            "moa": [None, None, "Microtubule stabilizers", None, "Microtubule stabilizers"],
            "is_control": [True, True, False, True, False],
        }
    )
    return dataset_from_arrays(images, metadata), images


@pytest.fixture(scope="module")
def tiny_model():
    from cdcl_hf import CDCLConfig, CDCLModel

    torch.manual_seed(0)
    return CDCLModel(CDCLConfig.from_preset("tiny", num_channels=3)).eval()


def test_extract_embeddings_writes_metadata_columns(tiny_screen, tiny_model):
    dataset, _ = tiny_screen
    profiles = extract_embeddings(tiny_model, dataset, batch_size=2, device="cpu", progress=False)
    assert len(profiles) == 5
    assert {"Metadata_Plate", "Metadata_Well", "Metadata_Treatment", "Metadata_moa", "Metadata_is_control"} <= set(
        profiles.columns
    )
    features = feature_columns(profiles)
    assert len(features) == tiny_model.config.hidden_size
    assert profiles["Metadata_Plate"].tolist() == ["P1", "P1", "P1", "P2", "P2"]
    # Batch size must not change the numbers.
    one_by_one = extract_embeddings(tiny_model, dataset, batch_size=1, device="cpu", progress=False)
    np.testing.assert_allclose(one_by_one[features], profiles[features], atol=1e-5)


def test_tiled_embedding_is_the_mean_of_its_tiles(tiny_screen, tiny_model):
    from cdcl_hf.screen_data import dataset_from_arrays

    dataset, images = tiny_screen
    tiled = extract_embeddings(tiny_model, dataset.select([0]), tile_size=32, device="cpu", progress=False)
    # The 48-px image gives tiles at offsets 0 and 16 in each direction: four tiles.
    corners = [images[0][:, top : top + 32, left : left + 32] for top in (0, 16) for left in (0, 16)]
    metadata = pd.DataFrame(
        {"plate": ["P1"] * 4, "well": ["A01"] * 4, "site": list("1234"), "batch": ["W1"] * 4,
         "compound": ["DMSO"] * 4, "concentration": [0.0] * 4, "is_control": [True] * 4}
    )
    per_tile = extract_embeddings(tiny_model, dataset_from_arrays(corners, metadata), device="cpu", progress=False)
    features = feature_columns(tiled)
    np.testing.assert_allclose(tiled[features].to_numpy()[0], per_tile[features].to_numpy().mean(axis=0), atol=1e-5)


@pytest.mark.parametrize("augmentation, turns", [("flips", [np.flipud, np.fliplr]),
                                                  ("dihedral", [np.rot90, np.flipud, lambda plane: np.rot90(plane, 3).T])])
def test_test_time_augmentation_makes_embeddings_invariant(tiny_screen, tiny_model, augmentation, turns):
    from cdcl_hf.screen_data import dataset_from_arrays

    dataset, images = tiny_screen
    metadata = dataset.remove_columns(["image", "channel_names"]).to_pandas()
    as_stored = extract_embeddings(tiny_model, dataset, device="cpu", progress=False,
                                   test_time_augmentation=augmentation)
    plain = extract_embeddings(tiny_model, dataset, device="cpu", progress=False)
    features = feature_columns(plain)
    # The model alone is not invariant: without the augmentation a mirrored screen embeds differently.
    mirrored = dataset_from_arrays(np.ascontiguousarray(images[..., ::-1]), metadata)
    assert not np.allclose(extract_embeddings(tiny_model, mirrored, device="cpu", progress=False)[features],
                           plain[features], atol=1e-3)
    for turn in turns:
        moved = np.stack([np.stack([np.ascontiguousarray(turn(plane)) for plane in image]) for image in images])
        augmented = extract_embeddings(tiny_model, dataset_from_arrays(moved, metadata), device="cpu", progress=False,
                                       test_time_augmentation=augmentation)
        np.testing.assert_allclose(augmented[features], as_stored[features], atol=1e-5)


@pytest.mark.skipif(not inductor_cpp_compiler()[1], reason="inductor needs a C++ compiler")
def test_compiled_extraction_gives_the_same_embeddings(tiny_screen, tiny_model):
    dataset, _ = tiny_screen
    before = {name: p.clone() for name, p in tiny_model.state_dict().items()}
    eager = extract_embeddings(tiny_model, dataset, batch_size=2, device="cpu", progress=False)
    # Batches of 2 and a last one of 1: the dynamic-shape graph serves both.
    compiled = extract_embeddings(tiny_model, dataset, batch_size=2, device="cpu", progress=False, compile_model=True)
    features = feature_columns(eager)
    np.testing.assert_allclose(compiled[features], eager[features], atol=1e-4)
    assert all(torch.equal(before[name], p) for name, p in tiny_model.state_dict().items())
    # Freezing is on only while the compiled model runs.
    import torch._inductor.config as inductor_config

    assert not inductor_config.freezing


def test_symmetry_views_are_the_group_and_refuse_what_they_cannot_do():
    from cdcl_hf.embedding import augmented_embedding, symmetry_views

    image = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    assert [len(symmetry_views(image, a)) for a in ("none", "flips", "dihedral")] == [1, 4, 8]
    distinct = {tuple(view[0, 0].flatten().tolist()) for view in symmetry_views(image, "dihedral")}
    assert len(distinct) == 8
    with pytest.raises(ValueError, match="square"):
        symmetry_views(torch.zeros(1, 3, 4, 6), "dihedral")
    assert len(symmetry_views(torch.zeros(1, 3, 4, 6), "flips")) == 4
    with pytest.raises(ValueError, match="one of"):
        symmetry_views(image, "rotations")
    # Each image's embedding is the mean over its own views, not mixed with the batch's other images.
    views = symmetry_views(image, "flips")
    mean_pool = lambda pixel_values: pixel_values.mean(dim=(2, 3))  # noqa: E731
    expected = torch.stack([mean_pool(view) for view in views]).mean(0)
    torch.testing.assert_close(augmented_embedding(mean_pool, image, "flips"),
                               expected)
    first_pixel = lambda pixel_values: pixel_values[:, :, 0, 0]  # noqa: E731
    corners = augmented_embedding(first_pixel, image, "flips")
    torch.testing.assert_close(corners[1], torch.stack([view[1, :, 0, 0] for view in views]).mean(0))


def test_channel_mismatch_is_a_clear_error(tiny_screen, tiny_model):
    from cdcl_hf import CDCLConfig, CDCLImageProcessor, CDCLModel

    dataset, _ = tiny_screen
    five_channel = CDCLModel(CDCLConfig.from_preset("tiny", num_channels=5))
    with pytest.raises(ValueError, match="3 channels but the model expects 5"):
        extract_embeddings(five_channel, dataset, device="cpu", progress=False)
    with pytest.raises(ValueError, match="3 channels but the checkpoint's image processor expects 5"):
        extract_embeddings(tiny_model, dataset, CDCLImageProcessor(num_channels=5, size=32), device="cpu",
                           progress=False)


def per_channel_processor(normalization):
    """The processor training exports after per-plate normalisation: mean/std of the average plate."""
    from cdcl_hf import CDCLImageProcessor

    return CDCLImageProcessor(num_channels=3, size=32, **normalization.processor_kwargs())


def test_per_channel_checkpoint_is_normalised_by_each_image_plate_as_in_training(tiny_screen, tiny_model):
    from cdcl_hf import CDCLImageProcessor
    from cdcl_hf.normalization import PlateNormalization, plate_statistics

    dataset, images = tiny_screen
    training_normalization = PlateNormalization.from_screen(dataset, "plate_controls")
    processor = per_channel_processor(training_normalization)
    evaluation_normalization = PlateNormalization.for_processor(processor, dataset, "controls")
    assert evaluation_normalization.statistics.keys() == plate_statistics(dataset, source="controls").keys()
    assert PlateNormalization.for_processor(processor, dataset, "none") is None  # the processor as saved
    per_image = CDCLImageProcessor(num_channels=3)
    assert PlateNormalization.for_processor(per_image, dataset, "controls") is None  # normalises each image itself
    assert PlateNormalization.for_processor(None, dataset, "controls") is None

    # Batches of 5 and 2 mix plates P1 and P2: each image must still get its own plate's statistics.
    mixed = extract_embeddings(tiny_model, dataset, processor, batch_size=5, device="cpu", progress=False,
                               normalization=evaluation_normalization)
    small = extract_embeddings(tiny_model, dataset, processor, batch_size=2, device="cpu", progress=False,
                               normalization=evaluation_normalization)
    features = feature_columns(mixed)
    np.testing.assert_allclose(small[features], mixed[features], atol=1e-5)

    # Reference: training's rule (normalise the raw image by its plate, then only the resize).
    identity = {"image_mean": [0.0] * 3, "image_std": [1.0] * 3}
    with torch.inference_mode():
        for row, (image, plate) in enumerate(zip(images, dataset["plate"], strict=True)):
            normalised = training_normalization.normalize(torch.from_numpy(image.astype(np.float32)), plate).numpy()
            pixels = processor([normalised], return_tensors="pt", **identity)["pixel_values"]
            expected = tiny_model(pixel_values=pixels).pooler_output[0].numpy()
            np.testing.assert_allclose(mixed[features].to_numpy()[row], expected, atol=1e-4)

    # The average plate of the saved processor is not what training used: results must differ.
    as_saved = extract_embeddings(tiny_model, dataset, processor, device="cpu", progress=False)
    assert not np.allclose(as_saved[features], mixed[features], atol=1e-3)


def test_streamed_dataset_gives_the_same_profiles(tiny_screen, tiny_model):
    from cdcl_hf.normalization import PlateNormalization

    dataset, _ = tiny_screen
    normalization = PlateNormalization.from_screen(dataset, "plate_all")
    processor = per_channel_processor(normalization)
    in_memory = extract_embeddings(tiny_model, dataset, processor, batch_size=2, device="cpu", progress=False,
                                   normalization=normalization)
    streamed = extract_embeddings(tiny_model, dataset.to_iterable_dataset(), processor, batch_size=2,
                                  device="cpu", progress=False, normalization=normalization)
    pd.testing.assert_frame_equal(streamed, in_memory, atol=1e-5)


def test_extracts_with_a_plain_transformers_vit(tiny_screen):
    """Any AutoModel image feature extractor works; without a processor images are standardised per image."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8, num_channels=3)
    dataset, _ = tiny_screen
    profiles = extract_embeddings(ViTModel(config), dataset, device="cpu", progress=False)
    assert profiles[feature_columns(profiles)].shape == (5, 32)


# ---------------------------------------------------------------------------------------------
# Degenerate control sets, channel names and order, refused checkpoints
# ---------------------------------------------------------------------------------------------


def test_per_plate_correction_needs_two_controls_on_every_plate():
    table = plate_table()
    one_control = table.assign(Metadata_is_control=[True, False, False, False, True, True, False, False])
    for method, options in (("zscore", {}), ("mad", {}), ("tvn", {"per_plate": True})):
        with pytest.raises(ValueError, match=r"plate\(s\) 'P1' \(1\) have fewer than 2 negative control profiles"):
            correct_profiles(one_control, method, **options)
    no_controls = table.assign(Metadata_is_control=[True, True, False, False, False, False, False, False])
    with pytest.raises(ValueError, match=r"'P2' \(0\) have no negative control"):
        correct_profiles(no_controls, "zscore")
    # Pooled over plates, TVN has 3 controls and works without per-plate standardisation.
    assert len(correct_profiles(one_control, "tvn")) == 8


def named_model(names, channels=3):
    from cdcl_hf import CDCLConfig, CDCLModel

    return CDCLModel(CDCLConfig.from_preset("tiny", num_channels=channels, channel_names=names))


def test_match_channels_checks_names_and_order_and_reorders(caplog):
    from cdcl_hf import CDCLImageProcessor
    from cdcl_hf.profiling import check_channel_count, match_channels

    model = named_model(["DAPI", "Tubulin", "Actin"])
    assert match_channels(model, None, 3, ["DAPI", "Tubulin", "Actin"]) is None
    with pytest.raises(ValueError, match=r"the channels of the dataset are \['Actin', 'Tubulin', 'DAPI'\] but the model "
                                         r"was trained on "
                                         r"\['DAPI', 'Tubulin', 'Actin'\], in this order; reorder them with "
                                         r"--channel_order DAPI Tubulin Actin"):
        check_channel_count(model, None, 3, ["Actin", "Tubulin", "DAPI"])
    assert match_channels(model, None, 3, ["Actin", "Tubulin", "DAPI"], channel_order=["DAPI", "Tubulin", "Actin"]) \
        == [2, 1, 0]
    assert match_channels(model, None, 3, ["Actin", "Tubulin", "DNA"], channel_map={"DNA": "DAPI"}) == [2, 1, 0]
    # An order may pick the model's channels out of more (here by index, of unnamed channels).
    assert match_channels(model, None, 5, None, channel_order=["4", "0", "2"]) == [4, 0, 2]
    for options, message in [
        ({"channel_map": {"DNA": "DAPI"}}, r"not channels of the dataset"),
        ({"channel_map": {"Actin": "DAPI"}}, r"map every data channel onto a different model channel"),
        ({"channel_order": ["DAPI", "DAPI", "Actin"]}, r"more than once"),
        ({"channel_order": ["Mito", "Tubulin", "Actin"]}, r"'Mito' is not a channel"),
        ({"channel_order": ["DAPI", "Tubulin"]}, r"2 channels but the model expects 3"),
    ]:
        with pytest.raises(ValueError, match=message):
            match_channels(model, None, 3, ["DAPI", "Tubulin", "Actin"], **options)
    with pytest.raises(ValueError, match="named channels on both sides"):
        match_channels(model, None, 3, None, channel_map={"a": "DAPI"})
    with pytest.raises(ValueError, match="checkpoint is inconsistent"):
        match_channels(model, CDCLImageProcessor(num_channels=3, channel_names=["DNA", "Tubulin", "Actin"]), 3, None)

    # Unnamed on one side: accepted, and said once.
    caplog.set_level("WARNING", logger="cdcl_hf.profiling")
    for _ in range(3):
        assert match_channels(model, None, 3, ["channel_0", "channel_1", "channel_2"], where="screen X") is None
    notes = [r.getMessage() for r in caplog.records if "screen X" in r.getMessage()]
    assert len(notes) == 1 and "not named" in notes[0] and "['DAPI', 'Tubulin', 'Actin']" in notes[0]
    assert match_channels(named_model(None), None, 3, ["A", "B", "C"]) is None  # the model names none


def test_reordered_screen_gives_the_embeddings_of_the_model_ordered_one(tiny_screen):
    """extract_embeddings with a channel order == the same images stored in the model's order (per-plate
    normalisation included: its statistics are reordered with the channels)."""
    from cdcl_hf.normalization import PlateNormalization
    from cdcl_hf.screen_data import dataset_from_arrays

    dataset, images = tiny_screen
    metadata = dataset.remove_columns(["image", "channel_names"]).to_pandas()
    ordered = dataset_from_arrays(images, metadata, channel_names=["DAPI", "Tubulin", "Actin"])
    reversed_ = dataset_from_arrays(np.ascontiguousarray(images[:, ::-1]), metadata,
                                    channel_names=["Actin", "Tubulin", "DAPI"])
    model = named_model(["DAPI", "Tubulin", "Actin"]).eval()
    normalization = PlateNormalization.from_screen(ordered, "plate_controls")
    processor = per_channel_processor(normalization)
    expected = extract_embeddings(model, ordered, processor, device="cpu", progress=False,
                                  normalization=normalization)
    with pytest.raises(ValueError, match="in this order"):
        extract_embeddings(model, reversed_, processor, device="cpu", progress=False)
    reordered = extract_embeddings(model, reversed_, processor, device="cpu", progress=False,
                                   normalization=PlateNormalization.from_screen(reversed_, "plate_controls"),
                                   channel_order=["DAPI", "Tubulin", "Actin"])
    features = feature_columns(expected)
    np.testing.assert_allclose(reordered[features], expected[features], atol=1e-5)


def test_refused_model_folders(tmp_path):
    from cdcl_hf import CDCLImageProcessor
    from cdcl_hf.profiling import check_model_folder, load_feature_extractor

    with pytest.raises(FileNotFoundError, match="not looked up on the Hub"):
        load_feature_extractor(str(tmp_path / "missing"))
    assert check_model_folder("org/model") is None  # a Hub id: left to the Hub
    (tmp_path / "file.bin").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is a file"):
        check_model_folder(tmp_path / "file.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        check_model_folder(tmp_path / "empty")
    model_dir = tmp_path / "model"
    named_model(None).save_pretrained(model_dir)
    with pytest.raises(ValueError, match="has no preprocessor_config.json"):
        load_feature_extractor(str(model_dir))
    assert load_feature_extractor(str(model_dir), allow_default_processor=True)[1] is None
    (model_dir / "preprocessor_config.json").write_text("{ broken")
    with pytest.raises((OSError, ValueError), match=r"(?i)json|decode|expecting"):  # a broken processor is shown
        load_feature_extractor(str(model_dir), allow_default_processor=True)
    CDCLImageProcessor(num_channels=3).save_pretrained(model_dir)
    (model_dir / "training_args.json").write_text("{}")
    with pytest.raises(ValueError, match="training run that has not finished"):
        load_feature_extractor(str(model_dir))
    (model_dir / "training_summary.json").write_text('{"finished": true}')
    assert isinstance(load_feature_extractor(str(model_dir))[1], CDCLImageProcessor)


def test_pooling_override_reads_another_embedding_of_the_same_model(tmp_path):
    from transformers import ViTConfig, ViTModel

    from cdcl_hf import CDCLImageProcessor
    from cdcl_hf.profiling import load_feature_extractor, set_pooling

    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    named_model(None).save_pretrained(model_dir)
    CDCLImageProcessor(num_channels=3).save_pretrained(model_dir)
    pixels = torch.randn(2, 3, 32, 32)
    own, _ = load_feature_extractor(str(model_dir))
    both, _ = load_feature_extractor(str(model_dir), pooling="cls+mean")
    assert own.config.pooling == "cls" and both.config.pooling == "cls+mean"
    with torch.no_grad():
        cls_token = own(pixel_values=pixels).pooler_output
        output = both(pixel_values=pixels)
    hidden = own.config.hidden_size
    assert output.pooler_output.shape == (2, 2 * hidden)
    torch.testing.assert_close(output.pooler_output[:, :hidden], cls_token)  # the same weights, the CLS token first
    torch.testing.assert_close(output.pooler_output[:, hidden:], output.last_hidden_state[:, 1:].mean(dim=1))
    with pytest.raises(ValueError, match="pooling must be one of"):
        load_feature_extractor(str(model_dir), pooling="max")
    from transformers import AutoModel  # the README's way without cdcl-hf's loader: a config keyword

    assert AutoModel.from_pretrained(str(model_dir), pooling="cls+mean").config.pooling == "cls+mean"
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match="'vit' model, which pools its own way"):
        set_pooling(vit, "cls+mean", where="google/vit")
