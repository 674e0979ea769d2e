"""Zero-shot classification with a stub model whose features give known predictions."""

import logging

import numpy as np
import pytest
import torch

from rwkv_clip_hf.evaluation import (
    FeatureCache,
    FeatureExtractor,
    build_classifier,
    bundled_zero_shot_data,
    classification_metrics,
    evaluate_zero_shot,
    load_eval_dataset,
    resolve_benchmark,
    zero_shot_logits,
)
from rwkv_clip_hf.evaluation.zero_shot import read_string_list, uses_mean_per_class

from eval_stubs import StubModel, StubProcessor, save_classification_dataset

CLASSNAMES = ["cat", "dog", "bird"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
E = np.eye(3)

# Class c's prompts embed as 3 * (e_c + 0.5 e_next) and 1 * (e_c - 0.5 e_next): normalised then averaged they give
# exactly e_c, while a plain mean (no per-template normalisation) would tilt every class towards the next one.
PROMPT_FEATURES = {
    TEMPLATES[0].format(name): 3.0 * (E[c] + 0.5 * E[(c + 1) % 3]) for c, name in enumerate(CLASSNAMES)
} | {TEMPLATES[1].format(name): 1.0 * (E[c] - 0.5 * E[(c + 1) % 3]) for c, name in enumerate(CLASSNAMES)}

# (label, image feature); with class weights = identity the prediction is the largest component.
IMAGES = [(0, k * (E[0] + 0.1 * E[2])) for k in (0.5, 1.0, 2.0, 3.0, 4.0, 5.0)] + [
    (1, E[1] + 0.9 * E[0]),  # dog, predicted dog; the tilted (unnormalised-mean) classifier would say cat
    (1, 2.0 * (E[0] + 0.3 * E[1])),  # dog, predicted cat
    (2, 0.5 * (E[1] + 0.2 * E[2])),  # bird, predicted dog
    (2, 4.0 * (E[1] + 0.5 * E[2])),  # bird, predicted dog
]
LABELS = [label for label, _ in IMAGES]
# By hand: 7 of 10 right (6 cats, 1 dog); per class: cat 6/6, dog 1/2, bird 0/2.
EXPECTED_TOP1 = 0.7
EXPECTED_MEAN_PER_CLASS = (1.0 + 0.5 + 0.0) / 3


def stub_extractor(tmp_path, prompt_features=PROMPT_FEATURES, images=IMAGES):
    vocab = {text: i for i, text in enumerate(prompt_features)}
    model = StubModel([feature for _, feature in images], list(prompt_features.values()))
    extractor = FeatureExtractor(
        model, StubProcessor(vocab), {"stub": "zero-shot"}, FeatureCache(tmp_path / "cache"), batch_size=4
    )
    return extractor, model


def test_classifier_is_normalised_mean_of_normalised_prompts(tmp_path):
    extractor, _ = stub_extractor(tmp_path)
    weights = build_classifier(extractor.text_features, CLASSNAMES, TEMPLATES)
    torch.testing.assert_close(weights, torch.eye(3), rtol=0, atol=1e-6)


def test_synonyms_are_averaged_with_templates(tmp_path):
    features = {
        "a photo of a happy.": [1.0, 0, 0],
        "a photo of a smiling.": [0, 5.0, 0],
        "a photo of a sad.": [0, 0, 2.0],
    }
    extractor, _ = stub_extractor(tmp_path, prompt_features=features)
    weights = build_classifier(extractor.text_features, [["happy", "smiling"], "sad"], ["a photo of a {}."])
    expected = torch.tensor([[2**-0.5, 2**-0.5, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-6)


def test_template_without_placeholder_is_rejected(tmp_path):
    extractor, _ = stub_extractor(tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        build_classifier(extractor.text_features, CLASSNAMES, ["a photo"])


def test_logits_are_100_times_cosine_in_float():
    logits = zero_shot_logits(torch.tensor([[3.0, 4.0, 0.0]]), torch.eye(3))
    torch.testing.assert_close(logits, torch.tensor([[60.0, 80.0, 0.0]], dtype=torch.float64))
    # 100 * cos = 70.60 vs 70.83: floats pick class 1; truncated to integers (the original) both are 70 and the
    # argmax takes class 0. This is the documented difference in ties.
    logits = zero_shot_logits(torch.tensor([[0.602, 0.604, 0.0]]), torch.eye(3))
    assert logits.argmax().item() == 1
    assert logits.long().argmax().item() == 0


def test_classification_metrics_by_hand():
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.3, 0.5], [0.1, 0.2, 0.7], [0.4, 0.4, 0.2]])
    labels = [0, 1, 2, 1]
    metrics = classification_metrics(scores, labels, top_k=(1, 2))
    # rows: right; wrong (2nd choice is 1: top-2 hit); right; tie 0/1 broken towards class 0: wrong, top-2 hit
    assert metrics["top1"] == 0.5
    assert metrics["top2"] == 1.0
    assert metrics["per_class_accuracy"] == [1.0, 0.0, 1.0]
    assert metrics["mean_per_class_accuracy"] == pytest.approx(2 / 3)


def test_absent_classes_are_left_out_of_the_mean():
    metrics = classification_metrics(torch.eye(4)[[0, 0, 1]], [0, 1, 1], num_classes=4, top_k=(1,))
    assert metrics["per_class_accuracy"] == [1.0, 0.5, None, None]
    assert metrics["mean_per_class_accuracy"] == 0.75


@pytest.mark.parametrize(
    "folder, metric, expected",
    [
        ("cifar10", "top1", EXPECTED_TOP1),
        ("oxford_pets", "mean_per_class", EXPECTED_MEAN_PER_CLASS),
        ("my-data", "top1", EXPECTED_TOP1),
    ],
)
def test_zero_shot_metric_follows_the_paper(tmp_path, folder, metric, expected):
    path = save_classification_dataset(tmp_path / folder, LABELS, CLASSNAMES)
    extractor, model = stub_extractor(tmp_path)
    result = evaluate_zero_shot(extractor, load_eval_dataset(path, "test"), classnames=CLASSNAMES, templates=TEMPLATES)
    assert result["metric"] == metric
    assert result["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert result["top1"] == pytest.approx(EXPECTED_TOP1, abs=1e-12)
    assert result["mean_per_class_accuracy"] == pytest.approx(EXPECTED_MEAN_PER_CLASS, abs=1e-12)
    assert result["per_class_accuracy"] == [1.0, 0.5, 0.0]
    assert result["top5"] == 1.0
    assert model.image_calls == 3  # 10 images in batches of 4


def test_explicit_metric_overrides_the_benchmark(tmp_path):
    path = save_classification_dataset(tmp_path / "flowers102", LABELS, CLASSNAMES)
    extractor, _ = stub_extractor(tmp_path)
    data = load_eval_dataset(path, "test")
    result = evaluate_zero_shot(extractor, data, classnames=CLASSNAMES, templates=TEMPLATES, metric="top1")
    assert result["benchmark"] == "flowers" and result["accuracy"] == pytest.approx(EXPECTED_TOP1)


def test_class_names_default_to_the_classlabel_names(tmp_path):
    path = save_classification_dataset(tmp_path / "unknown", LABELS, CLASSNAMES)
    extractor, _ = stub_extractor(tmp_path)
    result = evaluate_zero_shot(extractor, load_eval_dataset(path, "test"), templates=TEMPLATES)
    assert result["classnames"] == CLASSNAMES and result["classnames_source"] == "dataset ClassLabel"
    assert result["top1"] == pytest.approx(EXPECTED_TOP1)


def test_bundled_templates_and_classnames_are_used(tmp_path):
    templates, classnames = bundled_zero_shot_data()
    names = classnames["cifar10"]
    prompts = [t.format(n) for n in names for t in templates["cifar10"]]
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((len(names), 16))
    # Each prompt is its class direction plus a little noise; image i points at class i % 10.
    features = {
        p: directions[i // len(templates["cifar10"])] + 0.05 * rng.standard_normal(16) for i, p in enumerate(prompts)
    }
    images = [(i % 10, directions[i % 10]) for i in range(20)]
    path = save_classification_dataset(
        tmp_path / "cifar10", [label for label, _ in images], [n.replace(" ", "_") for n in names]
    )
    extractor, model = stub_extractor(tmp_path, prompt_features=features, images=images)
    result = evaluate_zero_shot(extractor, load_eval_dataset(path, "test"))
    assert result["benchmark"] == "cifar10" and result["classnames_source"] == "bundled:cifar10"
    assert result["num_templates"] == 18 and result["top1"] == 1.0


def test_class_count_mismatch_names_the_column(tmp_path):
    path = save_classification_dataset(tmp_path / "cifar10", LABELS, CLASSNAMES)
    extractor, _ = stub_extractor(tmp_path)
    with pytest.raises(ValueError, match=r"10 class names \(bundled:cifar10\).*'label'.*3 classes"):
        evaluate_zero_shot(extractor, load_eval_dataset(path, "test"))


def test_missing_label_column_is_named(tmp_path):
    path = save_classification_dataset(tmp_path / "d", LABELS, CLASSNAMES)
    extractor, _ = stub_extractor(tmp_path)
    with pytest.raises(ValueError, match=r"`label_column` 'fine_label'.*\[test\].*\['image', 'label'\]"):
        evaluate_zero_shot(extractor, load_eval_dataset(path, "test"), label_column="fine_label", templates=TEMPLATES)


def test_second_run_reads_the_cache(tmp_path, caplog):
    path = save_classification_dataset(tmp_path / "d", LABELS, CLASSNAMES)
    extractor, model = stub_extractor(tmp_path)
    data = load_eval_dataset(path, "test")
    first = evaluate_zero_shot(extractor, data, classnames=CLASSNAMES, templates=TEMPLATES)
    calls = (model.image_calls, model.text_calls)
    with caplog.at_level(logging.INFO, logger="rwkv_clip_hf"):
        second = evaluate_zero_shot(
            extractor, load_eval_dataset(path, "test"), classnames=CLASSNAMES, templates=TEMPLATES
        )
    assert (model.image_calls, model.text_calls) == calls
    assert second == first
    assert caplog.text.count("skipping the encoding") == 2
    # Another subset is another cache entry.
    evaluate_zero_shot(
        extractor, load_eval_dataset(path, "test", max_samples=5), classnames=CLASSNAMES, templates=TEMPLATES
    )
    assert model.image_calls > calls[0]


@pytest.mark.parametrize(
    "name, key",
    [
        ("uoft-cs/cifar10", "cifar10"),
        ("CIFAR-100", "cifar100"),
        ("ethz/food101", "food101"),
        ("timm/oxford-iiit-pet", "pets"),
        ("nelorth/oxford-flowers", "flowers"),
        ("Flowers102", "flowers"),
        ("FGVC-Aircraft", "aircraft"),
        ("clip-benchmark/wds_fgvc_aircraft", "aircraft"),
        ("clip-benchmark/wds_vtab-caltech101", "caltech101"),
        ("stanford_cars", "stanford_car"),
        ("tanganke/sun397", "sun397"),
        ("tanganke/dtd", "dtd"),
        ("ILSVRC/imagenet-1k", "imagenet"),
        ("imagenet-a", "imagenet_a"),
        ("/data/my-images", None),
    ],
)
def test_dataset_names_map_to_bundled_keys(name, key):
    assert resolve_benchmark(name) == key


def test_mean_per_class_benchmarks_are_the_papers():
    assert {k for k in bundled_zero_shot_data()[1] if uses_mean_per_class(k)} == {
        "caltech101",
        "aircraft",
        "flowers",
        "pets",
    }


def test_string_lists_from_files(tmp_path):
    (tmp_path / "t.json").write_text('{"cifar10": ["a {}."], "other": ["b {}."]}')
    (tmp_path / "c.txt").write_text("cat\n\ndog\n")
    assert read_string_list([str(tmp_path / "t.json")], "--templates", "cifar10") == ["a {}."]
    assert read_string_list([str(tmp_path / "c.txt")], "--classnames") == ["cat", "dog"]
    assert read_string_list(["a {}.", "b {}."], "--templates") == ["a {}.", "b {}."]
    with pytest.raises(ValueError, match="without the key 'pets'"):
        read_string_list([str(tmp_path / "t.json")], "--templates", "pets")


def test_cache_key_covers_model_files_and_processor(tmp_path):
    import os

    from rwkv_clip_hf.evaluation import model_fingerprint

    path = save_classification_dataset(tmp_path / "d", LABELS, CLASSNAMES)
    data = load_eval_dataset(path, "test")
    extractor, model = stub_extractor(tmp_path)
    extractor.image_features(data, "image")
    extractor.processor.image_processor.to_dict = lambda: {"stub": True, "crop_size": 8}
    extractor.image_features(data, "image")
    assert model.image_calls == 2 * 3  # a processor with another config is another entry

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"1")
    before = model_fingerprint(model, source=str(model_dir), dtype="float32")
    assert before == model_fingerprint(model, source=str(model_dir), dtype="float32")
    os.utime(model_dir / "model.safetensors", ns=(1, 1))  # new weights written in place
    assert model_fingerprint(model, source=str(model_dir), dtype="float32") != before
    assert model_fingerprint(model, source=str(model_dir), dtype="bfloat16") != before


def test_bundled_names_follow_the_dataset_label_order(tmp_path):
    templates, classnames = bundled_zero_shot_data()
    names = classnames["cifar10"]
    permutation = [3, 0, 9, 1, 8, 2, 7, 4, 6, 5]  # label id -> bundled index in this dataset copy
    prompts = [t.format(n) for n in names for t in templates["cifar10"]]
    directions = np.random.default_rng(1).standard_normal((10, 16))
    features = {p: directions[i // len(templates["cifar10"])] for i, p in enumerate(prompts)}
    # Image i shows bundled class permutation[label] with label = i % 10.
    images = [(i % 10, directions[permutation[i % 10]]) for i in range(20)]
    label_names = [names[j].replace(" ", "_").upper() for j in permutation]
    path = save_classification_dataset(tmp_path / "cifar10", [label for label, _ in images], label_names)
    extractor, _ = stub_extractor(tmp_path, prompt_features=features, images=images)
    result = evaluate_zero_shot(extractor, load_eval_dataset(path, "test"))
    assert result["classnames"] == [names[j] for j in permutation]
    assert result["classnames_source"] == "bundled:cifar10 (reordered to the labels)"
    assert result["top1"] == 1.0


def test_alignment_leaves_unmatched_names_alone():
    from rwkv_clip_hf.evaluation.zero_shot import align_to_label_order

    assert align_to_label_order(["cat", "dog"], ["dog", "cat"]) == ["dog", "cat"]
    assert align_to_label_order(["cat", "dog"], ["0", "1"]) == ["cat", "dog"]
    assert align_to_label_order([["happy", "smiling"], ["sad"]], ["sad", "smiling"]) == [["sad"], ["happy", "smiling"]]
    names = ["cat", "dog"]
    assert align_to_label_order(names, ["cat", "dog"]) is names
