"""Multi-crop views for C-channel microscopy images, on torch tensors only (no torchvision).

CDCL takes two global crops, the first from the image `x` and the second from its partner
`x'`, and splits the local crops between them (the first half from `x`). Fluorescence
channels are not colours, so instead of colour jitter each crop gets a per-channel random gain
N(1, sigma) and offset N(0, sigma) (applied after per-plate normalisation, so sigma is in units of
the plate's standard deviation). Flips and 90-degree rotations are exact symmetries of a field of
view. All randomness comes from one `torch.Generator`, so a crop set is reproducible.

Two ways to cut the same views: per item (`MultiCropAugmentation.__call__`, in the data-loader workers, ~15 small
tensor ops per view) or per batch (`MultiCropAugmentation.crop_batch`, one `affine_grid` + `grid_sample` per view
size for the whole batch, on the device of the images: `cdcl-train --batched_views`). They draw the same
distributions but are not numerically interchangeable (see `crop_batch`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

__all__ = [
    "MultiCropAugmentation",
    "PreparePair",
    "ViewParameters",
    "crop_sources",
    "sample_crop_box",
    "stack_views",
]

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


def _gaussian_blur_views(views: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B,n,C,S,S) views, each with its own sigma (B,n) (0: no blur), reflect padding.

    One kernel radius for all (3 x the largest sigma the recipe can draw, so nothing waits for the device); a view's
    kernel is its own Gaussian over that radius, so a small sigma just gets more near-zero taps.
    """
    batch, num_views, channels, height, width = views.shape
    radius = min(max(1, int(math.ceil(3 * max_sigma))), min(height, width) - 1)
    if radius < 1 or views.numel() == 0:
        return views
    taps = torch.arange(-radius, radius + 1, dtype=views.dtype, device=views.device)
    kernel = torch.exp(-(taps**2) / (2 * sigma.to(views.dtype).clamp_min(1e-6)[..., None] ** 2))  # sigma 0 -> a delta
    kernel = (kernel / kernel.sum(-1, keepdim=True))[:, :, None, :].expand(batch, num_views, channels, -1)
    kernel = kernel.reshape(-1, 1, 1, 2 * radius + 1)
    groups = kernel.shape[0]
    out = F.pad(views.reshape(1, groups, height, width), (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel, groups=groups)
    out = F.conv2d(out, kernel.transpose(-1, -2), groups=groups)
    return out.view(views.shape)


# cos and sin of k x 90 degrees, k = 0..3.
_COS90 = (1.0, 0.0, -1.0, 0.0)
_SIN90 = (0.0, 1.0, 0.0, -1.0)


@dataclass
class ViewParameters:
    r"""
    The random draws behind a batch's views (`MultiCropAugmentation.sample_view_parameters`), each of shape
    `(B, 2 + N, ...)` in view order (see `crop_sources`).

    Args:
        boxes (`torch.Tensor` of shape `(B, V, 4)`): The crop boxes `(top, left, height, width)` in source pixels
            (whole numbers, inside the image).
        flip_horizontal, flip_vertical (`torch.Tensor` of shape `(B, V)`): Whether each view is flipped (bool).
        rotations (`torch.Tensor` of shape `(B, V)`): The number of 90-degree turns (int64, as `torch.rot90`).
        gain, offset (`torch.Tensor` of shape `(B, V, C)`): The per-channel gain and offset.
        blur_sigma (`torch.Tensor` of shape `(B, V)`): The blur's sigma, 0 where a view is not blurred.
    """

    boxes: torch.Tensor
    flip_horizontal: torch.Tensor
    flip_vertical: torch.Tensor
    rotations: torch.Tensor
    gain: torch.Tensor
    offset: torch.Tensor
    blur_sigma: torch.Tensor

    def to(self, device: torch.device | str) -> ViewParameters:
        return ViewParameters(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def affine(self, height: int, width: int) -> torch.Tensor:
        """`(B, V, 2, 3)` matrices for `F.affine_grid` (normalised coordinates, `align_corners=False`).

        A view pixel p (normalised, x right, y down) samples the source at `diag(w/W, h/H) F R^k p + c`: `R^k` undoes
        the k quarter turns (`torch.rot90` maps the view's (x, y) to (-y, x) of its input), `F = diag(+-1, +-1)` the
        flips, the scale and the box centre `c` the crop. Identical to crop -> resize -> flip(-1) -> flip(-2) -> rot90.
        """
        top, left, box_h, box_w = self.boxes.unbind(-1)
        cos = torch.tensor(_COS90, dtype=self.boxes.dtype, device=self.boxes.device)[self.rotations]
        sin = torch.tensor(_SIN90, dtype=self.boxes.dtype, device=self.boxes.device)[self.rotations]
        scale_x = box_w / width * torch.where(self.flip_horizontal, -1.0, 1.0).to(self.boxes.dtype)
        scale_y = box_h / height * torch.where(self.flip_vertical, -1.0, 1.0).to(self.boxes.dtype)
        row_x = torch.stack([scale_x * cos, -scale_x * sin, (2 * left + box_w) / width - 1], -1)
        row_y = torch.stack([scale_y * sin, scale_y * cos, (2 * top + box_h) / height - 1], -1)
        return torch.stack([row_x, row_y], -2)


@dataclass
class PreparePair:
    """A pair-dataset transform for batched views: the prepared image and partner (`image`, `partner_image`), no views.

    `CrossDomainPairDataset` / `CrossDomainPairIterableDataset` call it in place of the `MultiCropAugmentation` (and
    cache what `prepare` returns); the training loop then cuts the views of the whole batch with
    `augmentation.crop_batch(batch["image"], batch["partner_image"], generator)`.

    Args:
        augmentation (`MultiCropAugmentation`): The view recipe whose `prepare` (float32, `resize_to`) is applied.
    """

    augmentation: MultiCropAugmentation

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        return self.augmentation.prepare(image)

    def __call__(
        self, image: torch.Tensor, partner: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        prepared = self.prepare(image)
        same = partner is None or partner is image
        return {"image": prepared, "partner_image": prepared if same else self.prepare(partner)}


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

    def sample_view_parameters(
        self, batch_size: int, channels: int, height: int, width: int, generator: torch.Generator, attempts: int = 10
    ) -> ViewParameters:
        """All random draws of `crop_batch` for B items of (C,H,W), at once, on the generator's device.

        The distributions of the per-item path: box area uniform in `*_scale` of the image, log-uniform aspect in
        `ratio`, the first of `attempts` boxes that fits (else the last, clipped), a uniform position; each flip
        with `flip_prob`; 0-3 quarter turns; gain N(1, gain_std), offset N(0, offset_std) per channel; blur with
        `blur_prob` and sigma uniform in `blur_sigma`.
        """
        device, shape = generator.device, (batch_size, self.num_views)

        def uniform(*size: int) -> torch.Tensor:
            return torch.rand(size, generator=generator, device=device, dtype=torch.float64)

        scales = torch.tensor([self.global_scale] * 2 + [self.local_scale] * self.num_local_crops, dtype=torch.float64,
                              device=device)
        low, high = scales[:, 0, None], scales[:, 1, None]  # (V, 1)
        area = height * width * (low + (high - low) * uniform(*shape, attempts))
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_low + (log_high - log_low) * uniform(*shape, attempts))
        box_w, box_h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
        fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
        chosen = torch.where(fits.any(-1), fits.to(torch.uint8).argmax(-1), attempts - 1)[..., None]  # first fit
        box_h = box_h.gather(-1, chosen)[..., 0].clamp(1, height)
        box_w = box_w.gather(-1, chosen)[..., 0].clamp(1, width)
        top = torch.minimum(torch.floor(uniform(*shape) * (height - box_h + 1)), height - box_h)
        left = torch.minimum(torch.floor(uniform(*shape) * (width - box_w + 1)), width - box_w)
        flip_horizontal = uniform(*shape) < self.flip_prob
        flip_vertical = uniform(*shape) < self.flip_prob
        rotations = torch.randint(0, 4 if self.rotate90 else 1, shape, generator=generator, device=device)
        gain = 1.0 + self.gain_std * torch.randn((*shape, channels), generator=generator, device=device)
        offset = self.offset_std * torch.randn((*shape, channels), generator=generator, device=device)
        blurred = uniform(*shape) < self.blur_prob
        sigma = self.blur_sigma[0] + (self.blur_sigma[1] - self.blur_sigma[0]) * uniform(*shape)
        return ViewParameters(
            boxes=torch.stack([top, left, box_h, box_w], -1).float(),
            flip_horizontal=flip_horizontal,
            flip_vertical=flip_vertical,
            rotations=rotations,
            gain=gain,
            offset=offset,
            blur_sigma=torch.where(blurred, sigma, 0.0).float(),
        )

    def _shrink_sources(self, sources: torch.Tensor, size: int, scale: tuple[float, float]) -> torch.Tensor:
        """Sources shrunk (antialiased, once per batch) so that the smallest box this view size can get is `size`.

        `grid_sample` does not antialias: a view cut from a box k times its side takes one bilinear sample per output
        pixel and aliases for k >= 2 (68 px crops -> 16 px local views: k ~ 2-3). Shrinking the whole source first by
        the smallest factor any box of this size will need leaves `grid_sample` a downscale of at most
        max box side / min box side (~1.7 for the default local scales; more for wide ranges such as DINO's
        (0.05, 0.4)): the rest of the reduction is filtered like the per-item path's. Normalised coordinates are
        unchanged by the resize, so the boxes stay where they were. Costs one batched resize per view size.
        """
        height, width = sources.shape[-2:]
        smallest_area = scale[0] * height * width
        smallest_w = min(math.sqrt(smallest_area * self.ratio[0]), width)  # aspect = w / h
        smallest_h = min(math.sqrt(smallest_area / self.ratio[1]), height)
        target = (min(height, max(size, round(height * size / smallest_h))),
                  min(width, max(size, round(width * size / smallest_w))))
        if target == (height, width):
            return sources
        return F.interpolate(sources, size=target, mode="bilinear", align_corners=False, antialias=True)

    def _cut(
        self, sources: torch.Tensor, theta: torch.Tensor, view_sources: list[int], size: int, scale: tuple[float, float]
    ) -> torch.Tensor:
        """(B,n,C,size,size) views of `sources` (x then x', (2B,C,H,W)), one `grid_sample` for them all.

        The views of each source image sit side by side in one sampling grid of (size, P*size) (P: the most views
        any source gives), so `grid_sample` reads the sources in place instead of a copy per view.
        """
        batch, num_views = theta.shape[:2]
        channels = sources.shape[1]
        if num_views == 0:
            return sources.new_zeros((batch, 0, channels, size, size))
        slots = [view_sources[:i].count(s) for i, s in enumerate(view_sources)]  # the view's place beside its source
        per_source = max(slots) + 1
        grid_theta = torch.eye(2, 3, dtype=theta.dtype, device=theta.device).repeat(2, batch, per_source, 1, 1)
        for view, (source, slot) in enumerate(zip(view_sources, slots, strict=True)):
            grid_theta[source, :, slot] = theta[:, view]
        grid = F.affine_grid(grid_theta.view(-1, 2, 3), [2 * batch * per_source, channels, size, size],
                             align_corners=False)
        grid = grid.view(2, batch, per_source, size, size, 2).transpose(2, 3)  # (2,B,S,P,S,2): views side by side
        grid = grid.reshape(2 * batch, size, per_source * size, 2)
        cut = F.grid_sample(self._shrink_sources(sources, size, scale), grid, mode="bilinear", padding_mode="border",
                            align_corners=False)
        cut = cut.view(2, batch, channels, size, per_source, size).permute(0, 1, 4, 2, 3, 5)  # (2,B,P,C,S,S)
        return torch.stack([cut[source, :, slot] for source, slot in zip(view_sources, slots, strict=True)], 1)

    def crop_batch(
        self,
        images: torch.Tensor,
        partners: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """The views of a whole batch at once, on the images' device: what a DataLoader over `__call__` would give.

        Same recipe and view sources as the per-item path, but each view size is cut by one `affine_grid` +
        `grid_sample` (bilinear) for the whole batch, with the crop box, the flips and the quarter turns folded into
        one affine matrix per view, and the photometric steps batched. `grid_sample` does not antialias; the sources
        are instead shrunk once per view size with an antialiased resize (see `_shrink_sources`), so the remaining
        bilinear downscale is at most the largest over the smallest box side of that view size (~1.2 for the global
        and ~1.7 for the local views with the default scales). Views are therefore close to, not bit-identical with,
        the per-item path's, and the random stream differs too: runs with and without batched views are not
        bit-comparable.

        Args:
            images (`torch.Tensor` of shape `(B, C, H, W)`):
                The prepared images `x` (see `prepare`; one size within a batch).
            partners (`torch.Tensor` of shape `(B, C, H, W)`, *optional*):
                The prepared partners `x'`; defaults to `images` (the plain DINO case).
            generator (`torch.Generator`, *optional*):
                The random source (draws happen on its device, then move to the images'); a randomly seeded one on
                the images' device when `None`.

        Returns:
            `dict[str, torch.Tensor]`: `{"global_crops": (B,2,C,G,G), "local_crops": (B,N,C,L,L)}`, float32.

        Raises:
            `ValueError`: when `images` is not (B,C,H,W) or `partners` has another shape.
        """
        partners = images if partners is None else partners
        if images.ndim != 4 or partners.shape != images.shape:
            raise ValueError(
                "crop_batch needs images and partners of one shape (B,C,H,W); got images "
                f"{tuple(images.shape)} and partners {tuple(partners.shape)}"
            )
        if generator is None:
            generator = torch.Generator(device=images.device).manual_seed(int(torch.randint(0, 2**62, ())))
        batch, channels, height, width = images.shape
        parameters = self.sample_view_parameters(batch, channels, height, width, generator).to(images.device)
        theta = parameters.affine(height, width)
        sources = torch.cat([images, partners]).float()
        view_sources = crop_sources(self.num_local_crops).tolist()
        out = {}
        for key, views, size, scale in (
            ("global_crops", slice(0, 2), self.global_size, self.global_scale),
            ("local_crops", slice(2, None), self.local_size, self.local_scale),
        ):
            crops = self._cut(sources, theta[:, views], view_sources[views], size, scale)
            crops = crops * parameters.gain[:, views, :, None, None] + parameters.offset[:, views, :, None, None]
            if self.blur_prob > 0:
                crops = _gaussian_blur_views(crops, parameters.blur_sigma[:, views], self.blur_sigma[1])
            if self.noise_std > 0:
                noise = torch.randn(crops.shape, generator=generator, device=generator.device)
                crops = crops + self.noise_std * noise.to(crops.device)
            out[key] = crops.contiguous()
        return out


def stack_views(batch: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Batch from a DataLoader -> list of per-view (B,C,H,W) tensors in view order."""
    views = list(batch["global_crops"].unbind(1))
    if "local_crops" in batch and batch["local_crops"].shape[1] > 0:
        views += list(batch["local_crops"].unbind(1))
    return views
