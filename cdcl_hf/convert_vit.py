"""Start a CDCL model from a 3-channel ViT / DeiT / DINO (v1) checkpoint.

The CDCL authors start from ImageNet DeiT-S; `cdcl_model_from_vit_checkpoint` does the same for any transformers
ViT or DeiT checkpoint (DINO v1 checkpoints on the Hub are ViT checkpoints). It reads the checkpoint's files
(`config.json` and `model.safetensors` / sharded safetensors / `pytorch_model.bin`) from a local folder or a Hub
repository and maps the stored parameter names onto CDCL's, so it does not depend on how the installed transformers
version names ViT parameters. Both spellings that transformers has used are understood:

* the one written to disk by transformers 4.x and 5.x (`encoder.layer.{i}.attention.attention.query`,
  `attention.output.dense`, `intermediate.dense`, `output.dense`, `layernorm_before/after`), and
* the one of newer in-memory ViT modules (`layers.{i}.attention.q_proj/k_proj/v_proj/o_proj`, `mlp.fc1/fc2`),

with or without the `vit.` / `deit.` prefix of the task models (classification heads, poolers and the masked-image
decoder are dropped).

This module is not copied into checkpoints; it is only needed to create a model, not to load one.
"""

import json
import os
import re
from pathlib import Path

import torch

from .configuration_cdcl import CDCLConfig
from .modeling_cdcl import CDCLModel

SUPPORTED_MODEL_TYPES = ("vit", "deit")

# Fields copied from the source config (ViTConfig / DeiTConfig names) into the CDCL config.
_COPIED_CONFIG_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "layer_norm_eps",
    "initializer_range",
    "qkv_bias",
)

# Stored name (after removing a task-model prefix) -> CDCL name. `{i}` is a layer index.
_LAYER_KEY_PATTERNS = [
    # transformers 4.x / 5.x files: BERT-style nesting under encoder.layer
    (r"encoder\.layer\.(\d+)\.attention\.attention\.query\.", r"layers.\1.attention.q_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.key\.", r"layers.\1.attention.k_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.value\.", r"layers.\1.attention.v_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention.o_proj."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.mlp.fc1."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.mlp.fc2."),
    (r"encoder\.layer\.(\d+)\.layernorm_(before|after)\.", r"layers.\1.layernorm_\2."),
    # newer in-memory spelling: already CDCL's
    (r"layers\.(\d+)\.attention\.([qkvo])_proj\.", r"layers.\1.attention.\2_proj."),
    (r"layers\.(\d+)\.mlp\.fc([12])\.", r"layers.\1.mlp.fc\2."),
    (r"layers\.(\d+)\.layernorm_(before|after)\.", r"layers.\1.layernorm_\2."),
]
_LAYER_KEY_PATTERNS = [
    (re.compile("^" + pattern), replacement) for pattern, replacement in _LAYER_KEY_PATTERNS
]
_TOP_LEVEL_KEYS = {
    "embeddings.cls_token",
    "embeddings.position_embeddings",
    "embeddings.patch_embeddings.projection.weight",
    "embeddings.patch_embeddings.projection.bias",
    "layernorm.weight",
    "layernorm.bias",
}
# Parts of ViT / DeiT task models that a backbone does not have.
_DROPPED_PREFIXES = ("pooler.", "classifier.", "cls_classifier.", "distillation_classifier.", "decoder.")
_DROPPED_KEYS = ("embeddings.mask_token",)
_TASK_MODEL_PREFIXES = ("vit.", "deit.")

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def cdcl_model_from_vit_checkpoint(
    pretrained_model_name_or_path: str | os.PathLike,
    num_channels: int,
    rescale_patch_kernel: bool = True,
    **config_overrides,
) -> CDCLModel:
    r"""
    A CDCL model initialised from a 3-channel transformers ViT, DeiT or DINO (v1) checkpoint.

    The patch-embedding kernel is tiled over the channel axis: input channel `c` takes the kernel of RGB channel
    `c mod 3`, as the CDCL authors do to start from ImageNet DeiT-S. With `rescale_patch_kernel`, the tiled kernel is
    multiplied by `3 / num_channels`, so that the patch embedding of an image whose channels all look alike keeps the
    magnitude the pretrained layers expect (an image whose channels repeat R, G, B embeds exactly as the RGB image).
    Every other weight is copied unchanged. A DeiT distillation token and its position embedding are dropped, and
    so are poolers and task heads.

    Args:
        pretrained_model_name_or_path (`str` or `os.PathLike`):
            A local folder with `config.json` and the weights, or a Hub model id (downloaded with `huggingface_hub`,
            which honours `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE`).
        num_channels (`int`):
            Number of channels of the new model.
        rescale_patch_kernel (`bool`, *optional*, defaults to `True`):
            Whether to multiply the tiled patch kernel by `3 / num_channels`.
        config_overrides:
            Further `CDCLConfig` arguments, e.g. `drop_path_rate=0.1`, `pooling="cls+mean"`,
            `channel_names=[...]`. The architecture fields (sizes, activation, LayerNorm epsilon, `qkv_bias`, image
            and patch size) come from the checkpoint.

    Returns:
        `CDCLModel`: the initialised model (in training mode, as a newly created model is).

    Raises:
        `ValueError`: if the checkpoint is not a ViT / DeiT one, is not RGB, has a non-square image or patch size,
            or its weights do not map one to one onto a CDCL model.
    """
    source = str(pretrained_model_name_or_path)
    source_config, source_state = _read_checkpoint(source)
    model_type = source_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{source} is a {model_type!r} model; cdcl_model_from_vit_checkpoint expects a transformers ViT or DeiT "
            "checkpoint (model_type 'vit' or 'deit'; DINO v1 checkpoints are of type 'vit')"
        )
    architecture = _architecture_fields(source_config, model_type)
    if architecture["num_channels"] != 3:
        raise ValueError(
            f"{source} has {architecture['num_channels']} input channels; expected an RGB (3-channel) checkpoint"
        )
    image_size, patch_size = architecture["image_size"], architecture["patch_size"]
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        raise ValueError(
            f"only square image and patch sizes are supported, got {image_size} and {patch_size}"
        )

    config = CDCLConfig(
        **{name: architecture[name] for name in _COPIED_CONFIG_FIELDS},
        image_size=image_size,
        patch_size=patch_size,
        num_channels=num_channels,
        **config_overrides,
    )
    state = _to_cdcl_names(source_state, source, has_distillation_token=model_type == "deit")

    rgb_kernel = state["embeddings.patch_embeddings.projection.weight"]
    tiled_kernel = rgb_kernel[:, [channel % 3 for channel in range(num_channels)]]
    if rescale_patch_kernel:
        tiled_kernel = tiled_kernel * (3.0 / num_channels)
    state["embeddings.patch_embeddings.projection.weight"] = tiled_kernel

    model = CDCLModel(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not map onto a CDCL model: missing {missing}, unexpected {unexpected} "
            "(names after mapping onto CDCL's)"
        )
    wrong_shapes = [
        f"{name}: {tuple(state[name].shape)} in the checkpoint, {tuple(value.shape)} in the model"
        for name, value in expected.items()
        if state[name].shape != value.shape
    ]
    if wrong_shapes:
        raise ValueError(f"{source} does not match its own config.json: " + "; ".join(wrong_shapes))
    model.load_state_dict(state, strict=True)
    return model


def _architecture_fields(source_config: dict, model_type: str) -> dict:
    """The config fields used here, with transformers' ViTConfig / DeiTConfig defaults for the ones not stored."""
    from transformers import DeiTConfig, ViTConfig

    defaults = (ViTConfig if model_type == "vit" else DeiTConfig)()
    fields = {}
    for name in (*_COPIED_CONFIG_FIELDS, "num_channels", "image_size", "patch_size"):
        value = source_config.get(name, getattr(defaults, name))
        if isinstance(value, list) and len(value) == 2:
            value = value[0] if value[0] == value[1] else tuple(value)
        fields[name] = value
    return fields


def _to_cdcl_names(source_state: dict, source: str, has_distillation_token: bool) -> dict:
    """The checkpoint's backbone tensors under CDCL's parameter names."""
    prefixes = {key.split(".", 1)[0] + "." for key in source_state if key.startswith(_TASK_MODEL_PREFIXES)}
    if len(prefixes) > 1:
        raise ValueError(
            f"{source} holds more than one backbone ({sorted(prefixes)}); cannot tell which to use"
        )
    prefix = prefixes.pop() if prefixes else ""

    state, unexpected = {}, []
    for key, tensor in source_state.items():
        if prefix:
            if not key.startswith(prefix):
                if not key.startswith(_DROPPED_PREFIXES):
                    unexpected.append(key)
                continue
            key = key[len(prefix) :]
        if key.startswith(_DROPPED_PREFIXES) or key in _DROPPED_KEYS:
            continue
        if has_distillation_token and key == "embeddings.distillation_token":
            continue
        name = key if key in _TOP_LEVEL_KEYS else None
        for pattern, replacement in _LAYER_KEY_PATTERNS:
            if name is None and pattern.match(key):
                name = pattern.sub(replacement, key, count=1)
        if name is None:
            unexpected.append(prefix + key)
            continue
        if name in state:
            raise ValueError(f"{source} stores {name!r} twice (in two spellings); cannot tell which to use")
        state[name] = tensor
    if unexpected:
        raise ValueError(
            f"{source} has weights that are not part of a ViT / DeiT backbone: {sorted(unexpected)}; "
            "cdcl_model_from_vit_checkpoint expects a transformers ViT or DeiT checkpoint"
        )

    if has_distillation_token and "embeddings.position_embeddings" in state:
        # DeiT stores positions for [CLS, distillation, patches...]; keep CLS and the patches.
        positions = state["embeddings.position_embeddings"]
        state["embeddings.position_embeddings"] = torch.cat([positions[:, :1], positions[:, 2:]], dim=1)
    return state


def _read_checkpoint(source: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """`config.json` as a dict and the full state dict of a local folder or a Hub repository."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        fetch = _local_fetcher(folder)
    elif folder.exists() or source.startswith(("/", ".", "~")) or source.count("/") > 1:
        raise ValueError(f"{source} is not a checkpoint folder (and not a Hub model id)")
    else:
        fetch = _hub_fetcher(source)

    config_path = fetch("config.json")
    if config_path is None:
        raise ValueError(f"{source} has no config.json; expected a transformers ViT or DeiT checkpoint")
    source_config = json.loads(Path(config_path).read_text())

    for weight_file in _WEIGHT_FILES:
        weight_path = fetch(weight_file)
        if weight_path is None:
            continue
        if weight_file.endswith(".index.json"):
            shard_names = sorted(set(json.loads(Path(weight_path).read_text())["weight_map"].values()))
            shard_paths = [fetch(shard) for shard in shard_names]
            if None in shard_paths:
                missing = [name for name, path in zip(shard_names, shard_paths, strict=True) if path is None]
                raise ValueError(f"{source}: {weight_file} names shards that are not there: {missing}")
        else:
            shard_paths = [weight_path]
        state = {}
        for shard_path in shard_paths:
            state.update(_load_weight_file(shard_path))
        return source_config, state
    raise ValueError(
        f"{source} has none of the weight files {list(_WEIGHT_FILES)}"
        + (" in the local Hub cache (offline mode)" if getattr(fetch, "offline", False) else "")
    )


def _local_fetcher(folder: Path):
    def fetch(filename: str) -> str | None:
        path = folder / filename
        return str(path) if path.is_file() else None

    return fetch


def _hub_fetcher(repo_id: str):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    def fetch(filename: str) -> str | None:
        try:
            return hf_hub_download(repo_id, filename)
        except LocalEntryNotFoundError:
            # Offline and not cached: the file may or may not exist. config.json is needed either way.
            if filename == "config.json":
                raise
            fetch.offline = True
            return None
        except EntryNotFoundError:  # the repository has no such file
            return None

    return fetch


def _load_weight_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


__all__ = ["cdcl_model_from_vit_checkpoint", "SUPPORTED_MODEL_TYPES"]
