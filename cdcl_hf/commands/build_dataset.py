"""Turn a high-content screen on disk into a Hugging Face dataset (see docs/dataset-schema.md).

Examples (``cdcl-build-dataset`` is this command once the package is installed; from a checkout,
``python hub/build_dataset.py`` takes the same arguments)::

    # a folder of images + a metadata CSV naming each row's file(s)
    cdcl-build-dataset folder --metadata_csv crops/metadata.csv --image_root crops/images \\
        --channel_names DNA Tubulin Actin --output_dir data/crops --split_column batch --holdout_values Week10

    # the official BBBC021 download
    cdcl-build-dataset bbbc021 --image_csv BBBC021_v1_image.csv --moa_csv BBBC021_v1_moa.csv \\
        --image_root BBBC021 --output_dir data/bbbc021 --num_proc 8 --push_to_hub my-org/bbbc021

    # RxRx1 (metadata.csv + images/<experiment>/Plate<n>/...)
    cdcl-build-dataset rxrx1 --root rxrx1 --output_dir data/rxrx1 --split_column dataset

The output folder must lie outside every input (the CSVs, the image folders): one that is, holds or lies inside an
input is refused. --overwrite replaces only a screen dataset this command wrote, once the new one is complete; a
folder holding anything else is never replaced. Errors are one line on stderr (exit status 1); --debug shows the
traceback.
"""

from __future__ import annotations

import argparse
import logging

from cdcl_hf.cli import (
    CommandParser,
    add_debug_argument,
    command_errors,
    fraction,
    non_negative_int,
    positive_int,
)
from cdcl_hf.dataset_builders import bbbc021_source, build_screen_dataset, folder_source, rxrx1_source
from cdcl_hf.screen_data import parse_column_mapping, parse_column_selection

PROG = "cdcl-build-dataset"


def shard_size(text: str) -> str | int:
    """``--max_shard_size``: a positive size such as ``500MB`` or a number of bytes, checked when parsing."""
    from datasets.utils.py_utils import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(int(text) if text.isdigit() else text)
    except (TypeError, ValueError):
        size = 0
    if size <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size such as 500MB or 2GB, got {text!r}")
    return int(text) if text.isdigit() else text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one sub-command per layout (``folder``, ``bbbc021``, ``rxrx1``).

    Returns:
        `argparse.ArgumentParser`: The parser.
    """
    common = CommandParser(add_help=False)
    out = common.add_argument_group("output")
    out.add_argument("--output_dir", help="folder to write (save_to_disk format + README.md card); written atomically")
    out.add_argument("--push_to_hub", metavar="ORG/NAME", help="also push parquet shards + card to this Hub dataset repo")
    out.add_argument("--private", action="store_true", default=None, help="create the Hub repo as private")
    out.add_argument("--max_shard_size", type=shard_size, default="500MB", help="shard size, e.g. 500MB (default)")
    out.add_argument("--num_shards", type=positive_int,
                     help="exact number of shards per split (overrides --max_shard_size)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace an --output_dir holding a screen dataset this command wrote (nothing else is "
                          "ever replaced)")
    split = common.add_argument_group("splits")
    split.add_argument("--split_column", help="metadata column to split on, e.g. batch (whole groups stay together)")
    split.add_argument("--holdout_values", nargs="+", help="values of --split_column that form the held-out split")
    split.add_argument("--holdout_fraction", type=fraction,
                       help="hold out this fraction (in (0, 1)) of --split_column's groups at random")
    split.add_argument("--holdout_split", default="test", help="name of the held-out split (default: test)")
    split.add_argument("--seed", type=non_negative_int, default=0)
    run = common.add_argument_group("run")
    run.add_argument("--num_proc", type=positive_int, default=1, help="worker processes that decode and encode images")
    run.add_argument("--on_error", choices=("raise", "skip"), default="raise",
                     help="raise (default): stop at the first bad row; skip: skip bad rows and list them in skipped_rows.csv")
    run.add_argument("--select", action="append", metavar="COLUMN=V1,V2",
                     help="keep only rows whose standard column has one of these values (repeatable), e.g. batch=Week1,Week2")
    run.add_argument("--license", help="licence id for the dataset card (e.g. cc0-1.0)")
    run.add_argument("-v", "--verbose", action="store_true")
    add_debug_argument(run)

    parser = CommandParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    layouts = parser.add_subparsers(dest="layout", required=True, metavar="{folder,bbbc021,rxrx1}")

    folder = layouts.add_parser("folder", parents=[common], help="image files + a metadata CSV naming them")
    folder.add_argument("--metadata_csv", required=True)
    folder.add_argument("--image_root", help="folder the CSV's file names are relative to (default: the CSV's folder)")
    folder.add_argument("--image_columns", nargs="+",
                        help="CSV column(s) with file names: one = multi-channel file, several = one file per channel")
    folder.add_argument("--channel_names", nargs="+", help="channel names in order (default: channel_0, ...)")
    folder.add_argument("--column_map", action="append", metavar="THEIRS=STANDARD",
                        help="map a CSV column onto a standard one, e.g. Metadata_Plate=plate (repeatable)")
    folder.add_argument("--control_compounds", nargs="+", default=["DMSO"],
                        help="compounds that are controls when the CSV has no is_control column (default: DMSO)")
    folder.add_argument("--channel_axis", choices=("auto", "first", "last"), default="auto",
                        help="axis of the channels in multi-channel files (auto: the short one)")
    folder.add_argument("--name", help="dataset name for the card")

    bbbc = layouts.add_parser("bbbc021", parents=[common], help="official BBBC021 download layout")
    bbbc.add_argument("--image_csv", required=True, help="BBBC021_v1_image.csv")
    bbbc.add_argument("--moa_csv", required=True, help="BBBC021_v1_moa.csv")
    bbbc.add_argument("--image_root", required=True, help="folder holding the Week<N>/Week<N>_<plate>/ TIFF folders")

    rxrx = layouts.add_parser("rxrx1", parents=[common], help="RxRx1 download layout")
    rxrx.add_argument("--root", required=True, help="folder with metadata.csv and images/")
    rxrx.add_argument("--control_well_types", nargs="+", default=["negative_control", "positive_control"])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Build (and optionally push) a screen dataset; prints a one-line summary.

    Args:
        argv (`list[str]`, *optional*):
            The arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        `int`: 0 on success.

    Raises:
        SystemExit: ``"cdcl-build-dataset: error: <one line>"`` (exit status 1) when the screen's data is bad (naming
            the row and file) or the output is refused; status 2 for a bad option. With ``--debug`` (or
            ``CDCL_HF_DEBUG=1``) the error itself is raised, with its traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.output_dir and not args.push_to_hub:
        parser.error("give --output_dir, --push_to_hub or both")
    try:
        select = parse_column_selection(args.select)
    except ValueError as error:
        parser.error(f"--select: {error}")
    try:
        column_mapping = parse_column_mapping(getattr(args, "column_map", None)) or None  # folder layout only
    except ValueError as error:
        parser.error(f"--column_map: {error}")
    licence = {"license": args.license} if args.license else {}
    with command_errors(PROG, args.debug):
        if args.layout == "folder":
            source = folder_source(
                args.metadata_csv, image_root=args.image_root, image_columns=args.image_columns,
                channel_names=args.channel_names, column_mapping=column_mapping,
                control_compounds=args.control_compounds, channel_axis=args.channel_axis, select=select,
                name=args.name, **licence,
            )
        elif args.layout == "bbbc021":
            source = bbbc021_source(args.image_csv, args.moa_csv, args.image_root, select=select, **licence)
        else:
            source = rxrx1_source(args.root, control_well_types=args.control_well_types, select=select, **licence)
        result = build_screen_dataset(
            source, args.output_dir, args.push_to_hub, max_shard_size=args.max_shard_size, num_shards=args.num_shards,
            split_column=args.split_column, holdout_values=args.holdout_values, holdout_fraction=args.holdout_fraction,
            holdout_split=args.holdout_split, seed=args.seed, num_proc=args.num_proc, on_error=args.on_error,
            overwrite=args.overwrite, private=args.private,
        )
    rows = {name: split.num_rows for name, split in result.dataset.items()}
    where = " and ".join(filter(None, [str(result.output_dir) if result.output_dir else None, result.repo_id]))
    print(f"wrote {rows} rows, {len(result.channel_names)} channels {result.channel_names}, "
          f"{result.image_shape} {result.dtype}, to {where}; skipped {len(result.skipped)} row(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
