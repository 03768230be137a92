"""Schema, dataset_from_arrays / decode_image round trips, loading, and the per-plate statistics of a screen."""

import numpy as np
import pandas as pd
import pytest

from cdcl_hf import normalization, screen_data
from cdcl_hf.normalization import plate_statistics
from cdcl_hf.screen_data import (
    ImageShapeError,
    MissingColumnError,
    ScreenDataError,
    dataset_from_arrays,
    decode_image,
    load_screen,
    looks_like_local_path,
    parse_channel_map,
    parse_column_mapping,
    parse_column_selection,
    screen_channel_names,
)


def make_metadata(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "plate": [f"P{i % 2}" for i in range(n)],
            "well": [f"B{i:02d}" for i in range(n)],
            "site": [i % 3 + 1 for i in range(n)],
            "batch": ["Week1" if i < n // 2 else "Week2" for i in range(n)],
            "compound": ["DMSO" if i % 3 == 0 else "taxol" for i in range(n)],
            "concentration": [0.0 if i % 3 == 0 else 0.3 for i in range(n)],
            "moa": ["DMSO" if i % 3 == 0 else None for i in range(n)],
            "is_control": [i % 3 == 0 for i in range(n)],
            "replicate": list(range(n)),
        }
    )


@pytest.fixture
def uint16_images():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 65536, size=(6, 3, 16, 12), dtype=np.uint16)
    images[0, 0, 0, 0], images[0, 0, 0, 1] = 0, 65535  # the extremes must survive too
    return images


def test_uint16_round_trip_is_exact_in_every_format(uint16_images):
    dataset = dataset_from_arrays(uint16_images, make_metadata(6), channel_names=["DNA", "Tubulin", "Actin"])
    assert screen_channel_names(dataset) == ["DNA", "Tubulin", "Actin"]
    assert screen_channel_names(dataset.to_iterable_dataset()) == ["DNA", "Tubulin", "Actin"]
    for fmt in (None, "numpy", "torch"):
        formatted = dataset.with_format(fmt)
        for index, expected in enumerate(uint16_images):
            decoded = decode_image(formatted[index]["image"])
            assert decoded.dtype == np.uint16, fmt
            np.testing.assert_array_equal(decoded, expected)


def test_uint8_keeps_its_dtype_and_metadata_is_normalised():
    images = [np.full((2, 8, 8), fill, dtype=np.uint8) for fill in (0, 7, 255)]
    dataset = dataset_from_arrays(images, make_metadata(3))
    assert screen_channel_names(dataset) == ["channel_0", "channel_1"]
    row = dataset[1]
    assert decode_image(row["image"]).dtype == np.uint8
    np.testing.assert_array_equal(decode_image(row["image"]), images[1])
    assert row["site"] == "2"  # ids are strings, not "2.0"
    assert row["treatment"] == "taxol@0.3"
    assert dataset[0]["treatment"] == "DMSO@0"
    assert row["moa"] is None and dataset[0]["moa"] == "DMSO"
    assert row["is_control"] is False and dataset[0]["is_control"] is True
    assert row["replicate"] == 1  # extra columns are kept with their type
    assert dataset.features["concentration"].dtype == "float64"


def test_decode_image_accepts_undecoded_storage(uint16_images):
    dataset = dataset_from_arrays(uint16_images[:1], make_metadata(1))
    raw = dataset.cast_column("image", screen_data.datasets.List(screen_data.datasets.Image(decode=False)))[0]["image"]
    assert isinstance(raw[0], dict) and raw[0]["bytes"]
    np.testing.assert_array_equal(decode_image(raw), uint16_images[0])


def test_decode_image_casts_widened_16_bit_planes_back(uint16_images):
    """Readers that hand 16-bit greyscale over as int32 (PIL "I" mode) or int64 arrays give uint16 back."""
    widened = [screen_data.PILImage.fromarray(plane.astype(np.int32), mode="I") for plane in uint16_images[0]]
    decoded = decode_image(widened)
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, uint16_images[0])
    np.testing.assert_array_equal(decode_image(list(uint16_images[1].astype(np.int64))), uint16_images[1])
    with pytest.raises(ImageShapeError, match=r"row 7, channel 0: unsupported pixel type int64"):
        decode_image([np.full((4, 4), -1, dtype=np.int64)], where="row 7")


def test_dataset_from_arrays_rejects_bad_input(uint16_images):
    metadata = make_metadata(6)
    with pytest.raises(MissingColumnError, match="plate"):
        dataset_from_arrays(uint16_images, metadata.drop(columns=["plate"]))
    with pytest.raises(ImageShapeError, match=r"image 2: expected shape \(3, 16, 12\) uint16.*got \(3, 16, 10\)"):
        dataset_from_arrays([*uint16_images[:2], uint16_images[2][:, :, :10], *uint16_images[3:]], metadata)
    with pytest.raises(ImageShapeError, match="float32"):
        dataset_from_arrays(uint16_images.astype(np.float32), metadata)
    with pytest.raises(ImageShapeError, match="2 names but images have 3 channels"):
        dataset_from_arrays(uint16_images, metadata, channel_names=["a", "b"])
    bad = metadata.astype({"concentration": object})
    bad.loc[4, "concentration"] = "lots"
    with pytest.raises(ScreenDataError, match=r"metadata row 4, column 'concentration': expected a number, got 'lots'"):
        dataset_from_arrays(uint16_images, bad)
    with pytest.raises(ScreenDataError, match="6 images but 5 metadata rows"):
        dataset_from_arrays(uint16_images, metadata.iloc[:5])


def test_column_mapping_renames_user_columns(uint16_images):
    metadata = make_metadata(6).rename(columns={"plate": "Metadata_Plate", "is_control": "control"})
    dataset = dataset_from_arrays(uint16_images, metadata, column_mapping={"Metadata_Plate": "plate", "control": "is_control"})
    assert dataset[0]["plate"] == "P0" and dataset[0]["is_control"] is True
    with pytest.raises(MissingColumnError, match="Metdata_Plate"):
        dataset_from_arrays(uint16_images, metadata, column_mapping={"Metdata_Plate": "plate"})


def test_parse_column_mapping_and_selection():
    assert parse_column_mapping(["Metadata_Plate=plate", "Image_Metadata_Well=well"]) == {
        "Metadata_Plate": "plate", "Image_Metadata_Well": "well"}
    assert parse_column_mapping(None) == {} and parse_column_mapping([]) == {}
    assert parse_column_mapping(["a=b=c"]) == {"a": "b=c"}  # split at the first "="
    for bad in ("Metadata_Plate", "=plate", "Metadata_Plate="):
        with pytest.raises(ValueError, match=rf"THEIRS=STANDARD.*got '{bad}'"):
            parse_column_mapping(["Metadata_Well=well", bad])
    with pytest.raises(ValueError, match=r"'P=plate2': 'P' is already given \(P=plate\)"):
        parse_column_mapping(["P=plate", "P=plate2"])
    assert parse_column_selection(["plate=P1,P2", "batch=Week1"]) == {"plate": ["P1", "P2"], "batch": ["Week1"]}
    with pytest.raises(ValueError, match=r"COLUMN=V1,V2.*got 'plate'"):
        parse_column_selection(["plate"])


def test_load_screen_from_disk_streaming_and_mapping(uint16_images, tmp_path):
    dataset = dataset_from_arrays(uint16_images, make_metadata(6), channel_names=["a", "b", "c"])
    dataset.save_to_disk(str(tmp_path / "screen"))
    loaded = load_screen(tmp_path / "screen", split=None)
    assert loaded.num_rows == 6
    np.testing.assert_array_equal(decode_image(loaded[5]["image"]), uint16_images[5])
    streamed = list(load_screen(tmp_path / "screen", split=None, streaming=True))
    assert [r["well"] for r in streamed] == [f"B{i:02d}" for i in range(6)]
    np.testing.assert_array_equal(decode_image(streamed[3]["image"]), uint16_images[3])

    dataset.rename_column("plate", "Plate").save_to_disk(str(tmp_path / "theirs"))
    with pytest.raises(MissingColumnError, match=r"\['plate'\]"):
        load_screen(tmp_path / "theirs", split=None)
    assert load_screen(tmp_path / "theirs", split=None, column_mapping={"Plate": "plate"})[0]["plate"] == "P0"


@pytest.mark.parametrize(
    "name, local",
    [("./screen", True), ("/data/screen", True), ("~/screen", True), ("data\\screen", True), ("a/b/c", True),
     ("screens.parquet", True), ("org/model.safetensors", True), ("org/screen", False), ("screen", False),
     ("Qwen/Qwen2.5-7B", False), ("org/bbbc021-v1.0", False)],
)
def test_looks_like_local_path(name, local):
    assert looks_like_local_path(name) is local


def test_a_missing_local_path_is_reported_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("looked up on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    for name in ("./screen", str(tmp_path / "screen"), "runs/a/screen", "screen.parquet", tmp_path / "screen"):
        with pytest.raises(FileNotFoundError, match=r"does not exist \(a local path, so it is not looked up on the Hub"):
            load_screen(name)


def test_parse_channel_map():
    assert parse_channel_map(["DAPI=DNA", "Phalloidin=Actin"]) == {"DAPI": "DNA", "Phalloidin": "Actin"}
    assert parse_channel_map(None) == {}
    with pytest.raises(ValueError, match="DATA=MODEL"):
        parse_channel_map(["DAPI"])


def test_load_screen_streaming_rename_keeps_the_stored_images(uint16_images, tmp_path, monkeypatch):
    """A streamed screen renamed by column_mapping yields the stored PNGs: nothing is re-encoded per row."""
    theirs = dataset_from_arrays(uint16_images, make_metadata(6)).rename_columns({"plate": "Plate", "well": "Well"})
    theirs.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "parquet" / "data").mkdir(parents=True)
    theirs.to_parquet(str(tmp_path / "parquet" / "data" / "train-00000-of-00001.parquet"))
    monkeypatch.setattr(screen_data.PILImage.Image, "save", lambda *args, **kwargs: pytest.fail("image re-encoded"))
    for folder in ("saved", "parquet"):
        streamed = load_screen(tmp_path / folder, split="train", streaming=True,
                               column_mapping={"Plate": "plate", "Well": "well"})
        assert {"plate", "well"} <= set(streamed.features) and "Plate" not in streamed.features
        assert streamed.features["image"] == screen_data.datasets.List(screen_data.datasets.Image())
        rows = list(streamed)
        assert [r["plate"] for r in rows] == [f"P{i % 2}" for i in range(6)], folder
        for row, expected in zip(rows, uint16_images, strict=True):
            np.testing.assert_array_equal(decode_image(row["image"]), expected)
        batch = next(streamed.select_columns(["image", "plate"]).iter(batch_size=4))
        np.testing.assert_array_equal(decode_image(batch["image"][3]), uint16_images[3])
        with pytest.raises(ValueError, match="Plates"):  # a typo fails at once, not when the stream is read
            load_screen(tmp_path / folder, split="train", streaming=True, column_mapping={"Plates": "plate"})


def expected_statistics(images, mask):
    chosen = images[mask].astype(np.float64)  # (N, C, H, W)
    return chosen.mean(axis=(0, 2, 3)), chosen.std(axis=(0, 2, 3))


def test_plate_statistics_match_numpy_and_are_cached(uint16_images, tmp_path, monkeypatch):
    metadata = make_metadata(6)
    metadata.loc[metadata.plate == "P1", "is_control"] = False  # P1 has no controls: falls back to all images
    dataset = dataset_from_arrays(uint16_images, metadata)
    plates = metadata.plate.to_numpy()
    controls = metadata.is_control.to_numpy()
    stats = plate_statistics(dataset, source="controls", cache_dir=tmp_path)
    assert set(stats) == {"P0", "P1"}
    mean, std = expected_statistics(uint16_images, (plates == "P0") & controls)
    np.testing.assert_allclose(stats["P0"].mean, mean, rtol=1e-12)
    np.testing.assert_allclose(stats["P0"].std, std, rtol=1e-10)
    assert stats["P0"].source == "controls" and stats["P0"].num_images == int(((plates == "P0") & controls).sum())
    mean, std = expected_statistics(uint16_images, plates == "P1")
    np.testing.assert_allclose(stats["P1"].mean, mean, rtol=1e-12)
    assert stats["P1"].source == "all" and stats["P1"].mean.dtype == np.float64

    everything = plate_statistics(dataset, source="all", cache_dir=tmp_path)
    mean, std = expected_statistics(uint16_images, plates == "P0")
    np.testing.assert_allclose(everything["P0"].std, std, rtol=1e-10)

    # Second call: served from the cache file, not recomputed (decoding would now fail).
    assert len(list(tmp_path.glob("*.json"))) == 2
    normalization._STATISTICS_MEMORY.clear()
    monkeypatch.setattr(normalization, "decode_image", lambda value: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = plate_statistics(dataset, source="controls", cache_dir=tmp_path)
    np.testing.assert_array_equal(again["P0"].std, stats["P0"].std)
    # A different dataset (different fingerprint) is not served from that cache.
    with pytest.raises(AssertionError, match="recomputed"):
        plate_statistics(dataset.select([0, 1, 2]), source="controls", cache_dir=tmp_path)


def test_plate_statistics_streaming_equals_in_memory(uint16_images):
    dataset = dataset_from_arrays(uint16_images, make_metadata(6))
    in_memory = plate_statistics(dataset, source="all", cache_dir=None)
    streamed = plate_statistics(dataset.to_iterable_dataset(num_shards=2), source="all")
    for plate in in_memory:
        np.testing.assert_allclose(streamed[plate].mean, in_memory[plate].mean, rtol=1e-12)
        np.testing.assert_allclose(streamed[plate].std, in_memory[plate].std, rtol=1e-10)
