"""Multi-crop views: shapes, sources of each view, the individual augmentations, determinism."""

import numpy as np
import pytest
import torch

from cdcl_hf.multicrop import MultiCropAugmentation, crop_sources, sample_crop_box, stack_views

C = 5


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _plain(**overrides):
    """No photometric noise, no geometry randomness unless asked: isolates one effect per test."""
    settings = dict(
        global_size=16,
        global_scale=(1.0, 1.0),
        local_size=8,
        local_scale=(0.3, 0.5),
        num_local_crops=4,
        ratio=(1.0, 1.0),
        flip_prob=0.0,
        rotate90=False,
        gain_std=0.0,
        offset_std=0.0,
    )
    return MultiCropAugmentation(**{**settings, **overrides})


def test_shapes():
    aug = MultiCropAugmentation(resize_to=40, global_size=32, local_size=16, num_local_crops=6)
    out = aug(torch.rand(C, 50, 60), torch.rand(C, 45, 45), generator=_gen(0))
    assert out["global_crops"].shape == (2, C, 32, 32)
    assert out["local_crops"].shape == (6, C, 16, 16)
    assert out["global_crops"].dtype == torch.float32
    assert aug.num_views == 8
    with pytest.raises(ValueError):
        MultiCropAugmentation(global_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="channels"):
        aug(torch.rand(C, 40, 40), torch.rand(C - 1, 40, 40))


@pytest.mark.parametrize("num_local", [0, 5, 6])
def test_views_come_from_x_and_partner_as_documented(num_local):
    x, partner = torch.full((C, 24, 24), 1.0), torch.full((C, 24, 24), 5.0)
    out = _plain(num_local_crops=num_local, flip_prob=0.5, rotate90=True)(x, partner, generator=_gen(1))
    sources = crop_sources(num_local)
    assert sources[:2].tolist() == [0, 1]
    assert (sources[2:] == 0).sum() == num_local - num_local // 2  # first half (ceil) from x
    view_means = torch.cat([out["global_crops"].flatten(1).mean(1), out["local_crops"].flatten(1).mean(1)])
    assert torch.allclose(view_means, torch.where(sources == 0, 1.0, 5.0))
    assert out["local_crops"].shape[0] == num_local


def test_same_seed_same_views_and_different_seed_differs():
    aug = MultiCropAugmentation(global_size=16, local_size=8, num_local_crops=2, blur_prob=0.5, noise_std=0.1)
    x, partner = torch.rand(C, 32, 32), torch.rand(C, 32, 32)
    a, b, c = (
        aug(x, partner, generator=_gen(3)),
        aug(x, partner, generator=_gen(3)),
        aug(x, partner, generator=_gen(4)),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["global_crops"], c["global_crops"])


def _dihedral(image):
    return [torch.rot90(f, k, dims=(-2, -1)) for f in (image, image.flip(-1)) for k in range(4)]


def test_flips_and_rotations_are_exact_dihedral_transforms():
    x = torch.rand(C, 16, 16)
    aug = _plain(flip_prob=0.5, rotate90=True, num_local_crops=0)
    seen = set()
    for seed in range(40):
        view = aug(x, generator=_gen(seed))["global_crops"][0]
        matches = [i for i, t in enumerate(_dihedral(x)) if torch.allclose(view, t, atol=1e-6)]
        assert matches, "a full-image crop must be one of the 8 symmetries of the image"
        seen.add(matches[0])
    assert len(seen) >= 6  # the random choice actually varies


def test_per_channel_gain_and_offset():
    x = torch.rand(C, 16, 16)
    aug = _plain(gain_std=0.1, offset_std=0.1, num_local_crops=0)
    gains, offsets = [], []
    for seed in range(60):
        view = aug(x, generator=_gen(seed))["global_crops"][0]
        for c in range(C):  # exact linear fit per channel: view_c = g_c * x_c + o_c
            design = torch.stack([x[c].flatten(), torch.ones(256)], 1)
            solution = torch.linalg.lstsq(design, view[c].flatten()[:, None]).solution.flatten()
            assert torch.allclose(design @ solution, view[c].flatten(), atol=1e-5)
            gains.append(float(solution[0]))
            offsets.append(float(solution[1]))
    gains, offsets = np.array(gains), np.array(offsets)
    assert abs(gains.mean() - 1) < 0.03 and 0.07 < gains.std() < 0.13
    assert abs(offsets.mean()) < 0.03 and 0.07 < offsets.std() < 0.13
    assert np.unique(gains[:C].round(6)).size == C  # channels get independent gains


def test_crop_box_respects_scale_and_clips_oversized_boxes():
    gen = _gen(0)
    for _ in range(200):
        top, left, h, w = sample_crop_box(100, 80, (0.3, 0.5), (3 / 4, 4 / 3), gen)
        assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 80
        assert 0.28 * 8000 <= h * w <= 0.52 * 8000
    for _ in range(50):  # the authors' 0.9-1.1: boxes larger than the image get clipped, never fail
        top, left, h, w = sample_crop_box(20, 20, (0.9, 1.1), (3 / 4, 4 / 3), gen)
        assert h <= 20 and w <= 20 and h * w >= 0.8 * 400


def test_local_crops_are_zoomed_regions():
    # A horizontal ramp: a crop of a fraction of the area spans a narrower value range.
    x = torch.linspace(0, 1, 64).expand(C, 64, 64).clone()
    out = _plain(local_scale=(0.1, 0.1), num_local_crops=4)(x, generator=_gen(0))
    span = out["local_crops"].amax(dim=(1, 2, 3)) - out["local_crops"].amin(dim=(1, 2, 3))
    assert (span < 0.45).all() and (span > 0.2).all()


def test_blur_and_noise():
    constant = torch.full((C, 16, 16), 2.0)
    blurred = _plain(blur_prob=1.0, num_local_crops=0)(constant, generator=_gen(0))["global_crops"]
    assert torch.allclose(blurred, constant.expand_as(blurred), atol=1e-5)  # blur keeps constants
    x = torch.rand(C, 16, 16)
    blurred = _plain(blur_prob=1.0, blur_sigma=(1.5, 1.5), num_local_crops=0)(x, generator=_gen(0))[
        "global_crops"
    ][0]
    assert blurred.var() < 0.5 * x.var()
    noisy = _plain(noise_std=0.5, num_local_crops=0)(constant, generator=_gen(0))["global_crops"]
    assert 0.4 < float((noisy - 2.0).std()) < 0.6


def test_stack_views_orders_globals_then_locals():
    batch = {"global_crops": torch.zeros(4, 2, C, 16, 16), "local_crops": torch.ones(4, 3, C, 8, 8)}
    views = stack_views(batch)
    assert [tuple(v.shape) for v in views] == [(4, C, 16, 16)] * 2 + [(4, C, 8, 8)] * 3
