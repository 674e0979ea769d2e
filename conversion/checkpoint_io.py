"""Files of a conversion: safe loading of an original checkpoint and of the authors' config, and atomic
publishing of the output directory (assembled in a staging sibling, moved into place only when complete).

Part of `convert_rwkv_clip_original.py`, which re-exports these names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

import rwkv_clip_hf

logger = logging.getLogger("rwkv_clip_conversion")


class ConversionError(Exception):
    """The checkpoint, the original config or the output directory cannot be used; the message says which."""


class UnsafeCheckpointError(ConversionError):
    """The checkpoint holds pickled objects that `torch.load(weights_only=True)` refuses to construct."""


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
            raise ConversionError(f"{source}: state dict entries that are not tensors: {preview(non_tensors)}")
        raise ConversionError(
            f"{source} contains no state dict: expected a dict of tensors, possibly under 'state_dict' or 'model'; "
            f"top-level keys: {preview(sorted(str(key) for key in obj))}"
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


def preview(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


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


def check_output(output: Path, overwrite: bool, inputs: Iterable[Path] = (), written: Iterable[str] = ()) -> None:
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
            f"output directory {output} holds files this converter did not write: {preview(foreign)}; "
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


def _os_error(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror + (f" ({error.filename})" if error.filename else "")
    return f"{type(error).__name__}: {error}"


@contextlib.contextmanager
def publish_atomically(output: Path, overwrite: bool, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a fresh staging directory beside `output`; when the block completes, move it to `output` (after
    checking `output` again: it may have appeared or gained files meanwhile). When the block raises, remove the
    staging directory: nothing is written. An `OSError` (disk full, read-only) becomes a `ConversionError`."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale_partials(output)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-{os.getpid()}-", dir=output.parent))
    except OSError as error:
        raise ConversionError(f"cannot write the output {output}: {_os_error(error)}") from None
    try:
        yield staging
        check_output(output, overwrite, inputs, written=[entry.name for entry in staging.iterdir()])
        _publish(staging, output)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) or type(error).__name__ == "SafetensorError":  # e.g. disk full, read-only
            message = f"cannot write the output {output}: {_os_error(error)}; nothing was written"
            raise ConversionError(message) from None
        raise
