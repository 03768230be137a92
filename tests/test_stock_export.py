"""The CDCL backbone as a stock `Dinov2Model` (cdcl_hf.stock_export): same pooled output, loads without custom code,
and a processor file that serves both the stock pipeline and the CDCL processor."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoImageProcessor, AutoModel, Dinov2Model

from cdcl_hf import CDCLConfig, CDCLImageProcessor, CDCLModel
from cdcl_hf.stock_export import (
    default_white_level,
    dinov2_incompatibility,
    merge_stock_processor_settings,
    resolve_export_format,
    stock_processor_settings,
    to_dinov2,
)

CHANNELS = ["DNA", "Tubulin", "Actin"]


def tiny_model(num_channels=3, seed=0, **overrides) -> CDCLModel:
    torch.manual_seed(seed)
    model = CDCLModel(CDCLConfig.from_preset("tiny", num_channels=num_channels, **overrides)).eval()
    with torch.no_grad():  # LayerNorms away from their (1, 0) initialisation, so that a swapped norm would show
        for name, parameter in model.named_parameters():
            if "layernorm" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    return model


# 32 px is the stored size; the others interpolate the position embeddings (square, non-square, fewer / more patches).
SIZES = [(32, 32), (48, 48), (32, 48), (16, 64), (64, 40), (8, 8)]


@pytest.mark.parametrize("num_channels", [3, 5])
def test_stock_model_pools_like_the_cdcl_model(num_channels):
    model = tiny_model(num_channels)
    stock = to_dinov2(model)
    assert isinstance(stock, Dinov2Model)
    generator = torch.Generator().manual_seed(1)
    for height, width in SIZES:
        pixel_values = torch.randn(3, num_channels, height, width, generator=generator)
        with torch.no_grad():
            ours, theirs = model(pixel_values), stock(pixel_values=pixel_values)
        torch.testing.assert_close(theirs.pooler_output, ours.pooler_output, rtol=0, atol=1e-5, msg=f"{height}x{width}")
        torch.testing.assert_close(theirs.last_hidden_state, ours.last_hidden_state, rtol=0, atol=1e-5)


def test_saved_stock_checkpoint_loads_with_automodel_and_no_custom_code(tmp_path):
    model = tiny_model(5, channel_names=["DNA", "ER", "RNA", "AGP", "Mito"])
    to_dinov2(model).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "dinov2" and "auto_map" not in config
    assert config["channel_names"] == ["DNA", "ER", "RNA", "AGP", "Mito"] and config["mlp_ratio"] == 2
    assert not list(tmp_path.glob("*.py"))
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
        # The layer-scale vectors are ones (CDCL has none) and the mask token is kept, so nothing is missing on load.
        assert torch.equal(weights.get_tensor("encoder.layer.1.layer_scale2.lambda1"), torch.ones(64))
    assert "embeddings.mask_token" in keys

    loaded, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is Dinov2Model
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    pixel_values = torch.randn(2, 5, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(pixel_values=pixel_values).pooler_output,
                                   model(pixel_values).pooler_output, rtol=0, atol=1e-5)


def test_formats_without_a_stock_equivalent_stay_custom_code():
    assert resolve_export_format(tiny_model().config) == "dinov2"
    assert resolve_export_format(tiny_model().config, "cdcl") == "cdcl"
    for overrides, reason in (({"pooling": "mean"}, 'pooling "mean"'), ({"pooling": "cls+mean"}, 'pooling "cls+mean"'),
                              ({"intermediate_size": 100}, "not a whole multiple")):
        config = tiny_model(**overrides).config
        assert reason in dinov2_incompatibility(config)
        assert resolve_export_format(config, "auto") == "cdcl"
        with pytest.raises(ValueError, match="cannot be exported as a stock Dinov2Model"):
            resolve_export_format(config, "dinov2")
        with pytest.raises(ValueError, match=reason.replace("+", r"\+")):
            to_dinov2(tiny_model(**overrides))
    with pytest.raises(ValueError, match="export format must be one of"):
        resolve_export_format(tiny_model().config, "onnx")


def test_a_weight_the_conversion_would_drop_is_refused():
    model = tiny_model()
    model.extra_scale = torch.nn.Parameter(torch.ones(64))  # a weight the stock model has no place for
    with pytest.raises(ValueError, match="extra_scale"):
        to_dinov2(model)


def test_white_level_is_the_smallest_range_holding_the_statistics():
    assert default_white_level([40.0, 50.0], [20.0, 30.0]) == 255
    assert default_white_level([243.0, 378.0], [316.0, 318.0]) == 4095
    assert default_white_level([3000.0], [2000.0]) == 65535
    assert default_white_level([90000.0], [1.0]) == 65535


def save_processor(folder, **settings):
    CDCLImageProcessor(num_channels=3, channel_names=CHANNELS, size={"height": 32, "width": 32}, **settings).save_pretrained(folder)
    return folder


def test_one_processor_file_serves_the_stock_pipeline_and_the_cdcl_processor(tmp_path):
    mean, std = [300.0, 400.0, 500.0], [50.0, 60.0, 70.0]
    folder = save_processor(tmp_path, normalization="per_channel", image_mean=mean, image_std=std)
    to_dinov2(tiny_model(channel_names=CHANNELS)).save_pretrained(folder)
    merged = merge_stock_processor_settings(folder)
    assert merged["image_processor_type"] == "ViTImageProcessor" and merged["rgb_white_level"] == 4095

    # Without custom code: the stock processor. Its fields map an 8-bit rendering back to raw units and normalise it
    # with the same average-plate statistics the CDCL processor stores.
    stock = AutoImageProcessor.from_pretrained(folder)
    assert type(stock).__module__.startswith("transformers.models.vit")
    rgb = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    expected = (rgb.astype(np.float64) * 4095 / 255 - mean) / std
    got = stock(Image.fromarray(rgb), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)

    # With trust_remote_code: the CDCL processor from the very same file, with its own settings intact.
    custom = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(custom).__name__ == "CDCLImageProcessor"
    assert (custom.normalization, custom.image_mean, custom.image_std, custom.channel_names) == (
        "per_channel", mean, std, CHANNELS
    )
    images = np.random.default_rng(1).integers(0, 4000, size=(2, 40, 40, 3), dtype=np.uint16)
    reference = CDCLImageProcessor(num_channels=3, size={"height": 32, "width": 32}, normalization="per_channel",
                                   image_mean=mean, image_std=std)
    np.testing.assert_array_equal(custom(list(images))["pixel_values"], reference(list(images))["pixel_values"])


def test_stock_processor_settings_for_other_processors():
    per_image = stock_processor_settings({"num_channels": 3, "size": {"height": 32, "width": 32}, "normalization": "per_image"})
    assert (per_image["rescale_factor"], per_image["image_mean"], per_image["image_std"]) == (1 / 255, [0.5] * 3, [0.5] * 3)
    given = stock_processor_settings({"num_channels": 3, "size": {"height": 32, "width": 32}, "normalization": "per_channel",
                                      "image_mean": [10.0] * 3, "image_std": [5.0] * 3}, white_level=65535)
    assert given["rescale_factor"] == 65535 / 255 and given["rgb_white_level"] == 65535
    assert stock_processor_settings({"num_channels": 5, "size": {"height": 32, "width": 32}, "normalization": "per_image"}) is None
    assert stock_processor_settings({"num_channels": 3, "size": {"shortest_edge": 32}, "normalization": "per_image"}) is None


def test_a_five_channel_processor_file_is_left_alone(tmp_path):
    CDCLImageProcessor(num_channels=5, size=32).save_pretrained(tmp_path)
    before = (tmp_path / "preprocessor_config.json").read_text()
    assert merge_stock_processor_settings(tmp_path) is None
    assert (tmp_path / "preprocessor_config.json").read_text() == before
