"""training/evaluate.py end to end on the real BBBC021 crops, and the local `evaluate` metric module."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "training" / "evaluate.py"
METRIC_MODULE = ROOT / "metrics" / "cdcl_profiling"
EXPECTED_METRICS = {
    "nsc", "nscb", "moa_map", "replicate_map", "knn_treatment_identification", "silhouette_moa",
    "batch_classification", "plate_classification", "silhouette_batch", "kbet_acceptance",
}


def load_cli():
    spec = importlib.util.spec_from_file_location("cdcl_evaluate_cli", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from cdcl_hf import CDCLConfig, CDCLImageProcessor, CDCLModel

    path = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    CDCLModel(CDCLConfig.from_preset("tiny", num_channels=3)).save_pretrained(path)
    CDCLImageProcessor(num_channels=3, size=32).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bbbc021_crops_dataset(shared_data_dir, tmp_path_factory):
    """The 1,000 real crops as a screen dataset on disk (arrays are H x W x C uint16 -> C x H x W)."""
    from cdcl_hf.screen_data import dataset_from_arrays

    crops = shared_data_dir / "bbbc021_crops"
    metadata = pd.read_csv(crops / "metadata.csv")
    images = [np.load(crops / "images" / name).transpose(2, 0, 1) for name in metadata["file"]]
    metadata = metadata.assign(
        site=metadata["site"].astype(str),
        is_control=metadata["compound"] == "DMSO",
        moa=metadata["moa"].where(metadata["compound"] != "DMSO"),  # DMSO is a control, not an MoA
    )
    path = tmp_path_factory.mktemp("bbbc021_crops") / "dataset"
    dataset_from_arrays(images, metadata, channel_names=["DNA", "stain_1", "stain_2"]).save_to_disk(str(path))
    return path


def test_cli_end_to_end_on_real_crops(tiny_checkpoint, bbbc021_crops_dataset, tmp_path):
    output_dir = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, str(CLI), "--model", str(tiny_checkpoint), "--dataset_name", str(bbbc021_crops_dataset),
         "--output_dir", str(output_dir), "--aggregate", "median", "--correction", "tvn",
         "--null_size", "500", "--no_progress"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("profiles_image.parquet", "profiles_well.parquet", "profiles_evaluated.parquet", "results.json",
                 "results.md", "projection_batch_moa.png"):
        assert (output_dir / name).is_file(), name

    report = json.loads((output_dir / "results.json").read_text())
    assert report["n_images"] == 1000
    assert report["n_profiles"] == 481  # wells in the crop set
    assert set(report["metrics"]) == EXPECTED_METRICS
    for name, metric in report["metrics"].items():
        assert metric["defined"], (name, metric["reason"])  # 10 batches, 55 plates, 12 MoAs: all defined
        assert metric["n"] > 0
    nsc = report["metrics"]["nsc"]
    assert nsc["unit"] == "treatments" and 90 <= nsc["n"] <= 103
    assert 0.0 <= nsc["value"] <= 1.0
    assert report["metrics"]["moa_map"]["n"] == 12

    images = pd.read_parquet(output_dir / "profiles_image.parquet")
    assert len(images) == 1000
    assert {"Metadata_plate", "Metadata_well", "Metadata_batch", "Metadata_moa", "Metadata_treatment"} <= set(images)
    assert "| nsc |" in (output_dir / "results.md").read_text()
    with Image.open(output_dir / "projection_batch_moa.png") as png:
        assert png.format == "PNG" and png.width > 500


def test_cli_refuses_a_model_with_the_wrong_channel_count(bbbc021_crops_dataset, tmp_path):
    from cdcl_hf import CDCLConfig, CDCLModel

    CDCLModel(CDCLConfig.from_preset("tiny", num_channels=5)).save_pretrained(tmp_path / "five")
    cli = load_cli()
    args = cli.parse_args(["--model", str(tmp_path / "five"), "--dataset_name", str(bbbc021_crops_dataset),
                           "--output_dir", str(tmp_path / "out"), "--max_images", "4", "--no_progress"])
    with pytest.raises(ValueError, match="3 channels but the model expects 5"):
        cli.run(args)
    assert not (tmp_path / "out" / "results.json").exists()


def test_metric_module_loads_by_path_and_reports_undefined_nscb():
    import evaluate

    metric = evaluate.load(str(METRIC_MODULE))
    # Two replicates per treatment, all in ONE batch: NSCB must come back as "not defined", not 0.
    # Treated profiles: cA (X) near cB (X), cC (Y) near cD (Y), so NSC = 1 at treatment level.
    angles = {"cA": 0, "cB": 10, "cC": 80, "cD": 90}
    moa = {"cA": "X", "cB": "X", "cC": "Y", "cD": "Y"}
    rows = [(c, moa[c], angles[c] + jitter, False) for c in angles for jitter in (-1, 1)]
    rows += [("DMSO", None, 45 + jitter, True) for jitter in (-2, 2)]
    radians = np.deg2rad([r[2] for r in rows])
    scores = metric.compute(
        embeddings=np.stack([np.cos(radians), np.sin(radians)], axis=1).tolist(),
        treatment=[r[0] for r in rows], compound=[r[0] for r in rows], moa=[r[1] for r in rows],
        batch=["W1"] * len(rows), plate=["P1"] * 5 + ["P2"] * 5, is_control=[r[3] for r in rows],
        null_size=200,
    )
    assert scores["nsc"] == 1.0 and scores["n"]["nsc"] == 4
    assert scores["nscb"] is None and "single batch" in scores["undefined"]["nscb"]
    assert scores["batch_classification"] is None and scores["kbet_acceptance"] is None
    assert scores["replicate_map"] == 1.0  # each replicate is closer to its twin than to any DMSO
