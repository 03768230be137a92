"""PyTorch CDCL model: a Vision Transformer over C-channel microscopy images.

The building blocks (patch/position embeddings, attention through transformers' attention interface, MLP) are
transformers' own ViT modules, so parameter names match `ViTModel` / `DeiTModel` checkpoints one to one and SDPA /
flash attention work as in transformers. What CDCL adds: any number of channels, position embeddings interpolated
for every crop size (multi-crop trains on 224 px and 96-112 px crops), stochastic depth, and a configurable pooled
embedding.
"""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.dinov2.modeling_dinov2 import Dinov2DropPath
from transformers.models.vit.modeling_vit import ViTAttention, ViTEmbeddings, ViTMLP

from .configuration_cdcl import CDCLConfig


class CDCLLayer(GradientCheckpointingLayer):
    """Pre-norm transformer layer (as in ViT / DeiT) with stochastic depth on both residual branches."""

    def __init__(self, config: CDCLConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.attention = ViTAttention(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ViTMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.drop_path = Dinov2DropPath(drop_path_rate)

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attention_output, attention_weights = self.attention(self.layernorm_before(hidden_states))
        hidden_states = hidden_states + self.drop_path(self.dropout(attention_output))

        mlp_output = self.mlp(self.layernorm_after(hidden_states))
        hidden_states = hidden_states + self.drop_path(self.dropout(mlp_output))
        return hidden_states, (attention_weights if output_attentions else None)


class CDCLPreTrainedModel(PreTrainedModel):
    config_class = CDCLConfig
    base_model_prefix = "cdcl"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ViTEmbeddings", "CDCLLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, nn.Linear | nn.Conv2d):
            init.trunc_normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, ViTEmbeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=self.config.initializer_range)
            init.trunc_normal_(module.cls_token, mean=0.0, std=self.config.initializer_range)


class CDCLModel(CDCLPreTrainedModel):
    """
    The CDCL backbone. Input: `pixel_values` of shape (batch, num_channels, height, width), height and width
    divisible by `patch_size` (any such size: position embeddings are interpolated). Output:
    `BaseModelOutputWithPooling` whose `last_hidden_state` holds the normalised CLS + patch tokens and whose
    `pooler_output` is the embedding selected by `config.pooling`.
    """

    def __init__(self, config: CDCLConfig):
        super().__init__(config)
        self.config = config
        self.embeddings = ViTEmbeddings(config)
        drop_path_rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers).tolist()
        self.layers = nn.ModuleList([CDCLLayer(config, rate) for rate in drop_path_rates])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must have shape (batch, channels, height, width), got shape {tuple(pixel_values.shape)}"
            )
        height, width = pixel_values.shape[-2:]
        patch_size = self.config.patch_size
        if height % patch_size or width % patch_size:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the patch size {patch_size}; "
                "resize or crop to a multiple of it (the image processor does this)"
            )
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)

        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=True)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, attention_weights = layer(hidden_states, output_attentions=bool(output_attentions))
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attention_weights,)

        sequence_output = self.layernorm(hidden_states)
        return BaseModelOutputWithPooling(
            last_hidden_state=sequence_output,
            pooler_output=self.pool(sequence_output),
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )

    def pool(self, sequence_output: torch.Tensor) -> torch.Tensor:
        """The embedding of each image from the normalised token sequence, as `config.pooling` says."""
        cls_token = sequence_output[:, 0]
        if self.config.pooling == "cls":
            return cls_token
        patch_mean = sequence_output[:, 1:].mean(dim=1)
        if self.config.pooling == "mean":
            return patch_mean
        return torch.cat([cls_token, patch_mean], dim=-1)

    @classmethod
    def from_vit_checkpoint(
        cls, pretrained_model_name_or_path: str, num_channels: int, rescale_patch_kernel: bool = True, **config_overrides
    ) -> "CDCLModel":
        """
        A CDCL model initialised from a 3-channel transformers ViT, DeiT or DINO (v1) checkpoint.

        The patch-embedding kernel is tiled over the channel axis (input channel c takes the kernel of RGB channel
        c mod 3), as the CDCL authors do to start from ImageNet DeiT-S. With `rescale_patch_kernel`, the tiled
        kernel is multiplied by 3 / num_channels so that the patch embedding of an image whose channels all look
        alike keeps the magnitude the pretrained layers expect. Every other weight is copied unchanged; a DeiT
        distillation token is dropped. `config_overrides` (e.g. `drop_path_rate=0.1`, `channel_names=[...]`)
        go into the new config.
        """
        from transformers import AutoModel

        source = AutoModel.from_pretrained(pretrained_model_name_or_path)
        source_config = source.config
        if source_config.model_type not in ("vit", "deit"):
            raise ValueError(
                f"{pretrained_model_name_or_path} is a {source_config.model_type!r} model; from_vit_checkpoint "
                "expects a transformers ViT or DeiT checkpoint (DINO v1 and DeiT checkpoints are of these types)"
            )
        if source_config.num_channels != 3:
            raise ValueError(
                f"{pretrained_model_name_or_path} has {source_config.num_channels} input channels; expected an RGB "
                "(3-channel) checkpoint"
            )
        image_size = source_config.image_size
        patch_size = source_config.patch_size
        if not isinstance(image_size, int) or not isinstance(patch_size, int):
            raise ValueError(f"only square image and patch sizes are supported, got {image_size} and {patch_size}")
        config_fields = {
            name: getattr(source_config, name)
            for name in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "hidden_act",
                "layer_norm_eps",
                "initializer_range",
                "qkv_bias",
            )
        }
        config = CDCLConfig(
            **{**config_fields, "image_size": image_size, "patch_size": patch_size, "num_channels": num_channels},
            **config_overrides,
        )
        model = cls(config)

        source_state = {k: v for k, v in source.state_dict().items() if not k.startswith("pooler.")}
        source_state.pop("embeddings.mask_token", None)
        if source_config.model_type == "deit":
            source_state.pop("embeddings.distillation_token")
            positions = source_state["embeddings.position_embeddings"]
            # DeiT stores [CLS, distillation, patches...]; keep CLS and the patches.
            source_state["embeddings.position_embeddings"] = torch.cat([positions[:, :1], positions[:, 2:]], dim=1)

        rgb_kernel = source_state["embeddings.patch_embeddings.projection.weight"]
        tiled_kernel = rgb_kernel[:, [channel % 3 for channel in range(num_channels)]]
        if rescale_patch_kernel:
            tiled_kernel = tiled_kernel * (3.0 / num_channels)
        source_state["embeddings.patch_embeddings.projection.weight"] = tiled_kernel

        missing, unexpected = model.load_state_dict(source_state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{pretrained_model_name_or_path} does not map onto a CDCL model: missing {missing}, "
                f"unexpected {unexpected}"
            )
        return model


__all__ = ["CDCLPreTrainedModel", "CDCLModel", "CDCLLayer"]
