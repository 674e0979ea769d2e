"""The bundled default model and README's first command (`make demo` = examples/demo.py)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from reference_tokenizer import ReferenceTokenizer
from transformers import AutoModel, AutoProcessor

import rwkv_clip_hf
from rwkv_clip_hf import RWKVCLIPModel, RWKVCLIPProcessor


ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = Path(rwkv_clip_hf.default_model_path())


def expected_label(image: Path) -> str:
    color, shape = image.stem.split("_")
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"


def test_bundled_model_loads_offline_and_is_small():
    files = {path.name for path in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer_config.json", "README.md"} <= files
    assert sum(path.stat().st_size for path in MODEL_DIR.iterdir()) < 15 * 2**20
    model = AutoModel.from_pretrained(MODEL_DIR)
    processor = AutoProcessor.from_pretrained(MODEL_DIR)
    assert type(model) is RWKVCLIPModel and type(processor) is RWKVCLIPProcessor
    assert model.dtype == torch.float32  # stored in float16, computed in float32
    # no tokenizer.json in the bundle: the tokenizer is rebuilt from the package's BPE file, original ids
    reference = ReferenceTokenizer(ROOT / "src" / "rwkv_clip_hf" / "data" / "bpe_simple_vocab_16e6.txt.gz")
    text = "a photo of a RED circle &amp; two stars"
    expected = reference(text)
    assert processor.tokenizer(text)["input_ids"] == expected[: expected.index(49407) + 1]
    assert processor.tokenizer.model_max_length == model.config.text_config.max_position_embeddings


def test_model_card_reports_the_saved_evaluation():
    results = json.loads((MODEL_DIR / "eval_results.json").read_text())
    card = (MODEL_DIR / "README.md").read_text()
    assert card.startswith("---\n") and "pipeline_tag: zero-shot-image-classification" in card
    for name, result in results.items():
        assert f"| {name.replace('_', ' ')} | {result['classes']} | {100 * result['accuracy']:.1f} % |" in card
    assert "make default-model" in card
    # the held-out breakdown and the verdict are derived from the same evaluation, not written by hand
    text = " ".join(card.split())
    held_out = results["held_out_color_shape"]
    assert f"colour right {100 * held_out['color_right']:.1f} % and the shape right {100 * held_out['shape_right']:.1f} %" in text
    verdict = "is met" if held_out["accuracy"] >= 0.9 else "is not reached"
    assert f"in training, {verdict} ({100 * held_out['accuracy']:.1f} %)" in text


def test_demo_prints_the_right_top_label_for_every_bundled_example(tmp_path):
    """README's first command: the bundled model through the pipeline on examples/images."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    images = sorted((ROOT / "examples" / "images").glob("*.png"))
    assert images
    blocks = re.findall(r"^(\S+\.png):\n\s+[0-9.]+\s+(.+)$", result.stdout, flags=re.MULTILINE)
    assert dict(blocks) == {image.name: expected_label(image) for image in images}, result.stdout
