"""Batched image/text encoding with any CLIP-API model, and an on-disk feature cache.

A model qualifies if it has `get_image_features(pixel_values=...)` and `get_text_features(input_ids=...,
attention_mask=...)` returning a tensor or an output with `pooler_output` (transformers v5 `CLIPModel` and
`RWKVCLIPModel` both return `BaseModelOutputWithPooling`), and a processor that turns `images=` into
`pixel_values` and `text=` into `input_ids`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .data import EvalData, require_column, to_pil

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CACHE_FORMAT = 1  # bump when the meaning of a cached file changes
_FINGERPRINTED_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".txt", ".gz", ".model", ".py")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_cache_dir() -> Path:
    """`$RWKV_CLIP_EVAL_CACHE`, else `$HF_HOME/rwkv_clip_eval` (HF_HOME defaults to ~/.cache/huggingface)."""
    if os.environ.get("RWKV_CLIP_EVAL_CACHE"):
        return Path(os.environ["RWKV_CLIP_EVAL_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME", os.path.join("~", ".cache", "huggingface"))
    return Path(hf_home).expanduser() / "rwkv_clip_eval"


def load_model_and_processor(
    model: str,
    *,
    device: str | None = None,
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """Load a CLIP-API model with `AutoModel` and its processor with `AutoProcessor`.

    Args:
        model: a local directory or a Hub id (RWKV-CLIP, transformers `CLIPModel`, ...).
        device: `"cpu"`, `"cuda"`, `"cuda:1"`, ...; default cuda when available.
        dtype: `"float32"`, `"float16"` or `"bfloat16"`; the model's weights are loaded in it.
        revision: a Hub revision.
        trust_remote_code: passed to both loaders.

    Returns:
        `(model, processor)`, the model in eval mode on `device`.
    """
    from transformers import AutoModel, AutoProcessor

    import rwkv_clip_hf  # noqa: F401  (registers RWKV-CLIP with the Auto classes)

    if dtype not in DTYPES:
        raise ValueError(f"`dtype` {dtype!r}: choose one of {sorted(DTYPES)}")
    device = device or default_device()
    loaded = AutoModel.from_pretrained(
        model, revision=revision, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
    )
    for name in ("get_image_features", "get_text_features"):
        if not hasattr(loaded, name):
            raise ValueError(
                f"`model` {model}: {type(loaded).__name__} has no {name}(); a CLIP-style dual encoder is needed"
            )
    processor = AutoProcessor.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    return loaded.to(device).eval(), processor


def model_fingerprint(
    model, *, source: str | None = None, revision: str | None = None, dtype: str | None = None
) -> dict:
    """What identifies a model's features: for a local directory, its path and the size and mtime of its
    config/weight/processor files; for a Hub id, the id, the revision and the commit of the cached snapshot.
    """
    source = source or getattr(model, "name_or_path", None) or type(model).__name__
    fingerprint: dict[str, Any] = {"class": type(model).__name__, "dtype": dtype}
    path = Path(source).expanduser()
    if path.is_dir():
        fingerprint["path"] = str(path.resolve())
        fingerprint["files"] = sorted(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns)
            for p in path.iterdir()
            if p.is_file() and p.suffix in _FINGERPRINTED_SUFFIXES
        )
    else:
        fingerprint.update(name_or_path=source, revision=revision, commit=_hub_commit(source, revision))
    return fingerprint


def _hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit of the locally cached snapshot of a Hub model (the Hub cache stores files under
    `snapshots/<commit>/`), so that a new upload of the same id gets new cache entries."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # an id the Hub client rejects: no snapshot to name
        return None
    return Path(cached).parent.name if isinstance(cached, str) else None


def _image_processor_config(processor) -> dict:
    image_processor = getattr(processor, "image_processor", processor)
    to_dict = getattr(image_processor, "to_dict", None)
    return {"class": type(image_processor).__name__, **(to_dict() if to_dict else {})}


def _tokenizer_config(processor) -> dict:
    tokenizer = getattr(processor, "tokenizer", processor)
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": getattr(tokenizer, "name_or_path", None),
        "model_max_length": getattr(tokenizer, "model_max_length", None),
        "vocab_size": getattr(tokenizer, "vocab_size", None),
    }


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class FeatureCache:
    """Features stored as safetensors files named by the SHA-256 of a JSON key, with the key beside them.

    `directory=None` disables caching.
    """

    def __init__(self, directory: str | os.PathLike | None):
        self.directory = Path(directory).expanduser() if directory is not None else None

    def path(self, key: dict) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / f"{_digest({'format': CACHE_FORMAT, **key})[:40]}.safetensors"

    def get_or_compute(self, key: dict, compute: Callable[[], torch.Tensor], what: str) -> torch.Tensor:
        """Return the cached tensor for `key`, or compute, store and return it. Logs which happened."""
        from safetensors.torch import load_file, save_file

        path = self.path(key)
        if path is not None and path.is_file():
            try:
                cached = load_file(str(path))["features"]
            except Exception as error:  # truncated or corrupted (e.g. copied from an interrupted sync)
                logger.warning(
                    "%s: the cached features %s are unreadable (%s: %s); encoding again",
                    what,
                    path,
                    type(error).__name__,
                    str(error).splitlines()[0] if str(error) else "",
                )
            else:
                logger.info("%s: cached features found, skipping the encoding (%s)", what, path)
                return cached
        features = compute()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename so that an interrupted run never leaves a truncated cache entry behind.
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
                tmp = handle.name
            try:
                save_file({"features": features.contiguous()}, tmp)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            path.with_suffix(".json").write_text(json.dumps(key, indent=1, sort_keys=True, default=str))
            logger.info("%s: features cached at %s", what, path)
        return features


def pooled(output) -> torch.Tensor:
    """The feature tensor of a `get_*_features` result: the tensor itself, `.pooler_output`, or a tuple's first."""
    if isinstance(output, torch.Tensor):
        return output
    pooler = getattr(output, "pooler_output", None)
    if isinstance(pooler, torch.Tensor):
        return pooler
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the features in a {type(output).__name__}; expected a tensor or a pooler_output")


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    if parameter is None:
        return torch.device("cpu"), torch.float32
    return parameter.device, parameter.dtype


def _text_max_length(model, tokenizer) -> int | None:
    """The tokenizer's limit, capped by the text tower's positions (some tokenizers carry no limit)."""
    limits = []
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and model_max < 1_000_000:
        limits.append(model_max)
    text_config = getattr(getattr(model, "config", None), "text_config", None)
    positions = getattr(text_config, "max_position_embeddings", None)
    if isinstance(positions, int):
        limits.append(positions)
    return min(limits) if limits else None


@torch.no_grad()
def encode_images(
    model,
    processor,
    images: Sequence | Callable[[int, int], list],
    count: int,
    batch_size: int = 64,
    desc: str = "images",
) -> torch.Tensor:
    """Encode `count` images in batches; `images(start, stop)` returns the PIL images of rows start..stop-1.

    Returns:
        float32 CPU tensor `(count, dim)`, not normalised.
    """
    device, dtype = _model_device_dtype(model)
    fetch = images if callable(images) else (lambda start, stop: list(images[start:stop]))
    chunks = []
    batches = range(0, count, batch_size)
    for start in tqdm(batches, desc=f"encoding {desc}", unit="batch", disable=len(batches) < 2):
        batch = fetch(start, min(start + batch_size, count))
        pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"]
        features = pooled(model.get_image_features(pixel_values=pixel_values.to(device=device, dtype=dtype)))
        chunks.append(features.float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


@torch.no_grad()
def encode_texts(model, processor, texts: Sequence[str], batch_size: int = 256, desc: str = "texts") -> torch.Tensor:
    """Encode texts in batches (padded per batch, truncated to the text tower's context).

    Returns:
        float32 CPU tensor `(len(texts), dim)`, not normalised.
    """
    device, _ = _model_device_dtype(model)
    tokenizer = getattr(processor, "tokenizer", processor)
    max_length = _text_max_length(model, tokenizer)
    kwargs = {"padding": True, "truncation": max_length is not None, "return_tensors": "pt"}
    if max_length is not None:
        kwargs["max_length"] = max_length
    chunks = []
    batches = range(0, len(texts), batch_size)
    for start in tqdm(batches, desc=f"encoding {desc}", unit="batch", disable=len(batches) < 2):
        batch = processor(text=list(texts[start : start + batch_size]), **kwargs)
        inputs = {"input_ids": batch["input_ids"].to(device)}
        if "attention_mask" in batch:
            inputs["attention_mask"] = batch["attention_mask"].to(device)
        chunks.append(pooled(model.get_text_features(**inputs)).float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


class FeatureExtractor:
    """A model and its processor with a feature cache: image features of a dataset split, text features of
    a list of strings, each computed once.

    Args:
        model, processor: a CLIP-API model and its processor.
        model_key: what identifies the model (see `model_fingerprint`).
        cache: a `FeatureCache` (`FeatureCache(None)` disables caching).
        batch_size: images per batch (texts use 4x this, they are cheaper).
    """

    def __init__(self, model, processor, model_key: dict, cache: FeatureCache, batch_size: int = 64):
        self.model, self.processor, self.model_key, self.cache, self.batch_size = (
            model,
            processor,
            model_key,
            cache,
            batch_size,
        )

    def image_features(self, data: EvalData, image_column: str) -> torch.Tensor:
        """Image features `(len(data), dim)` of `data`'s image column, from the cache when possible."""
        require_column(data.dataset, image_column, "`image_column`", data.source)
        key = {
            "kind": "image",
            "model": self.model_key,
            "processor": _image_processor_config(self.processor),
            "data": data.source,
            "fingerprint": data.fingerprint,
            "image_column": image_column,
        }
        column = data.dataset.select_columns([image_column])

        def fetch(start: int, stop: int) -> list:
            try:
                images = [to_pil(value, image_column) for value in column[start:stop][image_column]]
                for image in images:
                    image.load()  # decode here, where the row is known (PIL opens lazily)
                return images
            except (OSError, ValueError, TypeError, SyntaxError):  # PIL's errors for undecodable files
                for row in range(start, stop):  # find the row, and say which it is
                    try:
                        to_pil(column[row][image_column], image_column).load()
                    except (OSError, ValueError, TypeError, SyntaxError) as error:
                        raise ValueError(
                            f"`image_column` {image_column!r}: row {row} of {data.describe()} is not a readable "
                            f"image ({type(error).__name__}: {error})"
                        ) from None
                raise

        return self.cache.get_or_compute(
            key,
            lambda: encode_images(
                self.model, self.processor, fetch, len(data), self.batch_size, f"images of {data.describe()}"
            ),
            f"image features of {data.describe()}",
        )

    def text_features(self, texts: Sequence[str], what: str = "texts") -> torch.Tensor:
        """Text features `(len(texts), dim)`, cached by the texts' content."""
        key = {
            "kind": "text",
            "model": self.model_key,
            "processor": _tokenizer_config(self.processor),
            "texts": _digest(list(texts)),
            "count": len(texts),
        }
        return self.cache.get_or_compute(
            key,
            lambda: encode_texts(self.model, self.processor, texts, 4 * self.batch_size, what),
            f"text features of {what}",
        )
