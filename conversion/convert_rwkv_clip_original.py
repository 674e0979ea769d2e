#!/usr/bin/env python
"""Convert an original RWKV-CLIP checkpoint (deepglint/RWKV-CLIP, `torch.save` of a DDP state dict) into a
Hub-ready directory: config.json, model.safetensors, processor files and a model card.

    python conversion/convert_rwkv_clip_original.py --checkpoint model_31.pt --output rwkv-clip-b32-yfcc15m --verify

The architecture is inferred from the tensors; `--config` takes the authors' model_config JSON, which must
then agree with them. `--verify` compares the converted model with `original_reference.py`, an independent
float64 forward written against the original key names. Importable: `convert_checkpoint(...)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from huggingface_hub import HfApi, ModelCardData
from huggingface_hub.errors import HFValidationError, StrictDataclassError
from huggingface_hub.utils import tqdm, validate_repo_id
from transformers import AutoModel

import rwkv_clip_hf
from rwkv_clip_hf import RWKVCLIPConfig, RWKVCLIPModel, RWKVCLIPProcessor

import original_reference

logger = logging.getLogger("rwkv_clip_conversion")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
VERIFY_TOLERANCE = 1e-8
PAPER_URL = "https://arxiv.org/abs/2406.06973"
ORIGINAL_REPO_URL = "https://github.com/deepglint/RWKV-CLIP"

# Training sets of the released checkpoints, as spelled in their Hub repository names.
KNOWN_TRAINING_DATA = {
    "YFCC15M": {"hub_id": "Kaichengalex/YFCC15M", "description": "YFCC15M (15M image-text pairs of YFCC100M)"},
    "LAION10M": {"hub_id": None, "description": "LAION10M (10M image-text pairs from LAION)"},
    "LAION30M": {"hub_id": None, "description": "LAION30M (30M image-text pairs from LAION)"},
}

# The paper's zero-shot results for RWKV-CLIP-B/32 trained on YFCC15M (Tables 2 and 3; docs/architecture.md
# section 10).
PUBLISHED_RESULTS = {
    ("B/32", "YFCC15M"): {
        "zero-shot top-1 (mean per class for Pets, Flowers, Caltech101, Aircraft)": {
            "CIFAR10": 79.8,
            "CIFAR100": 55.1,
            "Food101": 50.6,
            "Pets": 37.6,
            "Flowers": 57.1,
            "SUN397": 54.0,
            "Cars": 4.1,
            "DTD": 24.6,
            "Caltech101": 77.1,
            "Aircraft": 4.0,
            "ImageNet": 44.3,
            "average": 44.4,
        },
        "zero-shot retrieval R@1": {
            "Flickr30k image->text": 76.0,
            "Flickr30k text->image": 57.6,
            "MSCOCO image->text": 50.3,
            "MSCOCO text->image": 34.0,
        },
    }
}


class ConversionError(Exception):
    """The checkpoint, the original config or the output directory cannot be used; the message says which."""


class UnsafeCheckpointError(ConversionError):
    """The checkpoint holds pickled objects that `torch.load(weights_only=True)` refuses to construct."""


class VerificationError(ConversionError):
    """The converted model does not reproduce the original-key reference within the tolerance."""


# ============================================================================ loading


def load_original_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load an original checkpoint safely and return its state dict with the wrapper prefixes removed.

    Only `torch.load(weights_only=True)` is used, so a file that would need to import or run code is refused.
    Accepts a bare state dict or one wrapped under `state_dict` / `model`, keys with `module.` (DDP) and/or
    `_orig_mod.` (torch.compile).
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint {path} does not exist or is not a file")
    size_mb = path.stat().st_size / 2**20
    logger.info("loading %s (%.1f MiB) with torch.load(weights_only=True)", path, size_mb)
    start = time.perf_counter()
    is_zip = zipfile.is_zipfile(path)
    try:
        # mmap keeps a 600 MB checkpoint out of RAM until each tensor is read; legacy files do not support it
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line), None)
        if reason is None:
            # the weights-only unpickler stopped at an opcode it does not know: not a torch.save file at all
            detail = next((line for line in lines if "Unsupported" in line), lines[0] if lines else "")
            raise ConversionError(
                f"cannot read {path} as a PyTorch checkpoint: the file is truncated, corrupted or not a torch.save "
                f"file (torch says: {detail})"
            ) from None
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it is not a plain tensor state dict. It contains pickled objects that "
            f"torch.load(weights_only=True) will not construct because building them could execute code "
            f"(torch says: {reason}). Nothing from the file was run. Convert only files from a source you trust, "
            f"saved with torch.save(model.state_dict())."
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile) as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConversionError(
            f"cannot read {path} as a PyTorch checkpoint: the file is truncated, corrupted or not a torch.save "
            f"file ({type(error).__name__}: {detail})"
        ) from None
    logger.info("loaded in %.1f s", time.perf_counter() - start)
    return normalize_keys(extract_state_dict(obj, source=str(path)))


def extract_state_dict(obj: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded checkpoint: the object itself, or its `state_dict` / `model` entry."""
    for _ in range(3):  # e.g. {"model": {"state_dict": {...}}}; deeper nesting is not a checkpoint we know
        if not isinstance(obj, dict):
            raise ConversionError(f"{source} holds a {type(obj).__name__}, not a state dict")
        if obj and all(isinstance(value, torch.Tensor) for value in obj.values()):
            return obj
        wrapper = next((name for name in ("state_dict", "model") if isinstance(obj.get(name), dict)), None)
        if wrapper is None:
            break
        ignored = sorted(str(key) for key in obj if key != wrapper)
        if ignored:
            logger.info("using the %r entry of %s; ignoring %s", wrapper, source, ", ".join(ignored))
        obj = obj[wrapper]
    if isinstance(obj, dict):
        non_tensors = sorted(str(key) for key, value in obj.items() if not isinstance(value, torch.Tensor))
        if obj and any(isinstance(value, torch.Tensor) for value in obj.values()):
            raise ConversionError(f"{source}: state dict entries that are not tensors: {_preview(non_tensors)}")
        raise ConversionError(
            f"{source} contains no state dict: expected a dict of tensors, possibly under 'state_dict' or 'model'; "
            f"top-level keys: {_preview(sorted(str(key) for key in obj))}"
        )
    raise ConversionError(f"{source} holds a {type(obj).__name__}, not a state dict")


def normalize_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the `module.` prefixes of (Distributed)DataParallel and the `_orig_mod.` parts of torch.compile."""
    normalized: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        parts = [part for part in str(key).split(".") if part != "_orig_mod"]
        while parts and parts[0] == "module":
            parts = parts[1:]
        new_key = ".".join(parts)
        if new_key in normalized:
            raise ConversionError(f"checkpoint keys {origin[new_key]!r} and {key!r} both name {new_key!r}")
        normalized[new_key] = value
        origin[new_key] = str(key)
    return normalized


def _preview(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


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


def load_original_config(path: str | os.PathLike) -> dict:
    """Read one of the authors' model_config JSON files (e.g. RWKV_CLIP_B32.json)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"original config {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"original config {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"original config {path} must hold a JSON object, got {type(data).__name__}")
    return data


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


# ============================================================================ key mapping


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
        problems.append(f"missing keys: {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_preview(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes: {_preview(wrong_shape)}")
    if not_float:
        problems.append(f"non-floating-point tensors: {_preview(not_float)}")
    if problems:
        raise ConversionError(
            f"the checkpoint does not match the inferred architecture ({describe(config)}): " + "; ".join(problems)
        )
    if non_finite:
        raise ConversionError(
            f"the checkpoint holds non-finite values (a diverged or corrupted training run?): {_preview(non_finite)}"
        )


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


Rule = tuple[str, tuple[str, ...], Callable[[list[torch.Tensor]], torch.Tensor]]


def conversion_rules(config: RWKVCLIPConfig) -> list[Rule]:
    """`(our key, original keys, transform)` for every parameter of `RWKVCLIPModel`."""
    rules: list[Rule] = []

    def block_rules(src: str, dst: str, tower, channel_mix_params: tuple[str, str], channel_mix: Callable) -> None:
        for i in range(tower.num_hidden_layers):
            s, d = f"{src}{i}.", f"{dst}{i}."
            for ours, theirs in (("norm1", "ln1"), ("norm2", "ln2"), ("token_mix.ln_x", "att.ln_x")):
                for leaf in ("weight", "bias"):
                    rules.append((f"{d}{ours}.{leaf}", (f"{s}{theirs}.{leaf}",), _same))
            rules.append((f"{d}token_mix.time_maa_x", (f"{s}att.time_maa_x",), _flat))
            rules.append((f"{d}token_mix.time_maa_wkvrg", tuple(f"{s}att.time_maa_{n}" for n in "wkvrg"), _stack))
            for name in ("time_maa_w1", "time_maa_w2", "time_decay_w1", "time_decay_w2", "time_faaaa"):
                rules.append((f"{d}token_mix.{name}", (f"{s}att.{name}",), _same))
            rules.append((f"{d}token_mix.time_decay", (f"{s}att.time_decay",), _flat))
            for name in ("receptance", "key", "value", "gate", "output"):
                rules.append((f"{d}token_mix.{name}.weight", (f"{s}att.{name}.weight",), _same))
            for ours, theirs in zip(("time_maa_k", "time_maa_r"), channel_mix_params):
                rules.append((f"{d}channel_mix.{ours}", (f"{s}ffn.{theirs}",), channel_mix))
            for name in ("key", "receptance", "value"):
                rules.append((f"{d}channel_mix.{name}.weight", (f"{s}ffn.{name}.weight",), _same))

    v, t = "vision_model.", "text_model."
    rules.append((f"{v}embeddings.patch_embedding.weight", ("image_model.patch_embed.projection.weight",), _same))
    rules.append((f"{v}embeddings.patch_embedding.bias", ("image_model.patch_embed.projection.bias",), _same))
    rules.append((f"{v}embeddings.position_embedding", ("image_model.pos_embed",), _same))
    for leaf in ("weight", "bias"):
        rules.append((f"{v}pre_layernorm.{leaf}", (f"image_model.layers.0.ln0.{leaf}",), _same))
        rules.append((f"{v}post_layernorm.{leaf}", (f"image_model.ln1.{leaf}",), _same))
    block_rules(
        "image_model.layers.",
        f"{v}encoder.layers.",
        config.vision_config,
        ("spatial_mix_k", "spatial_mix_r"),
        _one_minus_flat,
    )
    rules.append((f"{t}token_embedding.weight", ("text_model.emb.weight",), _same))
    for leaf in ("weight", "bias"):
        rules.append((f"{t}pre_layernorm.{leaf}", (f"text_model.blocks.0.ln0.{leaf}",), _same))
        rules.append((f"{t}final_layer_norm.{leaf}", (f"text_model.ln_out.{leaf}",), _same))
    block_rules("text_model.blocks.", f"{t}encoder.layers.", config.text_config, ("time_maa_k", "time_maa_r"), _flat)
    rules.append(("logit_scale", ("logit_scale",), _same))
    return rules


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
    remaining = dict(state)
    converted: dict[str, torch.Tensor] = {}
    for ours, sources, transform in tqdm(
        conversion_rules(config), desc="converting tensors", unit="tensor", disable=not progress, leave=False
    ):
        taken = []
        for key in sources:
            if key not in remaining:
                raise ConversionError(f"original tensor {key!r} would be used twice (for {ours!r})")
            taken.append(remaining.pop(key))
        if ours in converted:
            raise ConversionError(f"{ours!r} is produced twice")
        converted[ours] = transform(taken).to(dtype).contiguous()
    if remaining:
        raise ConversionError(f"original tensors not converted: {_preview(sorted(remaining))}")
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


# ============================================================================ verification


@dataclasses.dataclass
class VerificationReport:
    """Max relative differences (max |ours - reference| / max |reference| over each embedding, worst sample)."""

    image: float
    text: float
    stored_image: float
    stored_text: float
    stored_dtype: str
    tolerance: float = VERIFY_TOLERANCE

    @property
    def passed(self) -> bool:
        return self.image <= self.tolerance and self.text <= self.tolerance

    def lines(self) -> list[str]:
        return [
            f"verify: image embeddings max relative difference {self.image:.3e} "
            f"(float64, tolerance {self.tolerance:g})",
            f"verify: text embeddings max relative difference {self.text:.3e} (float64, tolerance {self.tolerance:g})",
            f"verify: the stored {self.stored_dtype} weights, run in float64: image {self.stored_image:.3e}, "
            f"text {self.stored_text:.3e} (rounding of the stored dtype; informational)",
        ]


def max_relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Worst sample's max |ours - reference| relative to that sample's max |reference|."""
    diff = (ours.to(torch.float64) - reference).abs().amax(dim=-1)
    return float((diff / reference.abs().amax(dim=-1)).max())


def verification_inputs(config: RWKVCLIPConfig, seed: int = 0) -> dict:
    """Random images (native size and one that needs padding and a resized position grid) and captions."""
    generator = torch.Generator().manual_seed(seed)
    vision, text = config.vision_config, config.text_config
    size, patch = vision.image_size, vision.patch_size
    odd_size = (size + patch // 2 + 1, size - patch + 3)
    images = [
        torch.randn(2, vision.num_channels, size, size, generator=generator, dtype=torch.float64),
        torch.randn(1, vision.num_channels, *odd_size, generator=generator, dtype=torch.float64),
    ]
    ctx = text.max_position_embeddings
    bos, eos = text.bos_token_id, text.eos_token_id
    low = 1 if text.pad_token_id == 0 else 0
    high = min(bos, eos)
    captions = []
    for length in (max(ctx // 4, 3), max(ctx // 2, 3), ctx):
        body = torch.randint(low, high, (length - 2,), generator=generator).tolist()
        captions.append([bos, *body, eos])
    return {"images": images, "captions": captions}


def _original_ids(captions: list[list[int]], ctx: int) -> torch.Tensor:
    ids = torch.zeros(len(captions), ctx, dtype=torch.long)  # the original pads with id 0
    for row, caption in enumerate(captions):
        ids[row, : len(caption)] = torch.tensor(caption)
    return ids


def _batch_ids(captions: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    # padded only to the longest caption, as a tokenizer would: the model restores the original's layout
    length = max(len(caption) for caption in captions)
    ids = torch.full((len(captions), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(captions), length, dtype=torch.long)
    for row, caption in enumerate(captions):
        ids[row, : len(caption)] = torch.tensor(caption)
        mask[row, : len(caption)] = 1
    return ids, mask


@torch.no_grad()
def _embeddings(model: RWKVCLIPModel, inputs: dict, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.cat([model.get_image_features(pixels).pooler_output for pixels in inputs["images"]])
    ids, mask = _batch_ids(inputs["captions"], pad_id)
    return image, model.get_text_features(ids, attention_mask=mask).pooler_output


def verify_conversion(
    original_state: dict[str, torch.Tensor],
    config: RWKVCLIPConfig,
    output_dir: str | os.PathLike,
    seed: int = 0,
    tolerance: float = VERIFY_TOLERANCE,
) -> VerificationReport:
    """Compare the conversion against `original_reference` (original keys, float64) on random inputs.

    1. The original tensors converted in float64 and run through `RWKVCLIPModel` in float64 must match the
       reference within `tolerance`: any mapping or modelling mistake stands far above float64 rounding.
    2. The written directory must load through `AutoModel` with every parameter equal to step 1's tensors
       rounded to the stored dtype (bitwise).
    3. The stored weights, upcast to float64, are also compared with the reference; that number measures
       only the rounding of the stored dtype (e.g. float32 `1 - spatial_mix`) and is reported, not gated.
    """
    inputs = verification_inputs(config, seed)
    text = config.text_config
    steps = tqdm(total=4, desc="verifying", unit="step", leave=False)
    logger.info("verify: original-key reference forward (float64)")
    reference_image = torch.cat([original_reference.image_embeddings(original_state, x) for x in inputs["images"]])
    reference_text = original_reference.text_embeddings(
        original_state, _original_ids(inputs["captions"], text.max_position_embeddings), text.head_size_divisor
    )
    steps.update()

    logger.info("verify: converted model forward (float64)")
    converted64 = convert_state_dict(original_state, config, torch.float64, progress=False)
    ours_image, ours_text = _embeddings(build_model(config, converted64), inputs, text.pad_token_id)
    steps.update()

    logger.info("verify: reading back %s through AutoModel", output_dir)
    stored, info = AutoModel.from_pretrained(output_dir, dtype="auto", output_loading_info=True)
    problems = {name: keys for name, keys in info.items() if name != "error_msgs" and keys}
    if problems or info.get("error_msgs"):
        raise VerificationError(f"AutoModel did not load {output_dir} cleanly: {problems or info['error_msgs']}")
    stored_dtype = next(stored.parameters()).dtype
    stored_state = stored.state_dict()
    if stored_state.keys() != converted64.keys():
        raise VerificationError(f"{output_dir} holds other parameters than the conversion")
    differing = [
        key for key, value in stored_state.items() if not torch.equal(value, converted64[key].to(value.dtype))
    ]
    if differing:
        raise VerificationError(f"stored tensors differ from the conversion: {_preview(differing)}")
    steps.update()

    logger.info("verify: stored %s weights in float64", str(stored_dtype).removeprefix("torch."))
    stored_image, stored_text = _embeddings(stored.double().eval(), inputs, text.pad_token_id)
    steps.update()
    steps.close()
    return VerificationReport(
        image=max_relative_difference(ours_image, reference_image),
        text=max_relative_difference(ours_text, reference_text),
        stored_image=max_relative_difference(stored_image, reference_image),
        stored_text=max_relative_difference(stored_text, reference_text),
        stored_dtype=str(stored_dtype).removeprefix("torch."),
        tolerance=tolerance,
    )


# ============================================================================ processor and model card


def save_processor(output_dir: str | os.PathLike, config: RWKVCLIPConfig) -> None:
    """Write the tokenizer and image-processor files: the bundled CLIP BPE and the original preprocessing."""
    processor = RWKVCLIPProcessor.from_bundled(
        image_size=config.vision_config.image_size, context_length=config.text_config.max_position_embeddings
    )
    if len(processor.tokenizer) != config.text_config.vocab_size:
        logger.warning(
            "the checkpoint's vocabulary (%d) is not the bundled CLIP BPE's (%d): the saved tokenizer does not fit it",
            config.text_config.vocab_size,
            len(processor.tokenizer),
        )
    processor.save_pretrained(output_dir)


def infer_training_data(*names: str | None) -> list[str]:
    """The training set named in the first of `names` that names one (e.g. "RWKV-CLIP-B32-LAION10M")."""
    for name in names:
        if not name:
            continue
        squashed = re.sub(r"[^a-z0-9]", "", str(name).lower())
        found = [data for data in KNOWN_TRAINING_DATA if data.lower() in squashed]
        if len(found) == 1:
            return found
    return []


def model_card(
    config: RWKVCLIPConfig,
    *,
    repo_id: str,
    training_data: list[str],
    checkpoint_name: str,
    checkpoint_sha256: str,
    dtype: str,
    verification: VerificationReport | None,
) -> str:
    """README.md for the converted directory: Hub metadata, provenance, usage, expected results."""
    architecture = architecture_name(config)
    datasets = [KNOWN_TRAINING_DATA.get(name, {}).get("hub_id") or name for name in training_data]
    metadata = ModelCardData(
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        license="mit",
        datasets=datasets or None,
        tags=["rwkv", "rwkv-clip", "clip", "vision", "zero-shot-image-classification", "arxiv:2406.06973"],
    )
    title = f"RWKV-CLIP-{architecture}" if architecture else "RWKV-CLIP (custom size)"
    data_text = (
        ", ".join(KNOWN_TRAINING_DATA.get(name, {}).get("description", name) for name in training_data)
        if training_data
        else "not recorded (pass --training-data when converting)"
    )
    lines = [
        "---",
        metadata.to_yaml(),
        "---",
        "",
        f"# {title}" + (f" ({', '.join(training_data)})" if training_data else ""),
        "",
        f"RWKV-CLIP ([Gu et al., EMNLP 2024]({PAPER_URL})) is a CLIP-style dual encoder whose image and text towers",
        "are RWKV-6 blocks with a bidirectional, linear-time WKV operator instead of attention. These are the",
        f"authors' released weights ([{ORIGINAL_REPO_URL}]({ORIGINAL_REPO_URL}), MIT) converted to a native",
        "Hugging Face `transformers` model by rwkv-clip-hf (`conversion/convert_rwkv_clip_original.py`).",
        "",
        f"- Architecture: {describe(config)}; {config.projection_dim}-d joint embedding (no projection layer).",
        f"- Training data: {data_text}.",
        f"- Converted from `{checkpoint_name}` (sha256 `{checkpoint_sha256}`), stored as {dtype}.",
    ]
    if verification is not None:
        lines.append(
            f"- Conversion check: against an independent float64 forward over the original tensors, max relative "
            f"difference of the embeddings {verification.image:.1e} (image) and {verification.text:.1e} (text)."
        )
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "import torch",
        "from PIL import Image",
        "from transformers import AutoModel, AutoProcessor, pipeline",
        "",
        "import rwkv_clip_hf  # pip install rwkv-clip-hf: registers the model, tokenizer and processor",
        "",
        f'repo = "{repo_id}"',
        "model = AutoModel.from_pretrained(repo).eval()",
        "processor = AutoProcessor.from_pretrained(repo)",
        "",
        'image = Image.open("cat.jpg")',
        'labels = ["a photo of a cat", "a photo of a dog"]',
        'inputs = processor(text=labels, images=image, return_tensors="pt", padding=True)',
        "with torch.no_grad():",
        "    probs = model(**inputs).logits_per_image.softmax(dim=-1)",
        "print(probs)",
        "",
        'classifier = pipeline("zero-shot-image-classification", model=repo)',
        'print(classifier(image, candidate_labels=["cat", "dog"]))',
        "```",
        "",
        "Embeddings: `model.get_image_features(pixel_values).pooler_output` and",
        "`model.get_text_features(input_ids, attention_mask).pooler_output` (not normalised). The repository also",
        "carries the code of the model, tokenizer, image processor and processor: without the package, pass",
        "`trust_remote_code=True` to `AutoModel`, `AutoProcessor` (or `AutoTokenizer`, `AutoImageProcessor`) and",
        "`pipeline(...)`; the results are the same (it needs `ftfy` and `regex` for the tokenizer).",
    ]
    published = PUBLISHED_RESULTS.get((architecture, training_data[0] if len(training_data) == 1 else None))
    if published:
        lines += ["", "## Published results", "", "From the paper; a faithful conversion reproduces them:", ""]
        for table, values in published.items():
            lines += [f"| {table} | " + " | ".join(values) + " |", "|---" * (len(values) + 1) + "|"]
            lines += ["| RWKV-CLIP | " + " | ".join(f"{value:.1f}" for value in values.values()) + " |", ""]
    lines += [
        "",
        "## Citation",
        "",
        "```bibtex",
        "@inproceedings{gu2024rwkvclip,",
        "  title     = {RWKV-CLIP: A Robust Vision-Language Representation Learner},",
        "  author    = {Gu, Tiancheng and Yang, Kaicheng and An, Xiang and Feng, Ziyong and Liu, Dongnan and",
        "               Cai, Weidong and Deng, Jiankang},",
        "  booktitle = {Proceedings of the 2024 Conference on Empirical Methods in Natural Language Processing},",
        "  year      = {2024}",
        "}",
        "```",
        "",
    ]
    return "\n".join(lines)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


# ============================================================================ output directory


# What a conversion writes: --overwrite replaces only a directory holding nothing else. Besides these, the model
# code that save_pretrained copies (modules of the package) and, when publishing, whatever the new conversion wrote.
OUTPUT_FILES = frozenset(
    {"config.json", "model.safetensors", "README.md", "processor_config.json", "tokenizer_config.json",
     "preprocessor_config.json", "special_tokens_map.json", "tokenizer.json", "vocab.json", "merges.txt",
     "bpe_simple_vocab_16e6.txt.gz", "chat_template.jinja", "generation_config.json"}
    | {path.name for path in Path(rwkv_clip_hf.__file__).parent.rglob("*.py")}
    | set(rwkv_clip_hf.remote_code_rwkv_clip.REMOTE_CODE_FILES)  # the flattened model code
)  # fmt: skip


def _check_output(output: Path, overwrite: bool, inputs: Iterable[Path] = (), written: Iterable[str] = ()) -> None:
    """Refuse an output that is a file, holds (or is) one of `inputs`, or is not empty without `overwrite`;
    with `overwrite`, refuse one holding anything this converter does not write (`OUTPUT_FILES`, `written`)."""
    if output.exists() and not output.is_dir():
        raise ConversionError(f"output {output} exists and is not a directory")
    resolved = output.resolve()
    for path in inputs:
        path = Path(path).resolve()
        if path == resolved or resolved in path.parents:
            raise ConversionError(
                f"output {output} contains the input {path}: replacing it would delete the input; choose an "
                "output directory outside the one holding the checkpoint and config"
            )
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not overwrite:
        raise ConversionError(f"output directory {output} exists and is not empty; pass --overwrite to replace it")
    ours = OUTPUT_FILES | set(written)
    foreign = sorted(entry.name for entry in output.iterdir() if entry.name not in ours or not entry.is_file())
    if foreign:
        raise ConversionError(
            f"output directory {output} holds files this converter did not write: {_preview(foreign)}; "
            "--overwrite only replaces a previous conversion. Move them away or choose another directory"
        )


STALE_LEGACY_SECONDS = 3600


def _clean_stale_partials(output: Path) -> None:
    """Remove `.NAME.partial-PID-*` staging folders of conversions that were killed (their process is gone;
    folders without a PID, from older versions, once untouched for an hour). A live conversion's are kept."""
    if not output.parent.is_dir():
        return
    for entry in output.parent.glob(f".{glob_escape(output.name)}.partial-*"):
        if not entry.is_dir() or entry.is_symlink():
            continue
        pid = entry.name.rsplit(".partial-", 1)[1].split("-", 1)[0]
        if pid.isdigit():
            stale = not _process_alive(int(pid))
        else:
            stale = time.time() - entry.stat().st_mtime > STALE_LEGACY_SECONDS
        if stale:
            logger.info("removing %s, left by an interrupted conversion", entry)
            shutil.rmtree(entry, ignore_errors=True)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _current_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _publish(staging: Path, output: Path) -> None:
    """Move the complete staging directory to `output`, replacing an existing one only after success."""
    # mkdtemp (and the safetensors writer) create private 0700/0600 entries; give the result the usual modes
    umask = _current_umask()
    os.chmod(staging, 0o777 & ~umask)
    for path in staging.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)
    if not output.exists():
        os.replace(staging, output)
        return
    previous = Path(tempfile.mkdtemp(prefix=f".{output.name}.previous-", dir=output.parent))
    previous.rmdir()
    os.replace(output, previous)
    try:
        os.replace(staging, output)
    except BaseException:
        os.replace(previous, output)
        raise
    shutil.rmtree(previous)


# ============================================================================ driver


def _os_error(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror + (f" ({error.filename})" if error.filename else "")
    return f"{type(error).__name__}: {error}"


@dataclasses.dataclass
class ConversionResult:
    output_dir: Path
    config: RWKVCLIPConfig
    verification: VerificationReport | None


def convert_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    original_config: str | os.PathLike | dict | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    verify: bool = False,
    push_to_hub: str | None = None,
    training_data: Iterable[str] | None = None,
) -> ConversionResult:
    """Convert an original checkpoint into a Hub-ready directory (see the module docstring).

    The directory is assembled in a temporary sibling and renamed into place only when complete (and
    verified, with `verify=True`), so a failure never leaves a partial output. Raises `ConversionError`
    (`UnsafeCheckpointError`, `VerificationError`) with a message naming the offending file, key or field.
    """
    if dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if push_to_hub:
        check_hub_access(push_to_hub)  # before minutes of converting, not after
    checkpoint, output = Path(checkpoint), Path(output_dir).absolute()
    inputs = [checkpoint] + ([Path(original_config)] if isinstance(original_config, (str, os.PathLike)) else [])
    _check_output(output, overwrite, inputs)
    if isinstance(original_config, (str, os.PathLike)):
        original_config = load_original_config(original_config)

    state = load_original_state_dict(checkpoint)
    try:
        config = infer_config(state, original_config)
        logger.info("architecture: %s (%s)", architecture_name(config) or "custom", describe(config))
        converted = convert_state_dict(state, config, DTYPES[dtype])
        model = build_model(config, converted)
    except (ValueError, TypeError, RuntimeError, ArithmeticError) as error:
        raise ConversionError(
            f"the checkpoint's architecture is not supported: {type(error).__name__}: {error}"
        ) from error

    training = list(training_data or []) or infer_training_data(push_to_hub, output.name, str(checkpoint))
    logger.info("training data: %s", ", ".join(training) if training else "unknown")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale_partials(output)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-{os.getpid()}-", dir=output.parent))
    except OSError as error:
        raise ConversionError(f"cannot write the output {output}: {_os_error(error)}") from None
    try:
        logger.info("writing %s (staging in %s)", output, staging.name)
        model.save_pretrained(staging)
        del model, converted
        save_processor(staging, config)
        report = None
        if verify:
            report = verify_conversion(state, config, staging)  # the CLI prints report.lines() once, at the end
            if not report.passed:
                raise VerificationError(
                    "the converted model does not reproduce the original-key reference: "
                    + " / ".join(report.lines()[:2])
                    + "; nothing was written"
                )
        card = model_card(
            config,
            repo_id=push_to_hub or output.name,
            training_data=training,
            checkpoint_name=checkpoint.name,
            checkpoint_sha256=file_sha256(checkpoint),
            dtype=dtype,
            verification=report,
        )
        (staging / "README.md").write_text(card, encoding="utf-8")
        # it may have appeared (or gained files) while we were converting
        _check_output(output, overwrite, inputs, written=[entry.name for entry in staging.iterdir()])
        _publish(staging, output)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) or type(error).__name__ == "SafetensorError":  # e.g. disk full, read-only
            message = f"cannot write the output {output}: {_os_error(error)}; nothing was written"
            raise ConversionError(message) from None
        raise
    logger.info("wrote %s", output)

    if push_to_hub:
        upload(output, push_to_hub, commit_message=f"Convert original RWKV-CLIP checkpoint {checkpoint.name}")
    return ConversionResult(output_dir=output, config=config, verification=report)


def check_hub_access(repo_id: str) -> None:
    """Raise `ConversionError` unless `repo_id` is a valid model repository id and a Hub token is usable."""
    try:
        validate_repo_id(repo_id)
        if "/" not in repo_id:
            raise HFValidationError("it must be NAMESPACE/NAME, e.g. your-user/RWKV-CLIP-B32-YFCC15M")
    except HFValidationError as error:
        raise ConversionError(f"--push-to-hub {repo_id!r} is not a valid repository id: {error}") from None
    try:
        user = HfApi().whoami()
    except Exception as error:  # no token (LocalTokenNotFoundError), a rejected one (401), offline, no network
        raise ConversionError(
            f"--push-to-hub {repo_id}: cannot use the Hub ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "log in with `hf auth login` or set HF_TOKEN (a token with write access), then run again. Nothing was "
            "converted"
        ) from None
    logger.info("Hub: logged in as %s", user.get("name", "?") if isinstance(user, dict) else user)


def upload(output: Path, repo_id: str, commit_message: str) -> None:
    """Upload a converted directory; a failure is a `ConversionError` that says how to retry the upload alone."""
    logger.info("uploading %s to the Hub repository %s", output, repo_id)
    try:
        api = HfApi()
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=output, commit_message=commit_message)
    except Exception as error:
        raise ConversionError(
            f"the upload of {output} to {repo_id} failed ({type(error).__name__}: {str(error).splitlines()[0]}). The "
            f"converted directory is complete; upload it alone with: python conversion/convert_rwkv_clip_original.py "
            f"--output {output} --push-to-hub {repo_id}"
        ) from None


def push_converted(output_dir: str | os.PathLike, repo_id: str) -> Path:
    """Upload a directory converted earlier (the CLI without --checkpoint)."""
    output = Path(output_dir).absolute()
    missing = [name for name in ("config.json", "model.safetensors", "README.md") if not (output / name).is_file()]
    if missing:
        raise ConversionError(
            f"--output {output} is not a converted directory (no {', '.join(missing)}); give --checkpoint to convert"
        )
    check_hub_access(repo_id)
    upload(output, repo_id, commit_message="Upload converted RWKV-CLIP checkpoint")
    return output


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert an original RWKV-CLIP checkpoint (deepglint/RWKV-CLIP) into a Hub-ready directory."
    )
    parser.add_argument(
        "--checkpoint",
        help="original torch.save state dict, e.g. model_31.pt; without it, --push-to-hub uploads an --output "
        "directory converted earlier",
    )
    parser.add_argument("--output", required=True, help="directory to create")
    parser.add_argument(
        "--config", help="the authors' model_config JSON (e.g. RWKV_CLIP_B32.json); checked against the tensors"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of model.safetensors")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--verify", action="store_true", help="compare with the original-key float64 reference")
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="upload the directory to this Hub model repository (the id and your Hub login are checked before "
        "converting)",
    )
    parser.add_argument(
        "--training-data",
        nargs="+",
        metavar="NAME",
        help="training set(s) for the model card, e.g. YFCC15M; default: inferred from the repo id, output or "
        f"checkpoint path ({', '.join(KNOWN_TRAINING_DATA)})",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point. Exit status: 0 success, 1 verification failed, 2 any other conversion error (bad input,
    unwritable output), 3 an unexpected error (a bug)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if args.checkpoint is None:
        if not args.push_to_hub:
            print(
                "error: give --checkpoint (or --push-to-hub to upload an --output converted earlier)", file=sys.stderr
            )
            return 2
        try:
            output = push_converted(args.output, args.push_to_hub)
        except ConversionError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"uploaded {output} -> {args.push_to_hub}")
        return 0
    try:
        result = convert_checkpoint(
            args.checkpoint,
            args.output,
            original_config=args.config,
            dtype=args.dtype,
            overwrite=args.overwrite,
            verify=args.verify,
            push_to_hub=args.push_to_hub,
            training_data=args.training_data,
        )
    except VerificationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a bug of the converter: a short message, the traceback only at debug level
        logger.debug("unexpected error", exc_info=True)
        print(
            f"error: unexpected {type(error).__name__} while converting {args.checkpoint}: {error} (please report "
            "this; nothing was written)",
            file=sys.stderr,
        )
        return 3
    if result.verification is not None:
        print("\n".join(result.verification.lines()))
    print(f"converted {args.checkpoint} -> {result.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
