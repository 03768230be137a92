"""PyTorch CDCL model: a Vision Transformer over C-channel microscopy images.

This file is self-contained: every module is defined here, so the parameter names of a checkpoint are fixed by this
file and not by the installed transformers version. It is copied into every saved checkpoint (together with
`configuration_cdcl.py`), where `AutoModel.from_pretrained(..., trust_remote_code=True)` loads it; it therefore
imports only public transformers APIs and nothing from the `cdcl_hf` package except the configuration.

Architecture: a pre-norm ViT (as ViT / DeiT / DINO) with any number of input channels, position embeddings
interpolated to every input size (multi-crop trains on 224 px and 96-112 px crops), stochastic depth on both
residual branches and a configurable pooled embedding (`config.pooling`). Attention goes through transformers'
attention-function registry, so `attn_implementation="sdpa"` / flash / flex work as in transformers' own models.
"""

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel

from .configuration_cdcl import CDCLConfig


class CDCLPatchEmbeddings(nn.Module):
    """
    Cuts `pixel_values` of shape `(batch_size, num_channels, height, width)` into non-overlapping patches and
    projects each to `hidden_size`: output `(batch_size, num_patches, hidden_size)`, patches in row-major order.
    """

    def __init__(self, config: CDCLConfig):
        super().__init__()
        self.num_channels = config.num_channels
        self.patch_size = config.patch_size
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        num_channels = pixel_values.shape[1]
        if num_channels != self.num_channels:
            raise ValueError(
                f"pixel_values has {num_channels} channels but the model was configured for {self.num_channels} "
                f"(config.num_channels): expected {self.num_channels} but got {num_channels}"
            )
        patches = self.projection(pixel_values)  # (batch, hidden, rows, columns)
        return patches.flatten(2).transpose(1, 2)


class CDCLEmbeddings(nn.Module):
    """
    CLS token + patch embeddings + position embeddings.

    The position embeddings are stored for a `config.image_size` square; for any other input size (divisible by the
    patch size) the patch part of them is resampled bicubically to the input's patch grid.
    """

    def __init__(self, config: CDCLConfig):
        super().__init__()
        # Creation order (CLS token, patch projection, position embeddings) fixes how a seeded model draws its
        # initial weights; keep it.
        self.cls_token = nn.Parameter(torch.randn(1, 1, config.hidden_size))
        self.patch_embeddings = CDCLPatchEmbeddings(config)
        self.grid_size = config.image_size // config.patch_size
        self.position_embeddings = nn.Parameter(torch.randn(1, 1 + self.grid_size**2, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.patch_size = config.patch_size

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """
        Position embeddings for an image of `height` x `width` pixels: `(1, 1 + num_patches, hidden_size)`.

        At the stored size they are returned as they are; otherwise the stored patch grid is resized with bicubic
        interpolation (`align_corners=False`) to `(height // patch_size, width // patch_size)` and the CLS position
        is kept. Under `torch.jit.trace` the resampling is always traced, so the trace works for other sizes.
        """
        rows, columns = height // self.patch_size, width // self.patch_size
        if (rows, columns) == (self.grid_size, self.grid_size) and not torch.jit.is_tracing():
            return self.position_embeddings

        hidden_size = self.position_embeddings.shape[-1]
        stored_grid = math.isqrt(self.position_embeddings.shape[1] - 1)
        cls_position = self.position_embeddings[:, :1]
        patch_positions = self.position_embeddings[:, 1:].reshape(1, stored_grid, stored_grid, hidden_size)
        patch_positions = nn.functional.interpolate(
            patch_positions.permute(0, 3, 1, 2), size=(rows, columns), mode="bicubic", align_corners=False
        )
        patch_positions = patch_positions.permute(0, 2, 3, 1).reshape(1, rows * columns, hidden_size)
        return torch.cat([cls_position, patch_positions], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch_size, _, height, width = pixel_values.shape
        # Each step rebinds `embeddings`, so the previous (batch, tokens, hidden) tensor is freed at once: at most two
        # are alive, which keeps the peak activation memory of inference at ViTModel's.
        embeddings = self.patch_embeddings(pixel_values)
        embeddings = torch.cat([self.cls_token.expand(batch_size, -1, -1), embeddings], dim=1)
        embeddings = embeddings + self.interpolate_pos_encoding(height, width)
        return self.dropout(embeddings)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Plain softmax attention over `(batch, heads, tokens, head_dim)` inputs, with the signature of transformers'
    registered attention functions. Returns the output as `(batch, tokens, heads, head_dim)` and the attention
    weights `(batch, heads, tokens, tokens)`.
    """
    scores = torch.matmul(query, key.transpose(-2, -1)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    # Softmax in float32 also under half precision, then back to the working dtype.
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


class CDCLAttention(nn.Module):
    """
    Multi-head self-attention with separate query / key / value / output projections.

    The attention itself is the function registered in transformers' `ALL_ATTENTION_FUNCTIONS` under
    `config._attn_implementation` ("sdpa", "flash_attention_2", "flex_attention", ...), or
    `eager_attention_forward` for "eager" and whenever the attention weights are requested.
    """

    def __init__(self, config: CDCLConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_probs_dropout_prob
        self.is_causal = False  # read by the registered attention functions

        inner_size = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, inner_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, inner_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(inner_size, config.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, num_tokens, _ = hidden_states.shape
        per_head = (batch_size, num_tokens, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(per_head).transpose(1, 2)
        key = self.k_proj(hidden_states).view(per_head).transpose(1, 2)
        value = self.v_proj(hidden_states).view(per_head).transpose(1, 2)

        # Only the eager function returns the weights; the registered kernels are used whenever they are not asked for.
        implementation = self.config._attn_implementation
        attention_function: Callable = eager_attention_forward
        if not output_attentions and implementation not in (None, "eager"):
            # Newer 5.x releases check the name there and resolve kernels from the Hub; early 5.x has no get_interface.
            if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
                attention_function = ALL_ATTENTION_FUNCTIONS.get_interface(
                    implementation, eager_attention_forward
                )
            else:
                attention_function = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]

        attention_output, attention_weights = attention_function(
            self,
            query,
            key,
            value,
            None,
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        attention_output = attention_output.reshape(batch_size, num_tokens, -1).contiguous()
        return self.o_proj(attention_output), (attention_weights if output_attentions else None)


class CDCLMLP(nn.Module):
    """The feed-forward block of a transformer layer: `hidden_size -> intermediate_size -> hidden_size`."""

    def __init__(self, config: CDCLConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class CDCLDropPath(nn.Module):
    """
    Stochastic depth: in training, zeroes a residual branch for a random subset of the samples (each with
    probability `drop_prob`) and scales the kept ones by `1 / (1 - drop_prob)`. The identity in evaluation.
    """

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return hidden_states
        keep_prob = 1.0 - self.drop_prob
        # One uniform draw per sample; floor(u + keep_prob) is 1 with probability keep_prob, else 0.
        mask_shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        uniform = torch.rand(mask_shape, dtype=hidden_states.dtype, device=hidden_states.device)
        keep_mask = torch.floor(uniform + keep_prob)
        return hidden_states.div(keep_prob) * keep_mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class CDCLLayer(GradientCheckpointingLayer):
    """
    Pre-norm transformer layer: `x + drop_path(attention(norm(x)))`, then `x + drop_path(mlp(norm(x)))`.

    As a `GradientCheckpointingLayer`, its activations are recomputed in the backward pass once
    `model.gradient_checkpointing_enable()` (or `activation_checkpointing_enable()`) has been called.
    """

    def __init__(self, config: CDCLConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.attention = CDCLAttention(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CDCLMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.drop_path = CDCLDropPath(drop_path_rate)

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The branch outputs are temporaries, not names: the attention output is freed before the MLP runs, so one
        # fewer (batch, tokens, hidden) tensor is alive at the MLP's peak.
        residual = hidden_states
        hidden_states, attention_weights = self.attention(
            self.layernorm_before(hidden_states), output_attentions=output_attentions
        )
        hidden_states = residual + self.drop_path(self.dropout(hidden_states))
        del residual
        hidden_states = hidden_states + self.drop_path(self.dropout(self.mlp(self.layernorm_after(hidden_states))))
        return hidden_states, attention_weights


class CDCLPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the transformers plumbing (loading, saving, attention dispatch) for CDCL models."""

    config_class = CDCLConfig
    base_model_prefix = "cdcl"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["CDCLEmbeddings", "CDCLLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        """
        Truncated normal (std `config.initializer_range`, cut at torch's default bounds of -2 and 2) for the
        projection weights, the CLS token and the position embeddings; zero biases; unit LayerNorms. Tensors already
        loaded from a checkpoint are left alone.
        """
        std = self.config.initializer_range
        if isinstance(module, nn.Linear | nn.Conv2d):
            # The plain normal draw before the truncated one is overwritten; it is kept so that a seeded model draws
            # the same initial weights as the releases before this file was self-contained.
            _init_if_needed(nn.init.normal_, module.weight, mean=0.0, std=std)
            _init_if_needed(nn.init.trunc_normal_, module.weight, mean=0.0, std=std)
            if module.bias is not None:
                _init_if_needed(nn.init.zeros_, module.bias)
        elif isinstance(module, nn.LayerNorm):
            _init_if_needed(nn.init.ones_, module.weight)
            _init_if_needed(nn.init.zeros_, module.bias)
        elif isinstance(module, CDCLEmbeddings):
            _init_if_needed(nn.init.trunc_normal_, module.position_embeddings, mean=0.0, std=std)
            _init_if_needed(nn.init.trunc_normal_, module.cls_token, mean=0.0, std=std)


def _init_if_needed(init_function: Callable, tensor: torch.Tensor, **kwargs) -> None:
    # transformers marks the tensors it loaded from a checkpoint with `_is_hf_initialized`.
    if not getattr(tensor, "_is_hf_initialized", False):
        init_function(tensor, **kwargs)


class CDCLModel(CDCLPreTrainedModel):
    """
    The CDCL backbone.

    Input: `pixel_values` of shape `(batch_size, num_channels, height, width)`, height and width divisible by
    `config.patch_size` (any such size: the position embeddings are interpolated). Output: a
    `BaseModelOutputWithPooling` whose `last_hidden_state` holds the layer-normed CLS + patch tokens
    `(batch_size, 1 + num_patches, hidden_size)` and whose `pooler_output` is the embedding selected by
    `config.pooling`; `hidden_states` (the embeddings and each layer's output, before the final norm:
    `num_hidden_layers + 1` tensors) and `attentions` (`(batch_size, heads, tokens, tokens)` per layer) on request.
    """

    def __init__(self, config: CDCLConfig):
        super().__init__(config)
        self.config = config
        self.embeddings = CDCLEmbeddings(config)
        # Rates computed on the CPU in float32 (also when transformers builds the model on the meta device).
        drop_path_rates = torch.linspace(
            0, config.drop_path_rate, config.num_hidden_layers, device="cpu"
        ).tolist()
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
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
                The images, normalised as the image processor does; height and width divisible by the patch size.
            output_hidden_states (`bool`, *optional*):
                Whether to return the hidden states of all layers; defaults to `config.output_hidden_states`.
            output_attentions (`bool`, *optional*):
                Whether to return the attention weights of all layers (computed by the eager attention function
                whatever `config._attn_implementation` is); defaults to `config.output_attentions`.
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
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
        weight_dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        if pixel_values.dtype != weight_dtype:
            pixel_values = pixel_values.to(weight_dtype)

        hidden_states = self.embeddings(pixel_values)
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


__all__ = ["CDCLPreTrainedModel", "CDCLModel", "CDCLLayer", "CDCLEmbeddings"]
