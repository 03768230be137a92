"""cdcl_model_from_vit_checkpoint: a 3-channel ViT / DeiT checkpoint, in either spelling of transformers' parameter
names, becomes a C-channel CDCL model that computes the same function on channel-tiled input."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DeiTConfig, DeiTModel, ViTConfig, ViTForImageClassification, ViTModel

from cdcl_hf import CDCLConfig, CDCLModel
from cdcl_hf.convert_vit import cdcl_model_from_vit_checkpoint

# The two spellings transformers has used for ViT layers: the one on disk (4.x and 5.x files) and the newer in-memory
# one. The tests write checkpoints in both, whatever the installed transformers writes itself.
LEGACY_TO_NEW = [
    (r"encoder\.layer\.(\d+)\.attention\.attention\.query\.", r"layers.\1.attention.q_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.key\.", r"layers.\1.attention.k_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.value\.", r"layers.\1.attention.v_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention.o_proj."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.mlp.fc1."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.mlp.fc2."),
    (r"encoder\.layer\.(\d+)\.layernorm_(before|after)\.", r"layers.\1.layernorm_\2."),
]
NEW_TO_LEGACY = [
    (r"layers\.(\d+)\.attention\.q_proj\.", r"encoder.layer.\1.attention.attention.query."),
    (r"layers\.(\d+)\.attention\.k_proj\.", r"encoder.layer.\1.attention.attention.key."),
    (r"layers\.(\d+)\.attention\.v_proj\.", r"encoder.layer.\1.attention.attention.value."),
    (r"layers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"layers\.(\d+)\.layernorm_(before|after)\.", r"encoder.layer.\1.layernorm_\2."),
]


def respell(state: dict, rules) -> dict:
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def write_both_spellings(saved_folder, tmp_path) -> dict:
    """Copies of a saved checkpoint folder with its weights in the legacy and in the new spelling."""
    state = load_file(saved_folder / "model.safetensors")
    folders = {}
    for spelling, rules in (("legacy", NEW_TO_LEGACY), ("new", LEGACY_TO_NEW)):
        folder = tmp_path / f"{saved_folder.name}-{spelling}"
        shutil.copytree(saved_folder, folder)
        save_file(respell(state, rules), folder / "model.safetensors", metadata={"format": "pt"})
        folders[spelling] = folder
    legacy, new = (set(load_file(folders[s] / "model.safetensors")) for s in ("legacy", "new"))
    assert any(".attention.attention.query." in key for key in legacy) and not any(
        "q_proj" in key for key in legacy
    )
    assert any(".attention.q_proj." in key for key in new) and not any("encoder.layer" in key for key in new)
    return folders


def tiny_vit_config(config_class, **overrides):
    return config_class(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
        **overrides,
    )


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    torch.manual_seed(0)
    model = ViTModel(tiny_vit_config(ViTConfig), add_pooling_layer=True).eval()
    folder = tmp_path_factory.mktemp("stock") / "vit"
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def vit_spellings(vit, tmp_path_factory):
    return write_both_spellings(vit[1], tmp_path_factory.mktemp("spellings"))


@pytest.mark.parametrize("spelling", ["legacy", "new"])
def test_tiled_kernel_keeps_the_function(vit, vit_spellings, spelling):
    stock, _ = vit
    model = cdcl_model_from_vit_checkpoint(vit_spellings[spelling], num_channels=6, drop_path_rate=0.1).eval()
    assert isinstance(model, CDCLModel)
    assert model.config.num_channels == 6 and model.config.drop_path_rate == 0.1
    assert (
        model.config.layer_norm_eps == 1e-6 and model.config.image_size == 32 and model.config.patch_size == 8
    )
    rgb_kernel = stock.embeddings.patch_embeddings.projection.weight
    torch.testing.assert_close(
        model.embeddings.patch_embeddings.projection.weight, rgb_kernel.repeat(1, 2, 1, 1) * 0.5
    )

    # Tiled kernel x 3/C: an image whose six channels repeat R, G, B embeds exactly as the RGB image does in ViT,
    # at the stored size and with interpolated position embeddings.
    rgb = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model(rgb.repeat(1, 2, 1, 1)).last_hidden_state,
            stock(rgb).last_hidden_state,
            atol=1e-5,
            rtol=1e-4,
        )
        rgb = torch.randn(2, 3, 48, 48)
        torch.testing.assert_close(
            model(rgb.repeat(1, 2, 1, 1)).last_hidden_state,
            stock(rgb, interpolate_pos_encoding=True).last_hidden_state,
            atol=1e-5,
            rtol=1e-4,
        )


def test_every_other_weight_is_copied(vit, vit_spellings):
    stock_state = respell(load_file(vit[1] / "model.safetensors"), LEGACY_TO_NEW)
    for spelling in ("legacy", "new"):
        model = cdcl_model_from_vit_checkpoint(
            vit_spellings[spelling], num_channels=3, rescale_patch_kernel=False
        )
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, stock_state[name], rtol=0, atol=0, msg=name)


def test_without_rescaling_the_kernel_is_only_tiled(vit):
    stock, folder = vit
    model = cdcl_model_from_vit_checkpoint(folder, num_channels=5, rescale_patch_kernel=False)
    rgb_kernel = stock.embeddings.patch_embeddings.projection.weight
    torch.testing.assert_close(
        model.embeddings.patch_embeddings.projection.weight, rgb_kernel[:, [0, 1, 2, 0, 1]]
    )


def test_config_overrides_go_into_the_new_config(vit):
    names = ["DNA", "ER", "RNA", "AGP", "Mito"]
    model = cdcl_model_from_vit_checkpoint(vit[1], num_channels=5, pooling="cls+mean", channel_names=names)
    assert model.config.pooling == "cls+mean" and model.config.channel_names == names
    assert model(torch.randn(1, 5, 32, 32)).pooler_output.shape == (1, 128)


@pytest.mark.parametrize("spelling", ["legacy", "new"])
def test_deit_drops_the_distillation_token(tmp_path, spelling):
    torch.manual_seed(0)
    deit = DeiTModel(tiny_vit_config(DeiTConfig))
    deit.save_pretrained(tmp_path / "deit")
    folder = write_both_spellings(tmp_path / "deit", tmp_path)[spelling]
    model = cdcl_model_from_vit_checkpoint(folder, num_channels=5)
    positions = deit.embeddings.position_embeddings
    torch.testing.assert_close(
        model.embeddings.position_embeddings, torch.cat([positions[:, :1], positions[:, 2:]], dim=1)
    )
    torch.testing.assert_close(model.embeddings.cls_token, deit.embeddings.cls_token)
    deit_state = respell(load_file(tmp_path / "deit" / "model.safetensors"), LEGACY_TO_NEW)
    torch.testing.assert_close(
        model.state_dict()["layers.1.mlp.fc2.weight"], deit_state["layers.1.mlp.fc2.weight"]
    )


def test_task_model_prefix_heads_and_pytorch_bin(vit, tmp_path):
    stock, _ = vit
    torch.manual_seed(0)
    classifier = ViTForImageClassification(tiny_vit_config(ViTConfig, num_labels=4))
    classifier.vit.load_state_dict(stock.state_dict(), strict=False)
    classifier.save_pretrained(tmp_path / "classifier")
    state = load_file(tmp_path / "classifier" / "model.safetensors")
    assert any(key.startswith("vit.") for key in state) and any(
        key.startswith("classifier.") for key in state
    )
    # As an older pytorch_model.bin, in the new spelling.
    (tmp_path / "classifier" / "model.safetensors").unlink()
    torch.save(respell(state, LEGACY_TO_NEW), tmp_path / "classifier" / "pytorch_model.bin")

    model = cdcl_model_from_vit_checkpoint(
        tmp_path / "classifier", num_channels=3, rescale_patch_kernel=False
    ).eval()
    rgb = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model(rgb).last_hidden_state, stock(rgb).last_hidden_state, atol=1e-5, rtol=1e-4
        )


def test_sharded_safetensors(vit, tmp_path):
    stock, _ = vit
    stock.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model = cdcl_model_from_vit_checkpoint(tmp_path / "sharded", num_channels=3, rescale_patch_kernel=False)
    torch.testing.assert_close(model.layernorm.weight, stock.layernorm.weight)


def test_hub_repository(vit, hub_server, hub_repo_id, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(hub_repo_id, exist_ok=True)
    api.upload_folder(repo_id=hub_repo_id, folder_path=str(vit[1]))
    model = cdcl_model_from_vit_checkpoint(hub_repo_id, num_channels=6).eval()
    rgb = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model(rgb.repeat(1, 2, 1, 1)).last_hidden_state,
            vit[0](rgb).last_hidden_state,
            atol=1e-5,
            rtol=1e-4,
        )


def edited_copy(folder, tmp_path, edit_state=None, edit_config=None):
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    if edit_state:
        state = load_file(copy / "model.safetensors")
        edit_state(state)
        save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        config = json.loads((copy / "config.json").read_text())
        edit_config(config)
        (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_refuses_other_model_types(tmp_path):
    torch.manual_seed(0)
    CDCLModel(CDCLConfig.from_preset("tiny")).save_pretrained(tmp_path / "cdcl")
    with pytest.raises(ValueError, match="expects a transformers ViT or DeiT checkpoint"):
        cdcl_model_from_vit_checkpoint(tmp_path / "cdcl", num_channels=5)


def test_refuses_non_rgb_and_non_square(vit, tmp_path):
    ViTModel(tiny_vit_config(ViTConfig, num_channels=4)).save_pretrained(tmp_path / "four")
    with pytest.raises(ValueError, match="expected an RGB"):
        cdcl_model_from_vit_checkpoint(tmp_path / "four", num_channels=5)
    rectangular = edited_copy(vit[1], tmp_path, edit_config=lambda config: config.update(image_size=[32, 48]))
    with pytest.raises(ValueError, match="only square image and patch sizes"):
        cdcl_model_from_vit_checkpoint(rectangular, num_channels=5)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda state: state.update({"encoder.layer.0.extra.weight": torch.zeros(2)}),
            "not part of a ViT / DeiT",
        ),
        (
            lambda state: state.pop("encoder.layer.1.output.dense.weight"),
            r"missing \['layers.1.mlp.fc2.weight'\]",
        ),
        (
            lambda state: state.update({k: v.clone() for k, v in respell(state, LEGACY_TO_NEW).items()}),
            "twice",
        ),
        (
            lambda state: state.update({"layernorm.weight": torch.ones(65)}),
            "does not match its own config.json",
        ),
    ],
)
def test_refuses_weights_that_do_not_map(vit_spellings, tmp_path, edit, message):
    folder = edited_copy(vit_spellings["legacy"], tmp_path, edit_state=edit)
    with pytest.raises(ValueError, match=message):
        cdcl_model_from_vit_checkpoint(folder, num_channels=3)


def test_refuses_folders_without_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        cdcl_model_from_vit_checkpoint(tmp_path / "empty", num_channels=3)
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        cdcl_model_from_vit_checkpoint(tmp_path / "absent", num_channels=3)


def test_the_model_class_has_no_conversion_method():
    assert not hasattr(CDCLModel, "from_vit_checkpoint")
