"""benchmarks/bench_methods_bbbc021.py: the baseline features (unit), and a `--quick` run on the real crops whose
JSON must be complete and consistent (every row, metric ranges, the CellProfiler line, deterministic baselines,
paired differences equal to the per-seed differences)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from benchmark_scripts import load_benchmark

from cdcl_hf.metrics import PERMUTATION_NULL_SIZE

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_methods_bbbc021.py"
ROWS = ("untrained", "dino", "dino-cb", "cdcl", "intensity_stats", "pooled_pixels", "cellprofiler")
TRAINED = ("untrained", "dino", "dino-cb", "cdcl")


def load_bench():
    return load_benchmark("bench_methods_bbbc021")


# ---------------------------------------------------------------------------------------------- unit


def test_intensity_stats_features_on_a_tiny_image():
    bench = load_bench()
    image = np.zeros((3, 4, 5), dtype=np.float32)
    image[0] = 2.0  # constant: every statistic is 2, all pixels above 1
    image[1] = np.arange(20, dtype=np.float32).reshape(4, 5)  # 0..19
    image[2, :2] = -1.0  # half -1, half 0
    features = bench.intensity_stats_features(image)
    names = bench.intensity_stats_names()
    assert features.shape == (24,) and len(names) == 24 and features.dtype == np.float64
    per_channel = features.reshape(3, 8)  # mean, std, p10, p25, p50, p75, p90, fraction above 1
    np.testing.assert_allclose(per_channel[0], [2, 0, 2, 2, 2, 2, 2, 1])
    values = np.arange(20.0)
    np.testing.assert_allclose(per_channel[1], [values.mean(), values.std(),
                                                *np.quantile(values, [0.1, 0.25, 0.5, 0.75, 0.9]), 18 / 20])
    np.testing.assert_allclose(per_channel[1, 2:7], [1.9, 4.75, 9.5, 14.25, 17.1])
    np.testing.assert_allclose(per_channel[2], [-0.5, 0.5, -1, -1, -0.5, 0, 0, 0])
    assert names[:2] == ["DNA_mean", "DNA_std"] and names[8] == "stain_1_mean" and names[7] == "DNA_frac_above_1"


def test_pooled_pixels_features_on_a_tiny_image():
    bench = load_bench()
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 16, 16)).astype(np.float32)
    features = bench.pooled_pixels_features(image)
    assert features.shape == (3 * 8 * 8,) and len(bench.pooled_pixels_names()) == 192
    # 16 -> 8: the mean of each 2 x 2 block, channel-major, row-major.
    expected = image.reshape(3, 8, 2, 8, 2).mean(axis=(2, 4)).reshape(-1)
    np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-6)
    # A crop's 68 x 68 (not divisible by 8) still gives 8 x 8 cells, each the mean of its (overlapping) window;
    # a constant channel stays constant.
    crop = np.ones((3, 68, 68), dtype=np.float32) * np.array([1.0, -2.0, 0.5], dtype=np.float32)[:, None, None]
    pooled = bench.pooled_pixels_features(crop).reshape(3, 64)
    np.testing.assert_allclose(pooled, np.repeat([[1.0], [-2.0], [0.5]], 64, axis=1), rtol=1e-6)


# ---------------------------------------------------------------------------------------------- quick run


@pytest.fixture(scope="module")
def quick_run(shared_data_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench_bbbc021")
    output = folder / "methods_bbbc021"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--output", str(output), "--work_dir", str(folder / "work"),
         "--crops_dir", str(shared_data_dir / "bbbc021_crops"),
         "--profiles_csv", str(shared_data_dir / "bbbc021_profiles" / "BBBC021_feature_selected_mad_robustize.csv")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(output.with_suffix(".json").read_text()), output.with_suffix(".md").read_text(), folder


def test_quick_run_has_every_row_and_sane_metrics(quick_run):
    result, md, _ = quick_run
    assert result["quick"] is True and result["settings"]["seeds"] == [0]
    assert result["machine"]["cpu"] and result["machine"]["cores_usable"] >= 1 and result["total_wall_s"] > 0
    preset = ROOT / result["settings"]["config"]
    assert result["preset"]["text"] == preset.read_text() and isinstance(result["preset"]["values"], dict)
    assert result["dataset"]["num_images"] == 1000 and result["dataset"]["num_batches"] == 10
    # The headline correction is `center` (chosen on the tuning weeks); `none` is scored too.
    assert result["settings"]["corrections"] == ["center", "none"]
    assert {"center", "none", "center, held-out weeks", "none, held-out weeks"} <= set(result["summary"])
    block = result["summary"]["center"]["metrics"]
    assert tuple(block) == ROWS
    ranges = result["metric_ranges"]
    for method in ROWS:
        for name in ("nsc", "nscb", "replicate_map", "moa_map", "batch_classification_controls", "ilisi_controls"):
            assert block[method][name]["mean"] is not None, (method, name)
        for name, stats in block[method].items():
            low, high = ranges[name]
            for value in stats["per_seed"].values():
                assert value is None or low - 1e-9 <= value <= high + 1e-9, (method, name, value)
        assert f"| {method}" in md
    # Each row's NSC / NSCB is over (about) the 103 / 92 treatments of the screen.
    for run in result["runs"]:
        metrics = run["evaluations"][0]["metrics"]
        assert 95 <= metrics["nsc"]["n"] <= 103 and 80 <= metrics["nscb"]["n"] <= 92, run["method"]
        assert "chance" in metrics["nsc"] and "no_batch_value" in metrics["ilisi_controls"]
        # The controls' batch scores carry their shuffled-batch null (56 controls: under the size cap).
        assert metrics["ilisi_controls"]["permutation_null"]["n_permutations"] == PERMUTATION_NULL_SIZE
        assert 0 < metrics["kbet_controls"]["p_vs_null"] <= 1
        assert math.isfinite(metrics["batch_classification_controls"]["z_vs_null"])
    z_table = result["summary"]["center"]["z_vs_null"]
    assert set(z_table) == set(ROWS) and "Batch on the controls against shuffled batch labels" in md
    assert set(z_table["cdcl"]["kbet_controls"]["p_per_seed"]) == set(z_table["cdcl"]["kbet_controls"]["per_seed"])
    assert "(p " in md
    # The trained models ran the preset with the quick step cap; untrained is the step-1 teacher.
    steps = {r["method"]: r["training"]["final_step"] for r in result["runs"] if r["kind"] == "trained"}
    assert steps == {"untrained": 1, "dino": 6, "dino-cb": 6, "cdcl": 6}
    for run in result["runs"]:
        if run["kind"] == "trained":
            assert "--config training/configs/bbbc021_crops.yaml" in run["commands"][0]
            assert "evaluate_embeddings.py" in run["commands"][1] and "--batch_column batch" in run["commands"][1]
            assert math.isfinite(run["training"]["final_teacher_entropy_ratio"])


def test_quick_run_scores_the_held_out_weeks_alone(quick_run):
    # The weeks the preset's tuning never saw are scored on their own: fewer treatments, every row present.
    result, md, _ = quick_run
    weeks = result["settings"]["heldout_batches"]
    assert weeks == [f"Week{i}" for i in range(6, 11)] and result["heldout_dataset"]["num_batches"] == 5
    held_out = result["summary"]["center, held-out weeks"]["metrics"]
    assert tuple(held_out) == ROWS
    for run in result["runs"]:
        (whole,) = [e for e in run["evaluations"] if e["summary_key"] == "center"]
        (half,) = [e for e in run["evaluations"] if e["summary_key"] == "center, held-out weeks"]
        assert 0 < half["metrics"]["nsc"]["n"] < whole["metrics"]["nsc"]["n"], run["method"]
        value = half["metrics"]["nsc"]["value"]
        assert held_out[run["method"]]["nsc"]["per_seed"]["0"] == value  # JSON keys are strings
    assert "held-out weeks only (Week6, Week7, Week8, Week9, Week10" in md


def test_quick_run_cellprofiler_reference(quick_run):
    result, _, _ = quick_run
    (reference,) = [r for r in result["runs"] if r["method"] == "cellprofiler"]
    assert reference["n_wells_matched"] == 296
    metrics = reference["evaluations"][0]["metrics"]
    assert metrics["nsc"]["value"] > 0.8 and metrics["nsc"]["n"] == 103
    assert abs(metrics["nsc"]["value"] - 0.903) < 0.005 and abs(metrics["nscb"]["value"] - 0.761) < 0.005
    assert metrics["nscb"]["n"] == 92


def test_quick_run_baselines_are_deterministic(quick_run):
    result, _, folder = quick_run
    bench = load_bench()
    tables = bench.baseline_image_profiles(str(folder / "work" / "dataset"))
    for name in ("intensity_stats", "pooled_pixels"):
        (record,) = [r for r in result["runs"] if r["method"] == name]
        assert record["seed"] is None and record["n_features"] == {"intensity_stats": 24, "pooled_pixels": 192}[name]
        assert bench.feature_sha256(tables[name]) == record["feature_sha256"], name
        stats = result["summary"]["center"]["metrics"][name]["nsc"]
        assert stats["deterministic"] and stats["std"] == 0.0
        assert set(stats["per_seed"].values()) == {record["evaluations"][0]["metrics"]["nsc"]["value"]}


def test_quick_run_paired_differences_match_per_seed_values(quick_run):
    result, _, _ = quick_run
    block = result["summary"]["center"]
    checked = 0
    for pair, per_metric in block["paired_differences"].items():
        a, b = pair.split(" - ")
        for name, stats in per_metric.items():
            va, vb = block["metrics"][a][name]["per_seed"], block["metrics"][b][name]["per_seed"]
            expected = {s: va[s] - vb[s] for s in va if va[s] is not None and vb.get(s) is not None}
            assert stats["per_seed"] == pytest.approx(expected), (pair, name)
            if expected:
                assert stats["mean"] == pytest.approx(np.mean(list(expected.values())))
                checked += 1
    assert {"cdcl - dino", "cdcl - intensity_stats"} <= set(block["paired_differences"]) and checked > 20
    # Per-seed values of a trained method are its evaluation's values.
    for run in result["runs"]:
        if run["kind"] == "trained":
            value = run["evaluations"][0]["metrics"]["nsc"]["value"]
            assert block["metrics"][run["method"]]["nsc"]["per_seed"][str(run["seed"])] == value


def test_rescore_scores_the_last_runs_models_without_training(quick_run, shared_data_dir, tmp_path):
    result, _, folder = quick_run
    common = [sys.executable, str(SCRIPT), "--quick", "--work_dir", str(folder / "work"),
              "--crops_dir", str(shared_data_dir / "bbbc021_crops"),
              "--profiles_csv", str(shared_data_dir / "bbbc021_profiles" / "BBBC021_feature_selected_mad_robustize.csv")]
    output = tmp_path / "methods_bbbc021"
    output.with_suffix(".json").write_text(json.dumps(result))
    done = subprocess.run([*common, "--rescore", "--output", str(output)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rescored = json.loads(output.with_suffix(".json").read_text())
    assert rescored["rescored"]["wall_s"] > 0 and rescored["total_wall_s"] == result["total_wall_s"]
    for before, after in zip(result["runs"], rescored["runs"], strict=True):
        assert (before["method"], before["seed"]) == (after["method"], after["seed"])
        if before["kind"] == "trained":
            assert after["commands"][0] == before["commands"][0] and after["train_wall_s"] == before["train_wall_s"]
            assert after["training"] == before["training"]  # the same trained model, read again
    assert "scoring the model trained by the last run" in done.stderr + done.stdout

    # Another preset than the run's: refused, nothing written.
    other = tmp_path / "other.yaml"
    other.write_text((ROOT / "training/configs/bbbc021_crops.yaml").read_text() + "\nnum_train_epochs: 16\n")
    refused = subprocess.run([*common, "--rescore", "--config", str(other), "--output", str(tmp_path / "x")],
                             capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert refused.returncode != 0 and "no earlier results" in refused.stderr
    before_text = output.with_suffix(".json").read_text()
    refused = subprocess.run([*common, "--rescore", "--config", str(other), "--output", str(output)],
                             capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert refused.returncode != 0 and "another preset" in refused.stderr
    assert output.with_suffix(".json").read_text() == before_text
