"""The three on-disk layouts, the CLI, splits, atomic writes and every bad-input case."""

import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from cdcl_hf.commands import build_dataset
from cdcl_hf.dataset_builders import (
    SKIPPED_ROWS_FILE,
    bbbc021_source,
    build_screen_dataset,
    folder_source,
    rxrx1_source,
)
from cdcl_hf.outputs import OUTPUT_MARKER, OutputSafetyError
from cdcl_hf.screen_data import (
    DuplicateRowError,
    ImageReadError,
    ImageShapeError,
    MissingColumnError,
    MissingImageError,
    decode_image,
    load_screen,
    screen_channel_names,
)

SCRIPT = Path(__file__).resolve().parents[1] / "hub" / "build_dataset.py"

datasets.disable_progress_bars()
rng = np.random.default_rng(0)


def write_png(path: Path, plane: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(plane).save(path)


def folder_screen(root: Path, rows: int = 6, channels: int = 3, size=(16, 16)) -> tuple[Path, dict[str, np.ndarray]]:
    """A folder with one H,W,C uint16 .npy per row and a metadata CSV (no is_control column)."""
    (root / "images").mkdir(parents=True)
    pixels, records = {}, []
    for i in range(rows):
        name = f"field_{i}.npy"
        pixels[name] = rng.integers(0, 65536, size=(*size, channels), dtype=np.uint16)
        np.save(root / "images" / name, pixels[name])
        records.append(
            {"file": f"images/{name}", "plate": f"P{i % 2}", "well": f"C{i:02d}", "site": "1", "batch": f"Week{i % 3 + 1}",
             "compound": "DMSO" if i % 2 == 0 else "taxol", "concentration": 0 if i % 2 == 0 else 0.3, "moa": "" if i % 2 == 0 else "Microtubule stabilizers"}
        )
    pd.DataFrame(records).to_csv(root / "metadata.csv", index=False)
    return root / "metadata.csv", pixels


def rows_by_file(dataset: datasets.Dataset, csv: Path) -> dict[str, dict]:
    names = pd.read_csv(csv)["file"].tolist()
    return dict(zip(names, dataset, strict=True))


# ---- layout (a): folder + CSV --------------------------------------------------------------


def test_real_bbbc021_crops_round_trip_losslessly(shared_data_dir, tmp_path):
    crops = shared_data_dir / "bbbc021_crops"
    table = pd.read_csv(crops / "metadata.csv")
    subset = pd.concat([table[table.batch == "Week1"].head(20), table[table.batch == "Week7"].head(20)])
    subset.to_csv(tmp_path / "subset.csv", index=False)
    source = folder_source(tmp_path / "subset.csv", image_root=crops / "images", channel_names=["DNA", "A", "B"])
    result = build_screen_dataset(source, tmp_path / "out", split_column="batch", holdout_values=["Week7"], num_proc=2)
    loaded = load_screen(tmp_path / "out", split=None)
    assert {name: part.num_rows for name, part in loaded.items()} == {"train": 20, "test": 20}
    assert screen_channel_names(loaded["train"]) == ["DNA", "A", "B"]
    assert result.image_shape == (3, 68, 68) and result.dtype == "uint16"
    rows = [*loaded["train"], *loaded["test"]]  # splits keep the CSV's row order
    for row, (_, expected) in zip(rows, subset.iterrows(), strict=True):
        original = np.load(crops / "images" / expected.file)  # H, W, C
        np.testing.assert_array_equal(decode_image(row["image"]), np.moveaxis(original, -1, 0))
        assert (row["plate"], row["well"], row["site"]) == (expected.plate, expected.well, str(expected.site))
        assert row["batch"] == expected.batch and row["compound"] == expected.compound
        assert row["concentration"] == expected.concentration and row["moa"] == expected.moa
        assert row["is_control"] == (expected.compound == "DMSO")
        assert row["treatment"] == f"{expected.compound}@{expected.concentration:g}"
        assert decode_image(row["image"]).dtype == np.uint16
    assert "Week7" not in set(loaded["train"]["batch"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| train | 20 |" in card and "uint16" in card and "DNA" in card


def test_per_channel_tiff_and_png_files(tmp_path):
    records = []
    expected = []
    for i in range(3):
        planes = [rng.integers(0, 65536, size=(12, 10), dtype=np.uint16) for _ in range(2)]
        tifffile.imwrite(tmp_path / f"f{i}_dna.tif", planes[0])
        write_png(tmp_path / f"f{i}_actin.png", planes[1])
        expected.append(np.stack(planes))
        records.append({"DNA_file": f"f{i}_dna.tif", "Actin_file": f"f{i}_actin.png", "Metadata_Plate": "P", "well": f"A0{i}",
                        "site": 1, "batch": "b", "compound": "x", "concentration": 1.5, "is_control": "false"})
    pd.DataFrame(records).to_csv(tmp_path / "meta.csv", index=False)
    source = folder_source(tmp_path / "meta.csv", column_mapping={"Metadata_Plate": "plate"})
    assert source.channel_names == ["DNA", "Actin"]
    dataset = build_screen_dataset(source, tmp_path / "out").dataset["train"]
    for row, pixels in zip(dataset, expected, strict=True):
        np.testing.assert_array_equal(decode_image(row["image"]), pixels)
        assert row["plate"] == "P" and row["is_control"] is False and row["treatment"] == "x@1.5"


def test_split_by_fraction_keeps_groups_whole(tmp_path):
    csv, _ = folder_screen(tmp_path / "screen", rows=9)
    result = build_screen_dataset(folder_source(csv), tmp_path / "out", split_column="batch", holdout_fraction=0.34, seed=1)
    train, test = (set(result.dataset[s]["batch"]) for s in ("train", "test"))
    assert len(test) == 1 and not train & test and len(train | test) == 3


# ---- layout (b): official BBBC021 ----------------------------------------------------------


def test_bbbc021_official_layout(shared_data_dir, tmp_path):
    profiles = shared_data_dir / "bbbc021_profiles"
    table = pd.read_csv(profiles / "BBBC021_v1_image.csv")
    moa = pd.read_csv(profiles / "BBBC021_v1_moa.csv")
    annotated_taxol = table.Image_Metadata_Concentration.isin(moa[moa.compound == "taxol"].concentration)
    # controls, an annotated treatment, and a concentration the MoA table does not annotate
    picked = pd.concat([table[table.Image_Metadata_Compound == "DMSO"].head(2),
                        table[(table.Image_Metadata_Compound == "taxol") & annotated_taxol].head(2),
                        table[(table.Image_Metadata_Compound == "taxol") & ~annotated_taxol].head(1)])
    picked.to_csv(tmp_path / "BBBC021_v1_image.csv", index=False)
    pixels = {}
    for _, row in picked.iterrows():
        for channel in ("DAPI", "Tubulin", "Actin"):
            path = tmp_path / "images" / row[f"Image_PathName_{channel}"] / row[f"Image_FileName_{channel}"]
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels[path.name] = rng.integers(0, 65536, size=(16, 16), dtype=np.uint16)
            tifffile.imwrite(path, pixels[path.name])
    source = bbbc021_source(tmp_path / "BBBC021_v1_image.csv", profiles / "BBBC021_v1_moa.csv", tmp_path / "images")
    dataset = build_screen_dataset(source, tmp_path / "out").dataset["train"]
    assert screen_channel_names(dataset) == ["DAPI", "Tubulin", "Actin"]
    for row, (_, expected) in zip(dataset, picked.iterrows(), strict=True):
        want = np.stack([pixels[expected[f"Image_FileName_{c}"]] for c in ("DAPI", "Tubulin", "Actin")])
        np.testing.assert_array_equal(decode_image(row["image"]), want)
        assert row["plate"] == expected.Image_Metadata_Plate_DAPI and row["well"] == expected.Image_Metadata_Well_DAPI
        assert row["batch"] == expected.Image_PathName_DAPI.split("/")[0]
        assert row["site"] == expected.Image_FileName_DAPI.split("_s")[1].split("_")[0]
        assert row["is_control"] == (expected.Image_Metadata_Compound == "DMSO")
        match = moa[(moa.compound == expected.Image_Metadata_Compound) & np.isclose(moa.concentration, expected.Image_Metadata_Concentration)]
        assert row["moa"] == (match.moa.iloc[0] if len(match) else None)
        assert row["replicate"] == expected.Replicate
    assert dataset[2]["moa"] == "Microtubule stabilizers" and dataset[4]["moa"] is None
    assert "cc0-1.0" in (tmp_path / "out" / "README.md").read_text()


# ---- layout (c): RxRx1 ---------------------------------------------------------------------


def rxrx1_tree(root: Path) -> dict[str, np.ndarray]:
    rows, pixels = [], {}
    for experiment, plate, well, site, well_type, sirna, sirna_id, dataset in [
        ("HUVEC-01", 1, "B02", 1, "treatment", "s21721", 855, "train"),
        ("HUVEC-01", 1, "B02", 2, "treatment", "s21721", 855, "train"),
        ("HUVEC-01", 2, "B03", 1, "negative_control", "EMPTY", 1138, "train"),
        ("RPE-05", 3, "G10", 1, "positive_control", "s501309", 1108, "test"),
    ]:
        rows.append({"site_id": f"{experiment}_{plate}_{well}_{site}", "well_id": f"{experiment}_{plate}_{well}", "cell_type": experiment.split("-")[0],
                     "dataset": dataset, "experiment": experiment, "plate": plate, "well": well, "site": site,
                     "well_type": well_type, "sirna": sirna, "sirna_id": sirna_id})
        planes = rng.integers(0, 256, size=(6, 16, 16), dtype=np.uint8)
        for channel in range(6):
            write_png(root / "images" / experiment / f"Plate{plate}" / f"{well}_s{site}_w{channel + 1}.png", planes[channel])
        pixels[rows[-1]["site_id"]] = planes
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return pixels


def test_rxrx1_layout(tmp_path):
    pixels = rxrx1_tree(tmp_path / "rxrx1")
    before = sorted(p.name for p in (tmp_path / "rxrx1").rglob("*"))
    for inside in (tmp_path / "rxrx1", tmp_path / "rxrx1" / "dataset", tmp_path):  # is, lies inside, holds the root
        with pytest.raises(OutputSafetyError, match="input --root"):
            build_screen_dataset(rxrx1_source(tmp_path / "rxrx1"), inside, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "rxrx1").rglob("*")) == before
    result = build_screen_dataset(rxrx1_source(tmp_path / "rxrx1"), tmp_path / "out", split_column="dataset")
    assert set(result.dataset) == {"train", "test"}
    assert result.dtype == "uint8" and result.image_shape == (6, 16, 16)
    rows = [r for part in result.dataset.values() for r in part]
    assert len(screen_channel_names(result.dataset["train"])) == 6
    for row in rows:
        decoded = decode_image(row["image"])
        assert decoded.dtype == np.uint8
        np.testing.assert_array_equal(decoded, pixels[row["site_id"]])
        assert row["batch"] == row["experiment"] and row["plate"] == f"{row['experiment']}_{row['plate_number']}"
        assert row["compound"] == row["treatment"] and row["moa"] is None and row["concentration"] is None
        assert row["is_control"] == (row["well_type"] != "treatment")


# ---- errors ----------------------------------------------------------------------------------


def test_missing_required_column_is_named(tmp_path):
    csv, _ = folder_screen(tmp_path / "s")
    pd.read_csv(csv).drop(columns=["batch"]).to_csv(csv, index=False)
    with pytest.raises(MissingColumnError, match=r"\['batch'\]"):
        folder_source(csv)


def test_missing_file_truncated_image_and_duplicates(tmp_path):
    csv, pixels = folder_screen(tmp_path / "s", rows=6)
    images = tmp_path / "s" / "images"
    (images / "field_2.npy").unlink()
    (images / "field_4.npy").write_bytes((images / "field_4.npy").read_bytes()[:200])  # truncated
    table = pd.read_csv(csv)
    pd.concat([table, table.iloc[[1]]]).to_csv(csv, index=False)  # line 8 repeats line 3

    with pytest.raises(MissingImageError, match=r"metadata.csv line 4: image file .*field_2.npy does not exist"):
        build_screen_dataset(folder_source(csv), tmp_path / "out")
    pd.concat([table.drop(index=2), table.iloc[[1]]]).to_csv(csv, index=False)
    with pytest.raises(DuplicateRowError, match=r"line 7: duplicate row, names the same image file\(s\) as metadata.csv line 3"):
        build_screen_dataset(folder_source(csv), tmp_path / "out")
    table.drop(index=2).to_csv(csv, index=False)
    with pytest.raises(ImageReadError, match=r"line 5: cannot read image file .*field_4.npy"):
        build_screen_dataset(folder_source(csv), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no partial folder left behind

    pd.concat([table, table.iloc[[1]]]).to_csv(csv, index=False)
    result = build_screen_dataset(folder_source(csv), tmp_path / "out", on_error="skip")
    assert result.dataset["train"].num_rows == 4  # 7 rows, 3 bad
    skipped = pd.read_csv(tmp_path / "out" / SKIPPED_ROWS_FILE)
    reasons = dict(zip(skipped.row, skipped.reason, strict=True))
    assert set(reasons) == {"metadata.csv line 4", "metadata.csv line 6", "metadata.csv line 8"}
    assert "does not exist" in reasons["metadata.csv line 4"] and "cannot read" in reasons["metadata.csv line 6"]
    assert "duplicate" in reasons["metadata.csv line 8"]
    assert skipped.files[skipped.row == "metadata.csv line 6"].iloc[0].endswith("field_4.npy")
    kept = {r["well"]: decode_image(r["image"]) for r in load_screen(tmp_path / "out")}
    np.testing.assert_array_equal(kept["C00"], np.moveaxis(pixels["field_0.npy"], -1, 0))
    assert "Rows skipped during the build: 3" in (tmp_path / "out" / "README.md").read_text()


def test_unsupported_pixel_type_and_other_pillow_formats(tmp_path):
    csv, _ = folder_screen(tmp_path / "s", rows=3)
    np.save(tmp_path / "s" / "images" / "field_1.npy", np.zeros((16, 16, 3), dtype=np.float32))
    with pytest.raises(ImageShapeError, match=r"line 3, file .*field_1.npy: expected uint8 or uint16 pixels.*float32"):
        build_screen_dataset(folder_source(csv), tmp_path / "out")
    # One file per channel in a format outside npy/tif/png: Pillow reads 16-bit PGM as int32, stored as uint16.
    planes = [rng.integers(0, 65536, size=(8, 8), dtype=np.uint16) for _ in range(2)]
    for name, plane in zip(("dna.pgm", "actin.pgm"), planes, strict=True):
        Image.fromarray(plane).save(tmp_path / name)
    pd.DataFrame([{"DNA_file": "dna.pgm", "Actin_file": "actin.pgm", "plate": "P", "well": "A01", "site": 1, "batch": "b",
                   "compound": "DMSO", "concentration": 0}]).to_csv(tmp_path / "pgm.csv", index=False)
    result = build_screen_dataset(folder_source(tmp_path / "pgm.csv"), tmp_path / "pgm")
    assert result.dtype == "uint16"
    np.testing.assert_array_equal(decode_image(result.dataset["train"][0]["image"]), np.stack(planes))


@pytest.mark.parametrize("bad", ["channels", "size"])
def test_rows_differing_in_channels_or_size(tmp_path, bad):
    csv, _ = folder_screen(tmp_path / "s", rows=4)
    shape = (16, 16, 4) if bad == "channels" else (16, 20, 3)
    np.save(tmp_path / "s" / "images" / "field_3.npy", np.zeros(shape, dtype=np.uint16))
    expected = r"\(4, 16, 16\)" if bad == "channels" else r"\(3, 16, 20\)"
    with pytest.raises(ImageShapeError, match=rf"line 5, file\(s\) .*field_3.npy.*expected .*\(3, 16, 16\) uint16.*got {expected}"):
        build_screen_dataset(folder_source(csv), tmp_path / "out", num_proc=2)
    result = build_screen_dataset(folder_source(csv), tmp_path / "out", on_error="skip", num_proc=2)
    assert result.dataset["train"].num_rows == 3 and list(result.skipped) == ["metadata.csv line 5"]


def test_bad_metadata_value_names_row_and_column(tmp_path):
    csv, _ = folder_screen(tmp_path / "s", rows=4)
    table = pd.read_csv(csv)
    table.loc[2, "plate"] = None
    table.to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"metadata.csv line 4, column 'plate': required value is empty"):
        build_screen_dataset(folder_source(csv), tmp_path / "out")
    assert build_screen_dataset(folder_source(csv), tmp_path / "out", on_error="skip").dataset["train"].num_rows == 3


def test_interrupted_build_leaves_no_dataset_and_keeps_the_old_one(tmp_path, monkeypatch):
    csv, _ = folder_screen(tmp_path / "s", rows=4)
    build_screen_dataset(folder_source(csv), tmp_path / "out")
    original = datasets.DatasetDict.save_to_disk

    def crash_midway(self, path, **kwargs):
        original(self, path, **kwargs)  # the data is fully written to the staging folder ...
        raise KeyboardInterrupt  # ... and the process dies before the rename

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        build_screen_dataset(folder_source(csv), tmp_path / "new")
    with pytest.raises(KeyboardInterrupt):
        build_screen_dataset(folder_source(csv), tmp_path / "out", overwrite=True)
    assert not (tmp_path / "new").exists()
    assert load_screen(tmp_path / "out").num_rows == 4  # the previous build is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "s"]
    assert (tmp_path / "out" / OUTPUT_MARKER).is_file()  # marked: a later --overwrite may replace it
    with pytest.raises(FileExistsError, match="already exists"):
        build_screen_dataset(folder_source(csv), tmp_path / "out")


# ---- CLI -------------------------------------------------------------------------------------


def test_cli_builds_and_reports_errors(tmp_path, capsys):
    csv, pixels = folder_screen(tmp_path / "s", rows=4)
    code = build_dataset.main(["folder", "--metadata_csv", str(csv), "--image_root", str(tmp_path / "s"),
                               "--channel_names", "a", "b", "c", "--output_dir", str(tmp_path / "out"),
                               "--license", "cc-by-4.0", "--num_shards", "2", "--select", "plate=P0"])
    assert code == 0, capsys.readouterr().err
    loaded = load_screen(tmp_path / "out")
    assert loaded.num_rows == 2 and set(loaded["plate"]) == {"P0"}
    assert len(loaded.cache_files) == 2
    assert "license: cc-by-4.0" in (tmp_path / "out" / "README.md").read_text()
    (tmp_path / "s" / "images" / "field_1.npy").unlink()
    with pytest.raises(SystemExit) as exit_info:
        build_dataset.main(["folder", "--metadata_csv", str(csv), "--output_dir", str(tmp_path / "out2")])
    assert exit_info.value.code.startswith("cdcl-build-dataset: error: metadata.csv line 3: image file")


def test_hub_script_runs_the_command(tmp_path):
    csv, pixels = folder_screen(tmp_path / "s", rows=3)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "folder", "--metadata_csv", str(csv), "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote {'train': 3} rows, 3 channels" in result.stdout and "(3, 16, 16) uint16" in result.stdout
    row = load_screen(tmp_path / "out")[0]
    np.testing.assert_array_equal(decode_image(row["image"]), np.moveaxis(pixels["field_0.npy"], -1, 0))
    missing = subprocess.run([sys.executable, str(SCRIPT), "folder", "--metadata_csv", str(tmp_path / "none.csv"),
                              "--output_dir", str(tmp_path / "out2")], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and "none.csv does not exist" in missing.stderr
