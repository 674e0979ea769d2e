"""Either tower loads from a full RWKV-CLIP checkpoint directory (as transformers' CLIP towers do), and the
image-feature-extraction pipeline serves a full directory."""

import numpy as np
import pytest
import torch
from transformers import pipeline

from rwkv_clip_hf import (
    RWKVCLIPForImageClassification,
    RWKVCLIPModel,
    RWKVCLIPProcessor,
    RWKVCLIPTextModel,
    RWKVCLIPVisionModel,
)

from conftest import randomize_, real_vocab_config
from test_image_processing import random_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory):
    model = randomize_(RWKVCLIPModel(real_vocab_config()).eval(), seed=11)
    path = tmp_path_factory.mktemp("full")
    model.save_pretrained(path)
    RWKVCLIPProcessor.from_bundled(image_size=32).save_pretrained(path)
    return path, model


def assert_same_weights(loaded: torch.nn.Module, expected: torch.nn.Module) -> None:
    got, want = loaded.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize(
    ("tower_class", "attribute"), [(RWKVCLIPVisionModel, "vision_model"), (RWKVCLIPTextModel, "text_model")]
)
def test_tower_from_full_directory_is_the_trained_tower(full_dir, tmp_path, tower_class, attribute):
    path, model = full_dir
    tower, info = tower_class.from_pretrained(path, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"], info
    assert not info["mismatched_keys"], info
    assert_same_weights(tower, getattr(model, attribute))
    # and it saves under its own names, reloading to the same weights
    tower.save_pretrained(tmp_path / "tower")
    again, info = tower_class.from_pretrained(tmp_path / "tower", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert_same_weights(again, tower)


def test_tower_outputs_equal_the_full_model(full_dir):
    path, model = full_dir
    vision = RWKVCLIPVisionModel.from_pretrained(path).eval()
    text = RWKVCLIPTextModel.from_pretrained(path).eval()
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    input_ids = torch.tensor([[49406, 320, 1125, 49407], [49406, 2368, 49407, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
        image = vision(pixel_values).pooler_output
        caption = text(input_ids, attention_mask).pooler_output
    assert torch.equal(torch.nn.functional.normalize(image, dim=-1), expected.image_embeds)
    assert torch.equal(torch.nn.functional.normalize(caption, dim=-1), expected.text_embeds)


def test_vision_tower_from_a_classifier_directory(tmp_path):
    config = real_vocab_config(num_labels=3)
    classifier = randomize_(RWKVCLIPForImageClassification(config).eval(), seed=2)
    classifier.save_pretrained(tmp_path)
    tower, info = RWKVCLIPVisionModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"], info
    assert_same_weights(tower, classifier.vision_model)


def test_image_feature_extraction_pipeline_on_a_full_directory(full_dir):
    path, model = full_dir
    extractor = pipeline("image-feature-extraction", model=str(path))
    images = [random_image(50, 41, "RGB", seed=s) for s in range(2)]
    pooled = extractor(images, pool=True, return_tensors=True)
    pixel_values = RWKVCLIPProcessor.from_pretrained(path).image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.get_image_features(pixel_values).pooler_output
        states = model.get_image_features(pixel_values).last_hidden_state
    torch.testing.assert_close(torch.cat([p.reshape(1, -1) for p in pooled]), expected, rtol=0, atol=0)
    # without pool: the final patch states, as for other image models
    hidden = extractor(images[0], return_tensors=True)
    torch.testing.assert_close(hidden.reshape(states[:1].shape), states[:1], rtol=0, atol=0)
    assert np.isfinite(expected.numpy()).all()


def test_towers_from_a_hub_id(full_dir, tmp_path):
    """The same through a Hub id, from a cache laid out as huggingface_hub's (offline: no download)."""
    import shutil

    path, model = full_dir
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--rwkv-clip-hf--tiny-test"
    shutil.copytree(path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    vision = RWKVCLIPVisionModel.from_pretrained("rwkv-clip-hf/tiny-test", cache_dir=tmp_path / "cache")
    text = RWKVCLIPTextModel.from_pretrained("rwkv-clip-hf/tiny-test", cache_dir=tmp_path / "cache")
    assert_same_weights(vision, model.vision_model)
    assert_same_weights(text, model.text_model)
