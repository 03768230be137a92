"""Evaluate a checkpoint's embeddings on a screen: profiles, scores, table and plots in one folder.

    cdcl-evaluate --model runs/cdcl/checkpoint --dataset_name data/bbbc021 \
        --aggregate median --correction mad --output_dir eval/bbbc021
    python training/evaluate_embeddings.py ...        # the same

The screen is read with cdcl_hf.screen_data.load_screen (a builder folder, a parquet folder or a Hub
id; --streaming iterates it without loading it whole). A checkpoint trained with per-plate
normalisation gets each image normalised by its own plate's statistics, as in training
(--plate_normalization).

Writes to --output_dir:
    profiles_image.parquet   one row per image (Metadata_* columns + emb_* features)
    profiles_well.parquet    per-well aggregate (when --profile_level well, the default)
    profiles_evaluated.parquet  the corrected profiles the metrics were computed on
    results.json             settings + every metric with value, n, defined, reason, details
    results.md               the same as a markdown table
    projection_batch_moa.png 2-D PCA projection coloured by batch and by MoA

Definitions of every metric: docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..image_io import decode_image
from ..metrics import evaluate_profiles, results_markdown_table
from ..normalization import PLATE_STATISTICS_SOURCES, PlateNormalization
from ..profiling import (
    AGGREGATION_METHODS,
    CORRECTION_METHODS,
    aggregate_profiles,
    check_channel_count,
    correct_profiles,
    extract_embeddings,
    load_feature_extractor,
    metadata_name,
    split_profiles,
    write_profiles,
)
from ..screen_data import load_screen, parse_column_mapping
from ..synthetic_screen import add_synthetic_screen_arguments, synthetic_screen_from_args

logger = logging.getLogger("cdcl_hf.evaluate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cdcl-evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub id (any AutoModel image model)")
    parser.add_argument("--dataset_name", required=True,
                        help='screen dataset: folder (save_to_disk or data files), Hub id, or "synthetic"')
    parser.add_argument("--split", default="train")
    parser.add_argument("--dataset_revision", default=None, help="Hub dataset branch, tag or commit")
    parser.add_argument("--streaming", action="store_true",
                        help="iterate the screen instead of loading it (large or Hub screens)")
    parser.add_argument("--column_map", action="append", metavar="THEIRS=STANDARD",
                        help="rename a dataset column to its standard name (repeatable), Metadata_Plate=plate")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--trust_remote_code", action="store_true")
    # Seed 1 by default: a held-out screen for a model trained on the training command's default (seed 0).
    add_synthetic_screen_arguments(parser, default_seed=1)
    columns = parser.add_argument_group("dataset columns (names in the dataset, without Metadata_)")
    columns.add_argument("--label_column", "--treatment_column", dest="treatment_column", default="treatment")
    columns.add_argument("--batch_column", default="batch")
    columns.add_argument("--plate_column", default="plate")
    columns.add_argument("--well_column", default="well")
    columns.add_argument("--compound_column", default="compound")
    columns.add_argument("--moa_column", default="moa", help='"none" when the screen has no MoA annotation')
    columns.add_argument("--control_column", default="is_control")
    extraction = parser.add_argument_group("embedding extraction")
    extraction.add_argument("--batch_size", type=int, default=64)
    extraction.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    extraction.add_argument("--tile_size", type=int, default=None, help="embed tiles of this size and average them")
    extraction.add_argument("--tile_stride", type=int, default=None)
    extraction.add_argument("--max_images", type=int, default=None, help="evaluate only the first N images")
    extraction.add_argument(
        "--plate_normalization", choices=PLATE_STATISTICS_SOURCES, default="controls",
        help='checkpoints whose processor normalises "per_channel": normalise each image by its plate\'s '
             "statistics, from the plate's controls (training's default) or all its images; none = the "
             "processor's saved mean/std. Per-image processors ignore it",
    )
    extraction.add_argument("--no_progress", action="store_true")
    scoring = parser.add_argument_group("profiles and scores")
    scoring.add_argument("--profile_level", choices=["image", "well"], default="well",
                         help="replicate unit the metrics see (treatment level is always derived from it)")
    scoring.add_argument("--aggregate", choices=AGGREGATION_METHODS, default="median")
    scoring.add_argument("--correction", choices=CORRECTION_METHODS, default="none")
    scoring.add_argument("--per_plate", action="store_true", help="tvn / sphering: standardise each plate first")
    scoring.add_argument("--knn_k", type=int, default=10)
    scoring.add_argument("--knn_temperature", type=float, default=0.1)
    scoring.add_argument("--null_size", type=int, default=10000, help="copairs permutations for mAP p-values")
    scoring.add_argument("--missing_moa", choices=["error", "drop"], default="error")
    scoring.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        parse_column_mapping(args.column_map)
    except ValueError as error:
        parser.error(f"--column_map: {error}")
    return args


def load_evaluation_dataset(args: argparse.Namespace):
    """The screen dataset to embed: "synthetic" (the `--synthetic_*` flags), or whatever ``load_screen`` reads."""
    column_mapping = parse_column_mapping(args.column_map) or None
    if args.dataset_name == "synthetic":
        if args.streaming or column_mapping or args.dataset_revision:
            raise ValueError(
                "--streaming, --column_map and --dataset_revision are for screens on disk or the Hub, "
                "not the synthetic screen"
            )
        return synthetic_screen_from_args(args)
    return load_screen(args.dataset_name, split=args.split, streaming=args.streaming,
                       revision=args.dataset_revision, column_mapping=column_mapping)


def first_n(dataset, n: int | None):
    """The first ``n`` rows of a map-style or streamed dataset (all of them when ``n`` is None)."""
    if n is None:
        return dataset
    if hasattr(dataset, "select") and hasattr(dataset, "__len__"):
        return dataset.select(range(min(n, len(dataset))))
    return dataset.take(n)


def projection_plot(profiles: pd.DataFrame, batch_column: str, moa_column: str | None, path: Path) -> Path:
    """Two panels of the same 2-D PCA projection, coloured by batch and by MoA (controls in grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    matrix, meta = split_profiles(profiles)
    coordinates = PCA(n_components=2).fit_transform(matrix) if matrix.shape[1] >= 2 else np.c_[matrix, matrix]
    colourings = [("batch", meta[batch_column].astype(str))]
    if moa_column is not None and moa_column in meta:
        colourings.append(("MoA", meta[moa_column].fillna("unannotated / control").astype(str)))
    figure, axes = plt.subplots(1, len(colourings), figsize=(7 * len(colourings), 6), squeeze=False)
    for axis, (title, labels) in zip(axes[0], colourings, strict=True):
        categories = sorted(labels.unique())
        colours = plt.get_cmap("tab20", max(len(categories), 1))
        for index, category in enumerate(categories):
            chosen = (labels == category).to_numpy()
            colour = "lightgrey" if category == "unannotated / control" else colours(index)
            axis.scatter(coordinates[chosen, 0], coordinates[chosen, 1], s=10, color=colour, label=category)
        axis.set_title(f"PCA of profiles, coloured by {title}")
        axis.set_xlabel("PC 1")
        axis.set_ylabel("PC 2")
        axis.legend(fontsize=6, markerscale=1.5, loc="best", ncol=1 + len(categories) // 20)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    column = {key: metadata_name(getattr(args, f"{key}_column"))
              for key in ("treatment", "batch", "plate", "well", "compound", "control")}
    moa_column = None if args.moa_column.lower() == "none" else metadata_name(args.moa_column)

    model, processor = load_feature_extractor(args.model, trust_remote_code=args.trust_remote_code)
    screen = load_evaluation_dataset(args)
    # Fail on a channel mismatch before the (possibly long) pass over the screen for plate statistics.
    first_row = next(iter(screen.select_columns(["image"])), None)
    if first_row is None:
        raise ValueError(f"{args.dataset_name} ({args.split}) is empty: nothing to evaluate")
    check_channel_count(model, processor, decode_image(first_row["image"]).shape[0])
    # Statistics over the whole screen, not only --max_images: an image's normalisation must not
    # depend on how many images are evaluated.
    normalization = PlateNormalization.for_processor(processor, screen, source=args.plate_normalization)
    if normalization is not None:
        logger.info("normalising each image by its plate's statistics (%s, %d plates)",
                    args.plate_normalization, len(normalization.plates))
    images = extract_embeddings(
        model, first_n(screen, args.max_images), processor, batch_size=args.batch_size, device=args.device,
        tile_size=args.tile_size, tile_stride=args.tile_stride, progress=not args.no_progress,
        normalization=normalization,
    )
    write_profiles(images, output_dir / "profiles_image.parquet")

    profiles = images
    if args.profile_level == "well":
        profiles = aggregate_profiles(images, by=[column["plate"], column["well"]], method=args.aggregate)
        write_profiles(profiles, output_dir / "profiles_well.parquet")
    profiles = correct_profiles(
        profiles, args.correction, control_column=column["control"], plate_column=column["plate"],
        per_plate=args.per_plate,
    )
    write_profiles(profiles, output_dir / "profiles_evaluated.parquet")

    results = evaluate_profiles(
        profiles, treatment_column=column["treatment"], compound_column=column["compound"], moa_column=moa_column,
        batch_column=column["batch"], plate_column=column["plate"], control_column=column["control"],
        aggregate=args.aggregate, knn_k=args.knn_k, knn_temperature=args.knn_temperature,
        null_size=args.null_size, missing_moa=args.missing_moa, seed=args.seed,
    )
    report = {
        "model": str(args.model),
        "dataset": str(args.dataset_name),
        "split": args.split,
        "settings": {key: getattr(args, key) for key in (
            "profile_level", "aggregate", "correction", "per_plate", "tile_size", "tile_stride",
            "knn_k", "knn_temperature", "null_size", "missing_moa", "seed", "max_images", "dataset_revision",
            "streaming", "column_map")},
        # What the images were normalised with: "per_plate:controls|all" or the processor's own rule.
        "input_normalization": (f"per_plate:{args.plate_normalization}" if normalization is not None
                                else "per_image" if processor is None  # extract_embeddings' default processor
                                else getattr(processor, "normalization", type(processor).__name__)),
        "n_images": len(images),
        "n_profiles": len(profiles),
        "embedding_dim": int(split_profiles(images)[0].shape[1]),
        "metrics": {name: result.to_dict() for name, result in results.items()},
    }
    (output_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    header = (
        f"# Profiling evaluation\n\nmodel `{args.model}`, dataset `{args.dataset_name}` ({args.split}), "
        f"{len(images)} images -> {len(profiles)} {args.profile_level} profiles; aggregate {args.aggregate}, "
        f"correction {args.correction}{' per plate' if args.per_plate else ''}.\n\n"
    )
    (output_dir / "results.md").write_text(header + results_markdown_table(results))
    projection_plot(profiles, column["batch"], moa_column, output_dir / "projection_batch_moa.png")
    return report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("copairs").setLevel(logging.WARNING)  # it logs every internal step at INFO
    args = parse_args(argv)
    report = run(args)
    print(results_markdown_table_from_report(report))
    print(f"wrote {args.output_dir}/results.json, results.md, projection_batch_moa.png and the profile parquets")
    return 0


def results_markdown_table_from_report(report: dict[str, Any]) -> str:
    lines = []
    for name, metric in report["metrics"].items():
        value = f"{metric['value']:.3f}" if metric["defined"] else f"not defined ({metric['reason']})"
        lines.append(f"{name:>30}: {value}  (n={metric['n']} {metric['unit']})")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
