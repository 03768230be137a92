"""Load a script of benchmarks/ as a module, as tests of its functions need (benchmarks/ is not a package)."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """`load_benchmark("tune_bbbc021_crops")` -> benchmarks/tune_bbbc021_crops.py, with benchmarks/ importable, as the
    scripts import their siblings (`common`, `bench_methods_synthetic`, ...)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
