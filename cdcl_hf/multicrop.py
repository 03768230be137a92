"""Multi-crop views for C-channel microscopy images, on torch tensors only (no torchvision).

CDCL takes two global crops, the first from the image `x` and the second from its partner
`x'`, and splits the local crops between them (the first half from `x`). Fluorescence
channels are not colours, so instead of colour jitter each crop gets a per-channel random gain
N(1, sigma) and offset N(0, sigma) (applied after per-plate normalisation, so sigma is in units of
the plate's standard deviation). Flips and 90-degree rotations are exact symmetries of a field of
view. All randomness comes from one `torch.Generator`, so a crop set is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["MultiCropAugmentation", "crop_sources", "sample_crop_box", "stack_views"]

def crop_sources(num_local_crops: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Which image each view comes from, in view order [global0, global1, local0, ...].

    0 = `x`, 1 = `x'`. Global 0 is from x, global 1 from x'; the first ceil(N/2) local crops
    are from x and the rest from x'. The losses use this for `only_cross_domain`.

    Args:
        num_local_crops (`int`):
            The number N of local crops.
        device (`torch.device` or `str`, *optional*):
            The device of the result.

    Returns:
        `torch.Tensor` of shape `(2 + N,)`: the int64 source of each view.
    """
    num_from_x = num_local_crops - num_local_crops // 2
    local = [0] * num_from_x + [1] * (num_local_crops - num_from_x)
    return torch.tensor([0, 1, *local], dtype=torch.long, device=device)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def sample_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """A random crop box covering `scale` of the image area with aspect `ratio` (log-uniform).

    Scales above 1 (the authors' 0.9-1.1) make boxes larger than the image; after a few attempts to
    fit one, the box is clipped to the image so a crop always exists.

    Args:
        height (`int`):
            The image height.
        width (`int`):
            The image width.
        scale (`tuple[float, float]`):
            The range of the box area, as a fraction of the image area.
        ratio (`tuple[float, float]`):
            The range of the box's aspect ratio.
        generator (`torch.Generator`):
            The random source.
        attempts (`int`, *optional*, defaults to 10):
            How many boxes to draw before clipping.

    Returns:
        `tuple[int, int, int, int]`: `(top, left, h, w)`.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    h = w = 0
    for _ in range(attempts):
        target_area = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            break
    h, w = min(max(h, 1), height), min(max(w, 1), width)
    top = int(torch.randint(0, height - h + 1, (), generator=generator))
    left = int(torch.randint(0, width - w + 1, (), generator=generator))
    return top, left, h, w


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (C,H,W) tensor, reflect padding, kernel radius 3 sigma."""
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, (min(image.shape[-2:]) - 1))  # reflect padding needs pad < size
    if radius < 1:
        return image
    x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = image.shape[0]
    out = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    out = F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return out[0]


@dataclass
class MultiCropAugmentation:
    """2 global + N local crops from an image and its partner.

    Calling it (see `__call__`) returns `{"global_crops": (2,C,G,G), "local_crops": (N,C,L,L)}`;
    view order and sources follow `crop_sources`. With a DataLoader the batch holds (B,2,C,G,G) and
    (B,N,C,L,L).

    Per crop: random resized crop (area `*_scale` of the image, aspect `ratio`), bilinear
    resize with antialiasing, horizontal / vertical flips, a random multiple of 90 degrees,
    per-channel gain N(1, gain_std) and offset N(0, offset_std), then optionally Gaussian blur
    (probability `blur_prob`, sigma uniform in `blur_sigma`) and additive Gaussian noise.

    Args:
        global_size (`int`, *optional*, defaults to 224):
            The side G of the global crops.
        global_scale (`tuple[float, float]`, *optional*, defaults to `(0.9, 1.1)`):
            The area range of the global crops, relative to the image.
        local_size (`int`, *optional*, defaults to 112):
            The side L of the local crops.
        local_scale (`tuple[float, float]`, *optional*, defaults to `(0.3, 0.5)`):
            The area range of the local crops, relative to the image.
        num_local_crops (`int`, *optional*, defaults to 6):
            The number N of local crops.
        ratio (`tuple[float, float]`, *optional*, defaults to `(3 / 4, 4 / 3)`):
            The aspect-ratio range of the crop boxes.
        resize_to (`int`, *optional*):
            Resize each source image (shorter side) to this size first, as the authors' 256.
        flip_prob (`float`, *optional*, defaults to 0.5):
            The flip probability, per axis.
        rotate90 (`bool`, *optional*, defaults to `True`):
            Whether to rotate by a random multiple of 90 degrees.
        gain_std (`float`, *optional*, defaults to 0.1):
            The std of the per-channel gain.
        offset_std (`float`, *optional*, defaults to 0.1):
            The std of the per-channel offset.
        blur_prob (`float`, *optional*, defaults to 0.0):
            The probability of the Gaussian blur.
        blur_sigma (`tuple[float, float]`, *optional*, defaults to `(0.1, 2.0)`):
            The range of the blur's sigma.
        noise_std (`float`, *optional*, defaults to 0.0):
            The std of the additive Gaussian noise.
    """

    global_size: int = 224
    global_scale: tuple[float, float] = (0.9, 1.1)
    local_size: int = 112
    local_scale: tuple[float, float] = (0.3, 0.5)
    num_local_crops: int = 6
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    resize_to: int | None = None  # resize each source image (shorter side) first, as the authors' 256
    flip_prob: float = 0.5  # per axis
    rotate90: bool = True
    gain_std: float = 0.1
    offset_std: float = 0.1
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        for name in ("global_scale", "local_scale", "ratio", "blur_sigma"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must satisfy 0 < low <= high, got {(low, high)}")
        if self.num_local_crops < 0:
            raise ValueError("num_local_crops must be >= 0")

    @property
    def num_views(self) -> int:
        return 2 + self.num_local_crops

    def view_sources(self) -> torch.Tensor:
        return crop_sources(self.num_local_crops)

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        """The image every view is cut from: float32, resized to `resize_to` (shorter side) when set.

        Idempotent (a prepared image is returned as it is), so a data set may prepare an image once, cache it, and
        pass the prepared image to `__call__` with bit-identical views.
        """
        return self._prepare(image)

    def _prepare(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim != 3:
            raise ValueError(f"expected a (C,H,W) tensor, got shape {tuple(image.shape)}")
        image = image.float()
        if self.resize_to is not None:
            h, w = image.shape[-2:]
            factor = self.resize_to / min(h, w)
            size = (max(1, round(h * factor)), max(1, round(w * factor)))
            if size != (h, w):
                image = F.interpolate(
                    image[None], size=size, mode="bilinear", align_corners=False, antialias=True
                )[0]
        return image

    def crop(
        self, image: torch.Tensor, size: int, scale: tuple[float, float], generator: torch.Generator
    ) -> torch.Tensor:
        """One augmented (C,size,size) view of a prepared (C,H,W) image."""
        top, left, h, w = sample_crop_box(image.shape[-2], image.shape[-1], scale, self.ratio, generator)
        view = image[:, top : top + h, left : left + w]
        view = F.interpolate(
            view[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )[0]
        if float(torch.rand((), generator=generator)) < self.flip_prob:
            view = view.flip(-1)
        if float(torch.rand((), generator=generator)) < self.flip_prob:
            view = view.flip(-2)
        if self.rotate90:
            view = torch.rot90(view, int(torch.randint(0, 4, (), generator=generator)), dims=(-2, -1))
        channels = view.shape[0]
        gain = 1.0 + self.gain_std * torch.randn(channels, 1, 1, generator=generator)
        offset = self.offset_std * torch.randn(channels, 1, 1, generator=generator)
        view = view * gain + offset
        if self.blur_prob > 0 and float(torch.rand((), generator=generator)) < self.blur_prob:
            view = _gaussian_blur(view, _uniform(generator, *self.blur_sigma))
        if self.noise_std > 0:
            view = view + self.noise_std * torch.randn(view.shape, generator=generator)
        return view.contiguous()

    def __call__(
        self,
        image: torch.Tensor,
        partner: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Crop an image and its partner.

        Args:
            image (`torch.Tensor` of shape `(C, H, W)`):
                The image `x`.
            partner (`torch.Tensor` of shape `(C, H, W)`, *optional*):
                The partner `x'`; defaults to `image` (the plain DINO case).
            generator (`torch.Generator`, *optional*):
                The random source; a randomly seeded one when `None`.

        Returns:
            `dict[str, torch.Tensor]`: `{"global_crops": (2,C,G,G), "local_crops": (N,C,L,L)}`.
        """
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
        x = self._prepare(image)
        x_partner = x if partner is None or partner is image else self._prepare(partner)
        if x_partner.shape[0] != x.shape[0]:
            raise ValueError(f"image has {x.shape[0]} channels but partner has {x_partner.shape[0]}")
        sources = (x, x_partner)
        global_crops = torch.stack(
            [self.crop(sources[s], self.global_size, self.global_scale, generator) for s in (0, 1)]
        )
        local_sources = crop_sources(self.num_local_crops)[2:].tolist()
        if local_sources:
            local_crops = torch.stack(
                [self.crop(sources[s], self.local_size, self.local_scale, generator) for s in local_sources]
            )
        else:
            local_crops = x.new_zeros((0, x.shape[0], self.local_size, self.local_size))
        return {"global_crops": global_crops, "local_crops": local_crops}


def stack_views(batch: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Batch from a DataLoader -> list of per-view (B,C,H,W) tensors in view order."""
    views = list(batch["global_crops"].unbind(1))
    if "local_crops" in batch and batch["local_crops"].shape[1] > 0:
        views += list(batch["local_crops"].unbind(1))
    return views
