"""CDCL model configuration."""

from transformers import PretrainedConfig

POOLING_MODES = ("cls", "mean", "cls+mean")

# Named architecture sizes for `CDCLConfig.from_preset`. "vit-small-patch16" is DeiT-S/16, the backbone the CDCL
# authors start from. (Not to be confused with the multi-crop presets in `cdcl_hf.multicrop.PRESETS`.)
ARCHITECTURE_PRESETS = {
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
    # Single-cell crops (~64 px) on CPUs: DeiT-Ti's width and heads, 6 layers, 8-px patches (64 tokens at 64 px).
    "vit-crops-patch8": {
        "hidden_size": 192,
        "num_hidden_layers": 6,
        "num_attention_heads": 3,
        "intermediate_size": 768,
        "patch_size": 8,
        "image_size": 64,
    },
    # The same crops on a GPU: DeiT-S's width, depth and heads with 8-px patches (64 tokens at 64 px).
    "vit-small-crops-patch8": {
        "hidden_size": 384,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "intermediate_size": 1536,
        "patch_size": 8,
        "image_size": 64,
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
    This is the configuration class to store the configuration of a [`CDCLModel`]: a Vision Transformer over
    C-channel microscopy images (Cross-Domain Consistency Learning backbone). Instantiating a configuration with the
    defaults yields a DeiT-S/16-sized model over 3 channels; `CDCLConfig.from_preset` gives the named sizes.

    Field names follow transformers' `ViTConfig`, so a 3-channel ViT / DeiT / DINO checkpoint maps onto it (see
    `cdcl_hf.convert_vit.cdcl_model_from_vit_checkpoint`).

    Args:
        hidden_size (`int`, *optional*, defaults to 384):
            Dimensionality of the encoder layers.
        num_hidden_layers (`int`, *optional*, defaults to 12):
            Number of transformer layers.
        num_attention_heads (`int`, *optional*, defaults to 6):
            Number of attention heads in each attention layer; must divide `hidden_size`.
        intermediate_size (`int`, *optional*, defaults to 1536):
            Dimensionality of the hidden layer of the MLP inside each transformer layer.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the MLP (a key of `transformers.activations.ACT2FN`).
        hidden_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout probability after the embeddings and on the attention / MLP outputs.
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout probability on the attention weights.
        drop_path_rate (`float`, *optional*, defaults to 0.0):
            Stochastic-depth rate of the last layer; the rates grow linearly from 0 at the first layer (the CDCL
            student uses 0.1).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal initialiser of all weight matrices and embeddings.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the layer normalisations (DeiT / DINO use 1e-6).
        image_size (`int`, *optional*, defaults to 224):
            Image size the position embeddings are stored for; other sizes divisible by `patch_size` are handled by
            interpolating them.
        patch_size (`int`, *optional*, defaults to 16):
            Size (height and width) of each patch.
        num_channels (`int`, *optional*, defaults to 3):
            Number of image channels (fluorescence stains).
        channel_names (`list[str]`, *optional*):
            Name of each channel, e.g. `["DNA", "ER", "RNA", "AGP", "Mito"]`; must have `num_channels` entries.
        qkv_bias (`bool`, *optional*, defaults to `True`):
            Whether the query / key / value projections have a bias.
        pooling (`str`, *optional*, defaults to `"cls"`):
            What `pooler_output` holds: `"cls"` (the CLS token, CDCL's embedding), `"mean"` (the mean of the patch
            tokens) or `"cls+mean"` (both, concatenated: 2 x `hidden_size`).

    Example:

    ```python
    >>> from cdcl_hf import CDCLConfig, CDCLModel

    >>> configuration = CDCLConfig.from_preset("vit-small-patch16", num_channels=5)
    >>> model = CDCLModel(configuration)
    ```
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
        r"""
        A configuration of a named architecture size.

        Args:
            name (`str`):
                One of the keys of `ARCHITECTURE_PRESETS`: `"vit-small-patch16"` (DeiT-S/16), `"vit-base-patch16"`
                (ViT-B/16), `"vit-crops-patch8"` (DeiT-Ti width, 6 layers, 8-px patches: single-cell crops on CPUs),
                `"vit-small-crops-patch8"` (DeiT-S width and depth, 8-px patches: the same crops on a GPU) or `"tiny"` (for tests and CPU smoke runs).
            overrides:
                Any other `CDCLConfig` argument (e.g. `num_channels=5`, `drop_path_rate=0.1`); it takes precedence
                over the preset.

        Returns:
            `CDCLConfig`: the configuration.
        """
        if name not in ARCHITECTURE_PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {sorted(ARCHITECTURE_PRESETS)}")
        return cls(**{**ARCHITECTURE_PRESETS[name], **overrides})

    @property
    def pooled_size(self) -> int:
        """Width of `pooler_output`: `hidden_size`, or twice it for `pooling="cls+mean"`."""
        return 2 * self.hidden_size if self.pooling == "cls+mean" else self.hidden_size


__all__ = ["CDCLConfig", "ARCHITECTURE_PRESETS", "POOLING_MODES"]
