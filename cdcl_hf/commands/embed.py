"""Embed microscopy image files with a CDCL checkpoint and print (or save) the embeddings.

    cdcl-embed --model org/cdcl-vit --images a.npy b.tif --output embeddings.npy
    cdcl-embed --model org/cdcl-vit --channel_files f1_dna.tif f1_actin.tif --channel_files f2_dna.tif f2_actin.tif
    cdcl-embed --demo      # a tiny untrained 5-channel model on random 16-bit images

From a checkout, ``python hub/embed_images.py`` takes the same arguments. Files are read in their stored
dtype (.npy, .tif/.tiff incl. multi-page, .png and other formats Pillow reads; see cdcl_hf.image_io).
The output has one row per --images file, in the order given, followed by one row per --channel_files
group. Images are read and embedded batch by batch, so memory does not grow with the number of files.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModel

# Importing the package (this module's parent) registered the CDCL classes with the Auto classes.
from cdcl_hf import CDCLConfig, CDCLImageProcessor, CDCLModel
from cdcl_hf.embedding import pooled_embedding
from cdcl_hf.image_io import CHANNEL_AXES, ChannelAxis, ScreenDataError, read_image, to_channels_first

DEMO_IMAGES, DEMO_CHANNELS, DEMO_SIZE = 4, 5, 96


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the embedding command.

    Returns:
        `argparse.ArgumentParser`: The parser.
    """
    parser = argparse.ArgumentParser(
        prog="cdcl-embed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="checkpoint folder or Hub id (model and image processor)")
    parser.add_argument("--images", nargs="*", type=Path, default=[],
                        help="image files, one image each (.npy, .tif/.tiff, .png, ...)")
    parser.add_argument("--channel_files", nargs="+", type=Path, action="append", default=[], metavar="FILE",
                        help="one image given as one single-channel file per channel, in channel order (repeatable)")
    parser.add_argument("--channel_axis", choices=CHANNEL_AXES, default="auto",
                        help="axis of the channels in multi-channel files (auto: the short one)")
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--output", type=Path,
                        help="write the (images, dim) float32 embeddings here (.npy; the suffix is added if missing)")
    parser.add_argument("--demo", action="store_true", help="tiny untrained model on random 5-channel images")
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
        `tuple[str, np.ndarray]`: A name for error messages (the file(s)) and the (C, H, W) pixels in the
        stored dtype; ``images`` first, then ``channel_files``.
    """
    for path in images:
        yield os.fspath(path), read_image(path, channel_axis)
    for group in channel_files:
        yield ", ".join(map(os.fspath, group)), read_image(list(group), channel_axis)


def embed_images(
    model: torch.nn.Module,
    processor,
    images: Iterable[tuple[str, np.ndarray]],
    batch_size: int = 32,
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

    def forward(pixels: list[torch.Tensor]) -> np.ndarray:
        with torch.inference_mode():
            output = model(pixel_values=torch.cat(pixels).to(device))
        return pooled_embedding(output).float().cpu().numpy()

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


def _npy_path(path: Path) -> Path:
    # np.save's rule, which --output has always followed: a name not ending in .npy gets it appended.
    return path if str(path).endswith(".npy") else path.with_name(path.name + ".npy")


def write_embeddings(batches: Iterable[np.ndarray], total: int, output: Path | None = None) -> tuple[int, int]:
    """Consume embedding batches, writing them into one .npy file as they come.

    The file is filled through a memory map and renamed into place at the end, so an interrupted run
    leaves no half-written ``output``.

    Args:
        batches (`Iterable[np.ndarray]`):
            (rows, dim) arrays, e.g. from :func:`embed_images`.
        total (`int`):
            The number of rows all batches hold together.
        output (`Path`, *optional*):
            The .npy file to write; without it the batches are only counted.

    Returns:
        `tuple[int, int]`: The (rows, dim) shape of the embeddings.
    """
    rows, dim = 0, 0
    target = _npy_path(output) if output is not None else None
    partial = target.with_name(f".{target.name}.partial") if target is not None else None
    stored = None
    try:
        for batch in batches:
            dim = batch.shape[1]
            if target is not None:
                if stored is None:
                    stored = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(total, dim))
                stored[rows : rows + len(batch)] = batch
            rows += len(batch)
        if rows != total:
            raise RuntimeError(f"expected {total} embeddings, got {rows}")
        if stored is not None:
            stored.flush()
            del stored
            os.replace(partial, target)
    finally:
        if partial is not None and partial.exists():
            partial.unlink()
    return rows, dim


def main(argv: list[str] | None = None) -> int:
    """Embed image files (or the demo images) and print the shape of the embeddings.

    Args:
        argv (`list[str]`, *optional*):
            The arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        `int`: The exit status: 0 on success, 1 when an image cannot be read or embedded (the error,
        naming the file, goes to stderr).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {args.batch_size}")

    if args.demo:
        torch.manual_seed(0)
        model = CDCLModel(CDCLConfig.from_preset("tiny", num_channels=DEMO_CHANNELS))
        processor = CDCLImageProcessor(num_channels=DEMO_CHANNELS, size=32)
        demo = np.random.default_rng(0).integers(0, 40000, size=(DEMO_IMAGES, DEMO_SIZE, DEMO_SIZE, DEMO_CHANNELS),
                                                 dtype=np.uint16)
        images = ((f"demo image {i}", to_channels_first(image, "last")) for i, image in enumerate(demo))
        total = DEMO_IMAGES
    else:
        if not args.model or not (args.images or args.channel_files):
            parser.error("give --model and --images (or --channel_files), or --demo")
        model = AutoModel.from_pretrained(args.model, trust_remote_code=True)
        processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=True)
        images = read_images(args.images, args.channel_files, args.channel_axis)
        total = len(args.images) + len(args.channel_files)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    try:
        rows, dim = write_embeddings(embed_images(model, processor, images, args.batch_size), total, args.output)
    except (ScreenDataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"embedded {rows} images -> embeddings of shape {(rows, dim)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
