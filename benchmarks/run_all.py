"""Run every benchmark, each in its own process, and write its JSON into one folder; then print the tables.

    python benchmarks/run_all.py                      # full runs into benchmarks/results/ (tens of minutes on 2 cores;
                                                      # bench_gpu only where a CUDA device is present)
    python benchmarks/run_all.py --quick --out_dir /tmp/bench   # smoke run (a few minutes), as tests/test_benchmarks.py

Each benchmark is `benchmarks/bench_<name>.py --out <out_dir>/<name>.json [--quick]`; a failing one fails the run
(exit status 1, after the others have run). `--only a,b` runs some of them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
BENCHMARKS = ("inference", "inference_compiled", "training_step", "data_path", "pairing", "gpu")
# Benchmarks that are a mode of another script: name -> (script's bench_<name>.py, its extra arguments).
MODES = {"inference_compiled": ("inference", ["--compiled"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out_dir", type=Path, default=HERE / "results")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    args = parser.parse_args(argv)
    names = BENCHMARKS if args.only is None else tuple(n.strip() for n in args.only.split(","))
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        if name == "gpu" and not args.quick and not _cuda_available():
            print("== gpu: skipped (no CUDA device; `--quick` runs its smoke test on the CPU)", flush=True)
            continue
        script, extra = MODES.get(name, (name, []))
        command = [sys.executable, str(HERE / f"bench_{script}.py"), *extra, "--out", str(args.out_dir / f"{name}.json")]
        if args.quick:
            command.append("--quick")
        start = time.perf_counter()
        print(f"== {name}: {' '.join(command)}", flush=True)
        status = subprocess.run(command).returncode
        print(f"== {name}: exit {status} after {time.perf_counter() - start:.1f} s", flush=True)
        if status != 0:
            failed.append(name)
    from make_tables import tables

    print(tables(args.out_dir))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
