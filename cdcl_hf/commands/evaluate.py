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
    results.json             settings + every metric with value, n, defined, informative, reason, details
                             (details.chance / details.no_batch_value: the level a value is read against)
    results.md               the same as a markdown table
    projection_batch_moa.png 2-D PCA projection coloured by batch and by MoA

Outputs appear whole or not at all: the files are assembled in a temporary folder beside --output_dir and swapped
in at the end, so a failed or killed re-run leaves the previous evaluation as it was (the next run removes the
temporary). --output_dir must be new, empty or an earlier evaluation; a folder holding anything else, or one
that is, holds or lies inside the model or the dataset, is refused.

Channels: the screen's channel names must be the model's, in the model's order; otherwise give --channel_order
or --channel_map. A checkpoint without its image processor is refused unless --allow_default_processor; so is a
training run that has not finished. Errors are one line on stderr (exit status 1); --debug shows the traceback.

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

from ..cli import (
    CommandParser,
    add_debug_argument,
    command_errors,
    non_negative_int,
    positive_float,
    positive_int,
)
from ..configuration_cdcl import POOLING_MODES
from ..cpu_kernels import LINEAR_KERNEL_HELP, LINEAR_KERNELS
from ..embedding import TEST_TIME_AUGMENTATIONS
from ..image_io import decode_image
from ..metrics import evaluate_profiles, reference_note, results_markdown_table
from ..normalization import PLATE_STATISTICS_SOURCES, PlateNormalization
from ..outputs import (
    OUTPUT_MARKER,
    OutputSafetyError,
    check_output_not_an_input,
    fault_point,
    is_cdcl_output,
    remove_stale_temporaries,
    staged_directory,
    write_output_marker,
)
from ..profiling import (
    AGGREGATION_METHODS,
    CORRECTION_METHODS,
    POOLING_HELP,
    aggregate_profiles,
    check_model_folder,
    correct_profiles,
    extract_embeddings,
    load_feature_extractor,
    match_channels,
    metadata_name,
    split_profiles,
    write_profiles,
)
from ..screen_data import CHANNEL_NAMES_COLUMN, load_screen, parse_channel_map, parse_column_mapping
from ..synthetic_screen import add_synthetic_screen_arguments, synthetic_screen_from_args

logger = logging.getLogger("cdcl_hf.evaluate")

PROG = "cdcl-evaluate"
# The output marker's kind (cdcl_hf.outputs): only a folder marked so (or an unmarked earlier evaluation, see
# is_evaluation_folder) is ever replaced.
OUTPUT_KIND = "evaluation"
EVALUATION_FILES = (
    "profiles_image.parquet", "profiles_well.parquet", "profiles_evaluated.parquet", "results.json", "results.md",
    "projection_batch_moa.png",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub id (any AutoModel image model)")
    parser.add_argument("--dataset_name", required=True,
                        help='screen dataset: folder (save_to_disk or data files), Hub id, or "synthetic"')
    parser.add_argument("--split", default="train")
    parser.add_argument("--dataset_revision", default=None, help="Hub dataset branch, tag or commit")
    parser.add_argument("--streaming", action="store_true",
                        help="iterate the screen instead of loading it (large or Hub screens)")
    parser.add_argument("--column_map", action="append", metavar="THEIRS=STANDARD",
                        help="rename a dataset column to its standard name (repeatable), Metadata_Plate=plate")
    parser.add_argument("--output_dir", required=True,
                        help="new, empty, or an earlier evaluation (replaced once this one is complete)")
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--allow_default_processor", action="store_true",
                        help="embed with a checkpoint that has no image processor (preprocessor_config.json), "
                             "standardising each image on its own")
    channels = parser.add_argument_group("channels (when the screen's channel names or order differ from the model's)")
    channels.add_argument("--channel_order", nargs="+", metavar="NAME_OR_INDEX",
                          help="the screen's channels (names or 0-based indices) that feed the model's channels, in "
                               "the model's order, e.g. DAPI Tubulin Actin")
    channels.add_argument("--channel_map", action="append", metavar="DATA=MODEL",
                          help="rename a screen channel to the model's name (repeatable), e.g. DAPI=DNA; the "
                               "channels are then put in the model's order")
    add_debug_argument(parser)
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
    extraction.add_argument("--batch_size", type=positive_int, default=64)
    extraction.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    extraction.add_argument("--tile_size", type=positive_int, default=None,
                            help="embed tiles of this size and average them")
    extraction.add_argument("--tile_stride", type=positive_int, default=None)
    extraction.add_argument(
        "--test_time_augmentation", choices=TEST_TIME_AUGMENTATIONS, default="none",
        help="average each image's embedding over its mirrored (flips: 4 views) or also quarter-turned (dihedral: 8) "
             "copies; cells have no preferred orientation",
    )
    extraction.add_argument(
        "--compile", dest="compile_model", action="store_true",
        help="torch.compile the model (dynamic shapes, frozen weights; needs a C++ compiler): ~2x faster on an AMD "
             "CPU once compiled, which takes tens of seconds; for large screens",
    )
    extraction.add_argument(
        "--cpu_linear_kernel", choices=LINEAR_KERNELS, default="auto", help=f"without --compile: {LINEAR_KERNEL_HELP}",
    )
    extraction.add_argument("--pooling", choices=POOLING_MODES, default=None, help=POOLING_HELP)
    extraction.add_argument("--max_images", type=positive_int, default=None, help="evaluate only the first N images")
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
    scoring.add_argument("--knn_k", type=positive_int, default=10)
    scoring.add_argument("--knn_temperature", type=positive_float, default=0.1)
    scoring.add_argument("--null_size", type=positive_int, default=10000, help="copairs permutations for mAP p-values")
    scoring.add_argument("--missing_moa", choices=["error", "drop"], default="error")
    scoring.add_argument("--seed", type=non_negative_int, default=0)
    args = parser.parse_args(argv)
    try:
        parse_column_mapping(args.column_map)
    except ValueError as error:
        parser.error(f"--column_map: {error}")
    try:
        parse_channel_map(args.channel_map)
    except ValueError as error:
        parser.error(f"--channel_map: {error}")
    if args.channel_map and args.channel_order:
        parser.error("give --channel_map or --channel_order, not both")
    if args.tile_stride is not None and args.tile_size is None:
        parser.error("--tile_stride needs --tile_size")
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


def is_evaluation_folder(folder: Path) -> bool:
    """Whether ``folder`` is an evaluation this command wrote, which a new run may replace.

    True when it holds only the files an evaluation writes (:data:`EVALUATION_FILES`) and the output marker of kind
    ``"evaluation"``, or, without a marker, ``results.json`` and only those files (an evaluation written by a
    cdcl-hf older than the marker). A folder with anything else in it (a user's notes) is never replaced.
    """
    names = {entry.name for entry in folder.iterdir()}
    if OUTPUT_MARKER in names:
        return is_cdcl_output(folder, OUTPUT_KIND) and names <= {*EVALUATION_FILES, OUTPUT_MARKER}
    return "results.json" in names and names <= set(EVALUATION_FILES)


def check_output_dir(output_dir: Path, model: str, dataset_name: str) -> None:
    """Refuse an ``output_dir`` whose replacement could lose data.

    Refused: a folder that is, holds or lies inside the model folder or the dataset folder; a file; a non-empty
    folder that is not an earlier evaluation (:func:`is_evaluation_folder`).

    Raises:
        OutputSafetyError: Naming the folder and what to do.
    """
    inputs = {"--model": model}
    if dataset_name != "synthetic":
        inputs["--dataset_name"] = dataset_name
    check_output_not_an_input(output_dir, inputs)
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise OutputSafetyError(f"--output_dir {output_dir} is a file, not a folder; choose another --output_dir")
    if any(output_dir.iterdir()) and not is_evaluation_folder(output_dir):
        raise OutputSafetyError(
            f"--output_dir {output_dir} holds files cdcl-evaluate did not write; it is never replaced or written "
            "into. Choose a new or empty folder, or an earlier evaluation's folder."
        )


def _first_row(screen) -> dict[str, Any] | None:
    """The screen's first row, pixels and channel names only (a streamed screen may not know its columns)."""
    columns = screen.column_names
    if columns is None:
        return next(iter(screen), None)
    wanted = ["image", *([CHANNEL_NAMES_COLUMN] if CHANNEL_NAMES_COLUMN in columns else [])]
    return next(iter(screen.select_columns(wanted)), None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Embed the screen, build and correct the profiles, score them, and write the evaluation folder.

    Args:
        args (`argparse.Namespace`): The parsed command line (:func:`parse_args`).

    Returns:
        `dict`: The report written to ``results.json``.

    Raises:
        OutputSafetyError, FileNotFoundError, ValueError: A refused output folder, model or dataset, or channels
            that do not fit the model (each with a message naming what and how to fix it).
    """
    import transformers

    # The weight-loading bar says nothing an evaluation needs, and would precede a refusal's one line.
    transformers.utils.logging.disable_progress_bar()
    if args.no_progress:
        import datasets

        datasets.disable_progress_bars()
    output_dir = Path(args.output_dir).expanduser().resolve()
    # Everything that can be refused without the model or the screen is checked before loading them.
    check_output_dir(output_dir, args.model, args.dataset_name)
    check_model_folder(args.model)
    channel_map = parse_channel_map(args.channel_map) or None
    column = {key: metadata_name(getattr(args, f"{key}_column"))
              for key in ("treatment", "batch", "plate", "well", "compound", "control")}
    moa_column = None if args.moa_column.lower() == "none" else metadata_name(args.moa_column)

    model, processor = load_feature_extractor(args.model, trust_remote_code=args.trust_remote_code,
                                              allow_default_processor=args.allow_default_processor,
                                              pooling=args.pooling)
    screen = load_evaluation_dataset(args)
    # Fail on a channel mismatch before the (possibly long) pass over the screen for plate statistics.
    first_row = _first_row(screen)
    if first_row is None:
        raise ValueError(f"{args.dataset_name} ({args.split}) is empty: nothing to evaluate")
    match_channels(model, processor, decode_image(first_row["image"]).shape[0], first_row.get(CHANNEL_NAMES_COLUMN),
                   channel_map, args.channel_order)
    # Statistics over the whole screen, not only --max_images: an image's normalisation must not
    # depend on how many images are evaluated.
    normalization = PlateNormalization.for_processor(processor, screen, source=args.plate_normalization)
    if normalization is not None:
        logger.info("normalising each image by its plate's statistics (%s, %d plates)",
                    args.plate_normalization, len(normalization.plates))
    images = extract_embeddings(
        model, first_n(screen, args.max_images), processor, batch_size=args.batch_size, device=args.device,
        tile_size=args.tile_size, tile_stride=args.tile_stride, progress=not args.no_progress,
        normalization=normalization, channel_map=channel_map, channel_order=args.channel_order,
        test_time_augmentation=args.test_time_augmentation, compile_model=args.compile_model,
        linear_kernel=args.cpu_linear_kernel,
    )
    wells = None
    profiles = images
    if args.profile_level == "well":
        profiles = wells = aggregate_profiles(images, by=[column["plate"], column["well"]], method=args.aggregate)
    profiles = correct_profiles(
        profiles, args.correction, control_column=column["control"], plate_column=column["plate"],
        per_plate=args.per_plate,
    )
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
            "pooling", "test_time_augmentation", "compile_model", "cpu_linear_kernel", "knn_k", "knn_temperature", "null_size", "missing_moa", "seed", "max_images", "dataset_revision",
            "streaming", "column_map", "channel_map", "channel_order", "allow_default_processor")},
        # What the images were normalised with: "per_plate:controls|all" or the processor's own rule.
        "input_normalization": (f"per_plate:{args.plate_normalization}" if normalization is not None
                                else "per_image" if processor is None  # extract_embeddings' default processor
                                else getattr(processor, "normalization", type(processor).__name__)),
        "n_images": len(images),
        "n_profiles": len(profiles),
        "embedding_dim": int(split_profiles(images)[0].shape[1]),
        "metrics": {name: result.to_dict() for name, result in results.items()},
    }
    header = (
        f"# Profiling evaluation\n\nmodel `{args.model}`, dataset `{args.dataset_name}` ({args.split}), "
        f"{len(images)} images -> {len(profiles)} {args.profile_level} profiles; aggregate {args.aggregate}, "
        f"correction {args.correction}{' per plate' if args.per_plate else ''}.\n\n"
        "Batch is scored three ways: on the negative controls (`*_controls`), within biological labels "
        "(`silhouette_batch_scib`, `kbet_within_*`), and on all profiles (`*_all_profiles`, where differences "
        "between treatments confined to some batches count as batch). A value in parentheses is *not "
        "informative* on this screen, for the reason given. Definitions: docs/evaluation.md.\n\n"
    )

    # Every file goes into a staging folder beside --output_dir, swapped in only once all are written: a failed or
    # killed run leaves the previous evaluation whole, and the next run removes the leftover staging folder.
    remove_stale_temporaries(output_dir.parent)
    with staged_directory(output_dir) as staging:
        write_profiles(images, staging / "profiles_image.parquet")
        if wells is not None:
            write_profiles(wells, staging / "profiles_well.parquet")
        write_profiles(profiles, staging / "profiles_evaluated.parquet")
        fault_point("evaluation-parquets")
        (staging / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        (staging / "results.md").write_text(header + results_markdown_table(results))
        projection_plot(profiles, column["batch"], moa_column, staging / "projection_batch_moa.png")
        write_output_marker(staging, OUTPUT_KIND)
        check_output_dir(output_dir, args.model, args.dataset_name)  # it may have changed during a long run
        fault_point("evaluation-swap")
    fault_point("evaluation-written")
    return report


def main(argv: list[str] | None = None) -> int:
    """Evaluate a checkpoint on a screen and print the scores.

    Args:
        argv (`list[str]`, *optional*):
            The arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        `int`: 0 on success.

    Raises:
        SystemExit: ``"cdcl-evaluate: error: <one line>"`` (exit status 1) for a refused output, model or dataset,
            mismatched channels or degenerate data; status 2 for a bad option. With ``--debug`` (or
            ``CDCL_HF_DEBUG=1``) the error itself is raised, with its traceback.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("copairs").setLevel(logging.WARNING)  # it logs every internal step at INFO
    args = parse_args(argv)
    with command_errors(PROG, args.debug):
        report = run(args)
    print(results_markdown_table_from_report(report))
    print(f"wrote {args.output_dir}/results.json, results.md, projection_batch_moa.png and the profile parquets")
    return 0


def results_markdown_table_from_report(report: dict[str, Any]) -> str:
    """The scores of a ``results.json`` report as aligned text lines, one per metric.

    A value flagged not informative (``"informative": false``) is printed in parentheses with its reason, never as a
    bare number; the chance / no-batch value follows where the metric has one.

    Args:
        report (`dict`): The report :func:`run` returns (and writes to ``results.json``).

    Returns:
        `str`: The lines, joined.
    """
    lines = []
    for name, metric in report["metrics"].items():
        if not metric["defined"]:
            value = f"not defined ({metric['reason']})"
        elif not metric.get("informative", True):
            value = f"({metric['value']:.3f}) not informative: {metric['reason']}"
        else:
            value = f"{metric['value']:.3f}"
        reference = reference_note(metric.get("details") or {})
        lines.append(f"{name:>34}: {value}  (n={metric['n']} {metric['unit']}{'; ' + reference if reference else ''})")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
