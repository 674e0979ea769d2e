"""RWKV-CLIP configurations: text tower, vision tower and the composite dual encoder."""

import math
import os
import re
import sys
from pathlib import Path

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


# Token-shift patterns. Each head's channels are split into as many equal groups as there are offsets;
# group g of token (row, col) takes the token at (row + dy, col + dx); out-of-range neighbours are zero.
TOKEN_SHIFT_OFFSETS = {
    # image "Q-shift" on the patch grid: left, right, above, below
    "q_shift": ((0, -1), (0, 1), (-1, 0), (1, 0)),
    # text "B-shift" along the sequence: previous, next
    "b_shift": ((0, -1), (0, 1)),
}


# Implementations of the Bi-WKV operator (ops/bi_wkv): "auto" uses the prebuilt kernel when it loads for the
# tensors' device and the PyTorch chunked path otherwise; "kernel" requires the kernel; "torch" never uses it.
BI_WKV_BACKENDS = ("auto", "kernel", "torch")


class _RemoteCodeConfigMixin:
    """Saved directories carry their code so that `trust_remote_code=True` loads them without this package."""

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        _save_with_remote_code(self, super().save_pretrained, save_directory, push_to_hub, **kwargs)


class _RWKVCLIPTowerConfigMixin(_RemoteCodeConfigMixin):
    """Checks shared by both tower configs (called from `validate_architecture`)."""

    def _validate_tower(self) -> None:
        if self.hidden_size <= 0 or self.head_size <= 0:
            raise ValueError(
                f"{type(self).__name__}: hidden_size ({self.hidden_size}) and head_size ({self.head_size}) must be positive."
            )
        if self.hidden_size % self.head_size != 0:
            raise ValueError(
                f"{type(self).__name__}: hidden_size ({self.hidden_size}) must be a multiple of head_size "
                f"({self.head_size}); the number of heads is hidden_size // head_size."
            )
        if self.token_shift not in TOKEN_SHIFT_OFFSETS:
            raise ValueError(
                f"{type(self).__name__}: token_shift must be one of {sorted(TOKEN_SHIFT_OFFSETS)}, got {self.token_shift!r}."
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
        if self.bi_wkv_backend not in BI_WKV_BACKENDS:
            raise ValueError(
                f"{type(self).__name__}: bi_wkv_backend must be one of {BI_WKV_BACKENDS}, got {self.bi_wkv_backend!r}."
            )

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
        bi_wkv_backend: `"auto"`, `"kernel"` or `"torch"`: which implementation of the Bi-WKV operator runs
            (see `BI_WKV_BACKENDS`); the environment variable RWKV_CLIP_BI_WKV_BACKEND overrides it.
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
    bi_wkv_backend: str = "auto"
    pad_token_id: int | None = 0
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407

    def __post_init__(self, **kwargs):
        if self.group_norm_eps is None:
            self.group_norm_eps = 1e-5 * self.head_size_divisor**2
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        self._validate_tower()
        if self.max_position_embeddings < 2:
            raise ValueError(
                f"RWKVCLIPTextConfig: max_position_embeddings (context length) must be >= 2, got {self.max_position_embeddings}."
            )
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"RWKVCLIPTextConfig: {name} ({value}) is outside the vocabulary (size {self.vocab_size}).")


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
        bi_wkv_backend: `"auto"`, `"kernel"` or `"torch"`: which implementation of the Bi-WKV operator runs
            (see `BI_WKV_BACKENDS`); the environment variable RWKV_CLIP_BI_WKV_BACKEND overrides it.
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
    bi_wkv_backend: str = "auto"

    def validate_architecture(self):
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


# Presets of the released checkpoints (ARCHITECTURE.md section 1). B/16 differs only in the patch size.
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
        if self.text_config.hidden_size != self.vision_config.hidden_size:
            raise ValueError(
                "RWKVCLIPConfig: the towers have no projection layer, so text_config.hidden_size "
                f"({self.text_config.hidden_size}) must equal vision_config.hidden_size ({self.vision_config.hidden_size})."
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


# model_type -> {transformers auto class: model class in modeling_rwkv_clip}
AUTO_MODEL_CLASSES: dict[str, dict[str, str]] = {
    "rwkv_clip": {
        "AutoModel": "RWKVCLIPModel",
        "AutoModelForZeroShotImageClassification": "RWKVCLIPModel",
        "AutoModelForImageClassification": "RWKVCLIPForImageClassification",
    },
    "rwkv_clip_text_model": {"AutoModel": "RWKVCLIPTextModel"},
    "rwkv_clip_vision_model": {"AutoModel": "RWKVCLIPVisionModel"},
}


def _remote_code_auto_map(config) -> dict:
    mapping = {"AutoConfig": f"configuration_rwkv_clip.{type(config).__name__}"}
    for auto_class, model_class in AUTO_MODEL_CLASSES.get(config.model_type, {}).items():
        mapping[auto_class] = f"modeling_rwkv_clip.{model_class}"
    return mapping

# Files written next to a saved model so that it loads with `trust_remote_code=True`. transformers resolves
# only flat sibling imports (`from .name import ...`), so the op package is flattened and its imports rewritten.
_PACKAGE_DIR = Path(__file__).resolve().parent
_REMOTE_CODE_FILES = {
    "configuration_rwkv_clip.py": ("configuration_rwkv_clip.py", {}),
    "modeling_rwkv_clip.py": ("modeling_rwkv_clip.py", {"from .ops.bi_wkv import": "from .bi_wkv import"}),
    "bi_wkv.py": (
        "ops/bi_wkv/__init__.py",
        {
            "from .chunk import": "from .bi_wkv_chunk import",
            "from .kernel import": "from .bi_wkv_kernel import",
            "from .naive import": "from .bi_wkv_naive import",
            "from .triton_op import": "from .bi_wkv_triton_op import",
        },
    ),
    "bi_wkv_chunk.py": ("ops/bi_wkv/chunk.py", {}),
    "bi_wkv_kernel.py": ("ops/bi_wkv/kernel.py", {}),
    "bi_wkv_naive.py": ("ops/bi_wkv/naive.py", {}),
    "bi_wkv_triton_op.py": (
        "ops/bi_wkv/triton_op.py",
        {"from .triton_kernels import": "from .bi_wkv_triton_kernels import"},
    ),
    "bi_wkv_triton_kernels.py": ("ops/bi_wkv/triton_kernels.py", {}),
}


def _loaded_flat_module_file(target: str) -> Path:
    # transformers may load the config and the model code from different cache folders
    candidates = [_PACKAGE_DIR / target]
    stem = target.removesuffix(".py")
    for name, module in list(sys.modules.items()):
        if name.rsplit(".", 1)[-1] == stem and getattr(module, "__file__", None):
            candidates.append(Path(module.__file__))
    # a file imported lazily (the Triton Bi-WKV) is not loaded: look beside the flattened files that are
    flat_stems = {flat.removesuffix(".py") for flat in _REMOTE_CODE_FILES}
    for name, module in list(sys.modules.items()):
        if name.rsplit(".", 1)[-1] in flat_stems and getattr(module, "__file__", None):
            candidates.append(Path(module.__file__).with_name(target))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"remote-code export: cannot find the source of {target}")


def export_remote_code(save_directory: str | os.PathLike) -> list[Path]:
    """Write the self-contained model code used by `trust_remote_code=True` into `save_directory`."""
    written = []
    for target, (source, rewrites) in _REMOTE_CODE_FILES.items():
        path = _PACKAGE_DIR / source
        if not path.is_file():
            # running from a flattened copy (loaded with trust_remote_code): copy the loaded files as they are
            path, rewrites = _loaded_flat_module_file(target), {}
        text = path.read_text(encoding="utf-8")
        for old, new in rewrites.items():
            if old not in text:
                raise RuntimeError(f"remote-code export: expected {old!r} in {source}; update _REMOTE_CODE_FILES")
            text = text.replace(old, new)
        leftover = re.findall(r"^\s*from\s+\.(\S+)\s+import", text, flags=re.MULTILINE)
        unknown = [name for name in leftover if f"{name}.py" not in _REMOTE_CODE_FILES]
        if unknown:
            raise RuntimeError(f"remote-code export: {source} imports {unknown}, which are not exported")
        path = Path(save_directory) / target
        tmp = path.with_suffix(".py.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        written.append(path)
    return written


def _save_with_remote_code(config, save_fn, save_directory, push_to_hub: bool, **kwargs) -> None:
    config.auto_map = _remote_code_auto_map(config)
    if not push_to_hub:
        save_fn(save_directory, **kwargs)
        export_remote_code(save_directory)
        return
    # Save and export locally first, then push the complete folder.
    save_fn(save_directory)
    export_remote_code(save_directory)
    repo_id = kwargs.pop("repo_id", Path(save_directory).name)
    config.push_to_hub(repo_id, **kwargs)

__all__ = [
    "RWKVCLIPConfig",
    "RWKVCLIPTextConfig",
    "RWKVCLIPVisionConfig",
    "PRESETS",
    "BI_WKV_BACKENDS",
    "export_remote_code",
]
