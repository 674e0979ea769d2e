"""RWKVCLIPProcessor and the zero-shot-image-classification pipeline against the manual computation of §8."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoProcessor, pipeline

from rwkv_clip_hf import RWKVCLIPImageProcessor, RWKVCLIPModel, RWKVCLIPProcessor, RWKVCLIPTokenizer

from conftest import randomize_, tiny_config
from reference_tokenizer import ReferenceTokenizer
from test_image_processing import random_image, reference_pixels

BPE_PATH = Path(__file__).resolve().parents[1] / "src" / "rwkv_clip_hf" / "data" / "bpe_simple_vocab_16e6.txt.gz"
IMAGE_SIZE = 32
LABELS = ["dog", "cat", "a red double-decker bus on a rainy LONDON street &amp; more", "Ω", ""]


@pytest.fixture(scope="module")
def reference_tokenizer():
    return ReferenceTokenizer(BPE_PATH)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny random RWKV-CLIP with the real vocabulary and context, saved with its processor."""
    config = tiny_config(
        text_config={"vocab_size": 49408, "bos_token_id": 49406, "eos_token_id": 49407, "max_position_embeddings": 77},
        vision_config={"image_size": IMAGE_SIZE, "patch_size": 8},
    )
    model = randomize_(RWKVCLIPModel(config).eval(), seed=3)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))  # the released checkpoints sit at the clamp
    path = tmp_path_factory.mktemp("tiny-rwkv-clip")
    model.save_pretrained(path)
    RWKVCLIPProcessor.from_bundled(image_size=IMAGE_SIZE).save_pretrained(path)
    return path, model


def manual_scores(model, reference_tokenizer, image, labels, template="This is a photo of {}."):
    """§8 by hand: original 77-token zero-padded ids, reference pixels, softmax(100 * cosine)."""
    ids = torch.tensor([reference_tokenizer(template.format(label)) for label in labels])
    pixels = reference_pixels(image, IMAGE_SIZE)[None]
    with torch.no_grad():
        text = model.get_text_features(input_ids=ids).pooler_output
        vision = model.get_image_features(pixel_values=pixels).pooler_output
    text = text / text.norm(dim=-1, keepdim=True)
    vision = vision / vision.norm(dim=-1, keepdim=True)
    return torch.softmax(100.0 * vision @ text.T, dim=-1)[0]


def as_label_scores(result):
    return {entry["label"]: entry["score"] for entry in result}


def test_processor_round_trip(tmp_path):
    processor = RWKVCLIPProcessor.from_bundled(image_size=64)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is RWKVCLIPProcessor
    assert type(loaded.tokenizer) is RWKVCLIPTokenizer and type(loaded.image_processor) is RWKVCLIPImageProcessor
    assert loaded.image_processor.crop_size == processor.image_processor.crop_size
    assert loaded.tokenizer.model_max_length == 77
    image = random_image(80, 70, "RGBA")
    a = processor(text=LABELS, images=image, padding=True, return_tensors="pt")
    b = loaded(text=LABELS, images=image, padding=True, return_tensors="pt")
    assert a.keys() == b.keys() == {"input_ids", "attention_mask", "pixel_values"}
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_processor_gives_original_inputs(reference_tokenizer):
    processor = RWKVCLIPProcessor.from_bundled()
    images = [random_image(300, 227, "RGB"), random_image(227, 301, "P", seed=1)]
    batch = processor(text=LABELS, images=images, padding="max_length", return_tensors="pt")
    assert batch["input_ids"].tolist() == [reference_tokenizer(label) for label in LABELS]
    torch.testing.assert_close(
        batch["pixel_values"], torch.stack([reference_pixels(im) for im in images]), rtol=0, atol=1e-5
    )


def test_auto_model_and_processor_from_saved_dir(saved_model):
    path, model = saved_model
    loaded = AutoModel.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    inputs = processor(text=LABELS[:2], images=random_image(40, 50, "RGB"), padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits_per_image, model(**inputs).logits_per_image)


def test_pipeline_matches_manual_computation(saved_model, reference_tokenizer):
    path, model = saved_model
    classifier = pipeline("zero-shot-image-classification", model=str(path))
    image = random_image(50, 41, "RGB", seed=5)
    result = classifier(image, candidate_labels=LABELS)
    assert [entry["score"] for entry in result] == sorted((entry["score"] for entry in result), reverse=True)
    expected = manual_scores(model, reference_tokenizer, image, LABELS)
    got = as_label_scores(result)
    torch.testing.assert_close(torch.tensor([got[label] for label in LABELS]), expected, rtol=1e-5, atol=1e-6)
    # the scores are not uniform: the comparison above would catch a wrong pairing of labels and scores
    assert expected.max() - expected.min() > 1e-3


def test_pipeline_template_and_batches(saved_model, reference_tokenizer):
    path, model = saved_model
    classifier = pipeline("zero-shot-image-classification", model=str(path))
    images = [random_image(60, 33, "RGB", seed=s) for s in range(3)]
    labels = ["red", "green", "blue"]
    template = "a {} thing, photographed."
    results = classifier(images, candidate_labels=labels, hypothesis_template=template, batch_size=2)
    assert len(results) == 3
    for image, result in zip(images, results):
        expected = manual_scores(model, reference_tokenizer, image, labels, template)
        got = as_label_scores(result)
        torch.testing.assert_close(torch.tensor([got[label] for label in labels]), expected, rtol=1e-5, atol=1e-6)


def test_padding_variants_give_identical_logits(saved_model):
    path, model = saved_model
    processor = AutoProcessor.from_pretrained(path)
    image = random_image(45, 45, "RGB")
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    logits = []
    for kwargs in (
        {"padding": True},
        {"padding": "max_length"},
        {"padding": "max_length", "max_length": 100, "truncation": False},
        {"padding": True, "padding_side": "left"},
    ):
        text = processor.tokenizer(LABELS, return_tensors="pt", **kwargs)
        with torch.no_grad():
            logits.append(model(pixel_values=pixels, **text).logits_per_image)
    for other in logits[1:]:
        torch.testing.assert_close(other, logits[0], rtol=0, atol=1e-6)


def test_pipeline_clear_errors(saved_model):
    path, _ = saved_model
    classifier = pipeline("zero-shot-image-classification", model=str(path))
    with pytest.raises(ValueError, match="candidate label"):
        classifier(random_image(40, 40, "RGB"), candidate_labels=[])
    with pytest.raises((TypeError, ValueError), match="image|Image"):
        classifier(12345, candidate_labels=["a"])
    with pytest.raises((TypeError, ValueError, OSError)):
        classifier(np.zeros(3), candidate_labels=["a"])


def test_processor_for_the_bundled_model_matches_the_saved_one(caplog):
    """README's way to a processor for a model: from_bundled(config=model.config) prepares exactly what the
    processor saved with the bundled default model does; plain from_bundled() (224 px) is flagged as a mismatch."""
    import rwkv_clip_hf
    from rwkv_clip_hf.processing_rwkv_clip import check_processor_matches_model

    path = rwkv_clip_hf.default_model_path()
    model, saved = AutoModel.from_pretrained(path), AutoProcessor.from_pretrained(path)
    built = RWKVCLIPProcessor.from_bundled(config=model.config)
    images = [random_image(90, 71, "RGB", seed=i) for i in range(2)]
    texts = ["a red circle", "a blue square in a long caption " * 4]
    expected = saved(text=texts, images=images, padding=True, return_tensors="pt")
    got = built(text=texts, images=images, padding=True, return_tensors="pt")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    assert check_processor_matches_model(saved, model) == []
    assert check_processor_matches_model(built, model.config) == []

    caplog.clear()
    problems = check_processor_matches_model(RWKVCLIPProcessor.from_bundled(), model)
    size = model.config.vision_config.image_size
    context = model.config.text_config.max_position_embeddings
    assert f"crops 224x224 images but the model was built for {size}x{size}" in problems[0]
    assert problems[1:] == [f"the tokenizer keeps 77 tokens but the text tower's context is {context}"]
    assert any("crops 224x224" in record.getMessage() for record in caplog.records)
    # an explicit size that contradicts the config is used as given, with a warning
    caplog.clear()
    assert RWKVCLIPProcessor.from_bundled(image_size=96, config=model.config).image_processor.crop_size["height"] == 96
    assert any(f"image_size=96 differs from the config's {size}" in r.getMessage() for r in caplog.records)
