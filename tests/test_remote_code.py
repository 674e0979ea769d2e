"""A saved directory serves users who do not have this package: remote code for the model, the tokenizer, the
image processor and the processor. Checked in a fresh interpreter where `rwkv_clip_hf` cannot be imported."""

import json
import math
import textwrap

import numpy as np
import pytest
import torch

from rwkv_clip_hf import RWKVCLIPModel, RWKVCLIPProcessor

from conftest import randomize_, real_vocab_config, run_without_the_package, use_torch_bi_wkv
from test_image_processing import random_image
from test_tokenization import TRICKY

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGE_SIZE = 32
LABELS = ["dog", "cat", "a red double-decker bus on a rainy LONDON street &amp; more", "Ω <END_OF_TEXT>"]
CODE_FILES = {
    "configuration_rwkv_clip.py",
    "modeling_rwkv_clip.py",
    "remote_code_rwkv_clip.py",
    "bi_wkv.py",
    "bi_wkv_chunk.py",
    "bi_wkv_kernel.py",
    "bi_wkv_naive.py",
    "block_ops.py",
    "tokenization_rwkv_clip.py",
    "image_processing_rwkv_clip.py",
    "processing_rwkv_clip.py",
}

# Runs without the package. Prints one JSON line: what each loader gave, or the error it raised.
HUB_USER_SCRIPT = textwrap.dedent(
    """
    import json
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer, pipeline

    path, inputs_path, out_path = sys.argv[1:4]
    inputs = json.load(open(inputs_path))
    images = [Image.fromarray(np.asarray(image, dtype=np.uint8)) for image in inputs["images"]]
    out = {"refused": {}}
    for name, loader in (("tokenizer", AutoTokenizer), ("image_processor", AutoImageProcessor),
                         ("processor", AutoProcessor), ("model", AutoModel)):
        try:
            loader.from_pretrained(path)
            out["refused"][name] = None
        except Exception as error:  # must name the fix
            out["refused"][name] = f"{type(error).__name__}: {error}"
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    out["classes"] = [type(x).__module__ + "." + type(x).__name__
                      for x in (tokenizer, image_processor, processor, processor.tokenizer,
                                processor.image_processor, model)]
    out["ids"] = tokenizer(inputs["texts"], padding="max_length")["input_ids"]
    out["pixel_values"] = image_processor(images, return_tensors="np")["pixel_values"].tolist()
    batch = processor(text=inputs["labels"], images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        output = model(**batch)
    out["image_embeds"] = output.image_embeds.tolist()
    out["text_embeds"] = output.text_embeds.tolist()
    classifier = pipeline("zero-shot-image-classification", model=path, trust_remote_code=True)
    out["scores"] = [{r["label"]: r["score"] for r in result}
                     for result in classifier(images, candidate_labels=inputs["labels"])]
    json.dump(out, open(out_path, "w"))
    """
)


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    """A tiny random RWKV-CLIP with the real vocabulary, saved with its processor as the conversion does."""
    model = randomize_(RWKVCLIPModel(real_vocab_config()).eval(), seed=3)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    path = tmp_path_factory.mktemp("hub-repo")
    model.save_pretrained(path)
    RWKVCLIPProcessor.from_bundled(image_size=IMAGE_SIZE).save_pretrained(path)
    return path, model


def test_saved_directory_carries_all_code(saved_dir):
    path, _ = saved_dir
    assert CODE_FILES <= {p.name for p in path.glob("*.py")}
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    processor_config = json.loads((path / "processor_config.json").read_text())
    assert tokenizer_config["auto_map"]["AutoTokenizer"][0] == "tokenization_rwkv_clip.RWKVCLIPTokenizer"
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_rwkv_clip.RWKVCLIPProcessor"
    assert (
        processor_config["image_processor"]["auto_map"]["AutoImageProcessor"]
        == "image_processing_rwkv_clip.RWKVCLIPImageProcessor"
    )


def test_hub_user_without_the_package_gets_what_the_package_gives(saved_dir, tmp_path, monkeypatch):
    from transformers import pipeline

    path, model = saved_dir
    use_torch_bi_wkv(model, monkeypatch)
    processor = RWKVCLIPProcessor.from_pretrained(path)
    images = [random_image(50, 41, "RGB", seed=5), random_image(33, 60, "RGBA", seed=6)]
    images = [np.asarray(image.convert("RGB")) for image in images]
    inputs = {"texts": TRICKY, "labels": LABELS, "images": [image.tolist() for image in images]}
    (tmp_path / "inputs.json").write_text(json.dumps(inputs))
    run_without_the_package(
        HUB_USER_SCRIPT, path, tmp_path / "inputs.json", tmp_path / "out.json", cwd=tmp_path, timeout=600
    )
    out = json.loads((tmp_path / "out.json").read_text())

    # without trust_remote_code: refused, naming the fix (never a generic tokenizer giving other ids)
    for name, error in out["refused"].items():
        assert error is not None and "trust_remote_code=True" in error, (name, error)
    assert all(".tokenization_rwkv_clip." in c or "_rwkv_clip." in c for c in out["classes"]), out["classes"]
    assert all(c.startswith("transformers_modules") for c in out["classes"]), out["classes"]

    from PIL import Image

    pil_images = [Image.fromarray(image) for image in images]
    assert out["ids"] == processor.tokenizer(TRICKY, padding="max_length")["input_ids"]
    expected_pixels = processor.image_processor(pil_images, return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(np.asarray(out["pixel_values"], dtype=np.float32), expected_pixels)
    batch = processor(text=LABELS, images=pil_images, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch)
    assert torch.equal(torch.tensor(out["image_embeds"]), expected.image_embeds)
    assert torch.equal(torch.tensor(out["text_embeds"]), expected.text_embeds)
    classifier = pipeline("zero-shot-image-classification", model=str(path))
    for got, result in zip(out["scores"], classifier(pil_images, candidate_labels=LABELS)):
        assert got == {r["label"]: r["score"] for r in result}
