"""Reading microscopy image files and bringing their pixels to (channels, height, width).

The one place that turns image files and stored ``image`` column values into arrays, so that the
dataset builders (:mod:`cdcl_hf.dataset_builders`), the screen dataset schema
(:mod:`cdcl_hf.screen_data`) and the embedding command (:mod:`cdcl_hf.commands.embed`) decode pixels
the same way:

* :func:`read_image_file`: one ``.npy``, ``.tif`` / ``.tiff`` (multi-page and multi-channel
  included) or any other file Pillow reads, in its stored dtype;
* :func:`to_channels_first` and :func:`squeeze_plane`: channel-axis coercion;
* :func:`read_image`: one image given as one file or as one file per channel;
* :func:`decode_image`: a screen dataset's ``image`` column value.

The errors are the :class:`ScreenDataError` family; :mod:`cdcl_hf.screen_data` re-exports them.
They live here, not there, because ``screen_data`` imports this module.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image as PILImage

ChannelAxis = Literal["auto", "first", "last"]
CHANNEL_AXES: tuple[str, ...] = ("auto", "first", "last")
SUPPORTED_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))
TIFF_SUFFIXES = (".tif", ".tiff")


class ScreenDataError(ValueError):
    """Bad screen data (metadata or pixels); the message names the row, file and/or column."""


class ImageReadError(ScreenDataError):
    """An image file exists but cannot be decoded (corrupt, truncated, unsupported)."""


class ImageShapeError(ScreenDataError):
    """An image's channel count, size or dtype differs from the rest of the screen."""


class MissingImageError(ScreenDataError, FileNotFoundError):
    """A file named in the metadata table does not exist."""


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _native_byte_order(array: np.ndarray) -> np.ndarray:
    # Big-endian uint16 (">u2", from "I;16B" PNGs or some .npy files) compares unequal to np.uint16
    # and would be rejected by dtype checks although it holds the same values.
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def _array_from_pil(image: PILImage.Image) -> np.ndarray:
    image.load()  # decode now, so that a truncated file fails here and not in a later np.asarray
    array = np.asarray(image)
    if image.mode == "I" and array.size and array.min() >= 0 and array.max() <= 65535:
        # Pillow widens 16-bit greyscale to int32 "I" for some formats (PGM, and PNG in older
        # Pillow versions); the values fit in 16 bits, so the stored dtype is uint16.
        array = array.astype(np.uint16)
    return _native_byte_order(array)


def _read_tiff(path: str) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tiff:
        series = tiff.series
        first = series[0]
        # Pages written one at a time (tifffile, some acquisition software) come back as one series per
        # page, and tifffile.imread would return only the first: stack same-shaped 2-D series as pages.
        # Anything else (a main image plus thumbnails or reduced levels) is read as its first series.
        if len(series) > 1 and all(len(s.shape) == 2 and s.shape == first.shape and s.dtype == first.dtype for s in series):
            return np.stack([s.asarray() for s in series])
        return first.asarray()


def _decode_file(path: str) -> np.ndarray:
    suffix = Path(path).suffix.lower()
    if suffix == ".npy":
        return _native_byte_order(np.load(path, allow_pickle=False))
    if suffix in TIFF_SUFFIXES:
        return _native_byte_order(_read_tiff(path))
    with PILImage.open(path) as image:
        frames = getattr(image, "n_frames", 1)
        if frames > 1:
            raise ValueError(f"it holds {frames} frames; save a multi-page stack as TIFF or .npy")
        return _array_from_pil(image)


def read_image_file(path: str | os.PathLike, *, where: str | None = None) -> np.ndarray:
    """The array stored in one image file, in its stored dtype and layout (no axis is moved).

    Reads ``.npy`` (``numpy.load``, no pickles), ``.tif`` / ``.tiff`` (``tifffile``: a multi-page or
    multi-channel TIFF gives a 3-D array) and every other format Pillow reads (PNG, PGM, ...; one
    frame). Pillow's int32 widening of 16-bit greyscale is undone, so a 16-bit file gives uint16.

    Args:
        path (`str` or `os.PathLike`):
            The image file.
        where (`str`, *optional*):
            What the file belongs to (e.g. ``"metadata.csv line 12"``); prefixes error messages.

    Returns:
        `np.ndarray`: The stored pixels: (H, W), (H, W, C), (C, H, W) or (pages, H, W).

    Raises:
        MissingImageError: The file does not exist.
        ImageReadError: The file cannot be decoded (truncated, corrupt, not an image); the message
            names the file and the decoder's error.
    """
    path = os.fspath(path)
    prefix = f"{where}: " if where else ""
    if not os.path.isfile(path):
        raise MissingImageError(f"{prefix}image file {path} does not exist")
    try:
        return _decode_file(path)
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - any decoder failure means an unreadable file
        raise ImageReadError(f"{prefix}cannot read image file {path}: {type(error).__name__}: {error}") from error


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------


def to_channels_first(array: np.ndarray, channel_axis: ChannelAxis = "auto", *, where: str = "image") -> np.ndarray:
    """An image as (C, H, W); a 2-D image becomes one channel.

    Args:
        array (`np.ndarray`):
            A 2-D (H, W) or 3-D (C, H, W) / (H, W, C) image.
        channel_axis (`str`, defaults to `"auto"`):
            ``"first"``, ``"last"``, or ``"auto"``: the channel axis is the first or last one, whichever
            is shorter than both other axes (microscopy fields are much larger than their channel count).
        where (`str`, defaults to `"image"`):
            Names the image in error messages (e.g. ``"metadata.csv line 3, file a.npy"``).

    Returns:
        `np.ndarray`: The (C, H, W) array (a view where possible), dtype unchanged.

    Raises:
        ImageShapeError: The array is not 2-D or 3-D, or ``"auto"`` cannot tell the channel axis
            (both or neither end axis is the short one).
    """
    if channel_axis not in CHANNEL_AXES:
        raise ValueError(f"channel_axis must be one of {CHANNEL_AXES}, got {channel_axis!r}")
    array = np.asarray(array)
    if array.ndim == 2:
        return array[np.newaxis]
    if array.ndim != 3:
        raise ImageShapeError(f"{where}: expected a 2-D or 3-D image, got shape {array.shape}")
    if channel_axis == "auto":
        first_is_small = array.shape[0] < min(array.shape[1:])
        last_is_small = array.shape[2] < min(array.shape[:2])
        if first_is_small == last_is_small:
            raise ImageShapeError(
                f"{where}: cannot tell the channel axis of shape {array.shape}; pass channel_axis='first' or 'last'"
            )
        channel_axis = "first" if first_is_small else "last"
    return array if channel_axis == "first" else np.moveaxis(array, -1, 0)


def squeeze_plane(array: np.ndarray, *, where: str = "image") -> np.ndarray:
    """One channel as an (H, W) plane: (H, W), (1, H, W) and (H, W, 1) are accepted.

    Args:
        array (`np.ndarray`):
            A single-channel image.
        where (`str`, defaults to `"image"`):
            Names the plane in error messages.

    Returns:
        `np.ndarray`: The (H, W) plane, dtype unchanged.

    Raises:
        ImageShapeError: The array holds more than one plane.
    """
    array = np.asarray(array)
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:-1])
    if array.ndim != 2:
        raise ImageShapeError(f"{where}: expected one single-channel 2-D plane, got shape {array.shape}")
    return array


def _file_label(where: str | None, path: str) -> str:
    return f"{where}, file {path}" if where else f"image file {path}"


def read_image(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    channel_axis: ChannelAxis = "auto",
    *,
    where: str | None = None,
) -> np.ndarray:
    """One image as (C, H, W), from one multi-channel file or from one file per channel.

    Args:
        files (`str`, `os.PathLike` or a sequence of them):
            One path (or a one-element sequence): a multi-channel or single-channel file, laid out as
            ``channel_axis`` says. Several paths: one single-channel file per channel, in channel order.
        channel_axis (`str`, defaults to `"auto"`):
            ``"auto"``, ``"first"`` or ``"last"``, as in :func:`to_channels_first`; one-file images only.
        where (`str`, *optional*):
            What the image belongs to (e.g. ``"metadata.csv line 12"``); prefixes error messages, which
            also name the file.

    Returns:
        `np.ndarray`: The (C, H, W) pixels in the stored dtype. The dtype is not checked here
        (the builders accept uint8/uint16 only, the image processor also floats).

    Raises:
        MissingImageError: A file does not exist.
        ImageReadError: A file cannot be decoded.
        ImageShapeError: The layout cannot be brought to (C, H, W), a per-channel file holds more than
            one plane, or the per-channel files differ in size or dtype.
    """
    paths = [os.fspath(files)] if isinstance(files, (str, os.PathLike)) else [os.fspath(f) for f in files]
    if not paths:
        raise ValueError(f"{where or 'image'}: no image files given")
    if len(paths) == 1:
        array = read_image_file(paths[0], where=where)
        return to_channels_first(array, channel_axis, where=_file_label(where, paths[0]))
    planes = [squeeze_plane(read_image_file(path, where=where), where=_file_label(where, path)) for path in paths]
    if len({(plane.shape, plane.dtype.str) for plane in planes}) > 1:
        details = ", ".join(f"{path}: {plane.shape} {plane.dtype}" for path, plane in zip(paths, planes, strict=True))
        prefix = f"{where}: its" if where else "the"
        raise ImageShapeError(f"{prefix} channel files differ in size or dtype ({details})")
    return np.stack(planes)


# --------------------------------------------------------------------------------------------
# Screen dataset ``image`` column values
# --------------------------------------------------------------------------------------------


def _decode_stored(source: Any, where: str) -> np.ndarray:
    try:
        with PILImage.open(source) as image:
            return _array_from_pil(image)
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - any decoder failure means a corrupt stored image
        raise ImageReadError(f"{where}: cannot decode the stored image: {type(error).__name__}: {error}") from error


def _plane_from_value(value: Any, where: str = "image channel") -> np.ndarray:
    """One channel of an ``image`` value (PIL image, storage dict, PNG bytes or array) as (H, W)."""
    if isinstance(value, PILImage.Image):
        plane = _array_from_pil(value)
    elif isinstance(value, Mapping):  # undecoded storage: {"bytes": ..., "path": ...}
        if value.get("bytes") is not None:
            plane = _decode_stored(io.BytesIO(value["bytes"]), where)
        elif value.get("path"):
            plane = _decode_stored(value["path"], where)
        else:
            raise ScreenDataError(f"{where}: image value has neither bytes nor path: {value!r}")
    elif isinstance(value, (bytes, bytearray)):
        plane = _decode_stored(io.BytesIO(value), where)
    else:
        plane = _native_byte_order(np.asarray(value.numpy() if hasattr(value, "numpy") else value))
    plane = squeeze_plane(plane, where=where)
    if plane.dtype not in SUPPORTED_DTYPES:
        # Formatters and older readers hand 16-bit greyscale over widened (int32, int64). PNG holds at
        # most 16 bits, so the values fit; cast back so the dtype is the stored one.
        if np.issubdtype(plane.dtype, np.integer) and plane.size and plane.min() >= 0 and plane.max() <= 65535:
            plane = plane.astype(np.uint16)
        else:
            raise ImageShapeError(f"{where}: unsupported pixel type {plane.dtype}; expected uint8 or uint16")
    return plane


def decode_image(value: Any, *, where: str = "image") -> np.ndarray:
    """A screen dataset row's ``image`` value as a (C, H, W) array in the stored dtype (uint8 or uint16).

    Accepts what the ``image`` column yields in every mode: a list of PIL images (default decoding),
    a list of ``{"bytes", "path"}`` dicts (``decode=False``), a list of (H, W) arrays (numpy
    formatting), or an already stacked (C, H, W) array / tensor ((C, 1, H, W) from the torch
    formatter included). Also importable as ``cdcl_hf.screen_data.decode_image``.

    Args:
        value (`Any`):
            The ``image`` value of one row.
        where (`str`, defaults to `"image"`):
            Names the row in error messages (e.g. ``"row 12"``).

    Returns:
        `np.ndarray`: The (C, H, W) pixels.

    Raises:
        ImageReadError: A stored PNG cannot be decoded.
        ImageShapeError: A channel is not one 2-D plane, the channels differ in size or dtype, or the
            pixels are neither uint8 nor uint16.
        ScreenDataError: A storage dict holds neither bytes nor a path.
    """
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):  # torch tensor
        value = value.numpy()
    if isinstance(value, np.ndarray) and value.ndim == 4 and value.shape[1] == 1:
        value = value[:, 0]  # the torch formatter yields (C, 1, H, W)
    if isinstance(value, np.ndarray) and value.ndim == 3:
        value = _native_byte_order(value)
        if value.dtype not in SUPPORTED_DTYPES:
            raise ImageShapeError(f"{where}: unsupported pixel type {value.dtype}; expected uint8 or uint16")
        return value
    if isinstance(value, (PILImage.Image, Mapping, bytes, bytearray)):
        value = [value]
    planes = [_plane_from_value(v, where=f"{where}, channel {index}") for index, v in enumerate(value)]
    if not planes:
        raise ImageShapeError(f"{where}: image value has no channels")
    shapes = {p.shape for p in planes}
    dtypes = {p.dtype for p in planes}
    if len(shapes) > 1 or len(dtypes) > 1:
        raise ImageShapeError(
            f"{where}: channels of one image differ: shapes {sorted(shapes)}, dtypes {sorted(map(str, dtypes))}"
        )
    return np.stack(planes)
