#!/usr/bin/env python
"""Convert an original RWKV-CLIP checkpoint (deepglint/RWKV-CLIP, `torch.save` of a DDP state dict) into a
Hub-ready directory: config.json, model.safetensors, processor files and a model card.

    python conversion/convert_rwkv_clip_original.py --checkpoint model_31.pt --output rwkv-clip-b32-yfcc15m --verify

The architecture is inferred from the tensors; `--config` takes the authors' model_config JSON, which must
then agree with them. `--verify` compares the converted model with `original_reference.py`, an independent
float64 forward written against the original key names. Importable: `convert_checkpoint(...)`.

This file holds the command line and `convert_checkpoint`; the jobs are the modules beside it, whose names it
re-exports: `checkpoint_io` (safe loading, atomic publishing of the output), `key_mapping` (architecture, layout
checks, the key-mapping table), `verification` (`--verify`) and `card` (the model card).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from huggingface_hub import HfApi
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from rwkv_clip_hf import RWKVCLIPConfig, RWKVCLIPProcessor

# The converter's parts, by job; their public names are importable from this module too.
from card import KNOWN_TRAINING_DATA, PUBLISHED_RESULTS, infer_training_data, model_card
from checkpoint_io import (
    OUTPUT_FILES,
    STALE_LEGACY_SECONDS,
    ConversionError,
    UnsafeCheckpointError,
    _current_umask,
    check_output,
    extract_state_dict,
    file_sha256,
    load_original_config,
    load_original_state_dict,
    normalize_keys,
    publish_atomically,
)
from key_mapping import (
    ORIGINAL_TO_CONVERTED_KEY_MAPPING,
    TRANSFORMS,
    architecture_name,
    build_model,
    check_layout,
    check_original_config,
    conversion_plan,
    convert_state_dict,
    describe,
    infer_config,
    map_key,
    original_layout,
)
from verification import VERIFY_TOLERANCE, VerificationError, VerificationReport, verify_conversion

__all__ = [
    "DTYPES",
    "KNOWN_TRAINING_DATA",
    "ORIGINAL_TO_CONVERTED_KEY_MAPPING",
    "OUTPUT_FILES",
    "PUBLISHED_RESULTS",
    "STALE_LEGACY_SECONDS",
    "TRANSFORMS",
    "VERIFY_TOLERANCE",
    "ConversionError",
    "ConversionResult",
    "UnsafeCheckpointError",
    "VerificationError",
    "VerificationReport",
    "_current_umask",
    "architecture_name",
    "build_model",
    "check_hub_access",
    "check_layout",
    "check_original_config",
    "conversion_plan",
    "map_key",
    "convert_checkpoint",
    "convert_state_dict",
    "describe",
    "extract_state_dict",
    "infer_config",
    "infer_training_data",
    "load_original_config",
    "load_original_state_dict",
    "main",
    "model_card",
    "normalize_keys",
    "original_layout",
    "parse_args",
    "push_converted",
    "save_processor",
    "upload",
    "verify_conversion",
]

logger = logging.getLogger("rwkv_clip_conversion")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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
    check_output(output, overwrite, inputs)
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
    with publish_atomically(output, overwrite, inputs) as staging:
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
