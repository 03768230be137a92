"""CDCL model configuration."""

from transformers import PretrainedConfig

POOLING_MODES = ("cls", "mean", "cls+mean")

# Named sizes. "vit-small-patch16" is DeiT-S/16, the backbone the CDCL authors start from.
PRESETS = {
    "vit-small-patch16": {
        "hidden_size": 384,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "intermediate_size": 1536,
        "patch_size": 16,
        "image_size": 224,
    },
    "vit-base-patch16": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "patch_size": 16,
        "image_size": 224,
    },
    # For tests and CPU smoke runs.
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "patch_size": 8,
        "image_size": 32,
    },
}


class CDCLConfig(PretrainedConfig):
    r"""
    Configuration of a CDCL backbone: a Vision Transformer over C-channel microscopy images.

    Field names follow transformers' `ViTConfig`, so a 3-channel ViT / DeiT / DINO checkpoint maps onto it.

    Args:
        hidden_size (`int`, defaults to 384): Width of the encoder.
        num_hidden_layers (`int`, defaults to 12): Number of transformer layers.
        num_attention_heads (`int`, defaults to 6): Attention heads per layer.
        intermediate_size (`int`, defaults to 1536): Width of the MLP inside each layer.
        hidden_act (`str`, defaults to `"gelu"`): MLP activation.
        hidden_dropout_prob (`float`, defaults to 0.0): Dropout after attention / MLP outputs.
        attention_probs_dropout_prob (`float`, defaults to 0.0): Dropout on attention weights.
        drop_path_rate (`float`, defaults to 0.0): Stochastic-depth rate of the last layer; rates grow linearly
            from 0 at the first layer (the CDCL student uses 0.1).
        initializer_range (`float`, defaults to 0.02): Std of the truncated normal initialiser.
        layer_norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon (DeiT / DINO use 1e-6).
        image_size (`int`, defaults to 224): Size the position embeddings are stored for; other sizes divisible
            by `patch_size` are handled by interpolating them.
        patch_size (`int`, defaults to 16): Patch size.
        num_channels (`int`, defaults to 3): Number of image channels (fluorescence stains).
        channel_names (`list[str]`, *optional*): Name of each channel, e.g. `["DNA", "ER", "RNA", "AGP", "Mito"]`.
        qkv_bias (`bool`, defaults to `True`): Bias on query / key / value projections.
        pooling (`str`, defaults to `"cls"`): What `pooler_output` holds: `"cls"` (the CLS token, CDCL's
            embedding), `"mean"` (mean of the patch tokens) or `"cls+mean"` (both, concatenated: 2 x hidden_size).
    """

    model_type = "cdcl"

    def __init__(
        self,
        hidden_size: int = 384,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 6,
        intermediate_size: int = 1536,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        drop_path_rate: float = 0.0,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-6,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        channel_names: list[str] | None = None,
        qkv_bias: bool = True,
        pooling: str = "cls",
        **kwargs,
    ):
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})"
            )
        if image_size % patch_size != 0:
            raise ValueError(f"image_size ({image_size}) must be divisible by patch_size ({patch_size})")
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
        if num_channels < 1:
            raise ValueError(f"num_channels must be at least 1, got {num_channels}")
        if channel_names is not None and len(channel_names) != num_channels:
            raise ValueError(
                f"channel_names has {len(channel_names)} entries ({channel_names}) but num_channels is {num_channels}"
            )
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")

        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.drop_path_rate = drop_path_rate
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.channel_names = list(channel_names) if channel_names is not None else None
        self.qkv_bias = qkv_bias
        self.pooling = pooling
        super().__init__(**kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "CDCLConfig":
        """A configuration of a named size (`"vit-small-patch16"`, `"vit-base-patch16"`, `"tiny"`), with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def pooled_size(self) -> int:
        """Width of `pooler_output`."""
        return 2 * self.hidden_size if self.pooling == "cls+mean" else self.hidden_size


__all__ = ["CDCLConfig", "PRESETS", "POOLING_MODES"]
