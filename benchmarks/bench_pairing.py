"""Partner sampling cost versus dataset size.

Builds a `PartnerIndex` for 1e3..1e6 items (labels ~ N/20 so each label keeps ~20 images over 24
domains, like RxRx1-sized label groups) and times, per item:
- `sample_partner` (the per-item path used by the map-style dataset),
- `sample_partners` (vectorised),
- for contrast, the research code's approach: filter the whole table per item (50 items).
Writes benchmarks/results/pairing.json. Run: python benchmarks/bench_pairing.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cdcl_hf.pairing import PartnerIndex


def _best_of(repeats: int, fn) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_size(n: int, draws: int, with_naive: bool, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, max(n // 20, 1), n)
    domains = rng.integers(0, 24, n)
    start = time.perf_counter()
    index = PartnerIndex(labels, domains, policy="same_domain")
    build_s = time.perf_counter() - start
    items = rng.integers(0, n, draws).tolist()
    items_np = np.asarray(items)
    draw_rng = random.Random(0)
    vector_rng = np.random.default_rng(1)

    def per_item() -> None:
        for item in items:
            index.sample_partner(item, draw_rng)

    def vectorised() -> None:
        index.sample_partners(items_np, vector_rng)

    row = {
        "items": n,
        "build_s": round(build_s, 4),
        "per_item_us": round(_best_of(repeats, per_item) / draws * 1e6, 3),
        "vectorised_per_item_us": round(_best_of(repeats, vectorised) / draws * 1e6, 4),
        "counts": index.counts,
    }
    if with_naive:
        frame = pd.DataFrame({"label": labels, "domain": domains})
        naive_items = items[:50]

        def naive() -> None:  # the research code's per-item filter of the whole table
            for item in naive_items:
                mask = (frame.label.values == labels[item]) & (frame.domain.values != domains[item])
                candidates = np.flatnonzero(mask)
                if len(candidates):
                    candidates[draw_rng.randrange(len(candidates))]

        row["naive_filter_per_item_us"] = round(_best_of(repeats, naive) / len(naive_items) * 1e6, 3)
    return row


def bench(sizes: list[int], draws: int, naive_limit: int, repeats: int) -> list[dict]:
    rows = []
    for n in sizes:
        row = bench_size(n, draws, with_naive=n <= naive_limit, repeats=repeats)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "counts"}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer draws (a smoke run)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "pairing.json"))
    args = parser.parse_args()
    sizes = [1_000, 10_000, 100_000, 1_000_000]
    draws = 2_000 if args.quick else 20_000
    rows = bench(sizes, draws=draws, naive_limit=1_000_000, repeats=3)
    flat_ratio = rows[-1]["per_item_us"] / rows[0]["per_item_us"]
    result = {
        "benchmark": "PartnerIndex partner sampling",
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
        },
        "draws_per_size": draws,
        "per_item_us_ratio_1e6_vs_1e3": round(flat_ratio, 3),
        "note": (
            "a draw reads a fixed number of array elements whatever N (tests/test_pairing.py counts them); "
            "the residual growth at 1e6 is CPU-cache misses on random access into ~40 MB of index arrays, "
            "not extra work. The naive per-item table filter grows linearly."
        ),
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"per-item time 1e6 / 1e3 = {flat_ratio:.2f}; wrote {out}")


if __name__ == "__main__":
    main()
