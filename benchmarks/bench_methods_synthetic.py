"""Does CDCL learn less batch and more biology than DINO? A CPU-scale answer on the built-in synthetic screen.

    python benchmarks/bench_methods_synthetic.py                      # 3 seeds, 2 runs at a time, ~10 min on 2 CPU cores
    python benchmarks/bench_methods_synthetic.py --seeds 0 --jobs 1 --corrections none   # a ~3 min smoke run

For every seed it
  1. draws a training screen (seed s) and a held-out evaluation screen (seed 1000 + s) with the same layout, in
     which each treatment is on `--plates_per_treatment` (default 2) plates of *different* batches, so NSCB is
     defined (with every treatment on every plate, as in the default screen, no candidate is left once the
     query's batches are excluded). The held-out screen has new plates, new batch effects and new compounds of
     the same six MoAs. The screens are written once with `save_to_disk` and passed as folders, so every run
     reads exactly the same pixels;
  2. trains, with identical flags, seed and initial weights:
       untrained  `train.py --max_train_steps 1` (learning rate 0 at step 0: the saved teacher is the init)
       dino       both global views from the same image, one centre
       dino-cb    global views from two images of the same treatment on different plates, one centre
       cdcl       dino-cb + one centre per plate + cross-correlation term (0.25 DINO + 0.75 CC)
     by running the real CLI `training/train.py` in a subprocess;
  3. evaluates each teacher backbone on the held-out screen (and, with `--eval_on both`, on the training screen)
     with the real CLI `training/evaluate_embeddings.py` (well-level profiles, median aggregation), once per
     `--corrections` entry (`none`: the raw embeddings; `mad`: per-plate robust z-scoring against DMSO wells);
  4. writes benchmarks/results/methods_synthetic.json and .md: every metric per seed, mean +- sample std over
     seeds, the paired per-seed difference cdcl - dino, training health (teacher entropy ratio, losses), wall
     times, and the exact commands.

Work folders (screens, checkpoints, evaluation outputs) go under --work_dir (default outputs/, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

METHODS = ("untrained", "dino", "dino-cb", "cdcl")

# (name in results.json, short column title, better direction)
METRICS = (
    ("nsc", "NSC", "higher"),
    ("nscb", "NSCB", "higher"),
    ("replicate_map", "replicate mAP", "higher"),
    ("moa_map", "MoA mAP", "higher"),
    ("knn_treatment_identification", "kNN treatment id", "higher"),
    ("silhouette_moa", "silhouette MoA", "higher"),
    ("batch_classification_controls", "batch clf acc (controls)", "lower"),
    ("silhouette_batch_controls", "batch silhouette (controls, 1 = mixed)", "higher"),
    ("kbet_controls", "kBET (controls)", "higher"),
    ("ilisi_controls", "iLISI (controls)", "higher"),
    ("batch_classification_all_profiles", "batch clf acc (all profiles)", "lower"),
)

# Recommended tiny-CPU training flags (the diagnosis is in the .md). Every method gets exactly these.
TINY_FLAGS = (
    "--model_preset", "tiny",
    "--num_train_epochs", "4",
    "--per_device_train_batch_size", "32",
    "--out_dim", "256",
    "--momentum_teacher", "0.95",
    "--momentum_teacher_end", "0.995",
    "--teacher_temp", "0.04",
    "--off_diagonal_weight", "0.5",
)

HEALTH_KEYS = ("loss", "dino_loss", "cross_correlation_loss", "teacher_entropy_ratio", "teacher_kl_to_uniform",
               "center_norm", "grad_norm")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--num_images", type=int, default=960, help="approximate images per screen")
    parser.add_argument("--plates_per_treatment", type=int, default=2)
    parser.add_argument("--batch_effect_strength", type=float, default=1.0)
    parser.add_argument("--eval_seed_offset", type=int, default=1000, help="held-out screen seed = seed + offset")
    parser.add_argument("--eval_on", choices=["heldout", "train", "both"], default="heldout")
    parser.add_argument("--corrections", nargs="+", default=["none", "mad"])
    parser.add_argument("--null_size", type=int, default=2000, help="copairs permutations (mAP p-values only)")
    parser.add_argument("--train_flags", default=" ".join(TINY_FLAGS),
                        help="flags given to every train.py run (quoted string)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="(seed, method) runs in parallel; each subprocess gets OMP_NUM_THREADS = max(1, 2 // jobs)")
    parser.add_argument("--work_dir", type=Path, default=ROOT / "outputs" / "bench_methods_synthetic")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "methods_synthetic",
                        help="writes OUTPUT.json and OUTPUT.md")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------- screens


def screen_config(args, seed: int):
    from cdcl_hf.synthetic_screen import config_for_num_images

    return config_for_num_images(
        args.num_images,
        plates_per_treatment=args.plates_per_treatment,
        batch_effect_strength=args.batch_effect_strength,
        seed=seed,
    )


def make_screen(args, seed: int, path: Path) -> dict:
    """Draw the screen (or reuse an identical one already on disk) and describe its layout."""
    import dataclasses

    config = screen_config(args, seed)
    description = {key: (list(value) if isinstance(value, tuple) else value)
                   for key, value in dataclasses.asdict(config).items()}
    marker = path / "bench_screen_config.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == description):
        from cdcl_hf.synthetic_screen import synthetic_screen_dataset

        if path.exists():
            import shutil

            shutil.rmtree(path)
        synthetic_screen_dataset(config).save_to_disk(str(path))
        marker.write_text(json.dumps(description, indent=2))
    return {"path": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
            "num_images": config.num_images, "num_plates": config.num_plates, "num_batches": config.num_batches,
            "num_treatments": config.num_treatments, "sites_per_well": config.sites_per_well, "config": description}


# ---------------------------------------------------------------------------------------------- runs

_print_lock = threading.Lock()


def log(message: str) -> None:
    with _print_lock:
        print(message, flush=True)


def display(command: list[str]) -> str:
    parts = []
    for part in command:
        if part == sys.executable:
            part = "python"
        elif Path(part).is_absolute() and Path(part).is_relative_to(ROOT):
            part = str(Path(part).relative_to(ROOT))
        parts.append(shlex.quote(part))
    return " ".join(parts)


def run_command(command: list[str], log_path: Path, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    with log_path.open("w") as handle:
        completed = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env)
    elapsed = time.perf_counter() - started
    if completed.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"command failed ({completed.returncode}): {display(command)}\n{tail}")
    return elapsed


def training_health(output_dir: Path) -> dict:
    rows = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    last = rows[-1]
    health = {f"final_{key}": last[key] for key in HEALTH_KEYS if key in last}
    health["final_step"] = last["step"]
    entropies = [row["teacher_entropy_ratio"] for row in rows if row["step"] > 1]
    if entropies:
        health["min_teacher_entropy_ratio_after_step1"] = min(entropies)
        health["max_teacher_entropy_ratio_after_step1"] = max(entropies)
    health["log"] = [{key: row[key] for key in ("step", "epoch", "loss", "dino_loss", "cross_correlation_loss",
                                                 "teacher_entropy_ratio", "teacher_kl_to_uniform", "teacher_temp",
                                                 "teacher_momentum") if key in row} for row in rows]
    return health


def run_one(args, seed: int, method: str, screens: dict, train_flags: list[str], threads: int) -> dict:
    out = args.work_dir / f"seed{seed}" / method
    out.parent.mkdir(parents=True, exist_ok=True)
    train_cmd = [sys.executable, str(ROOT / "training" / "train.py"),
                 "--dataset_name", str(ROOT / screens["train"]["path"]),
                 "--seed", str(seed), "--output_dir", str(out), "--overwrite_output_dir", *train_flags]
    if method == "untrained":
        train_cmd += ["--method", "cdcl", "--max_train_steps", "1"]
    else:
        train_cmd += ["--method", method]
    record = {"seed": seed, "method": method, "commands": [display(train_cmd)]}
    log(f"[seed {seed}] train {method} ...")
    record["train_wall_s"] = round(run_command(train_cmd, out.parent / f"{method}.train.log", threads), 1)
    record["training"] = training_health(out)
    log(f"[seed {seed}] train {method}: {record['train_wall_s']} s, final teacher entropy ratio "
        f"{record['training'].get('final_teacher_entropy_ratio', float('nan')):.3f}")

    record["evaluations"] = []
    targets = {"heldout": ["heldout"], "train": ["train"], "both": ["heldout", "train"]}[args.eval_on]
    for target in targets:
        for correction in args.corrections:
            eval_dir = out.parent / f"{method}.eval_{target}_{correction}"  # outside the model folder (refused inside)
            eval_cmd = [sys.executable, str(ROOT / "training" / "evaluate_embeddings.py"),
                        "--model", str(out), "--dataset_name", str(ROOT / screens[target]["path"]),
                        "--output_dir", str(eval_dir), "--correction", correction,
                        "--null_size", str(args.null_size), "--seed", str(seed), "--no_progress"]
            wall = run_command(eval_cmd, out.parent / f"{method}.eval_{target}_{correction}.log", threads)
            report = json.loads((eval_dir / "results.json").read_text())
            metrics = {}
            for name, _, _ in METRICS:
                metric = report["metrics"].get(name)
                if metric is None:
                    continue
                metrics[name] = {"value": metric["value"] if metric["defined"] else None, "n": metric["n"],
                                 "unit": metric.get("unit"), "defined": metric["defined"],
                                 "reason": metric.get("reason")}
                chance = (metric.get("details") or {}).get("chance")
                if chance is not None:
                    metrics[name]["chance"] = chance
            record["evaluations"].append({"screen": target, "correction": correction, "wall_s": round(wall, 1),
                                          "n_images": report["n_images"], "n_profiles": report["n_profiles"],
                                          "metrics": metrics})
            record["commands"].append(display(eval_cmd))
    log(f"[seed {seed}] {method} evaluated")
    return record


# ---------------------------------------------------------------------------------------------- summary


def mean_std(values: list[float]) -> dict:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n_seeds": 0}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n_seeds": len(values)}


def summarise(records: list[dict], args) -> dict:
    summary: dict = {}
    combos = sorted({(e["screen"], e["correction"]) for r in records for e in r["evaluations"]})
    for screen, correction in combos:
        key = f"{screen}/{correction}"
        table = {}
        values_by = {}
        for method in args.methods:
            per_metric = {}
            for name, _, _ in METRICS:
                values = {}
                for r in records:
                    if r["method"] != method:
                        continue
                    for e in r["evaluations"]:
                        if e["screen"] == screen and e["correction"] == correction and name in e["metrics"]:
                            values[r["seed"]] = e["metrics"][name]["value"]
                per_metric[name] = {**mean_std(list(values.values())), "per_seed": values}
                values_by[(method, name)] = values
            table[method] = per_metric
        # Paired per-seed differences (same screen, same initial weights).
        paired = {}
        for a, b in (("cdcl", "dino"), ("dino-cb", "dino"), ("cdcl", "untrained"), ("dino", "untrained")):
            if a not in args.methods or b not in args.methods:
                continue
            paired[f"{a} - {b}"] = {}
            for name, _, _ in METRICS:
                va, vb = values_by[(a, name)], values_by[(b, name)]
                diffs = [va[s] - vb[s] for s in va if s in vb and va[s] is not None and vb[s] is not None]
                paired[f"{a} - {b}"][name] = mean_std(diffs)
        summary[key] = {"metrics": table, "paired_differences": paired}
    health = {}
    for method in args.methods:
        runs = [r for r in records if r["method"] == method]
        health[method] = {
            key: mean_std([r["training"].get(key) for r in runs])
            for key in ("final_teacher_entropy_ratio", "min_teacher_entropy_ratio_after_step1",
                        "final_teacher_kl_to_uniform", "final_dino_loss", "final_cross_correlation_loss", "final_loss")
            if any(key in r["training"] for r in runs)
        }
        health[method]["train_wall_s"] = mean_std([r["train_wall_s"] for r in runs])
    summary["training_health"] = health
    return summary


def fmt(stats: dict | None, digits: int = 3) -> str:
    if not stats or stats.get("mean") is None:
        return "n/d"
    if stats["n_seeds"] > 1:
        return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"
    return f"{stats['mean']:.{digits}f}"


def markdown(result: dict, args) -> str:
    lines = [
        "# CDCL vs DINO on the built-in synthetic screen (tiny CPU setup)",
        "",
        f"Generated by `python benchmarks/bench_methods_synthetic.py {' '.join(result['argv'])}` "
        f"in {result['total_wall_s'] / 60:.1f} min on {result['machine']['cpu_count']} CPU core(s) "
        f"({result['machine']['platform']}); {len(args.seeds)} seed(s) {args.seeds}. Values: mean ± sample std over "
        "seeds (one seed = one training screen + one held-out screen + one initialisation, shared by all methods).",
        "",
        "## Setup",
        "",
        f"- Screens: `SyntheticScreenConfig` via `config_for_num_images({args.num_images}, "
        f"plates_per_treatment={args.plates_per_treatment}, batch_effect_strength={args.batch_effect_strength:g}, "
        f"seed=s)`: {result['screens_example']['num_images']} images, {result['screens_example']['num_plates']} plates "
        f"in {result['screens_example']['num_batches']} batches, {result['screens_example']['num_treatments']} "
        f"treatments + DMSO, {result['screens_example']['sites_per_well']} sites per well; each treatment on "
        f"{args.plates_per_treatment} plates in {args.plates_per_treatment} different batches (so NSCB is defined).",
        f"- Training screen seed s, evaluation on a **held-out** screen seed s + {args.eval_seed_offset} "
        "(new plates, batch effects and compounds of the same MoAs)"
        + (" and on the training screen" if args.eval_on == "both" else "") + ".",
        "- Domain = plate (train.py default), label = treatment. Same flags for every method: "
        f"`{args.train_flags}`; `untrained` = `--max_train_steps 1` (lr 0 at the first step, so the saved teacher is "
        "the seed's initial weights, which all methods start from).",
        "- Evaluation: `training/evaluate_embeddings.py`, well-level profiles, median aggregation; correction `none` "
        "(raw teacher CLS embeddings) and `mad` (per-plate robust z-score against DMSO wells). Higher is better "
        "except batch classification accuracy and silhouette by batch (lower = less batch information).",
        "",
    ]
    titles = [(name, title, better) for name, title, better in METRICS]
    for key, block in result["summary"].items():
        if key == "training_health":
            continue
        screen, correction = key.split("/")
        lines += [f"## Results: {screen} screen, correction `{correction}`", ""]
        chance = None
        for r in result["runs"]:
            for e in r["evaluations"]:
                if e["screen"] == screen and e["correction"] == correction:
                    chance = e["metrics"].get("batch_classification", {}).get("chance", chance)
        header = "| method | " + " | ".join(f"{t} ({'↑' if b == 'higher' else '↓'})" for _, t, b in titles) + " |"
        lines += [header, "|" + "---|" * (len(titles) + 1)]
        for method, per_metric in block["metrics"].items():
            lines.append(f"| {method} | " + " | ".join(fmt(per_metric.get(n)) for n, _, _ in titles) + " |")
        for pair, diffs in block["paired_differences"].items():
            lines.append(f"| *{pair}* (paired) | " + " | ".join(fmt(diffs.get(n)) for n, _, _ in titles) + " |")
        if chance is not None:
            lines += ["", f"Batch classification chance (majority batch): {chance:.3f}."]
        lines.append("")
    lines += ["## Training health (final logged step)", "",
              "| method | teacher entropy ratio | min entropy ratio (after step 1) | KL(mean teacher ‖ uniform) | "
              "DINO CE | cross-corr. | total loss | train wall s |", "|---|---|---|---|---|---|---|---|"]
    for method, health in result["summary"]["training_health"].items():
        lines.append(
            f"| {method} | {fmt(health.get('final_teacher_entropy_ratio'))} | "
            f"{fmt(health.get('min_teacher_entropy_ratio_after_step1'))} | {fmt(health.get('final_teacher_kl_to_uniform'))} | "
            f"{fmt(health.get('final_dino_loss'))} | {fmt(health.get('final_cross_correlation_loss'))} | "
            f"{fmt(health.get('final_loss'))} | {fmt(health.get('train_wall_s'), 1)} |")
    lines += ["", "## Commands", "", "```bash"]
    for r in result["runs"]:
        lines += r["commands"]
    lines += ["```", ""]
    if result.get("notes"):
        lines += ["## Notes", ""] + [f"- {note}" for note in result["notes"]] + [""]
    return "\n".join(lines)


NOTES = [
    "The training and held-out screens are saved with save_to_disk and passed as --dataset_name, so both commands "
    "read exactly the same screens (equivalent to --dataset_name synthetic --synthetic_plates_per_treatment 2 "
    "--synthetic_seed s / s + 1000).",
    "With ~960 images and 36 treatments, NSC / NSCB are over 36 / fewer treatments: one treatment = 0.028; "
    "read differences smaller than the seed spread as noise.",
    "`mad` correction uses only 4 DMSO wells per plate here; its per-plate median/MAD estimates are noisy and make plates *more* separable (batch classification rises from ~0.39 to ~0.60-0.68 for every method), so read the `none` table as the primary comparison of what the embeddings themselves encode.",
]


def main(argv=None) -> None:
    args = parse_args(argv)
    args.work_dir = args.work_dir.resolve()
    started = time.perf_counter()
    train_flags = shlex.split(args.train_flags)
    threads = max(1, 2 // max(args.jobs, 1))

    screens_by_seed = {}
    for seed in args.seeds:
        screens_by_seed[seed] = {
            "train": make_screen(args, seed, args.work_dir / f"seed{seed}" / "screen_train"),
            "heldout": make_screen(args, seed + args.eval_seed_offset, args.work_dir / f"seed{seed}" / "screen_heldout"),
        }
        log(f"[seed {seed}] screens ready: {screens_by_seed[seed]['train']['num_images']} images each")

    tasks = [(seed, method) for seed in args.seeds for method in args.methods]
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        futures = [pool.submit(run_one, args, seed, method, screens_by_seed[seed], train_flags, threads)
                   for seed, method in tasks]
        records = [future.result() for future in futures]

    first = screens_by_seed[args.seeds[0]]["train"]
    result = {
        "benchmark": "CDCL vs DINO vs DINO-CB vs untrained on the synthetic screen (tiny CPU setup)",
        "argv": list(argv if argv is not None else sys.argv[1:]),
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpu_count": os.cpu_count(), "jobs": args.jobs, "threads_per_job": threads},
        "settings": {"seeds": args.seeds, "methods": args.methods, "train_flags": train_flags,
                     "num_images": args.num_images, "plates_per_treatment": args.plates_per_treatment,
                     "batch_effect_strength": args.batch_effect_strength, "eval_on": args.eval_on,
                     "eval_seed_offset": args.eval_seed_offset, "corrections": args.corrections,
                     "null_size": args.null_size, "domain_column": "plate", "label_column": "treatment"},
        "screens_example": {k: v for k, v in first.items() if k != "config"},
        "screens": {str(seed): screens for seed, screens in screens_by_seed.items()},
        "runs": records,
        "summary": summarise(records, args),
        "notes": NOTES,
        "total_wall_s": round(time.perf_counter() - started, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(result, args))
    log(f"wrote {args.output.with_suffix('.json')} and .md in {result['total_wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
