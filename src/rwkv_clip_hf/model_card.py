"""The common frame of the model cards (README.md) this project writes: the converter's
(`conversion/card.py`) and the bundled default model's (`examples/build_default_model.py`).

`render_model_card` lays out the Hub metadata, the title and the caller's own sections, then the parts every
RWKV-CLIP card shares: how to use the model (with the package installed and, where the directory carries the
code, with `trust_remote_code=True`), its limitations and the paper's citation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from huggingface_hub import ModelCardData

PAPER_URL = "https://arxiv.org/abs/2406.06973"

CITATION_BIBTEX = """@inproceedings{gu2024rwkvclip,
  title     = {RWKV-CLIP: A Robust Vision-Language Representation Learner},
  author    = {Gu, Tiancheng and Yang, Kaicheng and An, Xiang and Feng, Ziyong and Liu, Dongnan and
               Cai, Weidong and Deng, Jiankang},
  booktitle = {Proceedings of the 2024 Conference on Empirical Methods in Natural Language Processing},
  year      = {2024}
}"""


def usage_section(
    repo: str,
    *,
    remote_code: bool,
    image: str = "cat.jpg",
    prompts: Sequence[str] = ("a photo of a cat", "a photo of a dog"),
    candidate_labels: Sequence[str] = ("cat", "dog"),
) -> str:
    """The `## Usage` section: zero-shot classification of `image` with `AutoModel` / `AutoProcessor` (against
    `prompts`) and with the pipeline (against `candidate_labels`).

    `repo` is the Python expression that names the model (a quoted Hub id, or a call). With `remote_code`, the
    section also says how to use the directory without the package (`trust_remote_code=True`).
    """
    lines = [
        "## Usage",
        "",
        "```python",
        "import torch",
        "from PIL import Image",
        "from transformers import AutoModel, AutoProcessor, pipeline",
        "",
        "import rwkv_clip_hf  # pip install rwkv-clip-hf: registers the model, tokenizer and processor",
        "",
        f"repo = {repo}",
        "model = AutoModel.from_pretrained(repo).eval()",
        "processor = AutoProcessor.from_pretrained(repo)",
        "",
        f"image = Image.open({json.dumps(image)})",
        f"labels = {json.dumps(list(prompts))}",
        'inputs = processor(text=labels, images=image, return_tensors="pt", padding=True)',
        "with torch.no_grad():",
        "    probs = model(**inputs).logits_per_image.softmax(dim=-1)",
        "print(probs)",
        "",
        'classifier = pipeline("zero-shot-image-classification", model=repo)',
        f"print(classifier(image, candidate_labels={json.dumps(list(candidate_labels))}))",
        "```",
        "",
        "Embeddings: `model.get_image_features(pixel_values).pooler_output` and",
        "`model.get_text_features(input_ids, attention_mask).pooler_output` (not normalised).",
    ]
    if remote_code:
        lines[-1] += " The repository also"
        lines += [
            "carries the code of the model, tokenizer, image processor and processor: without the package, pass",
            "`trust_remote_code=True` to `AutoModel`, `AutoProcessor` (or `AutoTokenizer`, `AutoImageProcessor`) and",
            "`pipeline(...)`; the results are the same (it needs `ftfy` and `regex` for the tokenizer).",
        ]
    return "\n".join(lines)


def render_model_card(
    metadata: ModelCardData,
    *,
    title: str,
    intro: str,
    sections: dict[str, str] | None = None,
    repo: str,
    remote_code: bool,
    limitations: str,
    **usage_example,
) -> str:
    """A model card: YAML `metadata`, `# title`, `intro`, the caller's `sections` (heading -> Markdown body, in
    order), then `## Usage` (`usage_section(repo, remote_code=..., **usage_example)`), `## Limitations` and
    `## Citation`."""
    parts = ["---\n" + metadata.to_yaml() + "\n---", f"# {title}", intro.strip("\n")]
    for heading, body in (sections or {}).items():
        parts.append(f"## {heading}\n\n{body.strip()}")
    parts.append(usage_section(repo, remote_code=remote_code, **usage_example))
    parts.append(f"## Limitations\n\n{limitations.strip()}")
    parts.append(f"## Citation\n\n```bibtex\n{CITATION_BIBTEX}\n```")
    return "\n\n".join(parts) + "\n"
