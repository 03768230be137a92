"""The evaluation command (training/evaluate_embeddings.py, cdcl-evaluate) end to end on the real BBBC021 crops, and the local `evaluate` metric module."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cdcl_hf.embedding import inductor_cpp_compiler

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "training" / "evaluate_embeddings.py"
METRIC_MODULE = ROOT / "metrics" / "cdcl_profiling"
EXPECTED_METRICS = {
    "nsc", "nscb", "moa_map", "replicate_map", "knn_treatment_identification", "silhouette_moa",
    "batch_classification_controls", "plate_classification_controls", "silhouette_batch_controls", "kbet_controls",
    "ilisi_controls", "silhouette_batch_scib", "kbet_within_treatment", "kbet_within_moa",
    "batch_classification_all_profiles", "plate_classification_all_profiles", "silhouette_batch_all_profiles",
    "kbet_all_profiles", "ilisi_all_profiles",
}


def load_cli():
    from cdcl_hf.commands import evaluate

    return evaluate


@pytest.fixture(scope="module")
def bbbc021_crops_dataset(shared_data_dir, tmp_path_factory):
    """The 1,000 real crops (68 x 68 x 3 uint16 .npy) built by the real folder builder (~3 s)."""
    from cdcl_hf.dataset_builders import build_screen_dataset, folder_source

    crops = shared_data_dir / "bbbc021_crops"
    source = folder_source(crops / "metadata.csv", image_root=crops / "images",
                           channel_names=["DNA", "stain_1", "stain_2"])
    output_dir = tmp_path_factory.mktemp("bbbc021_crops") / "dataset"
    return build_screen_dataset(source, output_dir=output_dir).output_dir


@pytest.fixture(scope="module")
def tiny_checkpoint(bbbc021_crops_dataset, tmp_path_factory):
    """A tiny model with the processor train.py saves after per-plate normalisation ("per_channel", the
    average plate's mean/std), so the CLI has to pass each image's own plate statistics."""
    from cdcl_hf import CDCLConfig, CDCLImageProcessor, CDCLModel
    from cdcl_hf.normalization import PlateNormalization
    from cdcl_hf.screen_data import load_screen

    normalization = PlateNormalization.from_screen(load_screen(bbbc021_crops_dataset), "plate_controls")
    path = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    CDCLModel(CDCLConfig.from_preset("tiny", num_channels=3)).save_pretrained(path)
    CDCLImageProcessor(num_channels=3, size=32, **normalization.processor_kwargs()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def crops_evaluation(tiny_checkpoint, bbbc021_crops_dataset, tmp_path_factory):
    """The CLI run end to end (a subprocess, as a user runs it); returns its output folder."""
    output_dir = tmp_path_factory.mktemp("eval") / "out"
    result = subprocess.run(
        [sys.executable, str(CLI), "--model", str(tiny_checkpoint), "--dataset_name", str(bbbc021_crops_dataset),
         "--output_dir", str(output_dir), "--aggregate", "median", "--correction", "tvn",
         "--null_size", "500", "--no_progress"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def test_cli_end_to_end_on_real_crops(crops_evaluation):
    output_dir = crops_evaluation
    for name in ("profiles_image.parquet", "profiles_well.parquet", "profiles_evaluated.parquet", "results.json",
                 "results.md", "projection_batch_moa.png", ".cdcl-hf-output.json"):
        assert (output_dir / name).is_file(), name
    assert [p.name for p in output_dir.parent.iterdir()] == ["out"]  # the staging folder was swapped in, not left

    report = json.loads((output_dir / "results.json").read_text())
    assert report["input_normalization"] == "per_plate:controls"  # default --plate_normalization
    assert report["n_images"] == 1000
    assert report["n_profiles"] == 481  # wells in the crop set
    assert set(report["metrics"]) == EXPECTED_METRICS
    for name, metric in report["metrics"].items():
        assert metric["defined"], (name, metric["reason"])  # 10 batches, 55 plates, 12 MoAs: all defined
        assert metric["n"] > 0
        assert isinstance(metric["informative"], bool) and (metric["informative"] or metric["reason"])
    metrics = report["metrics"]
    # BBBC021 places each treatment in one week: held out, 238 of the 425 treated wells have no same-treatment
    # reference, so the kNN identification is flagged, as is kBET within treatment (only taxol spans weeks).
    knn = metrics["knn_treatment_identification"]
    assert not knn["informative"] and knn["details"]["n_queries_label_absent_from_reference"] == 238
    assert not metrics["kbet_within_treatment"]["informative"] and metrics["kbet_within_treatment"]["n"] == 1
    # --correction tvn whitens the controls it was fitted on onto a simplex: controls-only batch scores are flagged.
    assert not metrics["kbet_controls"]["informative"] and "equidistant" in metrics["kbet_controls"]["reason"]
    assert metrics["kbet_within_moa"]["informative"] and metrics["kbet_within_moa"]["n"] >= 8
    for name in ("batch_classification_controls", "nsc", "moa_map"):
        assert "chance" in metrics[name]["details"], name
    for name in ("kbet_controls", "ilisi_controls", "silhouette_batch_scib"):
        assert "no_batch_value" in metrics[name]["details"], name
    nsc = report["metrics"]["nsc"]
    assert nsc["unit"] == "treatments" and 90 <= nsc["n"] <= 103
    assert 0.0 <= nsc["value"] <= 1.0
    assert report["metrics"]["moa_map"]["n"] == 12

    images = pd.read_parquet(output_dir / "profiles_image.parquet")
    assert len(images) == 1000
    assert {"Metadata_Plate", "Metadata_Well", "Metadata_Batch", "Metadata_moa", "Metadata_Treatment"} <= set(images)
    table = (output_dir / "results.md").read_text()
    assert "| nsc |" in table and "not informative" in table and "lacks the label of 238 of 425" in table
    with Image.open(output_dir / "projection_batch_moa.png") as png:
        assert png.format == "PNG" and png.width > 500


def test_cli_streams_a_screen_with_its_own_column_names(
    crops_evaluation, tiny_checkpoint, bbbc021_crops_dataset, tmp_path
):
    """--streaming + --column_map give the same image profiles as the in-memory run of the whole screen."""
    import datasets

    # Whole plates (so their statistics are those of the full run), one without controls (statistics
    # then fall back to all its images).
    plates = {"Week4_27861", "Week4_27801", "Week4_27821", "Week4_27521"}
    screen = datasets.load_from_disk(str(bbbc021_crops_dataset))["train"]
    screen = screen.select([i for i, plate in enumerate(screen["plate"]) if plate in plates])
    renamed = tmp_path / "renamed"
    screen.rename_columns({"plate": "Metadata_Plate", "well": "Metadata_Well"}).save_to_disk(str(renamed))

    cli = load_cli()
    common = ["--model", str(tiny_checkpoint), "--dataset_name", str(renamed), "--no_progress"]
    with pytest.raises(ValueError, match="plate"):  # without the mapping, the schema check names what is missing
        cli.run(cli.parse_args([*common, "--output_dir", str(tmp_path / "unmapped")]))

    report = cli.run(cli.parse_args(
        [*common, "--output_dir", str(tmp_path / "out"), "--streaming",
         "--column_map", "Metadata_Plate=plate", "--column_map", "Metadata_Well=well",
         "--max_images", "64", "--batch_size", "16", "--profile_level", "image", "--null_size", "50"]))
    assert report["n_images"] == 64 and report["settings"]["streaming"]
    assert report["input_normalization"] == "per_plate:controls"
    streamed = pd.read_parquet(tmp_path / "out" / "profiles_image.parquet")
    in_memory = pd.read_parquet(crops_evaluation / "profiles_image.parquet")
    in_memory = in_memory[in_memory["Metadata_Plate"].isin(plates)].head(64).reset_index(drop=True)
    pd.testing.assert_frame_equal(streamed, in_memory, atol=1e-5)


def test_cli_averages_over_mirrored_copies_when_asked(crops_evaluation, tiny_checkpoint, bbbc021_crops_dataset,
                                                     tmp_path):
    cli = load_cli()
    compile_model = ["--compile"] if inductor_cpp_compiler()[1] else []
    report = cli.run(cli.parse_args(
        ["--model", str(tiny_checkpoint), "--dataset_name", str(bbbc021_crops_dataset), "--no_progress",
         "--output_dir", str(tmp_path / "out"), "--max_images", "32", "--profile_level", "image",
         "--null_size", "50", "--test_time_augmentation", "flips", *compile_model]))
    assert report["settings"]["test_time_augmentation"] == "flips"
    assert report["settings"]["compile_model"] == bool(compile_model)
    assert report["settings"]["cpu_linear_kernel"] == "auto"
    augmented = pd.read_parquet(tmp_path / "out" / "profiles_image.parquet")
    plain = pd.read_parquet(crops_evaluation / "profiles_image.parquet").head(32)
    features = [c for c in plain if not c.startswith("Metadata_")]
    pd.testing.assert_frame_equal(augmented.drop(columns=features), plain.drop(columns=features))
    assert not np.allclose(augmented[features], plain[features], atol=1e-3)


def test_cli_reads_the_cls_and_mean_tokens_and_centres_when_asked(crops_evaluation, tiny_checkpoint,
                                                                  bbbc021_crops_dataset, tmp_path):
    cli = load_cli()
    report = cli.run(cli.parse_args(
        ["--model", str(tiny_checkpoint), "--dataset_name", str(bbbc021_crops_dataset), "--no_progress",
         "--output_dir", str(tmp_path / "out"), "--max_images", "32", "--profile_level", "image",
         "--null_size", "50", "--pooling", "cls+mean", "--correction", "center"]))
    assert report["settings"]["pooling"] == "cls+mean" and report["settings"]["correction"] == "center"
    both = pd.read_parquet(tmp_path / "out" / "profiles_image.parquet")
    plain = pd.read_parquet(crops_evaluation / "profiles_image.parquet").head(32)  # the model's own (CLS) pooling
    features = [c for c in plain if not c.startswith("Metadata_")]
    both_features = [c for c in both if not c.startswith("Metadata_")]
    assert report["embedding_dim"] == 2 * len(features) == len(both_features)
    np.testing.assert_allclose(both[both_features[: len(features)]].to_numpy(), plain[features].to_numpy(), atol=1e-5)
    # The scored profiles are the image profiles minus their mean (profile level image: no aggregation first).
    scored = pd.read_parquet(tmp_path / "out" / "profiles_evaluated.parquet")
    matrix = both[both_features].to_numpy(dtype=np.float64)
    np.testing.assert_allclose(scored[both_features].to_numpy(), matrix - matrix.mean(axis=0), atol=1e-9)


def test_cli_refuses_a_model_with_the_wrong_channel_count(bbbc021_crops_dataset, tmp_path):
    from cdcl_hf import CDCLConfig, CDCLImageProcessor, CDCLModel

    CDCLModel(CDCLConfig.from_preset("tiny", num_channels=5)).save_pretrained(tmp_path / "five")
    CDCLImageProcessor(num_channels=5, size=32).save_pretrained(tmp_path / "five")
    cli = load_cli()
    args = cli.parse_args(["--model", str(tmp_path / "five"), "--dataset_name", str(bbbc021_crops_dataset),
                           "--output_dir", str(tmp_path / "out"), "--max_images", "4", "--no_progress"])
    with pytest.raises(ValueError, match="3 channels but the model expects 5"):
        cli.run(args)
    assert not (tmp_path / "out" / "results.json").exists()


def test_cli_rejects_a_malformed_column_map(capsys):
    cli = load_cli()
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--model", "m", "--dataset_name", "d", "--output_dir", "o", "--column_map", "Metadata_Plate"])
    assert exit_info.value.code == 2
    assert "--column_map: expected THEIRS=STANDARD" in capsys.readouterr().err
    args = cli.parse_args(["--model", "m", "--dataset_name", "d", "--output_dir", "o", "--column_map", "P=plate"])
    assert args.column_map == ["P=plate"]


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
    assert scores["batch_classification_all_profiles"] is None and scores["kbet_all_profiles"] is None
    assert scores["kbet_controls"] is None and "two batches" in scores["undefined"]["kbet_controls"]
    assert scores["not_informative"] == {}  # nothing computed here is flagged: every value that exists is readable
    assert scores["replicate_map"] == 1.0  # each replicate is closer to its twin than to any DMSO
