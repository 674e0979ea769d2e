"""The architecture and the key mapping of a conversion: the `RWKVCLIPConfig` inferred from an original state dict
(checked against the authors' config JSON when given), the original checkpoint's expected layout, and the
declarative table `ORIGINAL_TO_CONVERTED_KEY_MAPPING` from the original keys to `RWKVCLIPModel`'s, with the
transforms it names (docs/architecture.md section 11).

Part of `convert_rwkv_clip_original.py`, which re-exports these names.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable

import torch
from huggingface_hub.errors import StrictDataclassError
from huggingface_hub.utils import tqdm

from rwkv_clip_hf import RWKVCLIPConfig, RWKVCLIPModel

from checkpoint_io import ConversionError, preview

logger = logging.getLogger("rwkv_clip_conversion")


# ============================================================================ architecture


def _require(state: dict[str, torch.Tensor], key: str, ndim: int) -> torch.Tensor:
    if key not in state:
        raise ConversionError(f"missing key {key!r}, needed to infer the architecture")
    tensor = state[key]
    if tensor.dim() != ndim:
        raise ConversionError(f"{key!r} has shape {tuple(tensor.shape)}; expected {ndim} dimensions")
    return tensor


def _num_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    indices = set()
    for key in state:
        if key.startswith(prefix):
            head = key[len(prefix) :].split(".", 1)[0]
            if not head.isdigit():
                raise ConversionError(f"unexpected key {key!r}: {prefix}<index> expected")
            indices.add(int(head))
    if not indices:
        raise ConversionError(f"no keys under {prefix!r}: not an RWKV-CLIP checkpoint")
    return max(indices) + 1


def _tower_dims(state: dict[str, torch.Tensor], block_prefix: str, width: int) -> dict:
    """Depth, head size, ffn width and LoRA ranks of one tower, read off its block 0 and its block count."""
    block = f"{block_prefix}0."
    faaaa = _require(state, block + "att.time_faaaa", 2)
    heads, head_size = faaaa.shape
    if heads * head_size != width:
        raise ConversionError(
            f"{block}att.time_faaaa has shape {tuple(faaaa.shape)}: attention width {heads}x{head_size} differs "
            f"from the model width {width}; only dim_att == width is supported"
        )
    mix_w1 = _require(state, block + "att.time_maa_w1", 2)
    if mix_w1.shape[1] % 5:
        raise ConversionError(f"{block}att.time_maa_w1 has shape {tuple(mix_w1.shape)}; its width must be 5 * rank")
    return {
        "hidden_size": width,
        "num_hidden_layers": _num_blocks(state, block_prefix),
        "head_size": head_size,
        "intermediate_size": _require(state, block + "ffn.key.weight", 2).shape[0],
        "mix_lora_rank": mix_w1.shape[1] // 5,
        "decay_lora_rank": _require(state, block + "att.time_decay_w1", 2).shape[1],
    }


def infer_config(state: dict[str, torch.Tensor], original_config: dict | None = None) -> RWKVCLIPConfig:
    """The `RWKVCLIPConfig` of a (prefix-free) original state dict.

    Shapes give every size; the authors' config JSON, when given, must agree with them and supplies what the
    tensors cannot tell (context length, head_size_divisor, drop-path rate).
    """
    projection = _require(state, "image_model.patch_embed.projection.weight", 4)
    width, channels, patch, patch_w = projection.shape
    if patch != patch_w:
        raise ConversionError(f"image_model.patch_embed.projection.weight: non-square patch {patch}x{patch_w}")
    pos_embed = _require(state, "image_model.pos_embed", 3)
    grid = math.isqrt(pos_embed.shape[1])
    if grid * grid != pos_embed.shape[1] or pos_embed.shape[0] != 1:
        raise ConversionError(
            f"image_model.pos_embed has shape {tuple(pos_embed.shape)}; expected (1, grid*grid, width) "
            "(a class-token position is not supported)"
        )
    embedding = _require(state, "text_model.emb.weight", 2)
    vocab_size, text_width = embedding.shape

    vision = _tower_dims(state, "image_model.layers.", width)
    vision.update(num_channels=channels, patch_size=patch, image_size=grid * patch)
    text = _tower_dims(state, "text_model.blocks.", text_width)
    text["vocab_size"] = vocab_size
    if vocab_size != RWKVCLIPConfig().text_config.vocab_size:
        # CLIP's BPE puts <start_of_text>, <end_of_text> last; keep that convention for other vocabularies
        text.update(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1)
    if original_config is not None:
        text_extra, vision_extra = check_original_config(original_config, vision, text)
        text.update(text_extra)
        vision.update(vision_extra)
    try:
        return RWKVCLIPConfig(text_config=text, vision_config=vision)
    except (ValueError, TypeError, StrictDataclassError) as error:
        # the config's validators speak of config fields; keep their last line (the reason), not the wrapper's
        reason = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise ConversionError(
            f"the checkpoint's architecture is not supported: {reason[-1] if reason else type(error).__name__}"
        ) from None


# original field: (tower, our field, how the tensors' value is derived); checked against the tensors
_CHECKED_FIELDS = {
    "image_depth": ("vision", lambda v: v["num_hidden_layers"]),
    "image_embed_dims": ("vision", lambda v: v["hidden_size"]),
    "image_patch_size": ("vision", lambda v: v["patch_size"]),
    "image_num_heads": ("vision", lambda v: v["hidden_size"] // v["head_size"]),
    "image_hidden_rate": ("vision", lambda v: v["intermediate_size"] / v["hidden_size"]),
    "input_size": ("vision", lambda v: v["image_size"]),
    "n_embd": ("text", lambda t: t["hidden_size"]),
    "dim_att": ("text", lambda t: t["hidden_size"]),
    "n_layer": ("text", lambda t: t["num_hidden_layers"]),
    "head_size": ("text", lambda t: t["head_size"]),
    "text_num_head": ("text", lambda t: t["hidden_size"] // t["head_size"]),
    "dim_ffn": ("text", lambda t: t["intermediate_size"]),
    "vocab_size": ("text", lambda t: t["vocab_size"]),
}
# RWKV-LM convention: 0 means "derive from the other fields"
_ZERO_MEANS_DEFAULT = {"dim_att", "text_num_head", "dim_ffn"}
# features of the original code that this port does not implement; RWKV-LM switches the numeric ones on with > 0
_MUST_BE_OFF = ("image_with_cls_token", "image_output_cls_token", "pos_emb", "head_qk", "tiny_att_dim")


def _is_on(value: object) -> bool:
    return value is True or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0)


# only affect training or the original's data loading
_TRAINING_ONLY = {"workers", "precision", "dropout", "data_type", "text_initialization", "with_cp", "tiny_att_layer"}


def check_original_config(original: dict, vision: dict, text: dict) -> tuple[dict, dict]:
    """Check an original config against the architecture read from the tensors.

    Returns the `(text, vision)` settings only the config knows. Raises `ConversionError` naming every
    disagreeing or unsupported field.
    """
    towers = {"vision": vision, "text": text}
    problems = []
    for field, (tower, derive) in _CHECKED_FIELDS.items():
        if field not in original or (field in _ZERO_MEANS_DEFAULT and original[field] in (0, None)):
            continue
        expected = derive(towers[tower])
        if original[field] != expected:
            problems.append(f"{field}={original[field]!r} but the tensors give {expected!r}")
    for field in _MUST_BE_OFF:
        if _is_on(original.get(field)):
            problems.append(f"{field}={original[field]!r} is not supported by this port (it must be off)")
    if problems:
        raise ConversionError("the original config disagrees with the checkpoint: " + "; ".join(problems))

    text_extra, vision_extra = {}, {}
    invalid = []
    for field in ("ctx_len", "head_size_divisor"):
        value = original.get(field)
        if field in original and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            invalid.append(f"{field}={value!r} must be a positive integer")
    rate = original.get("drop_path_rate")
    if "drop_path_rate" in original and (
        isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0
    ):
        invalid.append(f"drop_path_rate={rate!r} must be a number in [0, 1)")
    if invalid:
        raise ConversionError("invalid values in the original config: " + "; ".join(invalid))
    if "ctx_len" in original:
        text_extra["max_position_embeddings"] = original["ctx_len"]
    if "head_size_divisor" in original:
        text_extra["head_size_divisor"] = original["head_size_divisor"]
    if "drop_path_rate" in original:
        vision_extra["drop_path_rate"] = float(rate)
    used = {"ctx_len", "head_size_divisor", "drop_path_rate"}
    known = set(_CHECKED_FIELDS) | set(_MUST_BE_OFF) | _TRAINING_ONLY | used
    unknown = sorted(set(original) - known)
    if unknown:
        logger.warning("ignoring original config fields this converter does not know: %s", ", ".join(unknown))
    return text_extra, vision_extra


def architecture_name(config: RWKVCLIPConfig) -> str | None:
    """`"B/32"` or `"B/16"` when the config is exactly a released architecture, else None."""
    for name in ("B/32", "B/16"):
        preset = RWKVCLIPConfig.from_preset(name)
        same = all(
            _tower_signature(getattr(config, tower)) == _tower_signature(getattr(preset, tower))
            for tower in ("text_config", "vision_config")
        )
        if same:
            return name
    return None


def _tower_signature(tower) -> dict:
    ignored = {"drop_path_rate", "transformers_version", "_name_or_path", "dtype", "architectures"}
    return {key: value for key, value in tower.to_dict().items() if key not in ignored}


# ============================================================================ original layout


def original_layout(config: RWKVCLIPConfig) -> dict[str, tuple[int, ...]]:
    """Every key of an original checkpoint of this architecture (prefix-free) with its shape."""
    layout: dict[str, tuple[int, ...]] = {}

    def tower_blocks(prefix: str, tower, channel_mix_params: tuple[str, str]) -> None:
        dim, ffn, heads = tower.hidden_size, tower.intermediate_size, tower.num_attention_heads
        for i in range(tower.num_hidden_layers):
            block = f"{prefix}{i}."
            norms = ("ln0", "ln1", "ln2") if i == 0 else ("ln1", "ln2")
            for norm in norms:
                layout[f"{block}{norm}.weight"] = (dim,)
                layout[f"{block}{norm}.bias"] = (dim,)
            for name in ("x", "w", "k", "v", "r", "g"):
                layout[f"{block}att.time_maa_{name}"] = (1, 1, dim)
            layout[f"{block}att.time_maa_w1"] = (dim, 5 * tower.mix_lora_rank)
            layout[f"{block}att.time_maa_w2"] = (5, tower.mix_lora_rank, dim)
            layout[f"{block}att.time_decay"] = (1, 1, dim)
            layout[f"{block}att.time_decay_w1"] = (dim, tower.decay_lora_rank)
            layout[f"{block}att.time_decay_w2"] = (tower.decay_lora_rank, dim)
            layout[f"{block}att.time_faaaa"] = (heads, tower.head_size)
            for name in ("receptance", "key", "value", "gate", "output"):
                layout[f"{block}att.{name}.weight"] = (dim, dim)
            layout[f"{block}att.ln_x.weight"] = (dim,)
            layout[f"{block}att.ln_x.bias"] = (dim,)
            for name in channel_mix_params:
                layout[f"{block}ffn.{name}"] = (1, 1, dim)
            layout[f"{block}ffn.key.weight"] = (ffn, dim)
            layout[f"{block}ffn.receptance.weight"] = (dim, dim)
            layout[f"{block}ffn.value.weight"] = (dim, ffn)

    vision, text = config.vision_config, config.text_config
    patch = vision.patch_size
    layout["image_model.patch_embed.projection.weight"] = (vision.hidden_size, vision.num_channels, patch, patch)
    layout["image_model.patch_embed.projection.bias"] = (vision.hidden_size,)
    layout["image_model.pos_embed"] = (1, vision.grid_size**2, vision.hidden_size)
    tower_blocks("image_model.layers.", vision, ("spatial_mix_k", "spatial_mix_r"))
    layout["image_model.ln1.weight"] = (vision.hidden_size,)
    layout["image_model.ln1.bias"] = (vision.hidden_size,)
    layout["text_model.emb.weight"] = (text.vocab_size, text.hidden_size)
    tower_blocks("text_model.blocks.", text, ("time_maa_k", "time_maa_r"))
    layout["text_model.ln_out.weight"] = (text.hidden_size,)
    layout["text_model.ln_out.bias"] = (text.hidden_size,)
    layout["logit_scale"] = ()
    return layout


def check_layout(state: dict[str, torch.Tensor], config: RWKVCLIPConfig) -> None:
    """Raise `ConversionError` naming every missing, unexpected, wrongly shaped or non-float tensor."""
    expected = original_layout(config)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong_shape = [
        f"{key} {tuple(state[key].shape)} (expected {expected[key]})"
        for key in expected
        if key in state and tuple(state[key].shape) != expected[key]
    ]
    not_float = [
        f"{key} ({state[key].dtype})" for key in expected if key in state and not state[key].is_floating_point()
    ]
    non_finite = []
    for key in expected:
        tensor = state.get(key)
        if tensor is None or not tensor.is_floating_point() or tensor.device.type == "meta":
            continue
        bad = tensor.numel() - int(torch.isfinite(tensor).sum())
        if bad:
            non_finite.append(f"{key} ({bad} of {tensor.numel()} values are NaN or infinite)")
    problems = []
    if missing:
        problems.append(f"missing keys: {preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {preview(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes: {preview(wrong_shape)}")
    if not_float:
        problems.append(f"non-floating-point tensors: {preview(not_float)}")
    if problems:
        raise ConversionError(
            f"the checkpoint does not match the inferred architecture ({describe(config)}): " + "; ".join(problems)
        )
    if non_finite:
        raise ConversionError(
            f"the checkpoint holds non-finite values (a diverged or corrupted training run?): {preview(non_finite)}"
        )


# ============================================================================ key mapping


def _same(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0].reshape(-1)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([tensor.reshape(-1) for tensor in tensors])


def _one_minus_flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    # the original image channel mix is x*mix + shift*(1-mix); ours is x + (shift-x)*maa with maa = 1-mix.
    # Computed in float64 (exact for float32 inputs) so the stored value is rounded once.
    return 1.0 - tensors[0].to(torch.float64).reshape(-1)


# The transforms the tables name: each takes the original tensors of one of our keys, in the table's order.
TRANSFORMS: dict[str, Callable[[list[torch.Tensor]], torch.Tensor]] = {
    "same": _same,
    "flat": _flat,  # (1, 1, dim) -> (dim,)
    "stack": _stack,  # five (1, 1, dim) -> (5, dim)
    "one_minus": _one_minus_flat,  # (1, 1, dim) -> 1 - value, (dim,)
}

# Original key (prefix-free; a regex matched in full) -> (our key, as an `re` replacement template; transform). A
# tuple of regexes fuses several original tensors into one of ours, in that order. Entries are tried in order:
# the first match wins.
ORIGINAL_TO_CONVERTED_KEY_MAPPING: dict[str | tuple[str, ...], tuple[str, str]] = {
    r"image_model\.patch_embed\.projection\.(weight|bias)": (r"vision_model.embeddings.patch_embedding.\1", "same"),
    r"image_model\.pos_embed": ("vision_model.embeddings.position_embedding", "same"),
    r"image_model\.layers\.0\.ln0\.(weight|bias)": (r"vision_model.pre_layernorm.\1", "same"),
    r"image_model\.ln1\.(weight|bias)": (r"vision_model.post_layernorm.\1", "same"),
    r"text_model\.emb\.weight": ("text_model.token_embedding.weight", "same"),
    r"text_model\.blocks\.0\.ln0\.(weight|bias)": (r"text_model.pre_layernorm.\1", "same"),
    r"text_model\.ln_out\.(weight|bias)": (r"text_model.final_layer_norm.\1", "same"),
    r"logit_scale": ("logit_scale", "same"),
}

# Blocks of both towers: the original block prefix (the block index follows) -> ours.
BLOCK_PREFIXES = {
    "image_model.layers": "vision_model.encoder.layers",
    "text_model.blocks": "text_model.encoder.layers",
}

# Inside a block, the same kind of table over the key after `<prefix>.<index>.`.
BLOCK_KEY_MAPPING: dict[str | tuple[str, ...], tuple[str, str]] = {
    r"ln([12])\.(weight|bias)": (r"norm\1.\2", "same"),
    r"att\.ln_x\.(weight|bias)": (r"token_mix.ln_x.\1", "same"),
    r"att\.time_maa_x": ("token_mix.time_maa_x", "flat"),
    tuple(rf"att\.time_maa_{name}" for name in "wkvrg"): ("token_mix.time_maa_wkvrg", "stack"),
    r"att\.(time_maa_w[12]|time_decay_w[12]|time_faaaa)": (r"token_mix.\1", "same"),
    r"att\.time_decay": ("token_mix.time_decay", "flat"),
    r"att\.(receptance|key|value|gate|output)\.weight": (r"token_mix.\1.weight", "same"),
    # the text tower's channel mix has RWKV-6's time_maa_k/r; the image tower's has spatial_mix_k/r = 1 - ours
    r"ffn\.time_maa_([kr])": (r"channel_mix.time_maa_\1", "flat"),
    r"ffn\.spatial_mix_([kr])": (r"channel_mix.time_maa_\1", "one_minus"),
    r"ffn\.(key|receptance|value)\.weight": (r"channel_mix.\1.weight", "same"),
}

_BLOCK_KEY = re.compile(rf"({'|'.join(map(re.escape, BLOCK_PREFIXES))})\.(\d+)\.(.+)")


def _match(table: dict[str | tuple[str, ...], tuple[str, str]], key: str) -> tuple[str, int, int, str] | None:
    """`(our key, position among its original keys, their number, transform)` of the first entry matching `key`."""
    for patterns, (template, transform) in table.items():
        group = (patterns,) if isinstance(patterns, str) else patterns
        for position, pattern in enumerate(group):
            match = re.fullmatch(pattern, key)
            if match:
                return match.expand(template), position, len(group), transform
    return None


def map_key(key: str) -> tuple[str, int, int, str]:
    """Where one original key goes: `(our key, position among its original keys, their number, transform)`."""
    found = _match(ORIGINAL_TO_CONVERTED_KEY_MAPPING, key)
    if found is None and (block := _BLOCK_KEY.fullmatch(key)):
        prefix, index, rest = block.groups()
        inner = _match(BLOCK_KEY_MAPPING, rest)
        if inner is not None:
            found = (f"{BLOCK_PREFIXES[prefix]}.{index}.{inner[0]}", *inner[1:])
    if found is None:
        raise ConversionError(f"no conversion rule for the original key {key!r}")
    return found


def conversion_plan(keys: Iterable[str]) -> list[tuple[str, tuple[str, ...], str]]:
    """`(our key, original keys, transform)` for original `keys`, by the tables above. Every key is used once;
    a key without a rule, two keys for one of ours, or an incomplete fused group is a `ConversionError`."""
    plan: dict[str, tuple[list[str | None], str]] = {}
    for key in keys:
        ours, position, count, transform = map_key(key)
        sources, _ = plan.setdefault(ours, ([None] * count, transform))
        if sources[position] is not None:
            raise ConversionError(f"original tensors {sources[position]!r} and {key!r} both map to {ours!r}")
        sources[position] = key
    incomplete = sorted(ours for ours, (sources, _) in plan.items() if None in sources)
    if incomplete:
        raise ConversionError(f"original tensors missing for {preview(incomplete)}")
    return [(ours, tuple(sources), transform) for ours, (sources, transform) in plan.items()]


def convert_state_dict(
    state: dict[str, torch.Tensor],
    config: RWKVCLIPConfig,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Map a prefix-free original state dict to `RWKVCLIPModel`'s parameter names, cast to `dtype`.

    Every original tensor is consumed exactly once. Widening casts (bfloat16 text decays to float32) are exact;
    each value is rounded at most once, to `dtype`.
    """
    check_layout(state, config)
    converted: dict[str, torch.Tensor] = {}
    for ours, sources, transform in tqdm(
        conversion_plan(state), desc="converting tensors", unit="tensor", disable=not progress, leave=False
    ):
        converted[ours] = TRANSFORMS[transform]([state[key] for key in sources]).to(dtype).contiguous()
    return converted


def build_model(config: RWKVCLIPConfig, converted: dict[str, torch.Tensor]) -> RWKVCLIPModel:
    """An `RWKVCLIPModel` holding exactly the converted tensors (built on the meta device: no random init)."""
    with torch.device("meta"):
        model = RWKVCLIPModel(config)
    try:
        model.load_state_dict(converted, strict=True, assign=True)
    except RuntimeError as error:
        raise ConversionError(f"converted tensors do not fit RWKVCLIPModel: {error}") from None
    return model.eval()


def describe(config: RWKVCLIPConfig) -> str:
    """One line with the sizes of both towers."""
    v, t = config.vision_config, config.text_config
    return (
        f"image: {v.image_size}px patch {v.patch_size}, width {v.hidden_size}, {v.num_hidden_layers} blocks, "
        f"{v.num_attention_heads}x{v.head_size} heads, ffn {v.intermediate_size}; text: vocab {t.vocab_size}, "
        f"width {t.hidden_size}, {t.num_hidden_layers} blocks, {t.num_attention_heads}x{t.head_size} heads, "
        f"ffn {t.intermediate_size}, context {t.max_position_embeddings}"
    )
