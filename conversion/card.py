"""The model card (README.md) of a converted checkpoint: Hub metadata, provenance, usage and, for a released
checkpoint, the paper's results; and the training set, inferred from the names involved when not given.

Part of `convert_rwkv_clip_original.py`, which re-exports these names.
"""

from __future__ import annotations

import re

from huggingface_hub import ModelCardData

from rwkv_clip_hf import RWKVCLIPConfig
from rwkv_clip_hf.model_card import PAPER_URL, render_model_card

from key_mapping import architecture_name, describe
from verification import VerificationReport

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
    """README.md for the converted directory: Hub metadata, provenance, expected results, usage (the package's
    common card frame, `rwkv_clip_hf.model_card.render_model_card`)."""
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
    intro = [
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
        intro.append(
            f"- Conversion check: against an independent float64 forward over the original tensors, max relative "
            f"difference of the embeddings {verification.image:.1e} (image) and {verification.text:.1e} (text)."
        )
    sections = {}
    published = PUBLISHED_RESULTS.get((architecture, training_data[0] if len(training_data) == 1 else None))
    if published:
        lines = ["From the paper; a faithful conversion reproduces them:", ""]
        for table, values in published.items():
            lines += [f"| {table} | " + " | ".join(values) + " |", "|---" * (len(values) + 1) + "|"]
            lines += ["| RWKV-CLIP | " + " | ".join(f"{value:.1f}" for value in values.values()) + " |", ""]
        sections["Published results"] = "\n".join(lines)
    limitations = (
        "The converted model computes what the original computes, so the original's limitations carry over: it "
        "knows what its\nweb image-text pairs taught it, with their biases, and its zero-shot accuracy depends "
        "on the prompts. Captions\nlonger than "
        f"{config.text_config.max_position_embeddings} tokens are cut to that context."
    )
    return render_model_card(
        metadata,
        title=title + (f" ({', '.join(training_data)})" if training_data else ""),
        intro="\n".join(intro),
        sections=sections,
        repo=f'"{repo_id}"',
        remote_code=True,
        limitations=limitations,
    )
