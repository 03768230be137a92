"""Time the built-in synthetic screen and record how strongly its batch effects show in raw pixels.

    python benchmarks/bench_synthetic_screen.py [--repeats 3] [--output benchmarks/results/synthetic_screen.json]

Measures, on one thread: generating the default ~1k-image screen (numpy arrays), building the
screen-schema datasets.Dataset from it (PNG encoding), and, for several batch-effect strengths, the
fraction of images whose raw-pixel nearest neighbour is from the same batch / the same MoA.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

# One core, as on the CI machine; must be set before numpy loads its BLAS.
for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

import numpy as np  # noqa: E402

from cdcl_hf.screen_data import dataset_from_arrays  # noqa: E402
from cdcl_hf.synthetic_screen import (  # noqa: E402
    SyntheticScreenConfig,
    generate_synthetic_screen,
    raw_pixel_features,
    same_label_neighbour_rate,
)


def best_of(repeats: int, function) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        timings.append(time.perf_counter() - started)
    return min(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "synthetic_screen.json"))
    args = parser.parse_args()

    config = SyntheticScreenConfig()
    generate_seconds = best_of(args.repeats, lambda: generate_synthetic_screen(config))
    images, metadata = generate_synthetic_screen(config)
    names = list(config.resolved_channel_names())
    dataset_seconds = best_of(1, lambda: dataset_from_arrays(images, metadata, names))

    separability = {}
    for strength in (0.0, 0.5, 1.0, 2.0):
        images, metadata = generate_synthetic_screen(SyntheticScreenConfig(batch_effect_strength=strength))
        features = raw_pixel_features(images)
        treated = ~metadata["is_control"].to_numpy()
        separability[str(strength)] = {
            "same_batch_nn_rate": same_label_neighbour_rate(features, metadata["batch"]),
            "same_plate_nn_rate": same_label_neighbour_rate(features, metadata["plate"]),
            "same_moa_other_compound_nn_rate": same_label_neighbour_rate(
                raw_pixel_features(images[treated], grid=0),
                metadata["moa"][treated],
                exclude=metadata["compound"][treated],
            ),
        }
    batch_sizes = metadata["batch"].value_counts().to_numpy()
    result = {
        "config": {
            "num_images": config.num_images,
            "shape": [config.num_channels, config.image_size, config.image_size],
            "dtype": config.dtype,
            "plates": config.num_plates,
            "batches": config.num_batches,
            "treatments": config.num_treatments,
        },
        "generate_seconds_best_of": {"repeats": args.repeats, "seconds": round(generate_seconds, 3)},
        "images_per_second": round(config.num_images / generate_seconds, 1),
        "dataset_from_arrays_seconds": round(dataset_seconds, 3),
        "raw_pixel_nearest_neighbour": separability,
        "chance": {
            "same_batch": float(
                ((batch_sizes - 1) * batch_sizes).sum() / (len(metadata) * (len(metadata) - 1))
            ),
            "same_moa_other_compound": 1.0 / (len(config.moas) * config.compounds_per_moa - 1),
        },
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "numpy": np.__version__,
            "threads": 1,
        },
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
