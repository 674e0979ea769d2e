"""RWKV-CLIP configurations: text tower, vision tower and the composite dual encoder."""

import math
import re

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.utils import logging

from .remote_code_rwkv_clip import export_remote_code, save_with_remote_code

logger = logging.get_logger(__name__)

# Token-shift patterns. Each head's channels are split into as many equal groups as there are offsets;
# group g of token (row, col) takes the token at (row + dy, col + dx); out-of-range neighbours are zero.
TOKEN_SHIFT_OFFSETS = {
    # image "Q-shift" on the patch grid: left, right, above, below
    "q_shift": ((0, -1), (0, 1), (-1, 0), (1, 0)),
    # text "B-shift" along the sequence: previous, next
    "b_shift": ((0, -1), (0, 1)),
}


class _RemoteCodeConfigMixin:
    """Saved directories carry their code so that `trust_remote_code=True` loads them without this package."""

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        save_with_remote_code(self, super().save_pretrained, save_directory, push_to_hub, **kwargs)


class _RWKVCLIPTowerConfigMixin(_RemoteCodeConfigMixin):
    """Checks shared by both tower configs (called from `validate_architecture`)."""

    def __post_init__(self, **kwargs):
        # Configs saved by earlier versions carry `bi_wkv_backend`; the op implementation is now chosen on the model
        # (`model.set_kernel_backend(...)`), so the field is read here and dropped.
        legacy = kwargs.pop("bi_wkv_backend", None)
        if legacy not in (None, "auto"):
            logger.warning(
                f"{type(self).__name__}: the config field bi_wkv_backend={legacy!r} is no longer used; choose the "
                f"implementation with model.set_kernel_backend({legacy!r}) or $RWKV_CLIP_KERNEL_BACKEND."
            )
        super().__post_init__(**kwargs)

    def _validate_tower(self) -> None:
        if self.hidden_size <= 0 or self.head_size <= 0:
            raise ValueError(
                f"{type(self).__name__}: hidden_size ({self.hidden_size}) and head_size ({self.head_size}) "
                "must be positive."
            )
        if self.hidden_size % self.head_size != 0:
            raise ValueError(
                f"{type(self).__name__}: hidden_size ({self.hidden_size}) must be a multiple of head_size "
                f"({self.head_size}); the number of heads is hidden_size // head_size."
            )
        if self.token_shift not in TOKEN_SHIFT_OFFSETS:
            raise ValueError(
                f"{type(self).__name__}: token_shift must be one of {sorted(TOKEN_SHIFT_OFFSETS)}, "
                f"got {self.token_shift!r}."
            )
        groups = len(TOKEN_SHIFT_OFFSETS[self.token_shift])
        if self.head_size % groups != 0:
            raise ValueError(
                f"{type(self).__name__}: head_size ({self.head_size}) must be divisible by {groups} for the "
                f"{self.token_shift!r} token shift, which splits each head's channels into {groups} groups."
            )
        for name in ("num_hidden_layers", "intermediate_size", "mix_lora_rank", "decay_lora_rank"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{type(self).__name__}: {name} must be positive, got {getattr(self, name)}.")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"{type(self).__name__}: drop_path_rate must be in [0, 1), got {self.drop_path_rate}.")

    @property
    def num_attention_heads(self) -> int:
        return self.hidden_size // self.head_size

    @property
    def token_shift_offsets(self) -> tuple:
        return TOKEN_SHIFT_OFFSETS[self.token_shift]


@strict
class RWKVCLIPTextConfig(_RWKVCLIPTowerConfigMixin, PreTrainedConfig):
    r"""
    Configuration of the RWKV-CLIP text tower (`RWKVCLIPTextModel`). Defaults are the released B/32 and B/16
    text tower.

    Args:
        vocab_size: CLIP BPE vocabulary size.
        hidden_size: model width D (also the embedding size: there is no projection layer).
        num_hidden_layers: number of RWKV blocks.
        head_size: channels per head N of the time mix; heads = hidden_size // head_size.
        intermediate_size: hidden width of the channel mix.
        mix_lora_rank: rank of the data-dependent token-shift interpolation (time_maa_w1/w2).
        decay_lora_rank: rank of the data-dependent decay (time_decay_w1/w2).
        head_size_divisor: sets the GroupNorm eps of the time-mix output to `1e-5 * head_size_divisor**2`
            unless `group_norm_eps` is given.
        group_norm_eps: eps of the per-head GroupNorm (`ln_x`); None derives it from head_size_divisor.
        layer_norm_eps: eps of every LayerNorm.
        max_position_embeddings: the context length. The tower always runs on exactly this many tokens,
            padded with `pad_token_id`, as the original did (there is no position embedding).
        token_shift: `"b_shift"` (previous / next token per half head).
        drop_path_rate: stochastic-depth rate of the last block (linear from 0), training only.
        initializer_range: std of the token embedding at initialisation.
    """

    model_type = "rwkv_clip_text_model"
    base_config_key = "text_config"

    vocab_size: int = 49408
    hidden_size: int = 640
    num_hidden_layers: int = 6
    head_size: int = 64
    intermediate_size: int = 2240
    mix_lora_rank: int = 32
    decay_lora_rank: int = 64
    head_size_divisor: int = 8
    group_norm_eps: float | None = None
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 77
    token_shift: str = "b_shift"
    drop_path_rate: float = 0.0
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407

    def __post_init__(self, **kwargs):
        if self.group_norm_eps is None:
            self.group_norm_eps = 1e-5 * self.head_size_divisor**2
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        # special-token ids outside the vocabulary only warn (transformers' `validate_token_ids`), as Hub configs
        # carry such ids
        super().validate_architecture()
        self._validate_tower()
        if self.max_position_embeddings < 2:
            raise ValueError(
                "RWKVCLIPTextConfig: max_position_embeddings (context length) must be >= 2, "
                f"got {self.max_position_embeddings}."
            )
        if self.vocab_size <= 0:
            raise ValueError(f"RWKVCLIPTextConfig: vocab_size must be positive, got {self.vocab_size}.")


@strict
class RWKVCLIPVisionConfig(_RWKVCLIPTowerConfigMixin, PreTrainedConfig):
    r"""
    Configuration of the RWKV-CLIP vision tower (`RWKVCLIPVisionModel`). Defaults are the released B/32 image tower.

    Args:
        hidden_size: model width D (also the embedding size: there is no projection layer).
        num_hidden_layers: number of RWKV blocks.
        head_size: channels per head N of the spatial mix; heads = hidden_size // head_size.
        intermediate_size: hidden width of the channel mix (5 * D in the released models).
        mix_lora_rank, decay_lora_rank: ranks of the data-dependent interpolation and decay.
        group_norm_eps: eps of the per-head GroupNorm (`ln_x`).
        layer_norm_eps: eps of every LayerNorm.
        num_channels, image_size, patch_size: input channels, native (square) resolution and patch size;
            the position embedding is learned for the (image_size // patch_size)^2 grid.
        token_shift: `"q_shift"` (left / right / above / below per quarter head).
        drop_path_rate: stochastic-depth rate of the last block (linear from 0), training only.
        initializer_range: std of the position embedding at initialisation.
    """

    model_type = "rwkv_clip_vision_model"
    base_config_key = "vision_config"

    hidden_size: int = 640
    num_hidden_layers: int = 12
    head_size: int = 80
    intermediate_size: int = 3200
    mix_lora_rank: int = 32
    decay_lora_rank: int = 64
    group_norm_eps: float = 1e-5
    layer_norm_eps: float = 1e-5
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    token_shift: str = "q_shift"
    drop_path_rate: float = 0.3
    initializer_range: float = 0.02

    def validate_architecture(self):
        super().validate_architecture()
        self._validate_tower()
        if self.patch_size <= 0 or self.image_size < self.patch_size:
            raise ValueError(
                f"RWKVCLIPVisionConfig: need 0 < patch_size <= image_size, got patch_size={self.patch_size}, "
                f"image_size={self.image_size}."
            )
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"RWKVCLIPVisionConfig: image_size ({self.image_size}) must be a multiple of patch_size "
                f"({self.patch_size}) for the native position-embedding grid."
            )

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


# Presets of the released checkpoints (docs/architecture.md section 1). B/16 differs only in the patch size.
PRESETS = {
    "B/32": {"vision_config": {"patch_size": 32}},
    "B/16": {"vision_config": {"patch_size": 16}},
}
_PRESET_ALIASES = {re.sub(r"[^a-z0-9]", "", name.lower()): name for name in PRESETS}


@strict
class RWKVCLIPConfig(_RemoteCodeConfigMixin, PreTrainedConfig):
    r"""
    Configuration of the RWKV-CLIP dual encoder (`RWKVCLIPModel`).

    Args:
        text_config: dict or `RWKVCLIPTextConfig` of the text tower.
        vision_config: dict or `RWKVCLIPVisionConfig` of the vision tower.
        logit_scale_init_value: initial log of the contrastive temperature, log(1 / 0.07).

    Use `RWKVCLIPConfig.from_preset("B/32")` or `("B/16")` for the released architectures.
    """

    model_type = "rwkv_clip"
    sub_configs_defaults = {"text_config": RWKVCLIPTextConfig, "vision_config": RWKVCLIPVisionConfig}

    text_config: dict | RWKVCLIPTextConfig | None = None
    vision_config: dict | RWKVCLIPVisionConfig | None = None
    logit_scale_init_value: float = math.log(1 / 0.07)

    def validate_architecture(self):
        super().validate_architecture()
        if self.text_config.hidden_size != self.vision_config.hidden_size:
            raise ValueError(
                "RWKVCLIPConfig: the towers have no projection layer, so text_config.hidden_size "
                f"({self.text_config.hidden_size}) must equal vision_config.hidden_size "
                f"({self.vision_config.hidden_size})."
            )

    @property
    def projection_dim(self) -> int:
        """Size of the joint embedding (the tower width: there is no projection)."""
        return self.text_config.hidden_size

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "RWKVCLIPConfig":
        """Config of a released architecture: `"B/32"` or `"B/16"` (also `"b32"`, `"rwkv-clip-b16"`, ...).

        `kwargs` override top-level fields; `text_config` / `vision_config` dicts update the preset's towers.
        """
        key = re.sub(r"[^a-z0-9]", "", name.lower()).removeprefix("rwkvclip")
        if key not in _PRESET_ALIASES:
            raise ValueError(f"Unknown RWKV-CLIP preset {name!r}; available: {', '.join(PRESETS)}.")
        preset = PRESETS[_PRESET_ALIASES[key]]
        text = {**preset.get("text_config", {}), **kwargs.pop("text_config", {})}
        vision = {**preset.get("vision_config", {}), **kwargs.pop("vision_config", {})}
        return cls(text_config=text, vision_config=vision, **kwargs)


__all__ = [
    "RWKVCLIPConfig",
    "RWKVCLIPTextConfig",
    "RWKVCLIPVisionConfig",
    "PRESETS",
    "export_remote_code",
]
