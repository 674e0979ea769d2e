"""The bundled default model and README's first command (`make demo` = examples/demo.py)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoProcessor

import rwkv_clip_hf
from rwkv_clip_hf import RWKVCLIPForImageClassification, RWKVCLIPModel, RWKVCLIPProcessor

from reference_tokenizer import ReferenceTokenizer

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


def check_card(card: str, results: dict) -> None:
    """The card reports every figure of `results` (eval_results.json), and its verdict follows from them."""
    assert card.startswith("---\n") and "pipeline_tag: zero-shot-image-classification" in card
    assert "make default-model" in card
    text = " ".join(card.split())
    results = dict(results)
    vision = results.pop("step_1_classifier", None)
    if vision is not None:
        shape_right = (
            f"{100 * vision['held_back']:.1f} % accuracy on the held-back images. "
            "On the evaluation's new images (exact named colours) {} "
            f"{100 * vision['seen']:.1f} % of the time on seen pairs "
            f"and {100 * vision['held_out']:.1f} % on the held-out pairs"
        )
        wordings = ("its top class has the right shape", "its highest-scoring shape class is the right one")
        assert any(shape_right.format(wording) in text for wording in wordings)
        if "seen_color" in vision:
            assert (
                f"; the right colour {100 * vision['seen_color']:.1f} % and "
                f"{100 * vision['held_out_color']:.1f} % of the time." in text
            )
    for name, result in results.items():
        assert f"| {name.replace('_', ' ')} | {result['classes']} | {100 * result['accuracy']:.1f} % |" in card
    # the held-out breakdown and the verdict are derived from the same evaluation, not written by hand
    held_out = results["held_out_color_shape"]
    assert (
        f"colour right {100 * held_out['color_right']:.1f} % and the shape right {100 * held_out['shape_right']:.1f} %"
        in text
    )
    verdict = "is met" if held_out["accuracy"] >= 0.9 else "is not reached"
    assert f"in training, {verdict} ({100 * held_out['accuracy']:.1f} %)" in text


def test_model_card_reports_the_saved_evaluation():
    results = json.loads((MODEL_DIR / "eval_results.json").read_text())
    check_card((MODEL_DIR / "README.md").read_text(), results)


@pytest.mark.parametrize("variant", [[], ["--pretrain-label", "shape_and_color", "--no-freeze-vision"]])
def test_build_script_trains_evaluates_and_writes_a_consistent_card(tmp_path, variant):
    """`make default-model` at toy sizes (its recipe, and a variant): both training steps, the step-1 check, the
    zero-shot evaluation, and a bundle whose card reports the run's own figures."""
    output = tmp_path / "model"
    command = [
        sys.executable,
        str(ROOT / "examples" / "build_default_model.py"),
        "--output",
        str(output),
        "--work-dir",
        str(tmp_path / "work"),
        "--pretrain-samples",
        "40",
        "--pretrain-epochs",
        "1",
        "--train-samples",
        "32",
        "--epochs",
        "1",
        "--eval-samples",
        "12",
        "--batch-size",
        "16",
        *variant,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    results = json.loads((output / "eval_results.json").read_text())
    assert set(results["step_1_classifier"]) == {"held_back", "seen", "held_out", "seen_color", "held_out_color"}
    assert all(row["samples"] == 12 for name, row in results.items() if name != "step_1_classifier")
    check_card((output / "README.md").read_text(), results)
    model = AutoModel.from_pretrained(output)
    assert isinstance(model, RWKVCLIPModel)
    assert not output.with_name("model.tmp").exists()
    # the package serves the code: no remote-code files or auto_map entries pointing at them
    assert not list(output.glob("*.py"))
    assert not any(
        "auto_map" in (output / name).read_text()
        for name in ("config.json", "processor_config.json", "tokenizer_config.json")
    )
    # the recipe's step 2 keeps step 1's image tower (up to the float16 storage); --no-freeze-vision trains it
    classifier = RWKVCLIPForImageClassification.from_pretrained(tmp_path / "work" / "vision")
    assert classifier.config.num_labels == (14 if variant else 48)
    assert classifier.config.problem_type == (
        "multi_label_classification" if variant else "single_label_classification"
    )
    tower = classifier.vision_model.state_dict()
    same = [torch.equal(tower[k].half().float(), v) for k, v in model.vision_model.state_dict().items()]
    assert all(same) if not variant else not all(same)


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


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--images", "missing.png"], "--images: no such file: missing.png"),
        (["--model", "./no-such-model"], "--model: no such directory: ./no-such-model"),
        (["--top", "0"], "--top must be >= 1"),
        (["--template", "a photo"], "--template must contain {}"),
        (["--images", "not-an-image.png"], "cannot classify the images"),
    ],
)
def test_demo_names_the_bad_argument(tmp_path, arguments, message):
    (tmp_path / "not-an-image.png").write_text("text, not an image")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
