"""CDCLImageProcessor: every accepted input form, normalisation modes, save/load, and clear errors."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from cdcl_hf import CDCLConfig, CDCLImageProcessor


def uint16_image(channels=5, height=40, width=48, seed=0):
    return np.random.default_rng(seed).integers(500, 30000, size=(height, width, channels), dtype=np.uint16)


def test_channels_last_channels_first_tensor_and_planes_agree():
    processor = CDCLImageProcessor(num_channels=5, size=32)
    image = uint16_image()
    reference = processor(image, return_tensors="pt")["pixel_values"]
    assert reference.shape == (1, 5, 32, 32) and reference.dtype == torch.float32
    channels_first = np.moveaxis(image, -1, 0)
    for same_image in (
        channels_first,
        torch.from_numpy(channels_first.astype(np.int32)),
        [channels_first[c] for c in range(5)],
        [Image.fromarray(channels_first[c]) for c in range(5)],  # 16-bit PIL planes ("I;16")
    ):
        torch.testing.assert_close(processor(same_image, return_tensors="pt")["pixel_values"], reference)


def test_batches_in_every_form():
    processor = CDCLImageProcessor(num_channels=5, size=32)
    images = [uint16_image(seed=s) for s in range(3)]
    from_list = processor(images, return_tensors="pt")["pixel_values"]
    from_stack = processor(np.stack(images), return_tensors="pt")["pixel_values"]
    from_planes = processor(
        [[np.ascontiguousarray(im[..., c]) for c in range(5)] for im in images], return_tensors="pt"
    )["pixel_values"]
    assert from_list.shape == (3, 5, 32, 32)
    torch.testing.assert_close(from_stack, from_list)
    torch.testing.assert_close(from_planes, from_list)


def test_uint8_uint16_and_float_inputs_give_the_same_values():
    processor = CDCLImageProcessor(num_channels=3, size=16, normalization="none", do_resize=False)
    image8 = np.random.default_rng(0).integers(0, 255, size=(16, 16, 3), dtype=np.uint8)
    as8 = processor(image8, return_tensors="pt")["pixel_values"]
    as16 = processor(image8.astype(np.uint16), return_tensors="pt")["pixel_values"]
    as_float = processor(image8.astype(np.float64), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(as8, as16)
    torch.testing.assert_close(as8, as_float)
    # No silent 8-bit rescaling: raw intensities come through unchanged.
    assert as16.max().item() == image8.max()


def test_single_channel_16bit_pil_image():
    processor = CDCLImageProcessor(num_channels=1, size=32)
    plane = np.random.default_rng(0).integers(0, 65535, size=(50, 40), dtype=np.uint16)
    pil = Image.fromarray(plane)
    assert pil.mode == "I;16"
    torch.testing.assert_close(
        processor(pil, return_tensors="pt")["pixel_values"], processor(plane, return_tensors="pt")["pixel_values"]
    )


def test_per_channel_normalisation_uses_the_stored_statistics():
    mean, std = [1000.0, 2000.0, 3000.0], [10.0, 20.0, 30.0]
    processor = CDCLImageProcessor(
        num_channels=3, do_resize=False, normalization="per_channel", image_mean=mean, image_std=std
    )
    image = np.stack([np.full((8, 8), 1010.0), np.full((8, 8), 1960.0), np.full((8, 8), 3000.0)])
    pixel_values = processor(image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(pixel_values[:, 0, 0], [1.0, -2.0, 0.0])
    # Per-call statistics (e.g. one plate's) override the stored ones.
    plate = processor(image, image_mean=[1010.0, 1960.0, 3000.0], return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(plate, 0.0)


def test_per_image_standardisation_and_resize_crop():
    processor = CDCLImageProcessor(
        num_channels=5, size={"shortest_edge": 36}, do_center_crop=True, crop_size={"height": 32, "width": 32}
    )
    pixel_values = processor(uint16_image(height=40, width=60), return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 5, 32, 32)
    torch.testing.assert_close(pixel_values.mean(dim=(-2, -1)), torch.zeros(1, 5), atol=1e-4, rtol=0)
    torch.testing.assert_close(pixel_values.std(dim=(-2, -1), unbiased=False), torch.ones(1, 5), atol=1e-3, rtol=0)


def test_rgb_renderings_are_mapped_onto_the_model_channels():
    processor = CDCLImageProcessor(num_channels=5, size=32, rgb_channel_map=[0, 1, 2, None, 0])
    rgb = np.random.default_rng(0).integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
    pixel_values = processor(Image.fromarray(rgb), return_tensors="pt")["pixel_values"][0]
    assert pixel_values.shape == (5, 32, 32)
    torch.testing.assert_close(pixel_values[4], pixel_values[0])
    assert torch.count_nonzero(pixel_values[3]) == 0
    red = torch.from_numpy(rgb[..., 0].astype(np.float32))
    torch.testing.assert_close(pixel_values[0], (red - red.mean()) / (red.std(unbiased=False) + 1e-6))
    default = CDCLImageProcessor(num_channels=6)
    assert default.rgb_channel_map == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize(
    "bad_input, message",
    [
        (np.zeros((32, 32, 3), dtype=np.uint16), "expected 5 channels"),
        (np.zeros((2, 2, 32, 32, 5), dtype=np.uint16), "rank"),
        (np.zeros((32, 32), dtype=np.uint16), "2-D array"),
        (np.zeros((0, 32, 5), dtype=np.uint16), "empty"),
        (np.full((32, 32, 5), np.nan, dtype=np.float32), "NaN or infinite"),
        (np.array([[[np.inf] * 5] * 8] * 8, dtype=np.float64), "NaN or infinite"),
        (np.zeros((8, 8, 5), dtype=bool), "integer or floating point"),
        ("not an image", "unsupported input type"),
        ([], "empty list"),
        ([np.zeros((8, 8)), np.zeros((8, 9)), np.zeros((8, 8)), np.zeros((8, 8)), np.zeros((8, 8))], "differ in size"),
    ],
)
def test_bad_inputs_raise_clear_errors(bad_input, message):
    processor = CDCLImageProcessor(num_channels=5, size=32)
    with pytest.raises(ValueError, match=message):
        processor(bad_input)


def test_ambiguous_layout_needs_input_data_format():
    processor = CDCLImageProcessor(num_channels=3, size=8)
    cube = np.random.default_rng(0).random((3, 8, 3))
    with pytest.raises(ValueError, match="ambiguous"):
        processor(cube)
    assert processor(cube, input_data_format="channels_first", return_tensors="pt")["pixel_values"].shape == (1, 3, 8, 8)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"normalization": "per_channel"}, "needs image_mean"),
        ({"normalization": "per_channel", "image_mean": [0] * 5, "image_std": [1, 1, 1, 0, 1]}, "finite and positive"),
        ({"normalization": "zscore"}, "normalization must be one of"),
        ({"rgb_channel_map": [0, 1, 3, 0, 1]}, "rgb_channel_map"),
        ({"channel_names": ["DNA"]}, "channel_names has 1 entries"),
    ],
)
def test_inconsistent_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        CDCLImageProcessor(num_channels=5, **settings)


def test_differently_sized_images_without_resize_are_refused():
    processor = CDCLImageProcessor(num_channels=5, do_resize=False)
    with pytest.raises(ValueError, match="different shapes"):
        processor([uint16_image(height=32, width=32), uint16_image(height=40, width=40)])


def test_save_and_load_through_autoimageprocessor(tmp_path):
    processor = CDCLImageProcessor(
        num_channels=5,
        channel_names=["DNA", "ER", "RNA", "AGP", "Mito"],
        size=32,
        normalization="per_channel",
        image_mean=[1000.0] * 5,
        image_std=[300.0] * 5,
    )
    processor.save_pretrained(tmp_path)
    CDCLConfig.from_preset("tiny", num_channels=5).save_pretrained(tmp_path)
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is CDCLImageProcessor
    assert reloaded.to_dict() == processor.to_dict()
    image = uint16_image()
    np.testing.assert_array_equal(reloaded(image)["pixel_values"], processor(image)["pixel_values"])


def test_real_bbbc021_crops(shared_data_dir):
    crops = shared_data_dir / "bbbc021_crops"
    files = pd.read_csv(crops / "metadata.csv")["file"].head(8)
    images = [np.load(crops / "images" / name) for name in files]
    assert images[0].shape == (68, 68, 3) and images[0].dtype == np.uint16
    processor = CDCLImageProcessor(num_channels=3, size=32, channel_names=["DNA", "Tubulin", "Actin"])
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (8, 3, 32, 32)
    assert torch.isfinite(pixel_values).all()
    torch.testing.assert_close(pixel_values.mean(dim=(-2, -1)), torch.zeros(8, 3), atol=1e-4, rtol=0)


def test_named_channels_are_checked_against_the_processor(caplog):
    processor = CDCLImageProcessor(num_channels=3, size=8, channel_names=["DAPI", "Tubulin", "Actin"])
    image = np.random.default_rng(0).integers(0, 4000, (3, 12, 12), dtype=np.uint16)
    kwargs = {"input_data_format": "channels_first", "return_tensors": "pt"}
    reference = processor(image, **kwargs)["pixel_values"]
    torch.testing.assert_close(processor(image, channel_names=["DAPI", "Tubulin", "Actin"], **kwargs)["pixel_values"],
                               reference)
    with pytest.raises(ValueError, match=r"the images' channels are \['Actin', 'Tubulin', 'DAPI'\] but this processor "
                                         r"\(and its model\) expect \['DAPI', 'Tubulin', 'Actin'\], in this order; "
                                         r".*image\[\[2, 1, 0\]\]"):
        processor(image[::-1].copy(), channel_names=["Actin", "Tubulin", "DAPI"], **kwargs)
    with pytest.raises(ValueError, match="are 2, but this processor expects 3"):
        processor(image, channel_names=["DAPI", "Tubulin"], **kwargs)
    # Unnamed on either side: processed, and a warning says the order was not checked.
    for unnamed, names in ((processor, ["channel_0", "channel_1", "channel_2"]),
                           (CDCLImageProcessor(num_channels=3, size=8), ["DAPI", "Tubulin", "Actin"])):
        torch.testing.assert_close(unnamed(image, channel_names=names, **kwargs)["pixel_values"], reference)
