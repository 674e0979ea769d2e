"""Verification of a conversion against `original_reference.py`, an independent float64 forward pass written
against the original key names: the converted tensors (float64) must reproduce it, and the written directory must
load through `AutoModel` with exactly those tensors rounded to the stored dtype.

Part of `convert_rwkv_clip_original.py`, which re-exports these names.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
from huggingface_hub.utils import tqdm
from transformers import AutoModel

from rwkv_clip_hf import RWKVCLIPConfig, RWKVCLIPModel

import original_reference
from checkpoint_io import ConversionError, preview
from key_mapping import build_model, convert_state_dict

logger = logging.getLogger("rwkv_clip_conversion")

VERIFY_TOLERANCE = 1e-8


class VerificationError(ConversionError):
    """The converted model does not reproduce the original-key reference within the tolerance."""


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
        raise VerificationError(f"stored tensors differ from the conversion: {preview(differing)}")
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
