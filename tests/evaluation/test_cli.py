"""`rwkv-clip-eval` end to end with a tiny random RWKV-CLIP and a tiny random transformers CLIPModel.

Each protocol's result is checked against the same protocol computed by hand from features of one unbatched,
uncached forward pass; a second run must come from the feature cache without calling the model.
"""

import importlib.util
import json
import logging
import math

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value
from datasets import Image as ImageFeature
from PIL import Image
from transformers import (
    AutoModel,
    AutoProcessor,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
)

from rwkv_clip_hf import RWKVCLIPModel, RWKVCLIPProcessor
from rwkv_clip_hf.evaluation import linear_probe, retrieval_metrics
from rwkv_clip_hf.evaluation.cli import main, run
from rwkv_clip_hf.tokenization_rwkv_clip import bundled_vocab_and_merges

from conftest import randomize_, tiny_config

CLASSNAMES = ["cat", "dog", "bird"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
WORDS = "a small red dog runs on the green grass while two cats sleep near an old blue car".split()


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The models here are tiny: a second intra-op thread only adds synchronisation, which costs up to 100x on a
    loaded shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rwkv_dir(tmp_path_factory):
    config = tiny_config(
        text_config={"vocab_size": 49408, "bos_token_id": 49406, "eos_token_id": 49407, "max_position_embeddings": 77},
        vision_config={"image_size": 32, "patch_size": 8},
    )
    model = randomize_(RWKVCLIPModel(config).eval(), seed=5)
    path = tmp_path_factory.mktemp("tiny-rwkv-clip")
    model.save_pretrained(path)
    RWKVCLIPProcessor.from_bundled(image_size=32).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    torch.manual_seed(0)
    tower = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": 49408,
            "max_position_embeddings": 77,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    path = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).eval().save_pretrained(path)
    vocab, merges = bundled_vocab_and_merges()
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=list(merges),
        bos_token="<start_of_text>",
        eos_token="<end_of_text>",
        pad_token="<end_of_text>",
        unk_token="<end_of_text>",
        model_max_length=77,
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """train: 12 images (4 per class), test: 6 images; every image has 2 or 3 captions."""
    rng = np.random.default_rng(0)
    features = Features(
        {"image": ImageFeature(), "label": ClassLabel(names=CLASSNAMES), "caption": Sequence(Value("string"))}
    )

    def split(count, offset):
        images = [Image.fromarray(rng.integers(0, 256, (36 + i % 3 * 5, 40, 3), dtype=np.uint8)) for i in range(count)]
        captions = [
            [" ".join(rng.choice(WORDS, size=4 + j)) for j in range(2 + (i + offset) % 2)] for i in range(count)
        ]
        return Dataset.from_dict(
            {"image": images, "label": [i % 3 for i in range(count)], "caption": captions}, features=features
        )

    path = tmp_path_factory.mktemp("data") / "tiny-captions"
    DatasetDict({"train": split(12, 0), "test": split(6, 1)}).save_to_disk(str(path))
    return str(path)


@pytest.fixture(params=["rwkv", "clip"])
def model_dir(request, rwkv_dir, clip_dir):
    return rwkv_dir if request.param == "rwkv" else clip_dir


def common(model_dir, data_dir, tmp_path, *extra):
    return [
        "--model",
        model_dir,
        "--dataset",
        data_dir,
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--output-dir",
        str(tmp_path / "out"),
        *extra,
    ]


def pooled(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def features_by_hand(model_dir, data_dir, split):
    """Image features of a split and a text encoder, one sample at a time (no batching, no cache)."""
    from datasets import load_from_disk

    model, processor = AutoModel.from_pretrained(model_dir).eval(), AutoProcessor.from_pretrained(model_dir)
    rows = load_from_disk(data_dir)[split]
    images = torch.cat(
        [pooled(model.get_image_features(**processor(images=[im], return_tensors="pt"))) for im in rows["image"]]
    )

    def texts(strings):
        return torch.cat(
            [pooled(model.get_text_features(**processor(text=[s], return_tensors="pt"))) for s in strings]
        )

    return images, texts, rows


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def forbid_encoding(monkeypatch, model_dir):
    model_class = type(AutoModel.from_pretrained(model_dir))

    def refuse(*args, **kwargs):
        raise AssertionError("the model was called although the features are cached")

    monkeypatch.setattr(model_class, "get_image_features", refuse)
    monkeypatch.setattr(model_class, "get_text_features", refuse)


def test_zero_shot(model_dir, data_dir, tmp_path, monkeypatch, caplog):
    args = ["zero-shot", *common(model_dir, data_dir, tmp_path, "--templates", *TEMPLATES, "--plots")]
    result = run(args)

    images, texts, rows = features_by_hand(model_dir, data_dir, "test")
    weights = torch.stack([unit(unit(texts([t.format(c) for t in TEMPLATES])).mean(0)) for c in CLASSNAMES])
    logits = 100 * unit(images) @ weights.T
    predictions = logits.argmax(1)
    labels = torch.tensor(rows["label"])
    assert result["predictions"] == predictions.tolist()
    assert result["top1"] == pytest.approx((predictions == labels).double().mean().item())
    assert result["per_class_accuracy"] == pytest.approx(
        [(predictions[labels == c] == c).double().mean().item() for c in range(3)]
    )
    assert result["metric"] == "top1" and result["classnames"] == CLASSNAMES and result["num_templates"] == 2

    saved = json.loads((tmp_path / "out" / (result["files"]["json"].split("/")[-1])).read_text())
    assert saved["predictions"] == result["predictions"] and saved["top1"] == result["top1"]
    assert (
        "| zero-shot |" not in open(result["files"]["markdown"]).read()
        and "top-1" in open(result["files"]["markdown"]).read()
    )
    assert ("per_class_accuracy" in result["files"]) == (importlib.util.find_spec("matplotlib") is not None)

    forbid_encoding(monkeypatch, model_dir)
    with caplog.at_level(logging.INFO, logger="rwkv_clip_hf"):
        again = run(args)
    assert again["predictions"] == result["predictions"] and again["top1"] == result["top1"]
    assert caplog.text.count("skipping the encoding") == 2  # image features and prompt features


def test_retrieval(model_dir, data_dir, tmp_path, monkeypatch, caplog):
    args = ["retrieval", *common(model_dir, data_dir, tmp_path, "--plots")]
    result = run(args)

    images, texts, rows = features_by_hand(model_dir, data_dir, "test")
    owner = [i for i, captions in enumerate(rows["caption"]) for _ in captions]
    expected = retrieval_metrics(images, texts([c for captions in rows["caption"] for c in captions]), owner)
    for direction in ("image_to_text", "text_to_image"):
        assert result[direction] == pytest.approx(expected[direction])
    assert result["num_images"] == 6 and result["num_texts"] == 15
    assert ("similarity" in result["files"]) == (importlib.util.find_spec("matplotlib") is not None)

    forbid_encoding(monkeypatch, model_dir)
    with caplog.at_level(logging.INFO, logger="rwkv_clip_hf"):
        again = run(args)
    assert again["image_to_text"] == result["image_to_text"] and again["text_to_image"] == result["text_to_image"]
    assert caplog.text.count("skipping the encoding") == 2


def test_linear_probe(model_dir, data_dir, tmp_path, monkeypatch):
    args = [
        "linear-probe",
        *common(model_dir, data_dir, tmp_path, "--c-values", "0.1", "1", "10", "--val-fraction", "0.25"),
    ]
    result = run(args)

    train, _, train_rows = features_by_hand(model_dir, data_dir, "train")
    test, _, test_rows = features_by_hand(model_dir, data_dir, "test")
    expected = linear_probe(
        train.numpy(), train_rows["label"], test.numpy(), test_rows["label"], c_values=[0.1, 1, 10], val_fraction=0.25
    )
    assert result["best_c"] == expected["best_c"]
    assert result["top1"] == pytest.approx(expected["top1"])
    assert result["per_class_accuracy"] == pytest.approx(expected["per_class_accuracy"])
    assert (result["num_train"], result["num_validation"], result["num_test"]) == (9, 3, 6)

    forbid_encoding(monkeypatch, model_dir)
    again = run(args)
    assert again["top1"] == result["top1"] and again["best_c"] == result["best_c"]


def test_errors_name_the_column_and_exit_2(rwkv_dir, data_dir, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        status = main(["retrieval", *common(rwkv_dir, data_dir, tmp_path, "--caption-column", "sentences")])
    assert status == 2
    assert (
        "--caption-column 'sentences': no such column" in caplog.text
        and "['image', 'label', 'caption']" in caplog.text
    )
    with caplog.at_level(logging.ERROR):
        assert main(["linear-probe", *common(rwkv_dir, data_dir, tmp_path, "--train-split", "test")]) == 2
    assert "same rows" in caplog.text


def test_library_argument_names_become_the_command_lines_flags():
    from rwkv_clip_hf.evaluation.cli import build_parser, cli_message, parser_flags

    flags = parser_flags(build_parser())
    assert flags["label_column"] == "--label-column" and flags["val_fraction"] == "--val-fraction"
    assert flags["trust_remote_code"] == "--trust-remote-code" and "help" not in flags
    message = "`label_column` 'x' is not a ClassLabel; pass `classnames`, `unknown_name` or `overwrite=True`"
    assert cli_message(message, {**flags, "overwrite": "--overwrite"}) == (
        "--label-column 'x' is not a ClassLabel; pass --classnames, `unknown_name` or --overwrite"
    )


def test_plots_are_skipped_without_matplotlib(monkeypatch, tmp_path):
    import sys

    from rwkv_clip_hf.evaluation.report import plot_per_class_accuracy, plot_similarity_heatmap

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert plot_per_class_accuracy([1.0, 0.5], ["a", "b"], tmp_path / "p.png") is None
    assert plot_similarity_heatmap(np.eye(2), [0, 1], tmp_path / "s.png") is None
    assert not list(tmp_path.iterdir())


def test_markdown_tables():
    from rwkv_clip_hf.evaluation.report import results_markdown

    zero_shot = {
        "protocol": "zero-shot",
        "model": "m",
        "dataset": "d",
        "metric": "top1",
        "accuracy": 0.5,
        "top1": 0.5,
        "top5": 1.0,
        "mean_per_class_accuracy": math.nan,
        "num_samples": 4,
        "classnames": ["a", "b"],
        "classnames_source": "given",
        "num_templates": 1,
        "templates_source": "given",
    }
    text = results_markdown(zero_shot)
    assert "| m | d | top1 | 50.00 | 50.00 | 100.00 | - | 4 |" in text
    retrieval = {
        "protocol": "retrieval",
        "model": "m",
        "dataset": "d",
        "rsum": 350.0,
        "num_images": 2,
        "num_texts": 4,
        "image_to_text": {"R@1": 0.5, "R@5": 1.0, "median_rank": 1.5},
        "text_to_image": {"R@1": 0.0, "R@5": 1.0},
    }
    assert "| m | d | 50.00 | 100.00 | 0.00 | 100.00 | 350.00 | 2 | 4 |" in results_markdown(retrieval)


def _error_of(argv, caplog) -> str:
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    records = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert records and records[-1].name == "rwkv_clip_hf.evaluation"
    return records[-1].getMessage()


def test_bad_paths_devices_and_models_are_one_line_errors(rwkv_dir, data_dir, tmp_path, caplog, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    argv = common(rwkv_dir, data_dir, tmp_path)
    for option, value, message in (
        ("--output-dir", tmp_path / "a-file", "is a file, not a directory"),
        ("--output-dir", tmp_path / "a-file" / "sub", "is inside"),
        ("--cache-dir", tmp_path / "a-file", "is a file, not a directory"),
        ("--device", "gpu7", "'gpu7' is not a device"),
    ):
        changed = list(argv)
        changed[changed.index(option) + 1] = str(value)
        assert message in _error_of(["zero-shot", *changed], caplog), option
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    changed = list(argv)
    changed[changed.index("--device") + 1] = "cuda"
    assert "--device cuda: CUDA is not available" in _error_of(["zero-shot", *changed], caplog)
    changed = list(argv)
    changed[changed.index("--model") + 1] = str(tmp_path / "no" / "such-model")
    assert _error_of(["zero-shot", *changed], caplog) == f"--model {tmp_path / 'no' / 'such-model'}: no such directory"
    assert not (tmp_path / "out").exists()


def id_png(seed: int) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_broken_image_is_named_by_its_row(rwkv_dir, tmp_path, caplog):
    images = [{"bytes": id_png(i), "path": None} for i in range(4)]
    images[2] = {"bytes": b"\x89PNG\r\n\x1a\n broken", "path": None}
    Dataset.from_dict(
        {"image": images, "label": [0, 1, 2, 0]},
        features=Features({"image": ImageFeature(), "label": ClassLabel(names=CLASSNAMES)}),
    ).save_to_disk(str(tmp_path / "broken"))
    message = _error_of(
        [
            "zero-shot",
            *common(rwkv_dir, str(tmp_path / "broken"), tmp_path),
            "--classnames",
            *CLASSNAMES,
            "--templates",
            *TEMPLATES,
        ],
        caplog,
    )
    assert message.startswith("--image-column 'image': row 2 of ") and "is not a readable image" in message, message


def test_a_truncated_cache_file_is_encoded_again(rwkv_dir, data_dir, tmp_path, caplog):
    argv = ["zero-shot", *common(rwkv_dir, data_dir, tmp_path)]
    first = run(argv)
    for path in (tmp_path / "cache").glob("*.safetensors"):
        path.write_bytes(path.read_bytes()[:50])
    with caplog.at_level(logging.WARNING):
        second = run(argv)
    assert "are unreadable" in caplog.text and "encoding again" in caplog.text
    assert second["accuracy"] == first["accuracy"]


def test_progress_bars_only_for_more_than_one_batch(rwkv_dir, capsys):
    from rwkv_clip_hf.evaluation.features import encode_texts

    model, processor = AutoModel.from_pretrained(rwkv_dir), AutoProcessor.from_pretrained(rwkv_dir)
    capsys.readouterr()
    encode_texts(model, processor, ["a cat", "a dog"], batch_size=4)
    assert "encoding" not in capsys.readouterr().err
    encode_texts(model, processor, ["a cat", "a dog"], batch_size=1)
    assert "encoding texts" in capsys.readouterr().err
