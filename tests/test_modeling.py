"""CDCL model: shapes, pooling, variable crop sizes, save/load, gradient checkpointing, ViT initialisation."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, DeiTConfig, DeiTModel, ViTConfig, ViTModel

from cdcl_hf import CDCLConfig, CDCLModel


def tiny_model(**overrides) -> CDCLModel:
    torch.manual_seed(0)
    return CDCLModel(CDCLConfig.from_preset("tiny", **overrides)).eval()


def test_presets_have_the_published_sizes():
    small = CDCLConfig.from_preset("vit-small-patch16", num_channels=5)
    assert (small.hidden_size, small.num_hidden_layers, small.num_attention_heads) == (384, 12, 6)
    assert small.patch_size == 16 and small.num_channels == 5
    with pytest.raises(ValueError, match="unknown preset"):
        CDCLConfig.from_preset("vit-huge")


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"pooling": "max"}, "pooling must be one of"),
        ({"hidden_size": 65}, "divisible by num_attention_heads"),
        ({"num_channels": 3, "channel_names": ["DNA", "Actin"]}, "channel_names has 2 entries"),
        ({"image_size": 30}, "divisible by patch_size"),
    ],
)
def test_config_rejects_inconsistent_fields(bad, message):
    with pytest.raises(ValueError, match=message):
        CDCLConfig.from_preset("tiny", **bad)


@pytest.mark.parametrize("pooling, width", [("cls", 64), ("mean", 64), ("cls+mean", 128)])
def test_pooled_output_follows_the_config(pooling, width):
    model = tiny_model(num_channels=5, pooling=pooling)
    pixels = torch.randn(3, 5, 32, 32)
    output = model(pixels)
    assert output.last_hidden_state.shape == (3, 1 + 16, 64)
    assert output.pooler_output.shape == (3, width) == (3, model.config.pooled_size)
    tokens = output.last_hidden_state
    expected = {"cls": tokens[:, 0], "mean": tokens[:, 1:].mean(1)}
    expected["cls+mean"] = torch.cat([expected["cls"], expected["mean"]], -1)
    torch.testing.assert_close(output.pooler_output, expected[pooling])


def test_crops_of_different_sizes_go_through_one_model():
    model = tiny_model(num_channels=5)
    global_crop, local_crop, rectangle = torch.randn(2, 5, 32, 32), torch.randn(2, 5, 16, 16), torch.randn(1, 5, 24, 40)
    assert model(global_crop).last_hidden_state.shape == (2, 17, 64)
    assert model(local_crop).last_hidden_state.shape == (2, 5, 64)
    assert model(rectangle).last_hidden_state.shape == (1, 1 + 3 * 5, 64)
    # At the stored size the position embeddings are used as they are, not resampled.
    embeddings = model.embeddings
    torch.testing.assert_close(
        embeddings.interpolate_pos_encoding(torch.zeros(1, 17, 64), 32, 32), embeddings.position_embeddings
    )


def test_bad_inputs_are_named():
    model = tiny_model(num_channels=5)
    with pytest.raises(ValueError, match="Expected 5 but got 3"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        model(torch.randn(1, 5, 30, 32))
    with pytest.raises(ValueError, match=r"\(batch, channels, height, width\)"):
        model(torch.randn(5, 32, 32))


def test_attention_uses_sdpa_and_matches_eager():
    model = tiny_model()
    assert model.config._attn_implementation == "sdpa"
    pixels = torch.randn(2, 3, 32, 32)
    sdpa_output = model(pixels).last_hidden_state
    model.set_attn_implementation("eager")
    eager_output = model(pixels, output_attentions=True)
    torch.testing.assert_close(sdpa_output, eager_output.last_hidden_state, atol=1e-5, rtol=1e-4)
    assert len(eager_output.attentions) == 2 and eager_output.attentions[0].shape == (2, 2, 17, 17)


def test_hidden_states_and_gradient_checkpointing():
    model = tiny_model(drop_path_rate=0.0)
    pixels = torch.randn(2, 3, 32, 32)
    output = model(pixels, output_hidden_states=True)
    assert len(output.hidden_states) == 1 + model.config.num_hidden_layers

    model.train()
    reference_loss = model(pixels).pooler_output.pow(2).sum()
    reference_loss.backward()
    reference_grad = model.embeddings.patch_embeddings.projection.weight.grad.clone()
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    model(pixels).pooler_output.pow(2).sum().backward()
    torch.testing.assert_close(model.embeddings.patch_embeddings.projection.weight.grad, reference_grad)


def test_drop_path_is_active_only_in_training():
    model = tiny_model(drop_path_rate=0.5)
    assert model.layers[0].drop_path.drop_prob == 0.0 and model.layers[-1].drop_path.drop_prob == 0.5
    pixels = torch.randn(8, 3, 32, 32)
    torch.testing.assert_close(model(pixels).pooler_output, model(pixels).pooler_output)
    model.train()
    torch.manual_seed(1)
    first = model(pixels).pooler_output
    torch.manual_seed(2)
    assert not torch.allclose(first, model(pixels).pooler_output)


def test_save_and_load_round_trip_through_automodel(tmp_path):
    model = tiny_model(num_channels=5, channel_names=["DNA", "ER", "RNA", "AGP", "Mito"], pooling="cls+mean")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, CDCLConfig) and config.channel_names[-1] == "Mito"
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(reloaded) is CDCLModel
    pixels = torch.randn(2, 5, 32, 32)
    torch.testing.assert_close(reloaded(pixels).pooler_output, model(pixels).pooler_output, rtol=0, atol=0)


def _tiny_vit_config(config_class):
    return config_class(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32, patch_size=8
    )


def test_from_vit_checkpoint_tiles_the_rgb_kernel_and_keeps_the_function(tmp_path):
    torch.manual_seed(0)
    vit = ViTModel(_tiny_vit_config(ViTConfig), add_pooling_layer=True).eval()
    vit.save_pretrained(tmp_path / "vit")

    model = CDCLModel.from_vit_checkpoint(tmp_path / "vit", num_channels=6, drop_path_rate=0.1).eval()
    assert model.config.num_channels == 6 and model.config.drop_path_rate == 0.1
    rgb_kernel = vit.embeddings.patch_embeddings.projection.weight
    torch.testing.assert_close(
        model.embeddings.patch_embeddings.projection.weight, rgb_kernel.repeat(1, 2, 1, 1) * 0.5
    )
    vit_state = vit.state_dict()
    for name, value in model.state_dict().items():
        if name != "embeddings.patch_embeddings.projection.weight":
            torch.testing.assert_close(value, vit_state[name], msg=name)

    # Tiled kernel x 3/C: an image whose six channels repeat R, G, B embeds exactly as the RGB image does in ViT.
    rgb = torch.randn(2, 3, 32, 32)
    expected = vit(rgb).last_hidden_state
    torch.testing.assert_close(model(rgb.repeat(1, 2, 1, 1)).last_hidden_state, expected, atol=1e-5, rtol=1e-4)


def test_from_vit_checkpoint_accepts_deit_and_refuses_other_models(tmp_path):
    torch.manual_seed(0)
    deit = DeiTModel(_tiny_vit_config(DeiTConfig))
    deit.save_pretrained(tmp_path / "deit")
    model = CDCLModel.from_vit_checkpoint(tmp_path / "deit", num_channels=5)
    positions = deit.embeddings.position_embeddings
    torch.testing.assert_close(
        model.embeddings.position_embeddings, torch.cat([positions[:, :1], positions[:, 2:]], dim=1)
    )
    torch.testing.assert_close(model.embeddings.cls_token, deit.embeddings.cls_token)

    tiny_model().save_pretrained(tmp_path / "cdcl")
    with pytest.raises(ValueError, match="expects a transformers ViT or DeiT checkpoint"):
        CDCLModel.from_vit_checkpoint(tmp_path / "cdcl", num_channels=5)
