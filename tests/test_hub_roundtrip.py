"""Push to and load from a Hub (the in-test server; the real huggingface_hub client does the HTTP)."""

import datasets
import hub_fixtures  # noqa: F401  (the hub_server fixture re-points already imported clients)
import numpy as np
import pandas as pd
from hub_fixtures import hub_repo_id, hub_server  # noqa: F401  (fixtures; conftest may import them too)

from cdcl_hf.dataset_builders import SKIPPED_ROWS_FILE, build_screen_dataset, folder_source
from cdcl_hf.image_io import decode_image
from cdcl_hf.normalization import plate_statistics
from cdcl_hf.screen_data import load_screen, screen_channel_names

datasets.disable_progress_bars()


def small_screen(root, rows=8):
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    pixels, records = [], []
    for i in range(rows):
        pixels.append(rng.integers(0, 65536, size=(3, 16, 16), dtype=np.uint16))
        np.save(root / "images" / f"f{i}.npy", pixels[-1])
        records.append({"file": f"images/f{i}.npy", "plate": f"P{i % 2}", "well": f"D{i:02d}", "site": i, "batch": f"W{i % 4}",
                        "compound": "DMSO" if i % 2 else "cmpd", "concentration": 0.0 if i % 2 else 2.5, "moa": None if i % 2 else "X"})
    records.append({**records[0]})  # a duplicate row, skipped with on_error="skip"
    pd.DataFrame(records).to_csv(root / "metadata.csv", index=False)
    return root / "metadata.csv", pixels


def test_push_then_load_and_stream(hub_server, hub_repo_id, tmp_path):  # noqa: F811
    csv, pixels = small_screen(tmp_path / "screen")
    source = folder_source(csv, channel_names=["DNA", "Tub", "Act"], license="cc0-1.0")
    build_screen_dataset(source, tmp_path / "local", push_to_hub=hub_repo_id, split_column="batch",
                         holdout_values=["W3"], num_shards=2, on_error="skip")
    files = hub_server.repo_files(hub_repo_id, repo_type="dataset")
    assert sum(name.endswith(".parquet") for name in files) == 4  # 2 shards x 2 splits
    card = files["README.md"].decode()
    assert "license: cc0-1.0" in card and "dataset_info:" in card and "| test | 2 |" in card
    assert b"duplicate row" in files[SKIPPED_ROWS_FILE]
    assert ("POST", f"/datasets/{hub_repo_id}.git/info/lfs/objects/batch") in hub_server.state.requests

    expected = {f"D{i:02d}": p for i, p in enumerate(pixels)}
    loaded = load_screen(hub_repo_id, split="train", cache_dir=str(tmp_path / "cache"))
    assert loaded.num_rows == 6 and screen_channel_names(loaded) == ["DNA", "Tub", "Act"]
    local = load_screen(tmp_path / "local")
    assert loaded.features == local.features
    for row, local_row in zip(loaded, local, strict=True):
        decoded = decode_image(row["image"])
        assert decoded.dtype == np.uint16
        np.testing.assert_array_equal(decoded, expected[row["well"]])
        assert {k: v for k, v in row.items() if k != "image"} == {k: v for k, v in local_row.items() if k != "image"}

    streamed = load_screen(hub_repo_id, split="test", streaming=True)
    assert isinstance(streamed, datasets.IterableDataset)
    rows = list(streamed)
    assert [r["well"] for r in rows] == ["D03", "D07"] and {r["batch"] for r in rows} == {"W3"}
    for row in rows:
        np.testing.assert_array_equal(decode_image(row["image"]), expected[row["well"]])

    # statistics over a commit-pinned stream are cached on disk like an in-memory dataset's
    stats = plate_statistics(load_screen(hub_repo_id, split="train", streaming=True), source="all", cache_dir=tmp_path / "stats")
    reference = plate_statistics(local, source="all", cache_dir=None)
    assert list((tmp_path / "stats").glob("*.json"))
    for plate in reference:
        np.testing.assert_allclose(stats[plate].mean, reference[plate].mean, rtol=1e-12)
        np.testing.assert_allclose(stats[plate].std, reference[plate].std, rtol=1e-10)


def test_revision_pins_a_commit(hub_server, hub_repo_id, tmp_path):  # noqa: F811
    from huggingface_hub import HfApi

    csv, _ = small_screen(tmp_path / "screen", rows=4)
    source = folder_source(csv, channel_names=["a", "b", "c"])
    build_screen_dataset(source, push_to_hub=hub_repo_id, on_error="skip")
    first = HfApi().dataset_info(hub_repo_id).sha
    build_screen_dataset(folder_source(csv, channel_names=["a", "b", "c"], select={"plate": ["P0"]}), push_to_hub=hub_repo_id, on_error="skip")
    assert load_screen(hub_repo_id, cache_dir=str(tmp_path / "c1")).num_rows == 2
    assert load_screen(hub_repo_id, revision=first, cache_dir=str(tmp_path / "c2")).num_rows == 4


def test_model_repo_upload_and_download(hub_server, hub_repo_id, tmp_path):  # noqa: F811
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "cdcl"}')
    (folder / "model.safetensors").write_bytes(np.arange(1000, dtype=np.float32).tobytes())
    api = HfApi()
    api.create_repo(hub_repo_id, exist_ok=True)
    api.upload_folder(repo_id=hub_repo_id, folder_path=str(folder))
    assert sorted(api.list_repo_files(hub_repo_id)) == ["config.json", "model.safetensors"]
    weights = hf_hub_download(hub_repo_id, "model.safetensors", cache_dir=str(tmp_path / "cache"))
    assert np.array_equal(np.fromfile(weights, dtype=np.float32), np.arange(1000, dtype=np.float32))
    snapshot = snapshot_download(hub_repo_id, cache_dir=str(tmp_path / "cache2"))
    assert (tmp_path / "cache2").exists() and "config.json" in [p.name for p in __import__("pathlib").Path(snapshot).iterdir()]


def test_cli_push_to_hub_only(hub_server, hub_repo_id, tmp_path):  # noqa: F811
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hub"))
    try:
        import build_dataset
    finally:
        sys.path.pop(0)
    csv, pixels = small_screen(tmp_path / "screen")
    code = build_dataset.main(["folder", "--metadata_csv", str(csv), "--channel_names", "DNA", "Tub", "Act",
                               "--on_error", "skip", "--push_to_hub", hub_repo_id])
    assert code == 0
    loaded = load_screen(hub_repo_id, split="train", cache_dir=str(tmp_path / "cache"))
    assert loaded.num_rows == 8 and screen_channel_names(loaded) == ["DNA", "Tub", "Act"]
    by_well = {f"D{i:02d}": p for i, p in enumerate(pixels)}
    for row in loaded:
        np.testing.assert_array_equal(decode_image(row["image"]), by_well[row["well"]])
