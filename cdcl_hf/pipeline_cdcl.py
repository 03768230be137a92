"""A transformers pipeline that embeds multi-channel microscopy images: files, arrays, tiles of large fields.

Shipped with a published checkpoint (``cdcl_hf.serving.write_serving_files`` copies this file into the export folder and
registers it in ``config.json`` under ``custom_pipelines``), so that, where cdcl-hf is not installed::

    from transformers import pipeline

    embed = pipeline(model="org/cdcl-vit", trust_remote_code=True)  # task: "microscopy-feature-extraction"
    embed("field.tif")                                    # one multi-channel TIFF -> (dim,) float32 array
    embed({"channels": ["dna.tif", "tubulin.tif", "actin.tif"]})     # one file per channel
    embed(np.zeros((1224, 904, 3), np.uint16), image_mean=[...], image_std=[...])  # a plate's own statistics
    embed(["a.npy", "b.npy"])                             # a batch: a list of outputs

The model may be the custom ``CDCLModel`` or a stock transformers backbone (e.g. ``Dinov2Model``); the pooled output
is the model's ``pooler_output`` (the first token of ``last_hidden_state`` for a model without a pooler).

This file is loaded by transformers as a dynamic module, so it imports nothing but numpy, torch, PIL, tifffile,
transformers and the standard library.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import Pipeline

TASK = "microscopy-feature-extraction"
CHANNEL_AXES = ("auto", "first", "last")
# Leading bytes of the file formats accepted as raw bytes (a request body, a decoded base64 string).
NPY_MAGIC = b"\x93NUMPY"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
TIFF_SUFFIXES = (".tif", ".tiff")
# PIL modes that hold one channel; anything else (RGB, palette, CMYK, ...) is a rendering or needs converting.
SINGLE_CHANNEL_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
RGB_MODES = ("RGB", "RGBA")
AUTO = "auto"


class MicroscopyInputError(ValueError):
    """An input the pipeline cannot turn into a C-channel image; the message says what was expected and what came."""


# ---- tiling ----------------------------------------------------------------------------------------------------


def tile_offsets(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of size `tile` every `stride` pixels along a side of `length`, the last flush with the edge.

    The same rule as `cdcl_hf.profiling.tile_offsets` (this file cannot import cdcl_hf; a test checks that they agree).

    Args:
        length (`int`): The image side, in pixels.
        tile (`int`): The tile side.
        stride (`int`): Pixels between the starts of two tiles.

    Returns:
        `list[int]`: The offsets, ascending; the last is `length - tile`, so the tiles cover the side.

    Raises:
        ValueError: `tile` is larger than `length`.
    """
    if tile > length:
        raise ValueError(f"tile size {tile} is larger than the image side {length}")
    offsets = list(range(0, length - tile + 1, stride))
    if offsets[-1] != length - tile:
        offsets.append(length - tile)
    return offsets


def tile_grid(height: int, width: int, tile: tuple[int, int], stride: tuple[int, int]) -> list[tuple[int, int]]:
    """The (top, left) corners of the tiles that cover a `height` x `width` field, row by row.

    Args:
        height (`int`), width (`int`): The field's size.
        tile (`tuple[int, int]`): The tile's (height, width), each at most the field's.
        stride (`tuple[int, int]`): Pixels between tiles, vertically and horizontally.

    Returns:
        `list[tuple[int, int]]`: The corners.
    """
    return [
        (top, left)
        for top in tile_offsets(height, tile[0], stride[0])
        for left in tile_offsets(width, tile[1], stride[1])
    ]


# ---- reading ---------------------------------------------------------------------------------------------------


def _native(array: np.ndarray) -> np.ndarray:
    # Big-endian uint16 (some .npy / TIFF files) holds the same values; torch refuses non-native byte orders.
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def _read_tiff(source) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(source) as tiff:
        series = tiff.series
        first = series[0]
        # Pages written one at a time come back as one series per page: stack same-shaped 2-D series as channels.
        if len(series) > 1 and all(s.shape == first.shape and s.dtype == first.dtype and len(s.shape) == 2 for s in series):
            return np.stack([s.asarray() for s in series])
        return first.asarray()


def _from_pil(image: Image.Image, what: str) -> np.ndarray | Image.Image:
    if getattr(image, "n_frames", 1) > 1:
        raise MicroscopyInputError(f"{what} holds {image.n_frames} frames; save a multi-channel stack as TIFF or .npy")
    if image.mode in RGB_MODES:
        image.load()
        return image.convert("RGB")
    if image.mode not in SINGLE_CHANNEL_MODES:
        raise MicroscopyInputError(
            f"{what} is a PIL image of mode {image.mode!r}; expected a single-channel (8/16-bit greyscale) or RGB image"
        )
    array = np.asarray(image)
    if image.mode == "I" and array.size and array.min() >= 0 and array.max() <= 65535:
        array = array.astype(np.uint16)  # Pillow widens 16-bit greyscale to int32 for some formats
    return _native(array)


def load_image(source: Any, what: str = "image") -> np.ndarray | Image.Image:
    """The pixels of one file, its bytes, an array or a PIL image, in the stored dtype and layout.

    Args:
        source (`str`, `os.PathLike`, `bytes`, `np.ndarray`, `torch.Tensor` or `PIL.Image.Image`):
            A ``.npy``, ``.tif`` / ``.tiff`` (multi-page / multi-channel) or Pillow-readable file (PNG, ...), the
            bytes of such a file, or pixels.
        what (`str`, defaults to `"image"`): Names the input in error messages.

    Returns:
        `np.ndarray` or `PIL.Image.Image`: An array as stored ((H, W), (H, W, C) or (C, H, W)), or an RGB PIL image
        for an 8-bit RGB(A) file (a rendering, handled as the image processor handles RGB images).

    Raises:
        MicroscopyInputError: The file is missing or cannot be decoded, or the input is of an unsupported type.
    """
    if isinstance(source, Image.Image):
        return _from_pil(source, what)
    if isinstance(source, torch.Tensor):
        return source.detach().cpu().numpy()
    if isinstance(source, np.ndarray):
        return _native(source)
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        try:
            if data.startswith(NPY_MAGIC):
                return _native(np.load(io.BytesIO(data), allow_pickle=False))
            if data.startswith(TIFF_MAGICS):
                return _native(_read_tiff(io.BytesIO(data)))
            with Image.open(io.BytesIO(data)) as image:
                return _from_pil(image, what)
        except MicroscopyInputError:
            raise
        except Exception as error:  # noqa: BLE001 - any decoder failure means bytes that are no image file
            raise MicroscopyInputError(
                f"{what}: {len(data)} bytes starting {data[:8]!r} are not a readable NPY, TIFF or PNG file "
                f"({type(error).__name__}: {error})"
            ) from None
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise MicroscopyInputError(f"{what}: file {path} does not exist")
        suffix = os.path.splitext(path)[1].lower()
        try:
            if suffix == ".npy":
                return _native(np.load(path, allow_pickle=False))
            if suffix in TIFF_SUFFIXES:
                return _native(_read_tiff(path))
            with Image.open(path) as image:
                return _from_pil(image, f"{what} ({path})")
        except MicroscopyInputError:
            raise
        except Exception as error:  # noqa: BLE001 - any decoder failure means an unreadable file
            raise MicroscopyInputError(f"{what}: cannot read {path}: {type(error).__name__}: {error}") from None
    raise MicroscopyInputError(
        f"{what}: unsupported input of type {type(source).__name__}; expected a file path, file bytes, a numpy array, "
        "a torch tensor, a PIL image, or {'channels': [one file or 2-D array per channel]}"
    )


def channels_first(array: np.ndarray, num_channels: int, channel_axis: str = AUTO, what: str = "image") -> np.ndarray:
    """An image array as (C, H, W) for a model of `num_channels` channels.

    Args:
        array (`np.ndarray`): (H, W) (one channel), (H, W, C) or (C, H, W).
        num_channels (`int`): The channels the model expects.
        channel_axis (`str`, defaults to `"auto"`): ``"first"``, ``"last"``, or ``"auto"``: the end axis whose length is
            `num_channels` (when both are, the shorter-than-the-others one, as microscopy fields are much larger than
            their channel count).
        what (`str`, defaults to `"image"`): Names the input in error messages.

    Returns:
        `np.ndarray`: The (C, H, W) array, dtype unchanged.

    Raises:
        MicroscopyInputError: The shape does not hold `num_channels` channels, or the channel axis cannot be told.
    """
    if channel_axis not in CHANNEL_AXES:
        raise MicroscopyInputError(f"channel_axis must be one of {CHANNEL_AXES}, got {channel_axis!r}")
    if array.dtype.kind not in "uif":
        raise MicroscopyInputError(f"{what}: pixels must be numbers, got an array of dtype {array.dtype}")
    expected = f"(H, W, {num_channels}) or ({num_channels}, H, W)" if num_channels > 1 else "(H, W)"
    if array.ndim == 2:
        if num_channels != 1:
            raise MicroscopyInputError(
                f"{what}: got one channel of shape {array.shape}, but the model expects {num_channels} channels: "
                f"{expected}; for one file per channel pass {{'channels': [...]}} (or a list of them inside the batch)"
            )
        return array[None]
    if array.ndim != 3:
        raise MicroscopyInputError(f"{what}: expected an image {expected}, got an array of shape {array.shape}")
    first, last = array.shape[0] == num_channels, array.shape[2] == num_channels
    if channel_axis == "first" or (channel_axis == AUTO and first and not last):
        axis = 0
    elif channel_axis == "last" or (channel_axis == AUTO and last and not first):
        axis = 2
    elif channel_axis == AUTO and first and last:
        if array.shape[0] < min(array.shape[1:]) and not array.shape[2] < min(array.shape[:2]):
            axis = 0
        elif array.shape[2] < min(array.shape[:2]) and not array.shape[0] < min(array.shape[1:]):
            axis = 2
        else:
            raise MicroscopyInputError(
                f"{what}: cannot tell the channel axis of shape {array.shape}; pass channel_axis='first' or 'last'"
            )
    else:
        raise MicroscopyInputError(
            f"{what}: the model expects {num_channels} channels, {expected}, but got an array of shape {array.shape}"
        )
    if array.shape[axis] != num_channels:
        raise MicroscopyInputError(
            f"{what}: channel_axis={channel_axis!r} gives {array.shape[axis]} channels in shape {array.shape}, but the "
            f"model expects {num_channels}"
        )
    return array if axis == 0 else np.moveaxis(array, 2, 0)


def _plane(source: Any, what: str) -> np.ndarray:
    pixels = load_image(source, what)
    if isinstance(pixels, Image.Image):
        raise MicroscopyInputError(f"{what} is an RGB image; a per-channel file must hold one greyscale plane")
    pixels = np.asarray(pixels)
    if pixels.ndim == 3 and 1 in (pixels.shape[0], pixels.shape[2]):
        pixels = pixels.reshape(pixels.shape[1:] if pixels.shape[0] == 1 else pixels.shape[:2])
    if pixels.ndim != 2:
        raise MicroscopyInputError(f"{what}: expected one single-channel 2-D plane, got shape {pixels.shape}")
    return pixels


def read_channels(sources: Sequence[Any], num_channels: int, what: str = "image") -> np.ndarray:
    """One image from one file (or 2-D array) per channel, as (C, H, W).

    Args:
        sources (`Sequence`): The channels' files / bytes / 2-D arrays / single-channel PIL images, in the model's
            channel order.
        num_channels (`int`): The channels the model expects.
        what (`str`, defaults to `"image"`): Names the input in error messages.

    Returns:
        `np.ndarray`: The stacked (C, H, W) pixels.

    Raises:
        MicroscopyInputError: Another number of channels, or planes that differ in size or dtype.
    """
    if len(sources) != num_channels:
        raise MicroscopyInputError(
            f"{what}: got {len(sources)} per-channel files/planes, but the model expects {num_channels} channels"
        )
    planes = [_plane(source, f"{what}, channel {index}") for index, source in enumerate(sources)]
    if len({(plane.shape, plane.dtype.str) for plane in planes}) > 1:
        details = ", ".join(f"{plane.shape} {plane.dtype}" for plane in planes)
        raise MicroscopyInputError(f"{what}: the channel planes differ in size or dtype ({details})")
    return np.stack(planes)


# ---- the pipeline ----------------------------------------------------------------------------------------------


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise MicroscopyInputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _statistics(values: Any, name: str) -> list[float] | None:
    if values is None:
        return None
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise MicroscopyInputError(f"{name} must be a list of numbers (one per channel), got {values!r}")
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError):
        raise MicroscopyInputError(f"{name} must be a list of numbers (one per channel), got {list(values)!r}") from None
    if not all(np.isfinite(floats)):
        raise MicroscopyInputError(f"{name} must hold finite numbers, got {floats}")
    return floats


class CDCLMicroscopyPipeline(Pipeline):
    r"""
    Embeds multi-channel 8/16-bit microscopy images, one pooled embedding per image.

    Inputs (one image, or a list of them for a batch; a 4-D array or tensor is a batch of images):

    * a path (or the bytes) of a ``.npy``, multi-page / multi-channel ``.tif`` / ``.tiff`` or PNG file;
    * a numpy array or torch tensor, (H, W, C) or (C, H, W) (the axis of length C; see `channel_axis`);
    * ``{"channels": [file or 2-D array per channel, ...]}`` -- one file per channel, in the model's channel order;
      a tuple, or an inner list inside a batch list, means the same;
    * an RGB PIL image / 8-bit RGB PNG: a rendering, mapped to the model's channels and standardised per image, as
      the image processor does with RGB inputs;
    * a dict ``{"image": <any of the above>, "image_mean": [...], "image_std": [...]}`` gives that image its own
      plate's statistics (useful in a batch that mixes plates).

    Fields larger than the model's input are **tiled**, not resized: cut into tiles of the model's input size (or
    `tile_size`) every `tile_stride` pixels, the last tile flush with the edge, each tile processed as the model was
    trained and embedded; the image's embedding is the mean of its tiles'. Images no larger than the input are
    processed whole (the image processor resizes them).

    Args (of the call, or of `pipeline(...)` as defaults):
        image_mean (`list[float]`, *optional*): Per-channel mean of the image's plate, in raw intensity units; with
            `image_std`, normalises by these statistics (`normalization="per_channel"`) instead of the stored ones.
        image_std (`list[float]`, *optional*): Per-channel standard deviation of the plate.
        tile_size (`int`, `"auto"` or `None`, defaults to `"auto"`): Tile side. `"auto"`: the model's input size,
            used only when the field is larger. `None`: no tiling (the whole field is resized, as the processor does).
            A tile never exceeds the field: on a side shorter than the tile the tile spans that side.
        tile_stride (`int`, *optional*): Pixels between tiles; defaults to the tile size (no overlap).
        return_tiles (`bool`, defaults to `False`): Return a dict with the tiles' embeddings as well.
        channel_axis (`str`, defaults to `"auto"`): Where the channels are in arrays and multi-channel files:
            `"first"`, `"last"` or `"auto"`.
        batch_size (`int`, defaults to 32): Tiles (of one image) per forward pass.

    Returns:
        `np.ndarray` of shape (dim,), float32, per image (a list of them for a list input); with `return_tiles=True` a
        dict with `embedding` (dim,), `tile_embeddings` (tiles, dim), `tile_offsets` ([(top, left), ...]),
        `tile_size` ((height, width)) and `image_size` ((height, width)).
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False

    _SENTINEL = object()

    # ---- parameters --------------------------------------------------------------------------------------------

    def _sanitize_parameters(
        self,
        image_mean=None,
        image_std=None,
        tile_size=_SENTINEL,
        tile_stride=None,
        return_tiles=None,
        channel_axis=None,
        forward_batch_size=None,
        **kwargs,
    ):
        if kwargs:
            raise TypeError(
                f"unexpected argument(s) {sorted(kwargs)} for the microscopy pipeline; it takes image_mean, image_std, "
                "tile_size, tile_stride, return_tiles, channel_axis and batch_size"
            )
        preprocess, forward, postprocess = {}, {}, {}
        if image_mean is not None:
            preprocess["image_mean"] = _statistics(image_mean, "image_mean")
        if image_std is not None:
            preprocess["image_std"] = _statistics(image_std, "image_std")
        if tile_size is not self._SENTINEL:
            if tile_size is not None and tile_size != AUTO:
                tile_size = _positive_int(tile_size, "tile_size")
            preprocess["tile_size"] = tile_size
        if tile_stride is not None:
            preprocess["tile_stride"] = _positive_int(tile_stride, "tile_stride")
        if channel_axis is not None:
            if channel_axis not in CHANNEL_AXES:
                raise MicroscopyInputError(f"channel_axis must be one of {CHANNEL_AXES}, got {channel_axis!r}")
            preprocess["channel_axis"] = channel_axis
        if forward_batch_size is not None:
            forward["forward_batch_size"] = _positive_int(forward_batch_size, "batch_size")
        if return_tiles is not None:
            postprocess["return_tiles"] = bool(return_tiles)
        return preprocess, forward, postprocess

    def __call__(self, inputs, **kwargs):
        """Embed one image or a list of images; see the class docstring for inputs, options and outputs."""
        # A batch of images is a list; the base class would hand a list-typed batch to a DataLoader whose collation
        # cannot stack images of different tile counts, so every image runs alone and `batch_size` counts the tiles
        # of one image per forward pass instead.
        batch_size = kwargs.pop("batch_size", None)
        if batch_size is None:
            batch_size = self._batch_size
        if batch_size is not None:
            kwargs["forward_batch_size"] = batch_size
        if isinstance(inputs, np.ndarray | torch.Tensor) and inputs.ndim == 4:
            inputs = list(inputs)
        if isinstance(inputs, list | tuple) and not inputs:
            raise MicroscopyInputError("got an empty list of images")
        return super().__call__(inputs, batch_size=1, **kwargs)

    # ---- geometry ----------------------------------------------------------------------------------------------

    @property
    def num_channels(self) -> int:
        """The channel count of the model's input (image processor's, else the model config's; 3 if neither says)."""
        channels = getattr(self.image_processor, "num_channels", None)
        if channels is None:
            channels = getattr(self.model.config, "num_channels", 3)
        return int(channels)

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the model's input: the processor's crop or resize size, else the config's image_size."""
        processor = self.image_processor
        crop, size = getattr(processor, "crop_size", None), getattr(processor, "size", None)
        for candidate in ((crop if getattr(processor, "do_center_crop", False) else None), size):
            if isinstance(candidate, Mapping):
                if "height" in candidate and "width" in candidate:
                    return int(candidate["height"]), int(candidate["width"])
                if "shortest_edge" in candidate:
                    return int(candidate["shortest_edge"]), int(candidate["shortest_edge"])
        image_size = getattr(self.model.config, "image_size", 224)
        image_size = image_size if isinstance(image_size, Sequence) else (image_size, image_size)
        return int(image_size[0]), int(image_size[1])

    def _tile_shape(self, height: int, width: int, tile_size) -> tuple[int, int] | None:
        if tile_size is None:
            return None
        if tile_size == AUTO:
            target = self.input_size
            if height <= target[0] and width <= target[1]:
                return None
        else:
            target = (tile_size, tile_size)
        # On a side shorter than the tile, the tile spans the side (the processor then resizes it to the input).
        return min(target[0], height), min(target[1], width)

    # ---- steps -------------------------------------------------------------------------------------------------

    def _pixels(self, item: Any, channel_axis: str) -> tuple[np.ndarray | Image.Image, dict]:
        """The item's pixels ((C, H, W) array or RGB PIL image) and its own statistics, if it carries them."""
        overrides = {}
        if isinstance(item, list | tuple):  # one image given as one file / plane per channel
            item = {"channels": list(item)}
        if isinstance(item, Mapping):
            unknown = set(item) - {"image", "channels", "image_mean", "image_std"}
            if unknown or ("image" in item) == ("channels" in item):
                raise MicroscopyInputError(
                    "a dict input needs exactly one of 'image' or 'channels' (plus optional 'image_mean', 'image_std'); "
                    f"got keys {sorted(item)}"
                )
            for name in ("image_mean", "image_std"):
                if item.get(name) is not None:
                    overrides[name] = _statistics(item[name], name)
            if "channels" in item:
                channels = item["channels"]
                if isinstance(channels, str | bytes) or not isinstance(channels, Sequence):
                    raise MicroscopyInputError(
                        f"'channels' must be a list of per-channel files or 2-D arrays, got {type(channels).__name__}"
                    )
                return read_channels(list(channels), self.num_channels), overrides
            item = item["image"]
            if isinstance(item, list | tuple):
                return read_channels(list(item), self.num_channels), overrides
        pixels = load_image(item)
        if isinstance(pixels, Image.Image):
            return pixels, overrides
        return channels_first(np.asarray(pixels), self.num_channels, channel_axis), overrides

    def preprocess(self, item, image_mean=None, image_std=None, tile_size=AUTO, tile_stride=None, channel_axis=AUTO):
        pixels, overrides = self._pixels(item, channel_axis)
        image_mean = overrides.get("image_mean", image_mean)
        image_std = overrides.get("image_std", image_std)
        if (image_mean is None) != (image_std is None):
            raise MicroscopyInputError("pass both image_mean and image_std (the plate's statistics), or neither")
        is_rendering = isinstance(pixels, Image.Image)
        height, width = (pixels.height, pixels.width) if is_rendering else pixels.shape[1:]
        tile = self._tile_shape(height, width, tile_size)
        if tile is None:
            offsets, tile, tiles = [(0, 0)], (height, width), [pixels]
        else:
            stride = (tile_stride, tile_stride) if tile_stride is not None else tile
            offsets = tile_grid(height, width, tile, stride)
            if is_rendering:
                tiles = [pixels.crop((left, top, left + tile[1], top + tile[0])) for top, left in offsets]
            else:
                tiles = [pixels[:, top : top + tile[0], left : left + tile[1]] for top, left in offsets]

        processor_kwargs: dict[str, Any] = {"return_tensors": "pt"}
        if not is_rendering:
            # The arrays are (C, H, W) already; saying so avoids guessing when a tile side equals the channel count.
            processor_kwargs["input_data_format"] = "channels_first"
        if image_mean is not None:
            if hasattr(self.image_processor, "normalization"):
                processor_kwargs["normalization"] = "per_channel"
            processor_kwargs.update(image_mean=image_mean, image_std=image_std)
        pixel_values = self.image_processor(tiles, **processor_kwargs)["pixel_values"]
        if self.dtype is not None:
            pixel_values = pixel_values.to(self.dtype)
        return {
            "pixel_values": pixel_values,
            "tile_offsets": offsets,
            "tile_size": tile,
            "image_size": (int(height), int(width)),
        }

    def _forward(self, model_inputs, forward_batch_size=32):
        pieces = []
        for chunk in model_inputs["pixel_values"].split(forward_batch_size):
            output = self.model(pixel_values=chunk)
            pooled = output.get("pooler_output")
            if pooled is None:  # a backbone without a pooler: its first (CLS) token
                pooled = output["last_hidden_state"][:, 0]
            pieces.append(pooled.reshape(pooled.shape[0], -1).float())
        return {key: value for key, value in model_inputs.items() if key != "pixel_values"} | {
            "tile_embeddings": torch.cat(pieces)
        }

    def postprocess(self, model_outputs, return_tiles=False):
        tiles = model_outputs["tile_embeddings"].cpu().numpy().astype(np.float32)
        embedding = tiles.mean(axis=0)
        if not return_tiles:
            return embedding
        return {
            "embedding": embedding,
            "tile_embeddings": tiles,
            "tile_offsets": [tuple(int(v) for v in offset) for offset in model_outputs["tile_offsets"]],
            "tile_size": tuple(int(v) for v in model_outputs["tile_size"]),
            "image_size": tuple(int(v) for v in model_outputs["image_size"]),
        }


__all__ = [
    "TASK",
    "CDCLMicroscopyPipeline",
    "MicroscopyInputError",
    "channels_first",
    "load_image",
    "read_channels",
    "tile_grid",
    "tile_offsets",
]
