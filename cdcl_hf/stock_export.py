"""The CDCL backbone as a stock transformers `Dinov2Model`, so that a published model loads without custom code.

A `CDCLModel` with `pooling="cls"` computes exactly what `Dinov2Model` computes when its layer-scale vectors are ones:
the same pre-norm ViT layers, the same final LayerNorm, and a pooled output that is the normalised CLS token. Its
position embeddings are resampled the same way for other input sizes (bicubic, `align_corners=False`, to the
input's patch grid, in float32), so the two agree at interpolated sizes too (checked in tests/test_stock_export.py
at 48 px for a 32 px model and at non-square sizes). Written with `Dinov2Model.save_pretrained`, the checkpoint uses
the key names every transformers release with Dinov2 reads, so `AutoModel.from_pretrained(repo)` needs no
`trust_remote_code`.

What a stock model cannot express stays custom code (`export_format="cdcl"`): the `"mean"` and `"cls+mean"` pooling
modes, and an MLP width that is not a whole multiple of the hidden size (`Dinov2Config.mlp_ratio` is an integer).

The multi-channel image processor always stays custom code. For 3-channel models `preprocessor_config.json` also
describes a stock `ViTImageProcessor` (see `merge_stock_processor_settings`), so that
`pipeline("image-feature-extraction", model=repo)` runs with no custom code at all, while
`AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)` still gives the `CDCLImageProcessor`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import Dinov2Config, Dinov2Model

from .configuration_cdcl import CDCLConfig
from .modeling_cdcl import CDCLModel

__all__ = [
    "EXPORT_FORMATS",
    "STOCK_PROCESSOR_TYPE",
    "WHITE_LEVELS",
    "dinov2_incompatibility",
    "resolve_export_format",
    "dinov2_config",
    "to_dinov2",
    "default_white_level",
    "stock_processor_settings",
    "merge_stock_processor_settings",
]

# "auto": Dinov2 whenever the configuration allows, else the custom-code CDCL model.
EXPORT_FORMATS = ("auto", "dinov2", "cdcl")
# The stock processor written beside the CDCL one for 3-channel models: resize to a fixed size, rescale, normalise.
# (Dinov2's own default, BitImageProcessor, resizes the short side and centre-crops; training's input is a square.)
STOCK_PROCESSOR_TYPE = "ViTImageProcessor"
# The common detector ranges a stored channel may span: 8-bit, 12-bit (most scientific cameras, in a 16-bit
# container) and 16-bit.
WHITE_LEVELS = (255, 4095, 65535)


def dinov2_incompatibility(config: CDCLConfig) -> str | None:
    """Why a `CDCLModel` of `config` has no stock `Dinov2Model` equivalent, or `None` when it has one.

    Args:
        config (`CDCLConfig`): The backbone's configuration.

    Returns:
        `str` or `None`: A sentence naming the setting that rules Dinov2 out.
    """
    if config.pooling != "cls":
        return (f'pooling "{config.pooling}" has no stock equivalent (Dinov2\'s pooled output is the normalised CLS '
                'token, pooling "cls")')
    if config.intermediate_size % config.hidden_size:
        return (f"intermediate_size {config.intermediate_size} is not a whole multiple of hidden_size "
                f"{config.hidden_size} (Dinov2 sets the MLP width as an integer mlp_ratio)")
    return None


def resolve_export_format(config: CDCLConfig, export_format: str = "auto") -> str:
    """The format a model of `config` is published in: `"dinov2"` or `"cdcl"`.

    Args:
        config (`CDCLConfig`): The backbone's configuration.
        export_format (`str`, *optional*, defaults to `"auto"`): `"auto"` (Dinov2 when possible), `"dinov2"` (refused,
            with the reason, when not possible) or `"cdcl"` (the custom-code model).

    Raises:
        ValueError: An unknown format, or `"dinov2"` for a configuration Dinov2 cannot express.
    """
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got {export_format!r}")
    if export_format == "cdcl":
        return "cdcl"
    reason = dinov2_incompatibility(config)
    if reason is None:
        return "dinov2"
    if export_format == "dinov2":
        raise ValueError(f"this model cannot be exported as a stock Dinov2Model: {reason}; use export format cdcl")
    return "cdcl"


def dinov2_config(config: CDCLConfig) -> Dinov2Config:
    """The `Dinov2Config` of the stock model equivalent to a `CDCLModel` of `config`.

    Layer scale is set to 1 (CDCL has none), drop-path to 0 (an exported model is for inference), and the channel
    names travel along as an extra field so that a stock checkpoint still says which stain each channel is.

    Raises:
        ValueError: `config` has no Dinov2 equivalent (see `dinov2_incompatibility`).
    """
    reason = dinov2_incompatibility(config)
    if reason is not None:
        raise ValueError(f"this model cannot be exported as a stock Dinov2Model: {reason}")
    extra = {"channel_names": list(config.channel_names)} if config.channel_names is not None else {}
    return Dinov2Config(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size // config.hidden_size,
        hidden_act=config.hidden_act,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        initializer_range=config.initializer_range,
        layer_norm_eps=config.layer_norm_eps,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        qkv_bias=config.qkv_bias,
        layerscale_value=1.0,
        drop_path_rate=0.0,
        use_swiglu_ffn=False,
        use_mask_token=True,
        **extra,
    )


def _submodule(root: torch.nn.Module, *candidates: str) -> torch.nn.Module:
    """The first of `candidates` (dotted paths) that exists under `root`.

    Dinov2's attention projections are named `q_proj` / `o_proj` in recent transformers and `attention.query` /
    `output.dense` in older 5.x releases; resolving modules instead of renaming keys works with both.
    """
    for path in candidates:
        module = root
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if module is not None:
            return module
    raise AttributeError(f"{type(root).__name__} has none of {candidates}: unsupported transformers Dinov2 layout")


def _copy_module(target: torch.nn.Module, source: torch.nn.Module, copied: set[int]) -> None:
    target_parameters = dict(target.named_parameters())
    source_parameters = dict(source.named_parameters())
    if target_parameters.keys() != source_parameters.keys():
        raise ValueError(
            f"cannot map {type(source).__name__} onto {type(target).__name__}: parameters "
            f"{sorted(source_parameters)} vs {sorted(target_parameters)}"
        )
    for name, parameter in source_parameters.items():
        if target_parameters[name].shape != parameter.shape:
            raise ValueError(f"{type(source).__name__}.{name}: shape {tuple(parameter.shape)} does not fit "
                             f"{tuple(target_parameters[name].shape)}")
        target_parameters[name].copy_(parameter)
        copied.add(id(parameter))


@torch.no_grad()
def to_dinov2(model: CDCLModel) -> Dinov2Model:
    """A stock `Dinov2Model` whose `pooler_output` equals `model`'s, on any input size the CDCL model accepts.

    Every CDCL weight is copied (the conversion fails if one would be left behind); Dinov2's extra tensors are set to
    what makes it compute the CDCL function: the layer-scale vectors to ones, the mask token (used only for masked
    pre-training, `bool_masked_pos`) to zeros.

    Args:
        model (`CDCLModel`): The backbone to convert; its configuration must have a Dinov2 equivalent.

    Returns:
        `Dinov2Model`: In evaluation mode, with `model`'s dtype, on the CPU.

    Raises:
        ValueError: The configuration has no Dinov2 equivalent (see `dinov2_incompatibility`).
    """
    stock = Dinov2Model(dinov2_config(model.config)).eval()
    source = model.to("cpu")
    copied: set[int] = set()

    _copy_module(stock.embeddings.patch_embeddings.projection, source.embeddings.patch_embeddings.projection, copied)
    for name in ("cls_token", "position_embeddings"):
        source_tensor = getattr(source.embeddings, name)
        getattr(stock.embeddings, name).copy_(source_tensor)
        copied.add(id(source_tensor))
    stock.embeddings.mask_token.zero_()
    for stock_layer, layer in zip(stock.encoder.layer, source.layers, strict=True):
        _copy_module(stock_layer.norm1, layer.layernorm_before, copied)
        _copy_module(stock_layer.norm2, layer.layernorm_after, copied)
        for ours, theirs in (("q_proj", ("attention.q_proj", "attention.attention.query")),
                             ("k_proj", ("attention.k_proj", "attention.attention.key")),
                             ("v_proj", ("attention.v_proj", "attention.attention.value")),
                             ("o_proj", ("attention.o_proj", "attention.output.dense"))):
            _copy_module(_submodule(stock_layer, *theirs), getattr(layer.attention, ours), copied)
        _copy_module(stock_layer.mlp.fc1, layer.mlp.fc1, copied)
        _copy_module(stock_layer.mlp.fc2, layer.mlp.fc2, copied)
        stock_layer.layer_scale1.lambda1.fill_(1.0)
        stock_layer.layer_scale2.lambda1.fill_(1.0)
    _copy_module(stock.layernorm, source.layernorm, copied)

    left_behind = [name for name, parameter in source.named_parameters() if id(parameter) not in copied]
    if left_behind:
        raise ValueError(f"the Dinov2 conversion does not cover the CDCL weights {left_behind}")
    return stock.to(next(source.parameters()).dtype)


# ---- the stock image processor for 3-channel models ------------------------------------------------------------


def default_white_level(image_mean: list[float], image_std: list[float]) -> int:
    """The smallest common detector range (8-, 12- or 16-bit) that holds every channel's mean + 3 std.

    A guess from the processor's statistics: the exported checkpoint does not record its screen's bit depth. Pass
    the real range (`rgb_white_level`) when it is known.
    """
    top = max(mean + 3 * std for mean, std in zip(image_mean, image_std, strict=True))
    return next((level for level in WHITE_LEVELS if top <= level), WHITE_LEVELS[-1])


def stock_processor_settings(processor_config: Mapping[str, Any], white_level: int | None = None) -> dict[str, Any] | None:
    """The stock `ViTImageProcessor` fields for a 3-channel CDCL processor configuration, or `None` if none fits.

    The stock processor sees what `pipeline("image-feature-extraction")` delivers: an 8-bit RGB image. It resizes it
    to the CDCL processor's size and computes `(pixel * rescale_factor - image_mean) / image_std`. The fields are
    chosen so that they do not clash with the CDCL processor's, which reads the same file:

    * per-plate models (`normalization="per_channel"`): `image_mean` / `image_std` stay the CDCL processor's raw
      intensity statistics (the average training plate), and `rescale_factor = white_level / 255` maps 0..255 back
      to raw units. That is exact for an RGB image that renders each stored channel linearly from 0 to
      `white_level` (no contrast stretch, no gamma); any other rendering shifts the inputs.
    * per-image models (`normalization="per_image"`): no fixed normalisation reproduces per-image standardisation;
      transformers' statistics-free default (`(pixel / 255 - 0.5) / 0.5`) is used, an approximation.

    Args:
        processor_config (`Mapping`): The CDCL processor's saved settings (`preprocessor_config.json`).
        white_level (`int`, *optional*): The raw intensity that 255 in the RGB rendering stands for; defaults to
            `default_white_level` of the statistics.

    Returns:
        `dict` or `None`: The fields to merge into `preprocessor_config.json`; `None` for processors the stock one
        cannot follow (not 3 channels, `shortest_edge` sizes, centre crops, `"none"` normalisation).
    """
    size = processor_config.get("size") or {}
    if (processor_config.get("num_channels") != 3 or set(size) != {"height", "width"}
            or processor_config.get("do_center_crop") or not processor_config.get("do_resize", True)):
        return None
    settings: dict[str, Any] = {
        "image_processor_type": STOCK_PROCESSOR_TYPE,
        "do_resize": True,
        "size": dict(size),
        "resample": 2,  # PIL bilinear
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
    }
    normalization = processor_config.get("normalization")
    if normalization == "per_channel":
        mean, std = list(processor_config["image_mean"]), list(processor_config["image_std"])
        level = int(white_level) if white_level is not None else default_white_level(mean, std)
        if level <= 0:
            raise ValueError(f"rgb white level must be a positive intensity, got {white_level}")
        settings.update(rescale_factor=level / 255, image_mean=mean, image_std=std, rgb_white_level=level)
    elif normalization == "per_image":
        settings.update(rescale_factor=1 / 255, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    else:
        return None
    return settings


def merge_stock_processor_settings(folder: Path, white_level: int | None = None) -> dict[str, Any] | None:
    """Make `folder/preprocessor_config.json` describe a stock `ViTImageProcessor` as well as the CDCL processor.

    One file serves both loaders: `AutoImageProcessor.from_pretrained(folder)` (and the stock pipeline) finds the
    stock `image_processor_type` and needs no custom code; with `trust_remote_code=True` the `auto_map` entry wins
    and the CDCL processor is built from the same file, ignoring the stock-only fields (`do_rescale`,
    `rescale_factor`, `do_normalize`, `resample`, `do_convert_rgb`). Nothing is changed when no stock processor
    fits (see `stock_processor_settings`).

    Returns:
        `dict` or `None`: The merged stock fields, or `None` when the file was left as it was.
    """
    path = Path(folder) / "preprocessor_config.json"
    config = json.loads(path.read_text())
    settings = stock_processor_settings(config, white_level)
    if settings is None:
        return None
    config.update(settings)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return settings
