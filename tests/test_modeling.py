"""CDCL model, in the style of transformers' model tests: configuration, pinned parameter names, an integration
slice, shapes of every output, attention implementations, gradient checkpointing, save / load."""

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from cdcl_hf import CDCLConfig, CDCLModel
from cdcl_hf.configuration_cdcl import ARCHITECTURE_PRESETS
from cdcl_hf.modeling_cdcl import CDCLEmbeddings, CDCLLayer

# Parameter names of the tiny preset. They are the names in every saved checkpoint, fixed by modeling_cdcl.py (not by
# the installed transformers): changing them breaks loading of existing checkpoints.
EXPECTED_TINY_KEYS = [
    "embeddings.cls_token",
    "embeddings.position_embeddings",
    "embeddings.patch_embeddings.projection.weight",
    "embeddings.patch_embeddings.projection.bias",
    *[
        f"layers.{i}.{name}"
        for i in range(2)
        for name in (
            "attention.q_proj.weight",
            "attention.q_proj.bias",
            "attention.k_proj.weight",
            "attention.k_proj.bias",
            "attention.v_proj.weight",
            "attention.v_proj.bias",
            "attention.o_proj.weight",
            "attention.o_proj.bias",
            "layernorm_before.weight",
            "layernorm_before.bias",
            "layernorm_after.weight",
            "layernorm_after.bias",
            "mlp.fc1.weight",
            "mlp.fc1.bias",
            "mlp.fc2.weight",
            "mlp.fc2.bias",
        )
    ],
    "layernorm.weight",
    "layernorm.bias",
]



def checkpointing_is_on(model) -> bool:
    """`is_activation_checkpointing` (transformers >= 5.23) or its older name."""
    flag = getattr(type(model), "is_activation_checkpointing", None)
    return model.is_activation_checkpointing if flag is not None else model.is_gradient_checkpointing

def tiny_model(**overrides) -> CDCLModel:
    torch.manual_seed(0)
    return CDCLModel(CDCLConfig.from_preset("tiny", **overrides)).eval()


class TestConfiguration:
    def test_presets_have_the_published_sizes(self):
        small = CDCLConfig.from_preset("vit-small-patch16", num_channels=5)
        assert (small.hidden_size, small.num_hidden_layers, small.num_attention_heads) == (384, 12, 6)
        assert small.patch_size == 16 and small.num_channels == 5
        base = CDCLConfig.from_preset("vit-base-patch16")
        assert (base.hidden_size, base.num_hidden_layers, base.num_attention_heads) == (768, 12, 12)
        assert set(ARCHITECTURE_PRESETS) == {"vit-small-patch16", "vit-base-patch16", "vit-crops-patch8", "vit-small-crops-patch8", "tiny"}
        with pytest.raises(ValueError, match="unknown preset"):
            CDCLConfig.from_preset("vit-huge")

    @pytest.mark.parametrize(
        "bad, message",
        [
            ({"pooling": "max"}, "pooling must be one of"),
            ({"hidden_size": 65}, "divisible by num_attention_heads"),
            ({"num_channels": 3, "channel_names": ["DNA", "Actin"]}, "channel_names has 2 entries"),
            ({"image_size": 30}, "divisible by patch_size"),
            ({"drop_path_rate": 1.0}, "drop_path_rate must be in"),
            ({"num_channels": 0}, "num_channels must be at least 1"),
        ],
    )
    def test_config_rejects_inconsistent_fields(self, bad, message):
        with pytest.raises(ValueError, match=message):
            CDCLConfig.from_preset("tiny", **bad)

    def test_config_round_trips_through_json(self, tmp_path):
        config = CDCLConfig.from_preset(
            "tiny", num_channels=2, channel_names=["DNA", "Actin"], pooling="mean"
        )
        config.save_pretrained(tmp_path)
        reloaded = CDCLConfig.from_pretrained(tmp_path)
        assert reloaded.channel_names == ["DNA", "Actin"] and reloaded.pooling == "mean"
        assert reloaded.pooled_size == 64


class TestParameters:
    def test_state_dict_keys_are_pinned(self):
        assert list(tiny_model().state_dict()) == EXPECTED_TINY_KEYS

    def test_shapes_follow_the_config(self):
        state = tiny_model(num_channels=5).state_dict()
        assert state["embeddings.patch_embeddings.projection.weight"].shape == (64, 5, 8, 8)
        assert state["embeddings.position_embeddings"].shape == (1, 1 + 16, 64)
        assert state["layers.1.mlp.fc1.weight"].shape == (128, 64)
        assert "layers.0.attention.q_proj.bias" not in tiny_model(qkv_bias=False).state_dict()

    def test_initialisation(self):
        model = CDCLModel(CDCLConfig.from_preset("vit-small-patch16", num_hidden_layers=1))
        weight = model.layers[0].mlp.fc1.weight
        # torch's trunc_normal_ cuts at the absolute values -2 and 2, which a std of 0.02 never reaches.
        assert abs(weight.std().item() - 0.02) < 0.002 and weight.abs().max().item() < 0.2
        assert torch.count_nonzero(model.layers[0].attention.q_proj.bias) == 0
        assert torch.equal(model.layers[0].layernorm_before.weight, torch.ones(384))
        assert abs(model.embeddings.position_embeddings.std().item() - 0.02) < 0.002

    def test_same_seed_gives_the_same_weights(self):
        first, second = tiny_model().state_dict(), tiny_model().state_dict()
        assert all(torch.equal(first[name], second[name]) for name in first)

    def test_module_metadata(self):
        model = tiny_model()
        assert model.get_input_embeddings() is model.embeddings.patch_embeddings
        assert set(CDCLModel._no_split_modules) == {CDCLEmbeddings.__name__, CDCLLayer.__name__}
        assert model.supports_gradient_checkpointing and model._supports_sdpa


class TestIntegration:
    """Outputs of a seeded tiny model on seeded input, measured once (they equal those of the earlier
    implementation built from transformers' ViT modules)."""

    @pytest.fixture(scope="class")
    @classmethod
    def outputs(cls):
        model = tiny_model(num_channels=5)
        generator = torch.Generator().manual_seed(0)
        square = torch.randn(2, 5, 32, 32, generator=generator)
        rectangle = torch.randn(1, 5, 24, 40, generator=generator)
        with torch.no_grad():
            return model(square), model(rectangle)

    def test_output_slice_at_the_stored_size(self, outputs):
        square, _ = outputs
        torch.testing.assert_close(
            square.pooler_output[0, :5],
            torch.tensor([-1.384163, 1.109514, -0.204777, -0.661545, 0.320453]),
            atol=1e-4,
            rtol=0,
        )
        expected = torch.tensor(
            [
                [-1.384163, 1.109514, -0.204777],
                [1.360740, -1.963515, 0.366267],
                [1.451317, -0.083114, 0.577941],
            ]
        )
        torch.testing.assert_close(square.last_hidden_state[0, :3, :3], expected, atol=1e-4, rtol=0)

    def test_output_slice_with_interpolated_positions(self, outputs):
        _, rectangle = outputs
        assert rectangle.last_hidden_state.shape == (1, 1 + 3 * 5, 64)
        torch.testing.assert_close(
            rectangle.pooler_output[0, :5],
            torch.tensor([-1.126408, 0.978604, 0.336066, -0.275147, 0.433634]),
            atol=1e-4,
            rtol=0,
        )
        expected = torch.tensor(
            [
                [-0.511031, 0.048578, -1.123260],
                [-0.881117, 0.610023, -1.763938],
                [-0.565182, 0.843691, -0.366930],
            ]
        )
        torch.testing.assert_close(rectangle.last_hidden_state[0, -3:, :3], expected, atol=1e-4, rtol=0)


class TestForward:
    @pytest.mark.parametrize("pooling, width", [("cls", 64), ("mean", 64), ("cls+mean", 128)])
    def test_pooled_output_follows_the_config(self, pooling, width):
        model = tiny_model(num_channels=5, pooling=pooling)
        output = model(torch.randn(3, 5, 32, 32))
        assert output.last_hidden_state.shape == (3, 1 + 16, 64)
        assert output.pooler_output.shape == (3, width) == (3, model.config.pooled_size)
        tokens = output.last_hidden_state
        expected = {"cls": tokens[:, 0], "mean": tokens[:, 1:].mean(1)}
        expected["cls+mean"] = torch.cat([expected["cls"], expected["mean"]], -1)
        torch.testing.assert_close(output.pooler_output, expected[pooling])
        torch.testing.assert_close(model.pool(tokens), output.pooler_output)

    def test_crops_of_different_sizes_go_through_one_model(self):
        model = tiny_model(num_channels=5)
        global_crop, local_crop = torch.randn(2, 5, 32, 32), torch.randn(2, 5, 16, 16)
        assert model(global_crop).last_hidden_state.shape == (2, 17, 64)
        assert model(local_crop).last_hidden_state.shape == (2, 5, 64)
        assert model(torch.randn(1, 5, 24, 40)).last_hidden_state.shape == (1, 1 + 3 * 5, 64)
        assert model(torch.randn(1, 5, 48, 48)).last_hidden_state.shape == (1, 1 + 36, 64)

    def test_position_embeddings_are_resampled_only_for_other_sizes(self):
        embeddings = tiny_model().embeddings
        # At the stored size the position embeddings are used as they are.
        assert embeddings.interpolate_pos_encoding(32, 32) is embeddings.position_embeddings
        # Same number of patches, other grid (2 x 8 instead of 4 x 4): resampled.
        wide = embeddings.interpolate_pos_encoding(16, 64)
        assert wide.shape == (1, 17, 64) and not torch.allclose(wide, embeddings.position_embeddings)
        larger = embeddings.interpolate_pos_encoding(48, 48)
        assert larger.shape == (1, 37, 64)
        # The CLS position is kept.
        torch.testing.assert_close(larger[:, 0], embeddings.position_embeddings[:, 0])

    def test_bad_inputs_are_named(self):
        model = tiny_model(num_channels=5)
        with pytest.raises(ValueError, match="expected 5 but got 3"):
            model(torch.randn(1, 3, 32, 32))
        with pytest.raises(ValueError, match="not divisible by the patch size 8"):
            model(torch.randn(1, 5, 30, 32))
        with pytest.raises(ValueError, match=r"\(batch, channels, height, width\)"):
            model(torch.randn(5, 32, 32))

    def test_hidden_states(self):
        model = tiny_model()
        pixels = torch.randn(2, 3, 24, 40)
        output = model(pixels, output_hidden_states=True)
        assert len(output.hidden_states) == model.config.num_hidden_layers + 1
        assert all(state.shape == (2, 1 + 15, 64) for state in output.hidden_states)
        torch.testing.assert_close(output.hidden_states[0], model.embeddings(pixels))
        torch.testing.assert_close(model.layernorm(output.hidden_states[-1]), output.last_hidden_state)
        assert model(pixels).hidden_states is None
        model.config.output_hidden_states = True  # the config default applies when the argument is not given
        assert len(model(pixels).hidden_states) == model.config.num_hidden_layers + 1

    @pytest.mark.parametrize("size", [(32, 32), (24, 40)])
    def test_attentions(self, size):
        model = tiny_model()
        model.set_attn_implementation("eager")
        output = model(torch.randn(2, 3, *size), output_attentions=True)
        tokens = 1 + (size[0] // 8) * (size[1] // 8)
        assert len(output.attentions) == model.config.num_hidden_layers
        for weights in output.attentions:
            assert weights.shape == (2, model.config.num_attention_heads, tokens, tokens)
            torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, tokens))
        assert model(torch.randn(1, 3, *size)).attentions is None

    def test_drop_path_is_active_only_in_training(self):
        model = tiny_model(drop_path_rate=0.5)
        assert model.layers[0].drop_path.drop_prob == 0.0 and model.layers[-1].drop_path.drop_prob == 0.5
        pixels = torch.randn(8, 3, 32, 32)
        torch.testing.assert_close(model(pixels).pooler_output, model(pixels).pooler_output)
        model.train()
        torch.manual_seed(1)
        first = model(pixels).pooler_output
        torch.manual_seed(2)
        assert not torch.allclose(first, model(pixels).pooler_output)
        torch.manual_seed(1)
        torch.testing.assert_close(model(pixels).pooler_output, first)  # seeded: reproducible

    def test_drop_path_drops_whole_samples(self):
        drop_path = tiny_model(drop_path_rate=0.5).layers[-1].drop_path.train()
        torch.manual_seed(0)
        out = drop_path(torch.ones(64, 5, 3))
        per_sample = out.reshape(64, -1)
        assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
        assert (per_sample == per_sample[:, :1]).all()  # one decision per sample
        assert 0 < (per_sample[:, 0] == 0).sum() < 64


class TestAttentionImplementations:
    def test_sdpa_is_the_default_and_matches_eager(self):
        model = tiny_model()
        assert model.config._attn_implementation == "sdpa"
        pixels = torch.randn(2, 3, 24, 40)
        sdpa_output = model(pixels, output_hidden_states=True)
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        eager_output = model(pixels, output_hidden_states=True)
        torch.testing.assert_close(
            sdpa_output.last_hidden_state, eager_output.last_hidden_state, atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(
            sdpa_output.pooler_output, eager_output.pooler_output, atol=1e-5, rtol=1e-4
        )
        for sdpa_state, eager_state in zip(
            sdpa_output.hidden_states, eager_output.hidden_states, strict=True
        ):
            torch.testing.assert_close(sdpa_state, eager_state, atol=1e-5, rtol=1e-4)

    def test_sdpa_model_returns_attention_weights_when_asked(self):
        model = tiny_model()
        pixels = torch.randn(2, 3, 32, 32)
        output = model(pixels, output_attentions=True)  # computed with the eager function for this call
        assert [weights.shape for weights in output.attentions] == [(2, 2, 17, 17)] * 2
        torch.testing.assert_close(
            output.last_hidden_state, model(pixels).last_hidden_state, atol=1e-5, rtol=1e-4
        )

    def test_sdpa_and_eager_agree_in_training(self):
        model = tiny_model(drop_path_rate=0.2).train()
        pixels = torch.randn(4, 3, 32, 32)
        torch.manual_seed(3)
        sdpa_loss = model(pixels).pooler_output.pow(2).sum()
        model.set_attn_implementation("eager")
        torch.manual_seed(3)
        eager_loss = model(pixels).pooler_output.pow(2).sum()
        torch.testing.assert_close(sdpa_loss, eager_loss, atol=1e-4, rtol=1e-5)

    def test_attention_implementation_can_be_chosen_when_loading(self, tmp_path):
        tiny_model().save_pretrained(tmp_path)
        assert (
            CDCLModel.from_pretrained(tmp_path, attn_implementation="eager").config._attn_implementation
            == "eager"
        )


class TestGradientCheckpointing:
    @pytest.mark.parametrize("overrides", [{}, {"drop_path_rate": 0.3, "hidden_dropout_prob": 0.1}])
    def test_same_loss_and_gradients(self, overrides):
        model = tiny_model(**overrides).train()
        pixels = torch.randn(2, 3, 32, 32)

        def loss_and_grads():
            model.zero_grad()
            torch.manual_seed(0)
            loss = model(pixels).pooler_output.pow(2).sum()
            loss.backward()
            return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

        reference_loss, reference_grads = loss_and_grads()
        mlp_calls, mlp_forward = [], model.layers[0].mlp.forward
        model.layers[0].mlp.forward = lambda hidden_states: mlp_calls.append(1) or mlp_forward(hidden_states)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()  # renamed in transformers 5.23
        assert checkpointing_is_on(model) and all(
            layer.gradient_checkpointing for layer in model.layers
        )
        loss, grads = loss_and_grads()
        assert len(mlp_calls) == 2  # the forward pass and its recomputation in the backward pass
        torch.testing.assert_close(loss, reference_loss)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], msg=name)

        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        assert not checkpointing_is_on(model)


class TestSaveLoad:
    def test_round_trip_through_automodel(self, tmp_path):
        model = tiny_model(
            num_channels=5,
            channel_names=["DNA", "ER", "RNA", "AGP", "Mito"],
            pooling="cls+mean",
            drop_path_rate=0.1,
        )
        model.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").is_file()
        assert not list(tmp_path.glob("*.bin"))
        config = AutoConfig.from_pretrained(tmp_path)
        assert isinstance(config, CDCLConfig) and config.channel_names[-1] == "Mito"
        reloaded = AutoModel.from_pretrained(tmp_path).eval()
        assert type(reloaded) is CDCLModel
        assert [layer.drop_path.drop_prob for layer in reloaded.layers] == [0.0, pytest.approx(0.1)]
        pixels = torch.randn(2, 5, 24, 40)
        torch.testing.assert_close(
            reloaded(pixels).pooler_output, model(pixels).pooler_output, rtol=0, atol=0
        )

    def test_saved_names_are_the_pinned_ones(self, tmp_path):
        from safetensors import safe_open

        tiny_model().save_pretrained(tmp_path)
        with safe_open(tmp_path / "model.safetensors", "pt") as weights:
            assert sorted(weights.keys()) == sorted(EXPECTED_TINY_KEYS)

    def test_missing_weights_are_initialised_and_loaded_ones_kept(self, tmp_path):
        from safetensors.torch import load_file, save_file

        model = tiny_model()
        model.save_pretrained(tmp_path)
        state = load_file(tmp_path / "model.safetensors")
        del state["layers.1.mlp.fc2.weight"]
        save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
        reloaded = CDCLModel.from_pretrained(tmp_path)
        torch.testing.assert_close(
            reloaded.layers[1].mlp.fc1.weight, model.layers[1].mlp.fc1.weight, rtol=0, atol=0
        )
        torch.testing.assert_close(reloaded.embeddings.cls_token, model.embeddings.cls_token, rtol=0, atol=0)
        refilled = reloaded.layers[1].mlp.fc2.weight
        assert torch.isfinite(refilled).all() and 0.01 < refilled.std().item() < 0.03

    def test_bfloat16(self):
        model = tiny_model().to(torch.bfloat16)
        output = model(torch.randn(2, 3, 24, 40))  # float32 input is cast to the weights' dtype
        assert output.pooler_output.dtype == torch.bfloat16
        assert isinstance(model.embeddings.patch_embeddings.projection, nn.Conv2d)
