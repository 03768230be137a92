"""Batched multi-crop views (`MultiCropAugmentation.crop_batch`, `cdcl-train --batched_views`)."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_train import assert_same_run, train

from cdcl_hf.multicrop import MultiCropAugmentation, PreparePair, crop_sources
from cdcl_hf.pairing import CrossDomainPairDataset, CrossDomainPairIterableDataset, PartnerIndex
from cdcl_hf.training.arguments import changed_resume_settings, parse_args, serializable_arguments
from cdcl_hf.training.data import collate_prepared_pairs


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def all_views(out: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """(B,C,S,S) per view, in view order."""
    return list(out["global_crops"].unbind(1)) + list(out["local_crops"].unbind(1))


@pytest.mark.parametrize("num_local_crops", [0, 3, 4])
def test_shapes_dtype_and_device_match_a_dataloader_batch_of_the_per_item_path(num_local_crops):
    augmentation = MultiCropAugmentation(global_size=12, local_size=6, num_local_crops=num_local_crops)
    images = torch.rand(5, 3, 20, 24, dtype=torch.float64)
    partners = torch.rand(5, 3, 20, 24, dtype=torch.float64)
    out = augmentation.crop_batch(images, partners, generator())
    per_item = torch.utils.data.default_collate([augmentation(images[i], partners[i], generator()) for i in range(5)])
    assert out.keys() == per_item.keys()
    for key in out:
        assert out[key].shape == per_item[key].shape and out[key].dtype == per_item[key].dtype == torch.float32
        assert out[key].device == images.device and out[key].is_contiguous() and torch.isfinite(out[key]).all()
    assert augmentation.crop_batch(images, generator=None)["global_crops"].shape == (5, 2, 3, 12, 12)


def test_a_seed_fixes_the_views():
    augmentation = MultiCropAugmentation(global_size=12, local_size=6, num_local_crops=3, blur_prob=0.5,
                                         noise_std=0.1)
    images, partners = torch.rand(4, 2, 16, 16), torch.rand(4, 2, 16, 16)
    first = augmentation.crop_batch(images, partners, generator(7))
    again = augmentation.crop_batch(images, partners, generator(7))
    other = augmentation.crop_batch(images, partners, generator(8))
    for key in first:
        assert torch.equal(first[key], again[key])
        assert not torch.equal(first[key], other[key])


@pytest.mark.parametrize("num_local_crops", [3, 4])
def test_each_view_comes_from_the_source_crop_sources_names(num_local_crops):
    augmentation = MultiCropAugmentation(global_size=8, local_size=4, num_local_crops=num_local_crops,
                                         gain_std=0.0, offset_std=0.0)
    images, partners = torch.zeros(6, 2, 16, 16), torch.ones(6, 2, 16, 16)  # x = 0, x' = 1
    views = all_views(augmentation.crop_batch(images, partners, generator()))
    sources = crop_sources(num_local_crops).tolist()
    assert len(views) == len(sources)
    for view, source in zip(views, sources, strict=True):
        assert torch.equal(view, torch.full_like(view, float(source)))


def _dihedral(image: torch.Tensor, flip_horizontal: bool, flip_vertical: bool, rotations: int) -> torch.Tensor:
    """The per-item path's order: flip(-1), flip(-2), rot90."""
    if flip_horizontal:
        image = image.flip(-1)
    if flip_vertical:
        image = image.flip(-2)
    return torch.rot90(image, rotations, dims=(-2, -1))


def test_flips_and_rotations_are_exact_for_a_whole_image_box():
    # Box = the whole image, view size = image size: each view is exactly a flip/rotation of its source.
    augmentation = MultiCropAugmentation(global_size=8, local_size=8, num_local_crops=2, global_scale=(1, 1),
                                         local_scale=(1, 1), ratio=(1, 1), gain_std=0.0, offset_std=0.0)
    images, partners = torch.randn(16, 3, 8, 8), torch.randn(16, 3, 8, 8)
    parameters = augmentation.sample_view_parameters(16, 3, 8, 8, generator(3))
    views = all_views(augmentation.crop_batch(images, partners, generator(3)))
    assert (parameters.boxes == torch.tensor([0.0, 0.0, 8.0, 8.0])).all()
    seen = set()
    for v, source in enumerate(crop_sources(2).tolist()):
        for b in range(16):
            flips = (bool(parameters.flip_horizontal[b, v]), bool(parameters.flip_vertical[b, v]))
            rotations = int(parameters.rotations[b, v])
            expected = _dihedral((images, partners)[source][b], *flips, rotations)
            torch.testing.assert_close(views[v][b], expected, rtol=0, atol=1e-5)
            seen.add((*flips, rotations))
    assert len(seen) >= 12  # most of the 16 flip/rotation combinations occur in 64 views


def test_views_without_flips_or_rotations_are_the_image():
    augmentation = MultiCropAugmentation(global_size=8, local_size=8, num_local_crops=1, global_scale=(1, 1),
                                         local_scale=(1, 1), ratio=(1, 1), flip_prob=0.0, rotate90=False,
                                         gain_std=0.0, offset_std=0.0)
    images = torch.randn(4, 2, 8, 8)
    for view in all_views(augmentation.crop_batch(images, images.clone(), generator())):
        torch.testing.assert_close(view, images, rtol=0, atol=1e-5)


def test_boxes_are_cut_like_a_bilinear_resize_of_the_box():
    # Boxes at least the view size and no pre-shrink (the smallest box side is below the view size): each view is the
    # bilinear resize (without antialiasing) of its box, flipped and rotated.
    augmentation = MultiCropAugmentation(global_size=8, local_size=4, num_local_crops=2, global_scale=(0.3, 0.5),
                                         local_scale=(0.06, 0.1), gain_std=0.0, offset_std=0.0)
    images, partners = torch.randn(12, 2, 16, 16), torch.randn(12, 2, 16, 16)
    parameters = augmentation.sample_view_parameters(12, 2, 16, 16, generator(1))
    views = all_views(augmentation.crop_batch(images, partners, generator(1)))
    sizes, checked = [8, 8, 4, 4], 0
    for v, source in enumerate(crop_sources(2).tolist()):
        for b in range(12):
            top, left, height, width = (int(z) for z in parameters.boxes[b, v])
            assert 0 <= top <= 16 - height and 0 <= left <= 16 - width
            if min(height, width) < sizes[v]:
                continue  # upscaled: grid_sample reads the neighbouring pixels at the box's edge, the slice cannot
            box = (images, partners)[source][b][None, :, top : top + height, left : left + width]
            resized = F.interpolate(box, size=(sizes[v], sizes[v]), mode="bilinear", align_corners=False)[0]
            flips = (bool(parameters.flip_horizontal[b, v]), bool(parameters.flip_vertical[b, v]))
            expected = _dihedral(resized, *flips, int(parameters.rotations[b, v]))
            torch.testing.assert_close(views[v][b], expected, rtol=0, atol=1e-5)
            checked += 1
    assert checked >= 24


def test_parameters_follow_the_recipe():
    augmentation = MultiCropAugmentation(global_size=16, local_size=8, num_local_crops=4, flip_prob=0.3,
                                         global_scale=(0.5, 0.7), local_scale=(0.1, 0.2), blur_prob=0.25)
    parameters = augmentation.sample_view_parameters(500, 3, 40, 50, generator())
    top, left, height, width = parameters.boxes.unbind(-1)
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= 40).all() and (left + width <= 50).all()
    area = height * width / (40 * 50)
    assert 0.45 < float(area[:, :2].min()) and float(area[:, :2].max()) < 0.75
    assert 0.08 < float(area[:, 2:].min()) and float(area[:, 2:].max()) < 0.22
    aspect = width / height
    assert 0.7 < float(aspect.min()) and float(aspect.max()) < 1.45
    assert abs(float(torch.log(aspect).mean())) < 0.02  # log-uniform around 1
    for flips in (parameters.flip_horizontal, parameters.flip_vertical):
        assert abs(float(flips.float().mean()) - 0.3) < 0.03
    assert torch.bincount(parameters.rotations.flatten(), minlength=4).min() > 600  # 3000 views, ~750 each
    blurred = parameters.blur_sigma > 0
    assert abs(float(blurred.float().mean()) - 0.25) < 0.03
    assert 0.1 <= float(parameters.blur_sigma[blurred].min()) and float(parameters.blur_sigma.max()) <= 2.0


def test_gain_and_offset_statistics():
    augmentation = MultiCropAugmentation(global_size=8, local_size=4, num_local_crops=4, gain_std=0.2,
                                         offset_std=0.05)
    out = augmentation.crop_batch(torch.zeros(400, 3, 12, 12), torch.ones(400, 3, 12, 12), generator())
    per_channel = torch.cat([out["global_crops"][..., :4, :4], out["local_crops"]], 1).flatten(-2)  # (B,6,C,16)
    assert torch.allclose(per_channel, per_channel[..., :1].expand_as(per_channel), atol=1e-6)  # one value per channel
    values = per_channel[..., 0]  # (B, 6, C): 0 * gain + offset from x, 1 * gain + offset from x'
    from_x, from_partner = crop_sources(4) == 0, crop_sources(4) == 1
    offset, gain_plus_offset = values[:, from_x], values[:, from_partner]
    assert abs(float(offset.mean())) < 0.01 and abs(float(offset.std()) - 0.05) < 0.005
    assert abs(float(gain_plus_offset.mean()) - 1) < 0.02
    assert abs(float(gain_plus_offset.std()) - math.hypot(0.2, 0.05)) < 0.015
    assert not torch.equal(values[..., 0], values[..., 1])  # drawn per channel


def test_blur_and_noise():
    constant = torch.full((8, 2, 16, 16), 3.0)
    blurred = MultiCropAugmentation(global_size=12, local_size=6, num_local_crops=2, gain_std=0.0, offset_std=0.0,
                                    blur_prob=1.0)
    for view in all_views(blurred.crop_batch(constant, constant, generator())):
        torch.testing.assert_close(view, torch.full_like(view, 3.0))  # a normalised kernel keeps a constant
    noisy = MultiCropAugmentation(global_size=12, local_size=6, num_local_crops=2, gain_std=0.0, offset_std=0.0,
                                  noise_std=0.5)
    views = torch.cat([v.flatten() for v in all_views(noisy.crop_batch(constant, constant, generator()))])
    assert abs(float(views.mean()) - 3.0) < 0.03 and abs(float(views.std()) - 0.5) < 0.03
    texture = torch.randn(8, 2, 16, 16)
    sharp = MultiCropAugmentation(global_size=16, local_size=8, num_local_crops=0, global_scale=(1, 1), ratio=(1, 1),
                                  gain_std=0.0, offset_std=0.0)
    smooth = MultiCropAugmentation(global_size=16, local_size=8, num_local_crops=0, global_scale=(1, 1),
                                   ratio=(1, 1), gain_std=0.0, offset_std=0.0, blur_prob=1.0, blur_sigma=(1.5, 2.0))
    assert smooth.crop_batch(texture, generator=generator())["global_crops"].std() < 0.6 * float(
        sharp.crop_batch(texture, generator=generator())["global_crops"].std())


def test_strong_downscaling_is_filtered():
    # A +-1 checkerboard cut to views 4-8x smaller: plain bilinear sampling would keep values near +-1 (aliasing);
    # the antialiased pre-shrink averages the pattern out, as the per-item path's antialiased resize does.
    checkerboard = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 2.0 - 1.0
    images = checkerboard.expand(4, 1, 64, 64).contiguous()
    augmentation = MultiCropAugmentation(global_size=16, local_size=8, num_local_crops=2, gain_std=0.0,
                                         offset_std=0.0)
    for view in all_views(augmentation.crop_batch(images, images, generator())):
        assert float(view.abs().max()) < 0.35, float(view.abs().max())
    per_item = all_views(augmentation(images[0], generator=generator()))
    assert max(float(v.abs().max()) for v in per_item) < 0.35


def test_bad_shapes_raise_one_clear_error():
    augmentation = MultiCropAugmentation(global_size=8, local_size=4, num_local_crops=2)
    with pytest.raises(ValueError, match=r"images \(2, 3, 16, 16\) and partners \(2, 3, 16, 12\)"):
        augmentation.crop_batch(torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 16, 12), generator())
    with pytest.raises(ValueError, match=r"images \(3, 16, 16\)"):
        augmentation.crop_batch(torch.zeros(3, 16, 16), generator=generator())


def test_pair_datasets_yield_prepared_pairs_for_batched_views():
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.random((2, 20, 30), dtype=np.float32)) for _ in range(12)]
    augmentation = MultiCropAugmentation(resize_to=10, global_size=8, local_size=4, num_local_crops=2)
    transform = PreparePair(augmentation)
    index = PartnerIndex(np.arange(12) % 3, np.arange(12) % 2)
    dataset = CrossDomainPairDataset(images, index, transform=transform, seed=1, cache_bytes=2**20)
    item = dataset[0]
    assert item["image"].shape == item["partner_image"].shape == (2, 10, 15)
    assert torch.equal(item["image"], augmentation.prepare(images[item["index"]]))
    assert torch.equal(item["partner_image"], augmentation.prepare(images[item["partner_index"]]))
    assert torch.equal(augmentation.prepare(item["image"]), item["image"])  # idempotent: cached images stay valid
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    out = augmentation.crop_batch(batch["image"], batch["partner_image"], generator())
    assert out["global_crops"].shape == (4, 2, 2, 8, 8) and out["local_crops"].shape == (4, 2, 2, 4, 4)

    rows = [{"image": images[i], "treatment": i % 3, "plate": i % 2} for i in range(12)]
    streamed = next(iter(CrossDomainPairIterableDataset(rows, transform=transform, buffer_size=4)))
    assert streamed["image"].shape == streamed["partner_image"].shape == (2, 10, 15)


def test_training_batches_of_mixed_image_sizes_are_refused_clearly():
    images = [torch.rand(2, 16, 16), torch.rand(2, 16, 20), torch.rand(2, 16, 16), torch.rand(2, 16, 20)]
    index = PartnerIndex([0, 1, 0, 1], [0, 0, 1, 1])  # partners: 0 <-> 2 (16x16), 1 <-> 3 (16x20)
    transform = PreparePair(MultiCropAugmentation(global_size=8, local_size=4))
    dataset = CrossDomainPairDataset(images, index, transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_prepared_pairs)
    with pytest.raises(ValueError, match=r"share one size, got \[\(2, 16, 16\), \(2, 16, 20\)\]; give --resize_to"):
        next(iter(loader))
    same_size = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=[0, 2], collate_fn=collate_prepared_pairs)
    assert next(iter(same_size))["image"].shape == (2, 2, 16, 16)


def test_runs_stored_before_the_flag_can_be_resumed():
    current = serializable_arguments(parse_args([]))
    stored = {k: v for k, v in current.items() if k != "batched_views"}
    assert changed_resume_settings(stored, current) == []
    assert changed_resume_settings(stored, {**current, "batched_views": True}) == ["batched_views: False -> True"]


@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streaming"])
def test_cdcl_train_with_batched_views_trains_and_resumes_exactly(tmp_path, streaming):
    # 104 images / batch 16 = 6 steps per pass: the resume at step 4 is mid-pass, and the run crosses a pass.
    steps = ["--max_train_steps", "8", "--checkpointing_steps", "4", "--batched_views"]
    resumed_with = ["--dataloader_num_workers", "2"]  # map-style: workers must draw the same pairs as the main process
    if streaming:
        subprocess.run([sys.executable, "-m", "cdcl_hf.synthetic_screen", "--output_dir", "screen", "--num_images",
                        "120", "--image_size", "32"], cwd=tmp_path, check=True, capture_output=True)
        steps += ["--dataset_name", "screen", "--streaming", "--shuffle_buffer_size", "32", "--steps_per_epoch", "6"]
        resumed_with = []
    train(tmp_path, *steps, "--output_dir", "straight")
    assert json.loads((tmp_path / "straight" / "training_summary.json").read_text())["finished"]
    assert json.loads((tmp_path / "straight" / "training_args.json").read_text())["batched_views"] is True
    train(tmp_path, *steps, *resumed_with, "--output_dir", "resumed", "--stop_after_steps", "4")
    if not streaming:
        # The views of a batch depend on the flag: a checkpoint made with it is not resumed without it.
        without_flag = [a for a in steps if a != "--batched_views"]
        refused = train(tmp_path, *without_flag, "--output_dir", "resumed", "--resume_from_checkpoint", "latest",
                         expect_success=False)
        assert "batched_views: True -> False" in refused.stderr
    train(tmp_path, *steps, *resumed_with, "--output_dir", "resumed", "--resume_from_checkpoint", "latest")

    assert_same_run(tmp_path / "straight", tmp_path / "resumed", 8,
                    ("model.safetensors", "checkpoints/step_8/model.safetensors"))  # teacher backbone, student
