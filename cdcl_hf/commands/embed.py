"""Embed microscopy image files with a CDCL checkpoint and save the embeddings, one row per input image.

    cdcl-embed --model org/cdcl-vit --images a.npy b.tif --output embeddings.parquet
    cdcl-embed --model org/cdcl-vit --channel_files f1_dna.tif f1_actin.tif --channel_files f2_dna.tif f2_actin.tif \
        --output embeddings.npy
    cdcl-embed --demo      # a tiny untrained 5-channel model on random 16-bit images

From a checkout, ``python hub/embed_images.py`` takes the same arguments. Files are read in their stored
dtype (.npy, .tif/.tiff incl. multi-page, .png and other formats Pillow reads; see cdcl_hf.image_io).
The output has one row per --images file, in the order given, followed by one row per --channel_files
group. Images are read and embedded batch by batch, so memory does not grow with the number of files.

Output (--output): each row says which file(s) it embeds.
    *.parquet   a `file` column (the image's path; a --channel_files group's paths joined by ";") and
                float32 columns emb_0000, emb_0001, ...
    *.npy       the (images, dim) float32 matrix, and beside it <name>.files.csv: a one-column CSV (`file`)
                naming the file(s) of each row, in row order (another suffix gets .npy appended)
Outputs are written to a temporary file and renamed into place, so they appear whole or not at all. An existing
output is replaced only with --overwrite, and only when an earlier cdcl-embed run wrote it; any other file is
never replaced.

Channels: --channel_names names the files' channels (in stored order); they are then checked against the model's
names and order. When they differ, --channel_order (the files' channels in the model's order) or --channel_map
(DATA=MODEL renames) reorders them. Without names the files are taken to be in the model's order (a warning says
so). A checkpoint without its image processor is refused unless --allow_default_processor. Errors are one line on
stderr (exit status 1); --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import transformers

# Importing the package (this module's parent) registered the CDCL classes with the Auto classes.
from cdcl_hf import CDCLConfig, CDCLImageProcessor, CDCLModel, __version__
from cdcl_hf.cli import CommandParser, add_debug_argument, command_errors, positive_int
from cdcl_hf.configuration_cdcl import POOLING_MODES
from cdcl_hf.cpu_kernels import LINEAR_KERNEL_HELP, LINEAR_KERNELS
from cdcl_hf.embedding import TEST_TIME_AUGMENTATIONS, augmented_embedding, inference_forward
from cdcl_hf.image_io import CHANNEL_AXES, ChannelAxis, read_image, to_channels_first
from cdcl_hf.outputs import OutputSafetyError, remove_stale_temporaries, temporary_prefix
from cdcl_hf.profiling import (
    POOLING_HELP,
    check_model_folder,
    default_processor,
    load_feature_extractor,
    match_channels,
    model_num_channels,
    set_pooling,
)
from cdcl_hf.screen_data import parse_channel_map

PROG = "cdcl-embed"
DEMO_IMAGES, DEMO_CHANNELS, DEMO_SIZE = 4, 5, 96
# The parquet schema metadata key that marks a file as written by this command (see is_embedding_output).
PARQUET_MARKER_KEY = b"cdcl_hf"
FILES_COLUMN = "file"
FILES_SIDECAR_SUFFIX = ".files.csv"
# Rows gathered before a parquet row group is written: bounded memory, without a row group per small batch.
PARQUET_ROWS_PER_GROUP = 4096


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the embedding command.

    Returns:
        `argparse.ArgumentParser`: The parser.
    """
    parser = CommandParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder or Hub id (model and image processor)")
    parser.add_argument("--images", nargs="*", type=Path, default=[],
                        help="image files, one image each (.npy, .tif/.tiff, .png, ...)")
    parser.add_argument("--channel_files", nargs="+", type=Path, action="append", default=[], metavar="FILE",
                        help="one image given as one single-channel file per channel, in channel order (repeatable)")
    parser.add_argument("--channel_axis", choices=CHANNEL_AXES, default="auto",
                        help="axis of the channels in multi-channel files (auto: the short one)")
    parser.add_argument("--batch_size", type=positive_int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--test_time_augmentation", choices=TEST_TIME_AUGMENTATIONS, default="none",
                        help="average each image's embedding over its mirrored (flips: 4 views) or also quarter-turned "
                             "(dihedral: 8) copies")
    parser.add_argument("--compile", dest="compile_model", action="store_true",
                        help="torch.compile the model (dynamic shapes, frozen weights; needs a C++ compiler): ~2x "
                             "faster on an AMD CPU once compiled, which takes tens of seconds; for many images")
    parser.add_argument("--pooling", choices=POOLING_MODES, default=None, help=POOLING_HELP)
    parser.add_argument("--cpu_linear_kernel", choices=LINEAR_KERNELS, default="auto",
                        help=f"without --compile: {LINEAR_KERNEL_HELP}")
    parser.add_argument("--output", type=Path,
                        help="where to write the embeddings: .parquet (a `file` column + emb_* columns) or .npy "
                             "(+ <name>.files.csv naming each row's file); other names get .npy appended")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an --output an earlier cdcl-embed run wrote (nothing else is ever replaced)")
    parser.add_argument("--allow_default_processor", action="store_true",
                        help="embed with a checkpoint that has no image processor (preprocessor_config.json), "
                             "standardising each image on its own")
    channels = parser.add_argument_group("channels")
    channels.add_argument("--channel_names", nargs="+", metavar="NAME",
                          help="the files' channel names in stored order, checked against the model's")
    channels.add_argument("--channel_order", nargs="+", metavar="NAME_OR_INDEX",
                          help="the files' channels (names from --channel_names, or 0-based indices) that feed the "
                               "model's channels, in the model's order")
    channels.add_argument("--channel_map", action="append", metavar="DATA=MODEL",
                          help="rename a channel of --channel_names to the model's name (repeatable), e.g. DAPI=DNA; "
                               "the channels are then put in the model's order")
    parser.add_argument("--demo", action="store_true", help="tiny untrained model on random 5-channel images")
    add_debug_argument(parser)
    return parser


def read_images(
    images: Sequence[str | os.PathLike] = (),
    channel_files: Sequence[Sequence[str | os.PathLike]] = (),
    channel_axis: ChannelAxis = "auto",
) -> Iterator[tuple[str, np.ndarray]]:
    """Read images one at a time, as they are consumed.

    Args:
        images (`Sequence[str | os.PathLike]`, defaults to `()`):
            Files holding one image each.
        channel_files (`Sequence[Sequence[str | os.PathLike]]`, defaults to `()`):
            Images given as one single-channel file per channel; each inner sequence is one image.
        channel_axis (`str`, defaults to `"auto"`):
            Where the channels are in a multi-channel file: ``"auto"``, ``"first"`` or ``"last"``.

    Yields:
        `tuple[str, np.ndarray]`: The image's file(s) (a group's paths joined by ``";"``; also what names the row of
        the output) and the (C, H, W) pixels in the stored dtype; ``images`` first, then ``channel_files``.
    """
    for path in images:
        yield os.fspath(path), read_image(path, channel_axis)
    for group in channel_files:
        yield ";".join(map(os.fspath, group)), read_image(list(group), channel_axis)


def embed_images(
    model: torch.nn.Module,
    processor,
    images: Iterable[tuple[str, np.ndarray]],
    batch_size: int = 32,
    test_time_augmentation: str = "none",
    compile_model: bool = False,
    linear_kernel: str = "auto",
) -> Iterator[np.ndarray]:
    """Pooled embeddings of ``images``, one batch at a time, without gradients.

    Only one batch of images is held at once: ``images`` is consumed as the batches are embedded.

    Args:
        model (`torch.nn.Module`):
            A CDCL model or any transformers vision model (see :func:`cdcl_hf.embedding.pooled_embedding`).
        processor (`CDCLImageProcessor` or another image processor):
            Turns a (C, H, W) array into ``pixel_values``.
        images (`Iterable[tuple[str, np.ndarray]]`):
            (name, (C, H, W) pixels) pairs, e.g. from :func:`read_images`; the name goes into error messages.
        batch_size (`int`, defaults to 32):
            Images per forward pass.
        test_time_augmentation (`str`, defaults to `"none"`):
            ``"flips"`` or ``"dihedral"``: each embedding is the mean over the image's mirrored (and quarter-turned)
            copies (:func:`cdcl_hf.embedding.symmetry_views`), all in the same forward pass.
        compile_model (`bool`, defaults to `False`):
            Run the model through :func:`cdcl_hf.embedding.compiled_for_inference`.
        linear_kernel (`str`, defaults to `"auto"`):
            Without ``compile_model``: the CPU kernel of the linear layers (:func:`cdcl_hf.cpu_kernels.cpu_linear_kernel`).

    Yields:
        `np.ndarray`: (images in the batch, dim) float32 embeddings.

    Raises:
        ValueError: The processor rejects an image (e.g. a channel count the model was not trained on), or
            images of one batch end up with different sizes; the message names the file(s).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    model.eval()
    device = next(model.parameters()).device
    forward_model = inference_forward(model, compile_model, linear_kernel)

    def forward(pixels: list[torch.Tensor]) -> np.ndarray:
        with torch.inference_mode():
            embeddings = augmented_embedding(forward_model, torch.cat(pixels).to(device), test_time_augmentation)
        return embeddings.float().cpu().numpy()

    names: list[str] = []
    pixels: list[torch.Tensor] = []
    for name, image in images:
        try:
            # Processed one by one so that an error names its file, not a position in the batch.
            values = processor(image, return_tensors="pt", input_data_format="channels_first")["pixel_values"]
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from error
        if pixels and values.shape[1:] != pixels[0].shape[1:]:
            raise ValueError(
                f"{name}: processed to shape {tuple(values.shape[1:])}, but {names[0]} to {tuple(pixels[0].shape[1:])}; "
                "images of one batch must share a size (enable the processor's do_resize or do_center_crop)"
            )
        names.append(name)
        pixels.append(values)
        if len(pixels) == batch_size:
            yield forward(pixels)
            names, pixels = [], []
    if pixels:
        yield forward(pixels)


# ---- the output file ---------------------------------------------------------------------------------------------


def output_path(path: Path) -> Path:
    """Where ``--output`` writes: a ``.parquet`` or ``.npy`` path as given; any other name gets ``.npy`` appended
    (np.save's rule, which ``--output`` has always followed)."""
    return path if path.suffix in (".parquet", ".npy") else path.with_name(path.name + ".npy")


def files_sidecar(npy_path: Path) -> Path:
    """The CSV naming the file(s) of each row of an ``.npy`` output: ``emb.npy`` -> ``emb.files.csv``."""
    return npy_path.with_name(npy_path.name[: -len(".npy")] + FILES_SIDECAR_SUFFIX)


def is_embedding_output(path: Path) -> bool:
    """Whether ``path`` is an embedding file an earlier cdcl-embed run wrote (which ``--overwrite`` may replace).

    A ``.parquet`` file carries the marker ``cdcl_hf`` (kind ``"embeddings"``) in its schema metadata. An ``.npy``
    file carries none, so it is recognised with its sidecar: a float32 (rows, dim) matrix with a ``<name>.files.csv``
    beside it whose only column is ``file`` and whose row count is the matrix's.

    Args:
        path (`Path`): An existing ``.parquet`` or ``.npy`` file.

    Returns:
        `bool`: Whether the file (and its sidecar) may be replaced.
    """
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            metadata = pq.read_schema(path).metadata or {}
            return json.loads(metadata.get(PARQUET_MARKER_KEY, b"{}")).get("kind") == "embeddings"
        matrix = np.load(path, mmap_mode="r")
        sidecar = pd.read_csv(files_sidecar(path), dtype=str, keep_default_na=False)
        return (matrix.dtype == np.float32 and matrix.ndim == 2 and list(sidecar.columns) == [FILES_COLUMN]
                and len(sidecar) == matrix.shape[0])
    except Exception:  # noqa: BLE001 - whatever cannot be read as one of ours (empty, truncated, pickled) is not ours
        return False


def check_output(output: Path, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse an output that would replace a file cdcl-embed did not write, or an earlier one without ``overwrite``.

    Args:
        output (`Path`): The ``.parquet`` / ``.npy`` path (see :func:`output_path`).
        overwrite (`bool`): Whether an earlier cdcl-embed output may be replaced.
        inputs (`Iterable`, defaults to `()`): The input image files; the output must not be one of them.

    Raises:
        OutputSafetyError: The output (or its sidecar) is an input, a folder, or a file cdcl-embed did not write.
        FileExistsError: The output is an earlier cdcl-embed output and ``overwrite`` is false.
    """
    targets = [output, *([files_sidecar(output)] if output.suffix == ".npy" else [])]
    existing = [target for target in targets if target.exists() or target.is_symlink()]
    if not existing:
        return
    resolved = {target.resolve() for target in existing}
    for image in inputs:
        if Path(image).resolve() in resolved:
            raise OutputSafetyError(f"--output {output} would replace the input image {image}; choose another --output")
    for target in existing:
        if target.is_dir():
            raise OutputSafetyError(f"--output {target} is a folder; name a .parquet or .npy file")
    if not (output.exists() and is_embedding_output(output)):
        raise OutputSafetyError(
            f"{existing[0]} exists and was not written by cdcl-embed; it is never replaced, with or without "
            "--overwrite. Choose another --output (or move the file away)"
        )
    if not overwrite:
        raise FileExistsError(f"--output {output} exists (an earlier cdcl-embed output); pass --overwrite to replace it")


def write_embeddings(
    batches: Iterable[np.ndarray], files: Sequence[str], output: Path | None = None, model: str | None = None
) -> tuple[int, int]:
    """Consume embedding batches, writing them to ``output`` as they come.

    The rows go to a temporary file beside ``output`` (an ``.npy`` through a memory map, a ``.parquet`` row group
    by row group), renamed into place at the end, so an interrupted run leaves no half-written ``output``.

    Args:
        batches (`Iterable[np.ndarray]`):
            (rows, dim) arrays, e.g. from :func:`embed_images`.
        files (`Sequence[str]`):
            What each row embeds (its file, or a channel group's files joined by ``";"``), in row order.
        output (`Path`, *optional*):
            The ``.parquet`` or ``.npy`` file to write (see :func:`output_path`); without it the batches are only
            counted.
        model (`str`, *optional*):
            The model's name, recorded in a parquet file's metadata.

    Returns:
        `tuple[int, int]`: The (rows, dim) shape of the embeddings.
    """
    total, rows, dim = len(files), 0, 0
    temporaries: list[Path] = []
    writer = stored = None
    pending: list[np.ndarray] = []
    try:
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(output.parent)  # what a killed run left
            handle, name = tempfile.mkstemp(prefix=temporary_prefix(), suffix=output.suffix, dir=output.parent)
            os.close(handle)
            temporaries.append(Path(name))
        for batch in batches:
            dim = batch.shape[1]
            if output is not None and output.suffix == ".npy":
                if stored is None:
                    stored = np.lib.format.open_memmap(temporaries[0], mode="w+", dtype=np.float32, shape=(total, dim))
                stored[rows : rows + len(batch)] = batch
            elif output is not None:
                pending.append(batch.astype(np.float32))
                if sum(len(part) for part in pending) >= PARQUET_ROWS_PER_GROUP:
                    writer = _write_parquet_rows(writer, temporaries[0], pending, files, rows + len(batch), model)
                    pending = []
            rows += len(batch)
        if rows != total:
            raise RuntimeError(f"expected {total} embeddings, got {rows}")
        if output is None:
            return rows, dim
        if output.suffix == ".npy":
            if stored is None:  # no rows at all: an empty (0, 0) matrix
                stored = np.lib.format.open_memmap(temporaries[0], mode="w+", dtype=np.float32, shape=(0, 0))
            stored.flush()
            del stored
            handle, name = tempfile.mkstemp(prefix=temporary_prefix(), suffix=".csv", dir=output.parent)
            os.close(handle)
            temporaries.append(Path(name))
            pd.DataFrame({FILES_COLUMN: list(files)}).to_csv(temporaries[1], index=False)
            # The matrix first: a kill between the two renames leaves a pair is_embedding_output does not
            # recognise (row counts differ) only when an earlier output of another length was replaced.
            os.replace(temporaries[0], output)
            os.replace(temporaries[1], files_sidecar(output))
        else:
            writer = _write_parquet_rows(writer, temporaries[0], pending, files, rows, model, dim=dim)
            writer.close()
            writer = None
            os.replace(temporaries[0], output)
    finally:
        if writer is not None:
            writer.close()
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
    return rows, dim


def _write_parquet_rows(writer, path: Path, pending: list[np.ndarray], files: Sequence[str], end: int,
                        model: str | None, dim: int | None = None):
    """Append ``pending`` (the rows just before ``end``) as one row group, opening the writer on first use."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    matrix = np.concatenate(pending) if pending else np.zeros((0, dim or 0), dtype=np.float32)
    columns = {FILES_COLUMN: pa.array(list(files[end - len(matrix) : end]), type=pa.string())}
    columns.update({f"emb_{i:04d}": pa.array(matrix[:, i]) for i in range(matrix.shape[1])})
    table = pa.table(columns)
    if writer is None:
        marker = {"kind": "embeddings", "written_by": f"cdcl-hf {__version__}", "model": model}
        schema = table.schema.with_metadata({PARQUET_MARKER_KEY: json.dumps(marker).encode()})
        writer = pq.ParquetWriter(path, schema)
    if len(matrix):
        writer.write_table(table.replace_schema_metadata(writer.schema.metadata))
    return writer


# ---- the command -------------------------------------------------------------------------------------------------


def _demo_images() -> Iterator[tuple[str, np.ndarray]]:
    demo = np.random.default_rng(0).integers(0, 40000, size=(DEMO_IMAGES, DEMO_SIZE, DEMO_SIZE, DEMO_CHANNELS),
                                             dtype=np.uint16)
    return ((f"demo image {i}", to_channels_first(image, "last")) for i, image in enumerate(demo))


def _in_model_order(images: Iterator[tuple[str, np.ndarray]], model, processor, args) -> Iterator[tuple[str, np.ndarray]]:
    """``images`` with their channels checked against the model's and reordered as the options say.

    The first image fixes the order (checked before anything is embedded); every image must have its channel count.
    """
    first = next(images, None)
    if first is None:
        return
    channels = first[1].shape[0]
    order = match_channels(model, processor, channels, args.channel_names, parse_channel_map(args.channel_map) or None,
                           args.channel_order, where="the input files")
    for name, image in itertools.chain([first], images):
        if image.shape[0] != channels:
            raise ValueError(f"{name}: {image.shape[0]} channels, but {first[0]} has {channels}; all images must "
                             "have the same channels")
        yield name, (image[order] if order is not None else image)


def run(args: argparse.Namespace) -> tuple[int, int, Path | None]:
    """Embed the images the arguments name and write the output.

    Args:
        args (`argparse.Namespace`): The parsed command line (:func:`build_parser`).

    Returns:
        `tuple`: (rows, dim) of the embeddings and the output written (or `None`).
    """
    output = output_path(args.output) if args.output is not None else None
    inputs = [*args.images, *(path for group in args.channel_files for path in group)]
    if output is not None:
        # Before the model is loaded: a refused output should not cost a model download.
        check_output(output, args.overwrite, inputs)
    if args.demo:
        torch.manual_seed(0)
        model = CDCLModel(CDCLConfig.from_preset("tiny", num_channels=DEMO_CHANNELS))
        if args.pooling is not None:
            set_pooling(model, args.pooling, where="the demo model")
        processor = CDCLImageProcessor(num_channels=DEMO_CHANNELS, size=32)
        images = _demo_images()
        files = [f"demo image {i}" for i in range(DEMO_IMAGES)]
    else:
        check_model_folder(args.model)
        model, processor = load_feature_extractor(args.model, trust_remote_code=True,
                                                  allow_default_processor=args.allow_default_processor,
                                                  pooling=args.pooling)
        if processor is None:
            processor = default_processor(model, model_num_channels(model) or 3)
        images = read_images(args.images, args.channel_files, args.channel_axis)
        files = [os.fspath(path) for path in args.images] + [";".join(map(os.fspath, g)) for g in args.channel_files]
    images = _in_model_order(images, model, processor, args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    embeddings = embed_images(model, processor, images, args.batch_size, args.test_time_augmentation,
                              args.compile_model, args.cpu_linear_kernel)
    rows, dim = write_embeddings(embeddings, files, output, model=None if args.demo else str(args.model))
    return rows, dim, output


def main(argv: list[str] | None = None) -> int:
    """Embed image files (or the demo images), print the shape of the embeddings and save them.

    Args:
        argv (`list[str]`, *optional*):
            The arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        `int`: 0 on success.

    Raises:
        SystemExit: ``"cdcl-embed: error: <one line>"`` (exit status 1) when an image cannot be read or embedded
            (naming the file), the model or the output is refused, or the channels do not fit the model; status 2
            for a bad option. With ``--debug`` (or ``CDCL_HF_DEBUG=1``) the error itself is raised, with its traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.demo and (not args.model or not (args.images or args.channel_files)):
        parser.error("give --model and --images (or --channel_files), or --demo")
    if args.channel_map and args.channel_order:
        parser.error("give --channel_map or --channel_order, not both")
    try:
        parse_channel_map(args.channel_map)
    except ValueError as error:
        parser.error(f"--channel_map: {error}")
    # The command prints one line (or one error line); transformers' weight-loading bar would only add noise.
    transformers.utils.logging.disable_progress_bar()
    with command_errors(PROG, args.debug):
        rows, dim, output = run(args)
    where = ""
    if output is not None:
        where = f"; wrote {output}" + (f" and {files_sidecar(output)}" if output.suffix == ".npy" else "")
    print(f"embedded {rows} images -> embeddings of shape {(rows, dim)}{where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
