"""What every benchmark shares: the machine description, the matmul peak, interleaved timing and JSON output.

Every speed claim is a ratio against a baseline measured in the same process: `interleaved` runs the candidates
round-robin (the order rotating each repeat), so a noisy neighbour slows all of them alike, and reports the median
and the spread (min, max) of each candidate's times and of each per-repeat ratio.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"

# On a shared, oversubscribed machine two OpenMP threads spin-wait for each other at every parallel region (a step
# can run 10x slower); CDCL_BENCH_THREADS=1 makes the timings robust there. Recorded in each JSON's `machine`.
if os.environ.get("CDCL_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["CDCL_BENCH_THREADS"]))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """The cores this process may run on (its affinity), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine() -> dict:
    import transformers

    return {
        "cpu": cpu_model(),
        "cores_usable": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": "cpu",
    }


def _onednn_linear(a: torch.Tensor, b: torch.Tensor):
    """``a @ b.T`` through oneDNN's linear kernel, or None where this torch build has none."""
    from cdcl_hf.cpu_kernels import onednn_linear, onednn_linear_available

    return (lambda: onednn_linear(a, b)) if onednn_linear_available() else None


def matmul_peak_flops(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5) -> dict:
    """fp32 matmul FLOP/s of this machine (the best of `repeats` at each size), the denominator of every MFU here.

    Measured through each GEMM kernel torch has on the CPU, and the best taken: `torch.mm` (the BLAS, MKL in the
    PyTorch wheels, which eager `nn.Linear` uses) and oneDNN's linear (which `torch.compile` with frozen weights
    uses). On AMD CPUs MKL runs its AVX2 code: on this project's AMD EPYC (Zen 5, AVX-512) `torch.mm` reached ~108
    GFLOP/s on one core and oneDNN ~2.3x that, fp32 both (errors against float64 of the same order). A peak from
    `torch.mm` alone would have counted MKL's half speed as the machine's. Shared machines are noisy: a benchmark
    measures it at its start and end and keeps the best (`best_of`).
    """
    by_kernel: dict[str, dict[str, float]] = {"torch.mm": {}, "onednn_linear": {}}
    with torch.inference_mode():
        for size in sizes:
            a, b = torch.randn(size, size), torch.randn(size, size)
            kernels = {"torch.mm": lambda a=a, b=b: torch.mm(a, b), "onednn_linear": _onednn_linear(a, b)}
            inner = max(1, (1024 // size) ** 3 * 4)
            for kernel, run in kernels.items():
                if run is None:
                    continue
                run()
                best = 0.0
                for _ in range(repeats):
                    start = time.perf_counter()
                    for _ in range(inner):
                        run()
                    best = max(best, 2 * size**3 * inner / (time.perf_counter() - start))
                by_kernel[kernel][str(size)] = best
    best_by_kernel = {kernel: max(rates.values()) for kernel, rates in by_kernel.items() if rates}
    return {"best_flops": max(best_by_kernel.values()), "best_by_kernel": best_by_kernel, "by_kernel": by_kernel}


def best_of(*peaks: dict) -> dict:
    """The best of several `matmul_peak_flops` measurements (start and end of a run), overall and per kernel."""
    kernels = {kernel for p in peaks for kernel in p.get("best_by_kernel", {})}
    return {"best_flops": max(p["best_flops"] for p in peaks),
            "best_by_kernel": {k: max(p["best_by_kernel"].get(k, 0.0) for p in peaks) for k in sorted(kernels)},
            "measurements": list(peaks)}


def summary(values: list[float], digits: int = 4) -> dict:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "n": len(values),
    }


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each candidate, `repeats` times, round-robin in a different order each repeat.

    Up to 3 candidates go through all their orders in turn (6 repeats cover each once); more get a seeded shuffle per
    repeat. A plain rotation keeps the cyclic order, so a candidate would always run right after the same other one
    and inherit its cache and allocator state: on 2 cores that alone moved a ratio by 5 % between two runs.
    """
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    orders = list(itertools.permutations(names)) if len(names) <= 3 else None
    shuffler = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = orders[r % len(orders)] if orders else shuffler.sample(names, len(names))
        for name in order:
            start = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - start)
    return times


def ratios(times: dict[str, list[float]], numerator: str, denominator: str) -> list[float]:
    """Per-repeat time ratios (numerator / denominator): > 1 means the numerator is slower."""
    return [n / d for n, d in zip(times[numerator], times[denominator], strict=True)]


def write_result(result: dict, out: str | os.PathLike) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return out


class PeakTensorMemory:
    """Peak bytes of tensors allocated inside the context and alive at once (activations; weights excluded).

    A `TorchDispatchMode` counts every new storage an op returns and un-counts it when the storage is freed, so the
    figure is exact and independent of the allocator (CPU has no `max_memory_allocated`).
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker._track(t)
                return out

        self._mode = _Mode()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _track(self, tensor: torch.Tensor) -> None:
        import weakref

        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._seen or storage.nbytes() == 0:
            return
        self._seen.add(key)
        nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)

        def release(key=key, nbytes=nbytes):
            self._seen.discard(key)
            self.live -= nbytes

        weakref.finalize(storage, release)

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)
