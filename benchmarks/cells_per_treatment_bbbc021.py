"""How NSC / NSCB on the BBBC021 crops grow with the number of cells behind a treatment profile.

    python benchmarks/cells_per_treatment_bbbc021.py            # after bench_methods_bbbc021.py (reads its work dir)

Why: the crops hold a median of 5 cells per treatment, nearly all from one well, while the CellProfiler profiles they
are compared with average every cell of the same wells (hundreds). This measures how much of the gap is the number of
cells: for the treatments with at least --max_cells crops, each treatment profile is the median of k randomly drawn
crops (k = 1 .. --max_cells; --draws draws per k, seeded), and NSC / NSCB are scored on those profiles with
`cdcl_hf.metrics.nsc_nscb_accuracy`, the function the evaluation uses (controls excluded, cosine 1-NN, a treatment's
batches = the batches of its drawn crops). Inputs: the image-level profiles the benchmark's evaluations wrote
(`<work_dir>/seed*/<method>.eval_none/profiles_image.parquet`) and the two model-free baselines, recomputed with the
benchmark's own feature code. Results: benchmarks/results/cells_per_treatment_bbbc021.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from bench_methods_bbbc021 import baseline_image_profiles  # noqa: E402
from common import machine  # noqa: E402

TREATMENT, COMPOUND, MOA, BATCH, CONTROL = (
    "Metadata_Treatment", "Metadata_Compound", "Metadata_moa", "Metadata_Batch", "Metadata_is_control")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, default=ROOT / "outputs" / "bench_methods_bbbc021")
    parser.add_argument("--methods", nargs="+", default=["untrained", "dino", "cdcl"])
    parser.add_argument("--max_cells", type=int, default=5)
    parser.add_argument("--draws", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "cells_per_treatment_bbbc021")
    return parser.parse_args(argv)


def treatment_profiles(images: pd.DataFrame, cells: int, rng: np.random.Generator) -> tuple[np.ndarray, pd.DataFrame]:
    """One profile per treatment: the median of `cells` of its crops, drawn without replacement."""
    features = [c for c in images.columns if not str(c).startswith("Metadata_")]
    rows, meta = [], []
    for treatment, group in images.groupby(TREATMENT, sort=True):
        chosen = group.iloc[rng.choice(len(group), size=cells, replace=False)]
        rows.append(np.median(chosen[features].to_numpy(dtype=np.float64), axis=0))
        meta.append({TREATMENT: treatment, COMPOUND: chosen[COMPOUND].iloc[0], MOA: chosen[MOA].iloc[0],
                     BATCH: frozenset(chosen[BATCH].astype(str))})
    return np.stack(rows), pd.DataFrame(meta)


def curve(images: pd.DataFrame, max_cells: int, draws: int, seed: int) -> dict:
    from cdcl_hf.metrics import nsc_nscb_accuracy

    treated = images[~images[CONTROL].astype(bool)]
    counts = treated.groupby(TREATMENT).size()
    kept = treated[treated[TREATMENT].isin(counts.index[counts >= max_cells])]
    rng = np.random.default_rng(seed)
    out = {"n_treatments": int(kept[TREATMENT].nunique()), "cells": {}}
    for cells in range(1, max_cells + 1):
        scores = {"nsc": [], "nscb": []}
        for _ in range(draws):
            matrix, meta = treatment_profiles(kept, cells, rng)
            result = nsc_nscb_accuracy(matrix, meta, moa_column=MOA, compound_column=COMPOUND, batch_column=BATCH)
            for name in scores:
                if result[name].defined:
                    scores[name].append(result[name].value)
        out["cells"][str(cells)] = {name: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None,
                                              "n": len(v)}
                                    for name, v in scores.items() if v}
    return out


def markdown(result: dict) -> str:
    cells = [str(k) for k in range(1, result["max_cells"] + 1)]
    lines = ["# NSC / NSCB against the number of cells per treatment profile (BBBC021 crops)", "",
             result["doc"], "",
             f"{result['n_treatments']} treatments with >= {result['max_cells']} crops; {result['draws']} draws per "
             f"k; trained methods: mean over seeds {result['seeds']} of the per-seed mean over draws. "
             f"{result['machine']['cpu']}, {result['wall_s']:.0f} s.", ""]
    for metric in ("nsc", "nscb"):
        lines += [f"## {metric.upper()}", "", "| method | " + " | ".join(f"k = {k}" for k in cells) + " |",
                  "|---|" + "---|" * len(cells)]
        for method, entry in result["methods"].items():
            lines.append(f"| {method} | " + " | ".join(
                f"{entry['mean'][k][metric]:.3f}" if metric in entry["mean"][k] else "n/d" for k in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    tables: dict[str, list[pd.DataFrame]] = {}
    seeds = sorted(int(p.name[4:]) for p in args.work_dir.glob("seed*") if p.name[4:].isdigit())
    for method in args.methods:
        for seed in seeds:
            path = args.work_dir / f"seed{seed}" / f"{method}.eval_none" / "profiles_image.parquet"
            if not path.is_file():
                raise SystemExit(f"cells_per_treatment_bbbc021: error: {path} is missing; run "
                                 "benchmarks/bench_methods_bbbc021.py first (it writes the evaluations)")
            tables.setdefault(method, []).append(pd.read_parquet(path))
    for name, table in baseline_image_profiles(str(args.work_dir / "dataset")).items():
        tables[name] = [table]
    methods = {}
    for method, per_seed in tables.items():
        curves = [curve(table, args.max_cells, args.draws, args.seed) for table in per_seed]
        mean = {k: {metric: float(np.mean([c["cells"][k][metric]["mean"] for c in curves]))
                    for metric in ("nsc", "nscb") if all(metric in c["cells"][k] for c in curves)}
                for k in curves[0]["cells"]}
        methods[method] = {"per_seed": curves, "mean": mean}
        print(method, {k: round(v.get("nscb", float("nan")), 3) for k, v in mean.items()}, flush=True)
    result = {"benchmark": "NSC / NSCB against cells per treatment profile, BBBC021 crops",
              "doc": " ".join(("Why: " + __doc__.split("Why: ")[1].split("Results:")[0]).split()),
              "argv": sys.argv[1:], "machine": machine(), "seeds": seeds, "max_cells": args.max_cells,
              "draws": args.draws, "n_treatments": next(iter(methods.values()))["per_seed"][0]["n_treatments"],
              "methods": methods, "wall_s": round(time.perf_counter() - started, 1)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {args.output.with_suffix('.md')}")


if __name__ == "__main__":
    main()
