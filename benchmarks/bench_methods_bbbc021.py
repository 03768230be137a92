"""CDCL vs DINO vs DINO-CB on real BBBC021 single-cell crops, against model-free baselines and CellProfiler.

    python benchmarks/bench_methods_bbbc021.py                 # 3 seeds x 4 methods, the preset's full training
    python benchmarks/bench_methods_bbbc021.py --quick --output /tmp/bbbc021_quick    # smoke run, ~1-2 min on 2 cores
    python benchmarks/bench_methods_bbbc021.py --rescore   # new evaluation code on the last run's models, no training

Data (read-only, never copied into git): ../shared/data/bbbc021_crops (1,000 crops 68 x 68 x 3 uint16 + metadata)
and ../shared/data/bbbc021_profiles (CellProfiler well profiles); see ../shared/data/README.md.

Steps:
  1. builds the crops into a screen dataset once, with the real builder (`cdcl_hf.dataset_builders.
     build_screen_dataset(folder_source(...))`), under --work_dir (reused while metadata.csv is unchanged);
  2. for every seed trains, with the real CLI `training/train.py` in subprocesses and the same preset (--config,
     default training/configs/bbbc021_crops.yaml) for every method:
       untrained  `--method cdcl --max_train_steps 1` (learning rate 0 at step 0: the saved teacher is the init)
       dino, dino-cb, cdcl   the preset's schedule (`--quick`: `--max_train_steps 6`);
  3. evaluates each teacher on the same crops with the real CLI `training/evaluate_embeddings.py` (well-level
     profiles, `--aggregate median`, once per --corrections entry; batch = the `batch` column (BBBC021 week));
  4. scores two model-free baselines with the same code the evaluate CLI runs after embedding
     (`profiling.aggregate_profiles` -> `profiling.correct_profiles` -> `metrics.evaluate_profiles`, with the CLI's
     own parsed defaults), on images normalised per plate exactly as the models' inputs
     (`PlateNormalization`, mode plate_controls):
       intensity_stats  per channel: mean, std, 10/25/50/75/90th percentiles, fraction of pixels above 1
                        (one control std above the plate's control mean): 24 features
       pooled_pixels    the image area-averaged to 8 x 8 per channel, flattened: 192 features
     They are deterministic: computed once (metric seed 0), repeated against every seed in the paired differences;
  5. scores the CellProfiler reference: the published well profiles (feature-selected, MAD-robustised per plate)
     restricted to the wells present in the crops, with the same `evaluate_profiles` (treatment = median of wells,
     cosine 1-NN, DMSO excluded); reference figures on those wells: NSC 0.903 (103 treatments), NSCB 0.761 (92);
  6. writes OUTPUT.json and OUTPUT.md (default benchmarks/results/methods_bbbc021): per method mean +- sample sd
     over seeds and per-seed values, paired differences cdcl - dino and cdcl - intensity_stats, training health,
     wall times, machine, the exact commands and the preset's full contents.

Corrections (default `center` then `none`; the first is the headline one, the README's): `none`, `center`, `tvn` and
`sphering` work on these crops; 40 of the 55 plates hold fewer than two DMSO wells, so the per-plate `mad` / `zscore`
corrections are refused by `correct_profiles` (and by the evaluate CLI). `center` (subtract the screen's mean
profile) was chosen on the tuning weeks, for every method alike (benchmarks/results/tuning_bbbc021_crops.md).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shlex
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from bench_methods_synthetic import (  # noqa: E402
    display,
    fmt,
    log,
    mean_std,
    run_command,
    training_health,
)
from common import machine  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
TRAINED_METHODS = ("untrained", "dino", "dino-cb", "cdcl")
BASELINES = ("intensity_stats", "pooled_pixels")
REFERENCE = "cellprofiler"
ROWS = (*TRAINED_METHODS, *BASELINES, REFERENCE)
CHANNEL_NAMES = ("DNA", "stain_1", "stain_2")

# (name in results.json, short column title, better direction)
METRICS = (
    ("nsc", "NSC", "higher"),
    ("nscb", "NSCB", "higher"),
    ("replicate_map", "replicate mAP", "higher"),
    ("moa_map", "MoA mAP", "higher"),
    ("batch_classification_controls", "batch clf acc (controls)", "lower"),
    ("silhouette_batch_controls", "batch silhouette (controls, 1 = mixed)", "higher"),
    ("kbet_controls", "kBET (controls)", "higher"),
    ("ilisi_controls", "iLISI (controls)", "higher"),
    ("silhouette_batch_scib", "batch silhouette (scIB, within MoA)", "higher"),
    ("kbet_within_treatment", "kBET within treatment", "higher"),
    ("kbet_within_moa", "kBET within MoA", "higher"),
)
# Value ranges (inclusive) of each metric, for sanity checks.
METRIC_RANGES = {name: (0.0, 1.0) for name, _, _ in METRICS}
HEALTH_SUMMARY_KEYS = ("final_teacher_entropy_ratio", "min_teacher_entropy_ratio_after_step1",
                       "final_teacher_kl_to_uniform", "final_dino_loss", "final_cross_correlation_loss", "final_loss")
PAIRS = (("cdcl", "dino"), ("cdcl", "intensity_stats"), ("dino-cb", "dino"), ("cdcl", "untrained"),
         ("dino", "untrained"))

INTENSITY_QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90)
INTENSITY_THRESHOLD = 1.0  # in plate-control standard deviations above the plate's control mean
POOLED_SIZE = 8
BASELINE_EVAL_SEED = 0

DEFAULT_PROTOCOL_NOTE = (
    "Preset and tuning protocol: see the --config preset file (its full contents are recorded under `preset`)."
)

NOTES = [
    "One screen, 1,000 crops from 481 wells on 55 plates in 10 batches (weeks); each method is trained and scored "
    "on the same crops (no held-out screen): the question is what the embeddings encode, as in the BBBC021 "
    "benchmark, where the profiling method is fit to the whole screen.",
    "NSC / NSCB are over ~103 / ~91 treatments: one treatment = ~0.01. MoA mAP is over 12 MoAs.",
    "Batch is the week (`batch` column). The batch scores on the controls use the 56 DMSO wells only.",
    "The baselines see the same per-plate normalised pixels the models do (PlateNormalization, plate_controls; "
    "17 plates without DMSO crops fall back to all their images, as in training). They are deterministic and "
    "scored once with metric seed 0.",
    "CellProfiler: the published feature-selected, per-plate MAD-robustised profiles, restricted to the crops' "
    "wells and scored as published (no further correction, the same line in every correction's table). Its "
    "treatments are the profiled wells' treatments, so its n can differ slightly from the crops'.",
    "Corrections: `mad` / `zscore` are refused on these crops (40 of 55 plates hold fewer than two DMSO wells).",
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", type=Path, default=ROOT / "training" / "configs" / "bbbc021_crops.yaml",
                        help="the training preset every method gets (train.py --config)")
    parser.add_argument("--crops_dir", type=Path, default=SHARED / "bbbc021_crops",
                        help="metadata.csv + images/*.npy")
    parser.add_argument("--profiles_csv", type=Path,
                        default=SHARED / "bbbc021_profiles" / "BBBC021_feature_selected_mad_robustize.csv")
    parser.add_argument("--corrections", nargs="+", default=["center", "none"],
                        help="evaluate CLI --correction values; the first is the headline (README) one: `center`, "
                             "chosen on the tuning weeks (benchmarks/tune_bbbc021_crops.py). mad / zscore are "
                             "refused on these crops")
    parser.add_argument("--pooling", default="cls+mean", choices=["cls", "mean", "cls+mean"],
                        help="evaluate CLI --pooling: the trained models' embedding (chosen on the tuning weeks: the "
                             "CLS and mean patch tokens; the DINO head trains on the CLS token)")
    parser.add_argument("--batch_column", default="batch", help="evaluate CLI --batch_column (batch metrics, NSCB)")
    parser.add_argument("--plate_column", default="plate", help="evaluate CLI --plate_column")
    parser.add_argument("--null_size", type=int, default=2000, help="copairs permutations (mAP p-values only)")
    parser.add_argument("--train_flags", default="", help="extra flags given to every train.py run (quoted string)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs in parallel; each subprocess gets OMP_NUM_THREADS = max(1, 2 // jobs)")
    parser.add_argument("--work_dir", type=Path, default=None,
                        help="dataset, checkpoints, evaluations (default outputs/bench_methods_bbbc021, "
                             "outputs/bench_methods_bbbc021_quick with --quick)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "methods_bbbc021",
                        help="writes OUTPUT.json and OUTPUT.md")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: first seed only, --max_train_steps QUICK_STEPS, --null_size 100")
    parser.add_argument("--quick_steps", type=int, default=6)
    parser.add_argument("--rescore", action="store_true",
                        help="do not train: score the models the last run (--output) trained under --work_dir again, "
                             "with the current evaluation code (refused if the preset changed since)")
    parser.add_argument("--heldout_batches", nargs="*", default=[f"Week{i}" for i in range(6, 11)],
                        help="also score every model on the crops of these batches alone: the half of the screen "
                             "that the preset's tuning never saw (benchmarks/tune_bbbc021_crops.py); none: skip")
    parser.add_argument("--protocol_note", default=DEFAULT_PROTOCOL_NOTE,
                        help="text stored as `protocol` in the JSON and printed in the .md")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
        args.null_size = min(args.null_size, 100)
    if args.work_dir is None:
        args.work_dir = ROOT / "outputs" / ("bench_methods_bbbc021_quick" if args.quick else "bench_methods_bbbc021")
    args.work_dir = args.work_dir.resolve()
    return args


HELDOUT = "held-out weeks"


def summary_key(correction: str, screen: str) -> str:
    """The summary section of one evaluation: the correction, for the whole screen or for the held-out weeks."""
    return correction if screen == "all" else f"{correction}, {HELDOUT}"


def summary_keys(args) -> list[str]:
    screens = ["all"] + (["heldout"] if args.heldout_batches else [])
    return [summary_key(c, screen) for screen in screens for c in args.corrections]


def relative(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else os.path.relpath(path, ROOT)


# ---------------------------------------------------------------------------------------------- dataset


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_crops_dataset(crops_dir: Path, work_dir: Path, batches: list[str] | None = None) -> dict:
    """The crops (or those of `batches` only) as a screen dataset, built once with the real folder builder and
    reused while metadata.csv is the same."""
    import pandas as pd

    from cdcl_hf.dataset_builders import build_screen_dataset, folder_source

    name = "dataset" if batches is None else "dataset_" + "_".join(sorted(batches))
    output_dir = work_dir / name
    marker = work_dir / f"{name}_source.json"
    metadata_csv = crops_dir / "metadata.csv"
    source_description = {"metadata_csv": str(crops_dir.resolve() / "metadata.csv"),
                          "metadata_sha256": file_sha256(crops_dir / "metadata.csv"),
                          "num_image_files": len(list((crops_dir / "images").glob("*.npy"))),
                          "channel_names": list(CHANNEL_NAMES), "batches": sorted(batches) if batches else "all"}
    started = time.perf_counter()
    reused = marker.is_file() and json.loads(marker.read_text()) == source_description and output_dir.is_dir()
    if not reused:
        work_dir.mkdir(parents=True, exist_ok=True)
        if batches is not None:
            metadata = pd.read_csv(metadata_csv)
            unknown = sorted(set(batches) - set(metadata["batch"]))
            if unknown:
                raise SystemExit(f"bench_methods_bbbc021: error: --heldout_batches {unknown} are not batches of "
                                 f"{metadata_csv}")
            metadata_csv = work_dir / f"{name}_metadata.csv"
            metadata[metadata["batch"].isin(batches)].to_csv(metadata_csv, index=False)
        source = folder_source(metadata_csv, image_root=crops_dir / "images", channel_names=list(CHANNEL_NAMES))
        build_screen_dataset(source, output_dir=output_dir, overwrite=True)
        marker.write_text(json.dumps(source_description, indent=2))
    from cdcl_hf.screen_data import load_screen

    screen = load_screen(str(output_dir))
    return {"path": str(output_dir), "reused": reused, "build_wall_s": round(time.perf_counter() - started, 1),
            "num_images": len(screen), "num_plates": len(set(screen["plate"])), "num_batches": len(set(screen["batch"])),
            "num_wells": len(set(zip(screen["plate"], screen["well"], strict=True))),
            "num_treatments": len(set(screen["treatment"])), "columns": screen.column_names,
            "source": source_description}


# ---------------------------------------------------------------------------------------------- metric records


def metric_record(metric: dict) -> dict:
    """One metric of a results.json report (or `MetricResult.to_dict()`), as the benchmark keeps it."""
    details = metric.get("details") or {}
    record = {"value": metric["value"] if metric["defined"] else None, "n": metric["n"], "unit": metric.get("unit"),
              "defined": metric["defined"], "informative": metric.get("informative", metric["defined"]),
              "reason": metric.get("reason")}
    for key in ("chance", "no_batch_value", "permutation_null", "z_vs_null", "p_vs_null"):
        if details.get(key) is not None:
            record[key] = details[key]
    return record


def collect_metrics(report_metrics: dict) -> dict:
    return {name: metric_record(report_metrics[name]) for name, _, _ in METRICS if name in report_metrics}


# ---------------------------------------------------------------------------------------------- trained methods


def train_command(args, seed: int, method: str, dataset: str, output_dir: Path) -> list[str]:
    command = [sys.executable, str(ROOT / "training" / "train.py"), "--config", str(args.config.resolve()),
               "--dataset_name", dataset, "--seed", str(seed), "--output_dir", str(output_dir),
               "--overwrite_output_dir", *shlex.split(args.train_flags)]
    if method == "untrained":
        command += ["--method", "cdcl", "--max_train_steps", "1"]
    else:
        command += ["--method", method]
        if args.quick:
            command += ["--max_train_steps", str(args.quick_steps)]
    return command


def evaluate_command(args, model_dir: Path, dataset: str, eval_dir: Path, correction: str, seed: int) -> list[str]:
    return [sys.executable, str(ROOT / "training" / "evaluate_embeddings.py"), "--model", str(model_dir),
            "--dataset_name", dataset, "--output_dir", str(eval_dir), "--profile_level", "well",
            "--aggregate", "median", "--correction", correction, "--batch_column", args.batch_column,
            "--plate_column", args.plate_column, "--null_size", str(args.null_size), "--seed", str(seed),
            "--pooling", args.pooling, "--no_progress"]


def run_trained(args, seed: int, method: str, screens: dict[str, str], threads: int) -> dict:
    """Train one (seed, method) on the whole screen; evaluate it on every screen (all crops, held-out weeks)."""
    out = args.work_dir / f"seed{seed}" / method
    out.parent.mkdir(parents=True, exist_ok=True)
    command = train_command(args, seed, method, screens["all"], out)
    record = {"kind": "trained", "seed": seed, "method": method, "commands": [display(command)]}
    if args.rescore:
        trained = next(r for r in args.previous["runs"] if r["seed"] == seed and r["method"] == method)
        record.update(commands=trained["commands"][:1], train_wall_s=trained["train_wall_s"])
        log(f"[seed {seed}] {method}: scoring the model trained by the last run")
    else:
        log(f"[seed {seed}] train {method} ...")
        record["train_wall_s"] = round(run_command(command, out.parent / f"{method}.train.log", threads), 1)
    record["training"] = training_health(out)
    log(f"[seed {seed}] train {method}: {record['train_wall_s']} s, {record['training']['final_step']} steps, final "
        f"teacher entropy ratio {record['training'].get('final_teacher_entropy_ratio', float('nan')):.3f}")
    record["evaluations"] = []
    for (screen, dataset), correction in itertools.product(screens.items(), args.corrections):
        suffix = correction if screen == "all" else f"{correction}_{screen}"
        eval_dir = out.parent / f"{method}.eval_{suffix}"  # outside the model folder (refused inside)
        command = evaluate_command(args, out, dataset, eval_dir, correction, seed)
        wall = run_command(command, out.parent / f"{method}.eval_{suffix}.log", threads)
        report = json.loads((eval_dir / "results.json").read_text())
        record["evaluations"].append({"correction": correction, "screen": screen,
                                      "summary_key": summary_key(correction, screen), "wall_s": round(wall, 1),
                                      "n_images": report["n_images"], "n_profiles": report["n_profiles"],
                                      "input_normalization": report.get("input_normalization"),
                                      "metrics": collect_metrics(report["metrics"])})
        record["commands"].append(display(command))
    log(f"[seed {seed}] {method} evaluated")
    return record


# ---------------------------------------------------------------------------------------------- baselines


def intensity_stats_features(image: np.ndarray) -> np.ndarray:
    """Per channel of a normalised (C, H, W) image: mean, std (population), the INTENSITY_QUANTILES percentiles and
    the fraction of pixels above INTENSITY_THRESHOLD; channel-major, 8 * C float64 values."""
    flat = np.asarray(image, dtype=np.float64).reshape(image.shape[0], -1)
    quantiles = np.quantile(flat, INTENSITY_QUANTILES, axis=1).T  # (C, 5), linear interpolation
    columns = [flat.mean(axis=1, keepdims=True), flat.std(axis=1, keepdims=True), quantiles,
               (flat > INTENSITY_THRESHOLD).mean(axis=1, keepdims=True)]
    return np.concatenate(columns, axis=1).reshape(-1)


def intensity_stats_names(channels=CHANNEL_NAMES) -> list[str]:
    stats = ["mean", "std", *(f"p{round(q * 100)}" for q in INTENSITY_QUANTILES), f"frac_above_{INTENSITY_THRESHOLD:g}"]
    return [f"{channel}_{stat}" for channel in channels for stat in stats]


def pooled_pixels_features(image: np.ndarray, size: int = POOLED_SIZE) -> np.ndarray:
    """A normalised (C, H, W) image area-averaged to (C, size, size) (torch adaptive average pooling, which also
    handles H, W not divisible by size), flattened channel-major."""
    import torch

    tensor = torch.as_tensor(np.asarray(image, dtype=np.float32))[None]
    return torch.nn.functional.adaptive_avg_pool2d(tensor, size)[0].reshape(-1).double().numpy()


def pooled_pixels_names(channels=CHANNEL_NAMES, size: int = POOLED_SIZE) -> list[str]:
    return [f"{channel}_y{y}_x{x}" for channel in channels for y in range(size) for x in range(size)]


BASELINE_FEATURES = {
    "intensity_stats": (intensity_stats_features, intensity_stats_names),
    "pooled_pixels": (pooled_pixels_features, pooled_pixels_names),
}


def baseline_image_profiles(dataset: str) -> dict:
    """Image-level profile tables (Metadata_* + features) of every baseline, from the per-plate normalised images."""
    import pandas as pd
    import torch

    from cdcl_hf.image_io import decode_image
    from cdcl_hf.normalization import PlateNormalization
    from cdcl_hf.profiling import NON_METADATA_DATASET_COLUMNS, metadata_name
    from cdcl_hf.screen_data import load_screen

    screen = load_screen(dataset)
    normalization = PlateNormalization.from_screen(screen, "plate_controls")
    features = {name: [] for name in BASELINE_FEATURES}
    metadata = []
    for row in screen:
        image = torch.from_numpy(decode_image(row["image"]).astype(np.float32))
        normalized = normalization.normalize(image, row["plate"]).numpy()
        for name, (function, _) in BASELINE_FEATURES.items():
            features[name].append(function(normalized))
        metadata.append({metadata_name(k): v for k, v in row.items() if k not in NON_METADATA_DATASET_COLUMNS})
    meta = pd.DataFrame(metadata)
    tables = {}
    for name, (_, names) in BASELINE_FEATURES.items():
        matrix = np.stack(features[name])
        tables[name] = pd.concat([meta, pd.DataFrame(matrix, columns=names())], axis=1)
    return tables


def feature_sha256(table) -> str:
    from cdcl_hf.profiling import split_profiles

    matrix, _ = split_profiles(table)
    return hashlib.sha256(np.ascontiguousarray(matrix).tobytes()).hexdigest()


def evaluation_args(args, dataset: str, correction: str, seed: int):
    """The evaluate CLI's own parsed arguments for this evaluation: the baselines get exactly its defaults."""
    from cdcl_hf.commands import evaluate

    return evaluate.parse_args(["--model", "(in-process baseline)", "--dataset_name", dataset, "--output_dir",
                                str(args.work_dir / "unused"), "--profile_level", "well", "--aggregate", "median",
                                "--correction", correction, "--batch_column", args.batch_column,
                                "--plate_column", args.plate_column, "--null_size", str(args.null_size),
                                "--seed", str(seed)])


# The baselines and the CellProfiler reference are scored in threads of this process; copairs queries duckdb's
# module-wide default connection, which refuses a second concurrent call, so in-process scoring takes turns.
IN_PROCESS_SCORING = threading.Lock()


def score_profile_table(profiles, cli, aggregate_wells: bool = True) -> dict:
    """What `cdcl_hf.commands.evaluate.run` does after `extract_embeddings`: wells (median), correction, metrics."""
    from cdcl_hf.metrics import evaluate_profiles
    from cdcl_hf.profiling import aggregate_profiles, correct_profiles, metadata_name

    column = {key: metadata_name(getattr(cli, f"{key}_column"))
              for key in ("treatment", "batch", "plate", "well", "compound", "control")}
    moa_column = None if cli.moa_column.lower() == "none" else metadata_name(cli.moa_column)
    if aggregate_wells:
        profiles = aggregate_profiles(profiles, by=[column["plate"], column["well"]], method=cli.aggregate)
    profiles = correct_profiles(profiles, cli.correction, control_column=column["control"],
                                plate_column=column["plate"], per_plate=cli.per_plate)
    with IN_PROCESS_SCORING:
        results = evaluate_profiles(
            profiles, treatment_column=column["treatment"], compound_column=column["compound"], moa_column=moa_column,
            batch_column=column["batch"], plate_column=column["plate"], control_column=column["control"],
            aggregate=cli.aggregate, knn_k=cli.knn_k, knn_temperature=cli.knn_temperature,
            null_size=cli.null_size, missing_moa=cli.missing_moa, seed=cli.seed,
        )
    return {"n_profiles": len(profiles), "metrics": {name: result.to_dict() for name, result in results.items()}}


def screen_rows(args, table) -> dict:
    """{"all": every row, "heldout": the rows of the held-out weeks} of a profile table. Plates lie within one week,
    so the per-plate normalisation of a row is the same in both."""
    screens = {"all": table}
    if args.heldout_batches:
        screens["heldout"] = table[table["Metadata_Batch"].isin(args.heldout_batches)].reset_index(drop=True)
    return screens


def run_baselines(args, dataset: str) -> list[dict]:
    log("[baselines] features ...")
    started = time.perf_counter()
    tables = baseline_image_profiles(dataset)
    feature_wall = time.perf_counter() - started
    records = []
    for name, table in tables.items():
        record = {"kind": "baseline", "method": name, "seed": None, "n_features": table.shape[1] - len(
            [c for c in table.columns if str(c).startswith("Metadata_")]), "feature_sha256": feature_sha256(table),
            "feature_wall_s_all_baselines": round(feature_wall, 1), "metric_seed": BASELINE_EVAL_SEED,
            "commands": [f"in process: {__name__}.{BASELINE_FEATURES[name][0].__name__} per image after "
                         "PlateNormalization(plate_controls), then score_profile_table (aggregate_profiles median "
                         "per well -> correct_profiles -> metrics.evaluate_profiles) with the evaluate CLI's parsed "
                         "arguments"],
            "evaluations": []}
        for (screen, rows), correction in itertools.product(screen_rows(args, table).items(), args.corrections):
            cli = evaluation_args(args, dataset, correction, BASELINE_EVAL_SEED)
            started = time.perf_counter()
            scored = score_profile_table(rows, cli)
            record["evaluations"].append({"correction": correction, "screen": screen,
                                          "summary_key": summary_key(correction, screen),
                                          "wall_s": round(time.perf_counter() - started, 1),
                                          "n_images": len(rows), "n_profiles": scored["n_profiles"],
                                          "metrics": collect_metrics(scored["metrics"])})
        log(f"[baselines] {name} scored")
        records.append(record)
    return records


# ---------------------------------------------------------------------------------------------- CellProfiler


def cellprofiler_profiles(profiles_csv: Path, crops_metadata_csv: Path):
    """The CellProfiler well profiles of the wells present in the crops, with the screen's metadata columns
    (treatment as the builder names it, batch = the crops' batch of the plate, controls = DMSO)."""
    import pandas as pd

    from cdcl_hf.screen_data import default_treatment

    profiles = pd.read_csv(profiles_csv)
    crops = pd.read_csv(crops_metadata_csv)
    wells = set(zip(crops["plate"].astype(str), crops["well"].astype(str), strict=True))
    keep = [(str(p), str(w)) in wells for p, w in zip(profiles["Metadata_Plate"], profiles["Metadata_Well"],
                                                       strict=True)]
    profiles = profiles.loc[keep].reset_index(drop=True)
    batch_of_plate = dict(zip(crops["plate"].astype(str), crops["batch"].astype(str), strict=False))
    metadata = pd.DataFrame({
        "Metadata_Batch": profiles["Metadata_Plate"].astype(str).map(batch_of_plate),
        "Metadata_Treatment": [default_treatment(c, x) for c, x in zip(profiles["Metadata_Compound"],
                                                                       profiles["Metadata_Concentration"],
                                                                       strict=True)],
        "Metadata_is_control": (profiles["Metadata_Compound"] == "DMSO").to_numpy(),
    })
    table = pd.concat([metadata, profiles], axis=1)
    if table["Metadata_Batch"].isna().any():
        raise ValueError("a profiled plate has no batch in the crops' metadata")
    return table, {"n_wells_in_csv": int(len(pd.read_csv(profiles_csv, usecols=["Metadata_Plate"]))),
                   "n_crop_wells": len(wells), "n_wells_matched": int(len(table)),
                   "n_features": int(sum(not str(c).startswith("Metadata_") for c in table.columns))}


def run_cellprofiler(args, dataset: str) -> dict:
    log("[cellprofiler] scoring ...")
    table, description = cellprofiler_profiles(args.profiles_csv, args.crops_dir / "metadata.csv")
    # Already MAD-robustised per plate by its authors: scored as published (correction none), at well level.
    cli = evaluation_args(args, dataset, "none", BASELINE_EVAL_SEED)
    evaluations = []
    for screen, rows in screen_rows(args, table).items():
        started = time.perf_counter()
        scored = score_profile_table(rows, cli, aggregate_wells=False)
        evaluation = {"screen": screen, "wall_s": round(time.perf_counter() - started, 1),
                      "n_profiles": scored["n_profiles"], "metrics": collect_metrics(scored["metrics"])}
        log(f"[cellprofiler] {screen}: NSC {evaluation['metrics']['nsc']['value']:.3f} "
            f"(n {evaluation['metrics']['nsc']['n']}), NSCB {evaluation['metrics']['nscb']['value']:.3f} "
            f"(n {evaluation['metrics']['nscb']['n']})")
        # One evaluation per screen, shown under every correction.
        evaluations += [{**evaluation, "correction": c, "summary_key": summary_key(c, screen), "as_published": True}
                        for c in args.corrections]
    return {"kind": "reference", "method": REFERENCE, "seed": None, "source": relative(args.profiles_csv),
            **description, "metric_seed": BASELINE_EVAL_SEED, "reference_figures": {"nsc": 0.903, "nsc_n": 103,
                                                                                    "nscb": 0.761, "nscb_n": 92},
            "commands": ["in process: cellprofiler_profiles (CSV rows whose Metadata_Plate + Metadata_Well are among "
                         "the crops' plate + well) then score_profile_table(aggregate_wells=False, correction none)"],
            "evaluations": evaluations}


# ---------------------------------------------------------------------------------------------- summary


def values_by_seed(records: list[dict], method: str, key: str, name: str, seeds: list[int]) -> dict:
    """{seed: value} for a trained method; the one value repeated for every seed for a baseline / the reference."""
    values = {}
    for r in records:
        if r["method"] != method:
            continue
        for e in r["evaluations"]:
            if e["summary_key"] == key and name in e["metrics"]:
                if r["seed"] is None:
                    return {seed: e["metrics"][name]["value"] for seed in seeds}
                values[r["seed"]] = e["metrics"][name]["value"]
    return values


# Controls-only batch scores read against their permutation null (cdcl_hf.metrics.permutation_null).
CONTROLS_BATCH_METRICS = ("batch_classification_controls", "silhouette_batch_controls", "kbet_controls",
                          "ilisi_controls")


def z_vs_null(records: list[dict], key: str) -> dict:
    """{method: {metric: mean +- sd over seeds of (value - shuffled-batch null mean) / null sd, and each seed's
    permutation p-value under `p_per_seed`}} where recorded."""
    table = {}
    for method in ROWS:
        per_metric = {}
        for name in CONTROLS_BATCH_METRICS:
            per_seed, p_per_seed = {}, {}
            for r in records:
                if r["method"] != method:
                    continue
                for e in r["evaluations"]:
                    metric = e["metrics"].get(name, {}) if e["summary_key"] == key else {}
                    if metric.get("z_vs_null") is not None:
                        per_seed[r["seed"]] = metric["z_vs_null"]
                    if metric.get("p_vs_null") is not None:
                        p_per_seed[r["seed"]] = metric["p_vs_null"]
            if per_seed:
                per_metric[name] = {**mean_std(list(per_seed.values())), "per_seed": per_seed}
                if p_per_seed:
                    per_metric[name]["p_per_seed"] = p_per_seed
        if per_metric:
            table[method] = per_metric
    return table


def z_cell(stats: dict | None) -> str:
    """A z table cell: mean +- sd of z over seeds, then the seeds' permutation p-values."""
    p_values = (stats or {}).get("p_per_seed")
    text = fmt(stats)
    return text if not p_values else f"{text} (p {'/'.join(f'{p:.2f}' for _, p in sorted(p_values.items()))})"


def summarise(records: list[dict], args) -> dict:
    summary: dict = {}
    for key in summary_keys(args):
        table, by = {}, {}
        for method in ROWS:
            per_metric = {}
            for name, _, _ in METRICS:
                values = values_by_seed(records, method, key, name, args.seeds)
                by[(method, name)] = values
                if method in TRAINED_METHODS:
                    per_metric[name] = {**mean_std(list(values.values())), "per_seed": values}
                else:  # deterministic: one value, sd 0 by construction
                    value = next(iter(values.values()), None)
                    per_metric[name] = {**mean_std([value]), "per_seed": values, "deterministic": True}
            table[method] = per_metric
        paired = {}
        for a, b in PAIRS:
            paired[f"{a} - {b}"] = {}
            for name, _, _ in METRICS:
                va, vb = by[(a, name)], by[(b, name)]
                diffs = {s: va[s] - vb[s] for s in va if s in vb and va[s] is not None and vb[s] is not None}
                paired[f"{a} - {b}"][name] = {**mean_std(list(diffs.values())), "per_seed": diffs}
        summary[key] = {"metrics": table, "paired_differences": paired, "z_vs_null": z_vs_null(records, key)}
    health = {}
    for method in TRAINED_METHODS:
        runs = [r for r in records if r["method"] == method]
        health[method] = {key: mean_std([r["training"].get(key) for r in runs]) for key in HEALTH_SUMMARY_KEYS
                          if any(key in r["training"] for r in runs)}
        health[method]["final_step"] = mean_std([r["training"]["final_step"] for r in runs])
        health[method]["train_wall_s"] = mean_std([r["train_wall_s"] for r in runs])
        health[method]["eval_wall_s"] = mean_std([e["wall_s"] for r in runs for e in r["evaluations"]])
    summary["training_health"] = health
    return summary


def cell(stats: dict | None, informative: bool = True) -> str:
    text = fmt(stats)
    return text if informative or text == "n/d" else f"({text})"


def informative_everywhere(records: list[dict], method: str, key: str, name: str) -> bool:
    flags = [e["metrics"][name].get("informative", True) for r in records if r["method"] == method
             for e in r["evaluations"] if e["summary_key"] == key and name in e["metrics"]]
    return all(flags) if flags else True


def markdown(result: dict, args) -> str:
    machine_info = result["machine"]
    dataset = result["dataset"]
    lines = [
        "# CDCL vs DINO on real BBBC021 crops, against model-free baselines and CellProfiler"
        + (" — QUICK (smoke) RUN" if result["quick"] else ""),
        "",
        f"Generated by `python benchmarks/bench_methods_bbbc021.py {' '.join(result['argv'])}` in "
        f"{result['total_wall_s'] / 60:.1f} min on {machine_info['cpu']} ({machine_info['cores_usable']} core(s) "
        f"usable, {args.jobs} run(s) in parallel); {len(args.seeds)} seed(s) {args.seeds}. Trained methods: mean ± "
        "sample sd over seeds (one seed = one initialisation and data order, shared by all methods); baselines and "
        "CellProfiler are deterministic (one value).",
        "",
        "## Protocol",
        "",
        result["protocol"],
        "",
        "## Setup",
        "",
        f"- Screen: {dataset['num_images']} real crops (68 × 68 × 3 uint16), {dataset['num_wells']} wells, "
        f"{dataset['num_plates']} plates, {dataset['num_batches']} batches (weeks), {dataset['num_treatments']} "
        "treatments incl. DMSO; built with `build_screen_dataset(folder_source(...))`.",
        f"- Training: `training/train.py --config {relative(args.config)}` for every method"
        + (f" plus `{args.train_flags}`" if args.train_flags else "")
        + "; `untrained` = `--method cdcl --max_train_steps 1` (lr 0 at step 0: the saved teacher is the seed's "
        "initial weights)" + (f"; QUICK: `--max_train_steps {args.quick_steps}`" if args.quick else "") + ".",
        f"- Evaluation: `training/evaluate_embeddings.py` on the same crops, well-level profiles, median aggregation, "
        f"trained models embedded with `--pooling {args.pooling}`, batch = `{args.batch_column}`, corrections "
        f"{args.corrections} (the first is the headline one), `--null_size {args.null_size}`. Baselines: "
        "the same scoring code in process (see notes). Values in parentheses are flagged *not informative* by the "
        "metric code (reason in the JSON). Higher is better except batch classification accuracy.",
        "",
    ]
    titles = METRICS
    records = result["runs"]
    for key, block in result["summary"].items():
        if key == "training_health":
            continue
        correction, _, screen = key.partition(", ")
        lines += [f"## Results: correction `{correction}`"
                  + (f", {HELDOUT} only ({', '.join(args.heldout_batches)}: never seen by the preset's tuning)"
                     if screen else ", all crops"), ""]
        lines += ["| method | " + " | ".join(f"{t} ({'↑' if b == 'higher' else '↓'})" for _, t, b in titles) + " |",
                  "|" + "---|" * (len(titles) + 1)]
        for method, per_metric in block["metrics"].items():
            label = method + (" (as published)" if method == REFERENCE else "")
            lines.append(f"| {label} | " + " | ".join(
                cell(per_metric.get(n), informative_everywhere(records, method, key, n)) for n, _, _ in titles)
                + " |")
        for pair, diffs in block["paired_differences"].items():
            lines.append(f"| *{pair}* (paired) | " + " | ".join(fmt(diffs.get(n)) for n, _, _ in titles) + " |")
        counts = []
        for method in ROWS:
            for r in records:
                if r["method"] == method:
                    e = next(e for e in r["evaluations"] if e["summary_key"] == key)
                    nsc, nscb = e["metrics"].get("nsc", {}), e["metrics"].get("nscb", {})
                    counts.append(f"{method} {nsc.get('n')}/{nscb.get('n')}")
                    break
        chance = next((e["metrics"]["batch_classification_controls"].get("chance") for r in records
                       for e in r["evaluations"] if e["summary_key"] == key
                       and "batch_classification_controls" in e["metrics"]), None)
        lines += ["", "Treatments scored (NSC/NSCB): " + ", ".join(counts) + "."]
        if chance is not None:
            lines.append(f"Batch classification chance on the controls (majority batch): {chance:.3f}.")
        z_table = block.get("z_vs_null") or {}
        if z_table:
            lines += ["", "Batch on the controls against shuffled batch labels: z = (value - mean of the score with "
                      "the controls' batch labels shuffled) / its sd; |z| < 2 is no batch signal the controls can show. "
                      "Signs as the scores: batch clf z > 0 and silhouette / kBET / iLISI z < 0 mean batch is "
                      "present. In parentheses, each seed's one-sided permutation p-value (the share of shuffles "
                      "showing at least as much batch; floor 1 / (1 + shuffles)): on few controls the null is discrete "
                      "and lopsided, so a large |z| can rest on a few neighbourhoods.", "",
                      "| method | " + " | ".join(CONTROLS_BATCH_METRICS) + " |",
                      "|---|" + "---|" * len(CONTROLS_BATCH_METRICS)]
            for method, per_metric in z_table.items():
                lines.append(f"| {method} | " + " | ".join(z_cell(per_metric.get(n)) for n in CONTROLS_BATCH_METRICS)
                             + " |")
        lines.append("")
    lines += ["## Training health (final logged step)", "",
              "| method | steps | teacher entropy ratio | min entropy ratio (after step 1) | KL(mean teacher ‖ uniform) "
              "| DINO CE | cross-corr. | total loss | train wall s | eval wall s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for method, health in result["summary"]["training_health"].items():
        lines.append(
            f"| {method} | {fmt(health.get('final_step'), 0)} | {fmt(health.get('final_teacher_entropy_ratio'))} | "
            f"{fmt(health.get('min_teacher_entropy_ratio_after_step1'))} | "
            f"{fmt(health.get('final_teacher_kl_to_uniform'))} | {fmt(health.get('final_dino_loss'))} | "
            f"{fmt(health.get('final_cross_correlation_loss'))} | {fmt(health.get('final_loss'))} | "
            f"{fmt(health.get('train_wall_s'), 1)} | {fmt(health.get('eval_wall_s'), 1)} |")
    lines += ["", "## Preset", "", f"`{result['preset']['path']}` (sha256 {result['preset']['sha256'][:12]}…):", "",
              "```yaml", result["preset"]["text"].rstrip(), "```", "", "## Commands", "", "```bash"]
    for r in records:
        lines += r["commands"]
    lines += ["```", "", "## Notes", ""] + [f"- {note}" for note in result["notes"]] + [""]
    return "\n".join(lines)


def previous_run_to_rescore(args, preset: dict) -> dict:
    """The last full run's results (--output), checked to match the models under --work_dir and the preset."""
    path = args.output.with_suffix(".json")
    if not path.is_file():
        raise SystemExit(f"bench_methods_bbbc021 --rescore: no earlier results at {path}; run without --rescore")
    previous = json.loads(path.read_text())
    # The preset's values, not its text: a comment changes nothing the models were trained with.
    if previous.get("quick") != args.quick or previous["preset"]["values"] != preset["values"]:
        raise SystemExit(f"bench_methods_bbbc021 --rescore: {path} was run with another preset or --quick setting "
                         f"than now ({args.config}); run without --rescore to train with it")
    for seed in args.seeds:
        for method in TRAINED_METHODS:
            summary = args.work_dir / f"seed{seed}" / method / "training_summary.json"
            if not summary.is_file() or not json.loads(summary.read_text()).get("finished"):
                raise SystemExit(f"bench_methods_bbbc021 --rescore: no finished training at {summary.parent}; "
                                 "run without --rescore")
            if not any(r["seed"] == seed and r["method"] == method for r in previous["runs"]):
                raise SystemExit(f"bench_methods_bbbc021 --rescore: {path} has no run of {method} seed {seed}")
            trained_with = json.loads((summary.parent / "training_args.json").read_text())
            differing = sorted(key for key, value in preset["values"].items() if key in trained_with
                               and key not in ("output_dir", "method") and _as_list(trained_with[key]) != _as_list(value))
            if differing:
                raise SystemExit(f"bench_methods_bbbc021 --rescore: the model at {summary.parent} was trained with "
                                 f"other {', '.join(differing)} than {args.config} sets; run without --rescore")
    return previous


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def read_preset(path: Path) -> dict:
    import yaml

    text = path.read_text()
    return {"path": relative(path), "sha256": hashlib.sha256(text.encode()).hexdigest(), "text": text,
            "values": yaml.safe_load(text)}


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    if not (args.crops_dir / "metadata.csv").is_file():
        raise SystemExit(f"bench_methods_bbbc021: no crops at {args.crops_dir} (see ../shared/data/README.md)")
    threads = max(1, 2 // max(args.jobs, 1))
    preset = read_preset(args.config)
    if args.rescore:
        args.previous = previous_run_to_rescore(args, preset)
    dataset_info = build_crops_dataset(args.crops_dir, args.work_dir)
    dataset = dataset_info["path"]
    log(f"dataset ready ({'reused' if dataset_info['reused'] else 'built'}): {dataset_info['num_images']} images, "
        f"{dataset_info['num_wells']} wells")

    # In-process scoring shares the cores with the subprocesses: give it the same thread budget.
    from threadpoolctl import threadpool_limits

    screens = {"all": dataset}
    heldout_info = None
    if args.heldout_batches:
        heldout_info = build_crops_dataset(args.crops_dir, args.work_dir, batches=args.heldout_batches)
        screens["heldout"] = heldout_info["path"]
    with threadpool_limits(threads), ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        import torch

        torch.set_num_threads(threads)
        futures = [pool.submit(run_trained, args, seed, method, screens, threads)
                   for seed in args.seeds for method in TRAINED_METHODS]
        futures.append(pool.submit(run_baselines, args, dataset))
        futures.append(pool.submit(run_cellprofiler, args, dataset))
        records = []
        for future in futures:
            value = future.result()
            records.extend(value if isinstance(value, list) else [value])

    result = {
        "benchmark": "CDCL vs DINO vs DINO-CB vs untrained on real BBBC021 crops, with model-free baselines and "
                     "the CellProfiler reference",
        "quick": args.quick,
        "argv": list(argv if argv is not None else sys.argv[1:]),
        "machine": {**machine(), "cpu_count": os.cpu_count(), "jobs": args.jobs, "threads_per_job": threads},
        "protocol": args.protocol_note,
        "preset": preset,
        "settings": {"seeds": args.seeds, "methods": list(ROWS), "config": relative(args.config),
                     "train_flags": shlex.split(args.train_flags), "quick_steps": args.quick_steps if args.quick else None,
                     "corrections": args.corrections, "pooling": args.pooling, "heldout_batches": args.heldout_batches,
                     "null_size": args.null_size, "profile_level": "well",
                     "aggregate": "median", "batch_column": args.batch_column, "plate_column": args.plate_column,
                     "crops_dir": relative(args.crops_dir), "profiles_csv": relative(args.profiles_csv),
                     "baseline_metric_seed": BASELINE_EVAL_SEED, "intensity_quantiles": list(INTENSITY_QUANTILES),
                     "intensity_threshold": INTENSITY_THRESHOLD, "pooled_size": POOLED_SIZE},
        "dataset": {**dataset_info, "path": relative(Path(dataset_info["path"]))},
        "heldout_dataset": None if heldout_info is None else {**heldout_info, "path": relative(Path(heldout_info["path"]))},
        "metric_ranges": {name: list(bounds) for name, bounds in METRIC_RANGES.items()},
        "runs": records,
        "summary": summarise(records, args),
        "notes": NOTES,
        "total_wall_s": round(time.perf_counter() - started, 1),
    }
    if args.rescore:
        # The wall time a reader compares is the run's that trained the models; the re-scoring's is kept beside it.
        result["rescored"] = {"wall_s": result["total_wall_s"], "note": "every score recomputed with the current "
                              "evaluation code on the models the run below trained (same preset, same work dir)"}
        result["total_wall_s"] = args.previous["total_wall_s"]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(result, args))
    log(f"wrote {args.output.with_suffix('.json')} and .md in {result['total_wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
