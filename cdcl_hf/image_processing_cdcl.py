"""Image processor for CDCL: multi-channel 8/16-bit microscopy images to model inputs, without torchvision.

Accepted inputs, for a processor built with `num_channels=C`:

* numpy arrays or torch tensors of one image, (H, W, C) or (C, H, W), or a batch, (N, H, W, C) or (N, C, H, W);
  2-D (H, W) when C == 1. Integer (uint8, uint16, ...) or float pixels in raw intensity units.
* one image given as a list of C per-channel 2-D arrays or single-channel PIL images (8-bit "L", 16-bit "I;16",
  32-bit "I" / "F") -- the layout of the `image` column of a cdcl-hf screen dataset; a batch is a list of such lists.
* PIL RGB / RGBA images (what `pipeline(...)` and the Hub widgets deliver). These are renderings, not measurements:
  model channel c is fed by RGB channel `rgb_channel_map[c]` (default: c mod 3, so a 5-channel model sees
  R, G, B, R, G; `None` leaves a channel at 0 after normalisation) and the image is always standardised per image
  and channel, because an 8-bit rendering carries none of the intensity scale the stored statistics describe.

Processing: cast to float32 -> resize (bilinear, antialiased) -> optional centre crop -> normalise. Normalisation:
`"per_channel"` subtracts `image_mean` and divides by `image_std` (per channel, raw intensity units -- e.g. the
training set's statistics); `"per_image"` standardises each channel of each image by its own mean and std;
`"none"` leaves raw values.
"""

import re

import numpy as np
import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging

logger = logging.get_logger(__name__)

NORMALIZATION_MODES = ("per_channel", "per_image", "none")
# The names a screen builder gives channels nobody named (channel_0, channel_1, ...): they say nothing about the stain.
# (This file ships with every checkpoint and imports nothing from cdcl_hf, hence its own copy of the rule.)
DEFAULT_CHANNEL_NAME = re.compile(r"channel_\d+")
# Keeps constant (e.g. empty background) channels finite under per-image standardisation.
STD_EPSILON = 1e-6


class CDCLImageProcessorKwargs(ImagesKwargs, total=False):
    num_channels: int
    channel_names: list[str] | None
    normalization: str
    rgb_channel_map: list[int | None] | None


class CDCLImageProcessor(BaseImageProcessor):
    r"""
    Turns C-channel microscopy images into `pixel_values` of shape (batch, C, height, width), float32.

    Args:
        num_channels (`int`, defaults to 3): Channels the model expects.
        channel_names (`list[str]`, *optional*): Stain / channel names, for documentation and checks.
        do_resize (`bool`, defaults to `True`): Resize to `size`.
        size (`dict`, defaults to `{"height": 224, "width": 224}`): Target size; `{"shortest_edge": n}` keeps the
            aspect ratio (combine with a centre crop).
        do_center_crop (`bool`, defaults to `False`): Centre-crop to `crop_size` after resizing.
        crop_size (`dict`, *optional*): `{"height": h, "width": w}`.
        normalization (`str`, defaults to `"per_image"`): `"per_channel"`, `"per_image"` or `"none"`.
        image_mean (`list[float]`, *optional*): Per-channel mean in raw intensity units (for `"per_channel"`).
        image_std (`list[float]`, *optional*): Per-channel std in raw intensity units (for `"per_channel"`).
        rgb_channel_map (`list[int | None]`, *optional*): Which RGB channel feeds each model channel for PIL RGB
            inputs; defaults to `[c % 3 for c in range(num_channels)]`.
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = CDCLImageProcessorKwargs

    def __init__(
        self,
        num_channels: int = 3,
        channel_names: list[str] | None = None,
        do_resize: bool = True,
        size: dict[str, int] | None = None,
        do_center_crop: bool = False,
        crop_size: dict[str, int] | None = None,
        normalization: str = "per_image",
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        rgb_channel_map: list[int | None] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_channels = int(num_channels)
        self.channel_names = list(channel_names) if channel_names is not None else None
        self.do_resize = do_resize
        self.size = _size_dict(size if size is not None else {"height": 224, "width": 224}, "size")
        self.do_center_crop = do_center_crop
        self.crop_size = _size_dict(crop_size, "crop_size") if crop_size is not None else None
        self.normalization = normalization
        self.image_mean = [float(v) for v in image_mean] if image_mean is not None else None
        self.image_std = [float(v) for v in image_std] if image_std is not None else None
        self.rgb_channel_map = (
            list(rgb_channel_map) if rgb_channel_map is not None else [c % 3 for c in range(self.num_channels)]
        )
        self._validate_settings(self.normalization, self.image_mean, self.image_std)

    def _validate_settings(self, normalization, image_mean, image_std):
        if self.num_channels < 1:
            raise ValueError(f"num_channels must be at least 1, got {self.num_channels}")
        if self.channel_names is not None and len(self.channel_names) != self.num_channels:
            raise ValueError(
                f"channel_names has {len(self.channel_names)} entries but num_channels is {self.num_channels}"
            )
        if normalization not in NORMALIZATION_MODES:
            raise ValueError(f"normalization must be one of {NORMALIZATION_MODES}, got {normalization!r}")
        if normalization == "per_channel":
            for name, values in (("image_mean", image_mean), ("image_std", image_std)):
                if values is None or len(values) != self.num_channels:
                    got = "nothing" if values is None else f"{len(values)} values"
                    raise ValueError(
                        f'normalization="per_channel" needs {name} with one value per channel '
                        f"({self.num_channels}), got {got}"
                    )
            if any(not np.isfinite(s) or s <= 0 for s in image_std):
                raise ValueError(f"image_std must be finite and positive, got {image_std}")
        if self.do_center_crop and self.crop_size is None:
            raise ValueError("do_center_crop=True needs crop_size")
        if len(self.rgb_channel_map) != self.num_channels or any(
            c is not None and c not in (0, 1, 2) for c in self.rgb_channel_map
        ):
            raise ValueError(
                f"rgb_channel_map needs one entry per model channel ({self.num_channels}), each 0, 1, 2 or None; "
                f"got {self.rgb_channel_map}"
            )

    def preprocess(
        self,
        images,
        return_tensors: str | None = None,
        normalization: str | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        input_data_format: str | None = None,
        channel_names: list[str] | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Process one image or a batch.

        Args:
            images: One image or a batch, in any of the forms the module docstring lists.
            return_tensors (`str`, *optional*): `"pt"`, `"np"`, ... as in transformers.
            normalization (`str`, *optional*), image_mean (`list[float]`, *optional*), image_std (`list[float]`,
                *optional*): Override the stored settings for this call (e.g. per-plate statistics).
            input_data_format (`str`, *optional*): `"channels_first"` / `"channels_last"`, for arrays whose layout
                is ambiguous.
            channel_names (`list[str]`, *optional*): The images' channel names, in their stored order. Checked
                against the processor's own `channel_names`: when both name their channels, they must be the same
                names in the same order (a `ValueError` names both orders); reorder the images' channels to the
                processor's order first. Unnamed on either side (`None`, or default names `channel_0`, ...): not
                checked, and a warning says so once.
        """
        unknown = set(kwargs) - set(self.valid_kwargs.__annotations__)
        if unknown:
            raise TypeError(f"unexpected arguments for CDCLImageProcessor.preprocess: {sorted(unknown)}")
        if channel_names is not None:
            self._check_channel_names(list(channel_names))
        normalization = normalization or self.normalization
        image_mean = image_mean if image_mean is not None else self.image_mean
        image_std = image_std if image_std is not None else self.image_std
        self._validate_settings(normalization, image_mean, image_std)

        processed = []
        for index, image in enumerate(self._split_batch(images)):
            pixels, is_rgb_rendering = self._to_channels_first(image, input_data_format, index)
            pixels = self._resize_and_crop(torch.from_numpy(pixels))
            if is_rgb_rendering:
                pixels = standardize_per_image(pixels)
                unmapped = [c for c, source in enumerate(self.rgb_channel_map) if source is None]
                pixels[unmapped] = 0.0
            elif normalization == "per_image":
                pixels = standardize_per_image(pixels)
            elif normalization == "per_channel":
                mean = torch.tensor(image_mean, dtype=torch.float32)[:, None, None]
                std = torch.tensor(image_std, dtype=torch.float32)[:, None, None]
                pixels = (pixels - mean) / std
            processed.append(pixels)

        shapes = {tuple(p.shape) for p in processed}
        if len(shapes) > 1:
            raise ValueError(
                f"images in one batch end up with different shapes {sorted(shapes)}; enable do_resize or "
                "do_center_crop so that they share one size"
            )
        pixel_values = torch.stack(processed).numpy()
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    def _check_channel_names(self, names: list[str]) -> None:
        if len(names) != self.num_channels:
            raise ValueError(
                f"the images' channel names {names} are {len(names)}, but this processor expects {self.num_channels} "
                f"channels {self.channel_names if self.channel_names is not None else ''}".rstrip()
            )
        own = self.channel_names
        if not _named(own) or not _named(names):
            unnamed = "this processor's channels" if not _named(own) else "the images' channels"
            logger.warning_once(
                f"{unnamed} are not named, so the images' channel order {names} is not checked against the "
                f"processor's {own}"
            )
            return
        if [str(name) for name in names] != [str(name) for name in own]:
            hint = ""
            if sorted(map(str, names)) == sorted(map(str, own)) and len(set(names)) == len(names):
                order = [list(map(str, names)).index(str(name)) for name in own]
                hint = f" (for channels-first arrays: image[{order}])"
            raise ValueError(
                f"the images' channels are {names} but this processor (and its model) expect {own}, in this order; "
                f"reorder the images' channels to the processor's order{hint} before calling it"
            )

    # ---- input handling -------------------------------------------------------------------------------------

    def _split_batch(self, images) -> list:
        """The list of single images in `images`, whatever batch / per-channel nesting it comes in."""
        if isinstance(images, list | tuple):
            if len(images) == 0:
                raise ValueError("got an empty list of images")
            if self._is_per_channel_list(images):
                return [images]
            batch = []
            for item in images:
                batch.extend(self._split_batch(item) if _is_array_like(item) and item.ndim == 4 else [item])
            return batch
        if _is_array_like(images) and images.ndim == 4:
            return list(images)
        return [images]

    def _is_per_channel_list(self, items) -> bool:
        """A list of C 2-D planes (arrays or single-channel PIL images) is one C-channel image."""
        if self.num_channels == 1 or len(items) != self.num_channels:
            return False
        return all(_is_plane(item) for item in items)

    def _to_channels_first(self, image, input_data_format: str | None, index: int) -> tuple[np.ndarray, bool]:
        """A float32 (C, H, W) array, and whether the input was an RGB rendering."""
        where = f"image {index}"
        if _is_pil(image):
            if image.mode in ("RGB", "RGBA"):
                rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
                self._check_pixels(rgb, where)
                mapped = [rgb[..., source if source is not None else 0] for source in self.rgb_channel_map]
                return np.stack(mapped).astype(np.float32), True
            image = _pil_plane(image, where)

        if isinstance(image, list | tuple):
            if len(image) != self.num_channels or not all(_is_plane(p) for p in image):
                raise ValueError(
                    f"{where}: a list of per-channel planes must hold {self.num_channels} 2-D arrays or "
                    f"single-channel PIL images, got {len(image)} items"
                )
            planes = [_pil_plane(p, where) if _is_pil(p) else _as_numpy(p) for p in image]
            if len({p.shape for p in planes}) > 1:
                raise ValueError(f"{where}: channel planes differ in size: {[p.shape for p in planes]}")
            array = np.stack(planes)
        elif _is_array_like(image):
            array = _as_numpy(image)
            array = self._move_channels_first(array, input_data_format, where)
        else:
            raise ValueError(
                f"{where}: unsupported input type {type(image).__name__}; expected a numpy array, a torch tensor, a "
                "PIL image, or a list of per-channel 2-D arrays"
            )

        if array.dtype.kind not in "uif":
            raise ValueError(f"{where}: pixels must be integer or floating point, got dtype {array.dtype}")
        self._check_pixels(array, where)
        return array.astype(np.float32), False

    def _move_channels_first(self, array: np.ndarray, input_data_format: str | None, where: str) -> np.ndarray:
        channels = self.num_channels
        if array.ndim == 2:
            if channels != 1:
                raise ValueError(
                    f"{where}: got a 2-D array of shape {array.shape} but the model expects {channels} channels; "
                    "pass (H, W, C), (C, H, W) or a list of per-channel planes"
                )
            return array[None]
        if array.ndim != 3:
            raise ValueError(
                f"{where}: expected an image of rank 3 ((H, W, C) or (C, H, W)) or a batch of rank 4, got rank "
                f"{array.ndim} with shape {array.shape}"
            )
        if input_data_format in ("channels_first", "channels_last"):
            first = input_data_format == "channels_first"
            found = array.shape[0] if first else array.shape[-1]
            if found != channels:
                raise ValueError(
                    f"{where}: expected {channels} channels ({input_data_format}), got {found} in shape {array.shape}"
                )
            return array if first else np.moveaxis(array, -1, 0)
        if input_data_format is not None:
            raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', got {input_data_format!r}")
        first_matches, last_matches = array.shape[0] == channels, array.shape[-1] == channels
        if first_matches and last_matches:
            raise ValueError(
                f"{where}: shape {array.shape} is ambiguous (both the first and last axis have {channels} entries); "
                "pass input_data_format='channels_first' or 'channels_last'"
            )
        if last_matches:
            return np.moveaxis(array, -1, 0)
        if first_matches:
            return array
        raise ValueError(
            f"{where}: expected {channels} channels, got an array of shape {array.shape} (neither its first nor its "
            f"last axis has {channels} entries)"
        )

    @staticmethod
    def _check_pixels(array: np.ndarray, where: str) -> None:
        if array.size == 0 or min(array.shape) == 0:
            raise ValueError(f"{where}: image is empty (shape {array.shape})")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise ValueError(f"{where}: image contains {bad} NaN or infinite pixel values")

    # ---- geometry and intensity -----------------------------------------------------------------------------

    def _resize_and_crop(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.do_resize:
            height, width = pixels.shape[-2:]
            if "shortest_edge" in self.size:
                scale = self.size["shortest_edge"] / min(height, width)
                target = (max(1, round(height * scale)), max(1, round(width * scale)))
            else:
                target = (self.size["height"], self.size["width"])
            if target != (height, width):
                pixels = torch.nn.functional.interpolate(
                    pixels[None], size=target, mode="bilinear", align_corners=False, antialias=True
                )[0]
        if self.do_center_crop:
            crop_height, crop_width = self.crop_size["height"], self.crop_size["width"]
            height, width = pixels.shape[-2:]
            if crop_height > height or crop_width > width:
                raise ValueError(
                    f"crop_size {crop_height}x{crop_width} is larger than the (resized) image {height}x{width}"
                )
            top, left = (height - crop_height) // 2, (width - crop_width) // 2
            pixels = pixels[:, top : top + crop_height, left : left + crop_width]
        return pixels



def standardize_per_image(pixels: torch.Tensor) -> torch.Tensor:
    """Each channel of a (C, H, W) image to zero mean and unit std over its own pixels."""
    mean = pixels.mean(dim=(-2, -1), keepdim=True)
    std = pixels.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (pixels - mean) / (std + STD_EPSILON)


def _named(names) -> bool:
    return bool(names) and not all(DEFAULT_CHANNEL_NAME.fullmatch(str(name)) for name in names)


def _size_dict(size, name: str) -> dict[str, int]:
    if isinstance(size, int):
        return {"height": size, "width": size}
    size = dict(size)
    if set(size) not in ({"height", "width"}, {"shortest_edge"}):
        raise ValueError(f'{name} must be an int, {{"height", "width"}} or {{"shortest_edge"}}, got {size}')
    return {key: int(value) for key, value in size.items()}


def _is_pil(value) -> bool:
    return type(value).__module__.startswith("PIL.")


def _is_array_like(value) -> bool:
    return isinstance(value, np.ndarray | torch.Tensor)


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _is_plane(value) -> bool:
    if _is_pil(value):
        return value.mode not in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "P", "LA", "PA")
    return _is_array_like(value) and value.ndim == 2


def _pil_plane(image, where: str) -> np.ndarray:
    if not _is_plane(image):
        raise ValueError(f"{where}: PIL image of mode {image.mode!r} is not a single-channel plane")
    # np.asarray keeps 16-bit ("I;16") and 32-bit ("I", "F") pixels exactly.
    return np.asarray(image)


__all__ = ["CDCLImageProcessor", "NORMALIZATION_MODES", "standardize_per_image"]
