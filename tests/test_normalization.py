"""PlateNormalization: the one intensity contract of training, the exported processor and evaluation."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cdcl_hf import CDCLImageProcessor
from cdcl_hf.normalization import PLATE_STD_FLOOR, PlateNormalization, PlateStatistics
from cdcl_hf.screen_data import dataset_from_arrays


def _statistics(image: torch.Tensor) -> PlateStatistics:
    return PlateStatistics("P1", image.double().mean((1, 2)).numpy(), image.double().std((1, 2), unbiased=False).numpy(),
                           1, "all")


def test_normalize_by_the_image_plate():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.normal([[[10.0]], [[200.0]], [[3.0]]], [[[2.0]], [[50.0]], [[0.5]]], (3, 32, 32)))
    normalization = PlateNormalization("plate_all", {"P1": _statistics(image), "P2": ([0, 0, 0], [1, 1, 1])})
    out = normalization.normalize(image, "P1")
    assert out.dtype == torch.float32
    assert torch.allclose(out.mean((1, 2)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(out.std((1, 2), unbiased=False), torch.ones(3), atol=1e-4)
    assert torch.allclose(normalization.normalize(image, "P2"), image.float())
    with pytest.raises(KeyError, match="P9"):
        normalization.normalize(image, "P9")
    with pytest.raises(ValueError, match="channels"):
        normalization.normalize(image[:2], "P1")
    with pytest.raises(ValueError, match="needs per-plate statistics"):
        PlateNormalization("plate_controls")
    with pytest.raises(ValueError, match="normalization mode"):
        PlateNormalization("per_plate", {"P1": ([0], [1])})


def test_a_constant_channel_stays_finite_through_the_floor():
    normalization = PlateNormalization("plate_all", {"P1": ([5.0, 5.0], [0.0, 2.0])})
    out = normalization.normalize(torch.full((2, 4, 4), 5.0), "P1")
    assert torch.isfinite(out).all() and torch.equal(out, torch.zeros(2, 4, 4))
    assert normalization.processor_call_kwargs("P1")["image_std"] == pytest.approx([PLATE_STD_FLOOR, 2.0])


def test_load_normalized_decodes_uint16_planes():
    channels = [np.full((6, 6), 1000 * (c + 1), dtype=np.uint16) for c in range(3)]
    row = {"image": [Image.fromarray(ch) for ch in channels], "plate": "P1"}
    per_plate = PlateNormalization("plate_all", {"P1": ([1000, 2000, 3000], [10, 10, 10])})
    assert torch.allclose(per_plate.load_normalized(row), torch.zeros(3, 6, 6))
    per_image = PlateNormalization("per_image").load_normalized(row)
    assert per_image.shape == (3, 6, 6) and torch.equal(per_image, torch.zeros(3, 6, 6))


def test_exported_processor_and_per_plate_calls_reproduce_training():
    """What training feeds the model == what the exported processor gives with the plate's own statistics."""
    rng = np.random.default_rng(1)
    images = rng.integers(100, 30000, (4, 3, 16, 16)).astype(np.uint16)
    metadata = pd.DataFrame({
        "plate": ["P1", "P1", "P2", "P2"], "well": ["A01", "A02", "A01", "A02"], "site": ["1"] * 4,
        "batch": ["W1", "W1", "W2", "W2"], "compound": ["DMSO", "taxol", "DMSO", "taxol"],
        "concentration": [0.0, 1.0, 0.0, 1.0], "is_control": [True, False, True, False],
    })
    screen = dataset_from_arrays(images, metadata)
    normalization = PlateNormalization.from_screen(screen, "plate_controls")
    kwargs = normalization.processor_kwargs()
    assert kwargs["normalization"] == "per_channel"
    np.testing.assert_allclose(kwargs["image_mean"], images[[0, 2]].mean(axis=(2, 3)).mean(axis=0), rtol=1e-9)
    processor = CDCLImageProcessor(num_channels=3, size=16, **kwargs)
    for row in range(4):
        plate = metadata.plate[row]
        trained = normalization.load_normalized(screen[row])
        served = processor([images[row]], return_tensors="pt", **normalization.processor_call_kwargs(plate))
        torch.testing.assert_close(served["pixel_values"][0], trained, rtol=1e-6, atol=1e-5)
    assert PlateNormalization("per_image").processor_kwargs() == {"normalization": "per_image"}


def _screen(images: np.ndarray, plates: list[str], controls: list[bool]):
    count = len(images)
    metadata = pd.DataFrame({
        "plate": plates, "well": [f"A{i:02d}" for i in range(count)], "site": ["1"] * count, "batch": ["W1"] * count,
        "compound": ["DMSO" if c else "taxol" for c in controls], "concentration": [0.0 if c else 1.0 for c in controls],
        "is_control": controls,
    })
    return dataset_from_arrays(images, metadata)


def test_a_constant_channel_warns_naming_plate_and_channel(caplog):
    rng = np.random.default_rng(2)
    images = rng.integers(100, 3000, (4, 2, 8, 8)).astype(np.uint16)
    images[:2, 1] = 0  # plate P1's controls: channel 1 empty (a missing stain)
    screen = _screen(images, ["P1", "P1", "P2", "P2"], [True, True, True, True])
    caplog.set_level("WARNING", logger="cdcl_hf.normalization")
    normalization = PlateNormalization.from_screen(screen, "plate_controls")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "plate 'P1', channel 1: constant intensity 0 over the plate's 2 control image(s)" in warnings[0]
    assert torch.isfinite(normalization.load_normalized(screen[0])).all()  # the floor keeps it finite
    PlateNormalization("plate_all", {"P1": ([5.0, 0.0], [1.0, 0.0])})
    assert len(caplog.records) == 1  # said once, not again for the same plate and channel


def test_nan_statistics_and_plates_without_images_are_refused():
    with pytest.raises(ValueError, match=r"plate 'P3', channel 1: intensity mean is nan"):
        PlateNormalization("plate_all", {"P1": ([1.0, 2.0], [1.0, 1.0]), "P3": ([1.0, np.nan], [1.0, 1.0])})
    with pytest.raises(ValueError, match=r"plate 'P2', channel 0: intensity std is inf"):
        PlateNormalization("plate_all", {"P2": ([1.0], [np.inf])})
    with pytest.raises(ValueError, match="plate 'P4' has no usable image"):
        PlateNormalization("plate_all", {"P4": PlateStatistics("P4", np.ones(2), np.ones(2), 0, "all")})
    empty = _screen(np.zeros((1, 2, 4, 4), dtype=np.uint16), ["P1"], [True]).select([])
    with pytest.raises(ValueError, match="no images to compute per-plate intensity statistics"):
        PlateNormalization.from_screen(empty, "plate_all")
