"""The training examples' two-stage path (how the bundled default model is built): an image tower pre-trained on
labels by examples/finetune_classification.py, then copied into a fresh RWKV-CLIP by examples/train_contrastive.py
(--vision_model_name_or_path); and examples/similarity_heatmap.py."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

import rwkv_clip_hf
from rwkv_clip_hf import RWKVCLIPForImageClassification, RWKVCLIPModel, RWKVCLIPProcessor
from rwkv_clip_hf.shapes import COLORS, SHAPES, held_out_pairs
from rwkv_clip_hf.training import paper_training_arguments, paper_training_defaults

from conftest import randomize_, real_vocab_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def contrastive():
    return load_example("train_contrastive")


def short_context_config(**vision):
    """The training tests' tiny real-vocabulary model with a 16-token context (the subprocess runs stay quick)."""
    return real_vocab_config(text_config={"max_position_embeddings": 16}, vision_config=vision)


def model_arguments(contrastive, config, **kwargs):
    """ModelArguments for train_contrastive.build_model that rebuild `config` from scratch."""
    overrides = {key: getattr(config, key).to_diff_dict() for key in ("text_config", "vision_config")}
    return contrastive.ModelArguments(config_name="tiny", config_overrides=json.dumps(overrides), **kwargs)


def save_classifier(path: Path, config, seed: int) -> RWKVCLIPForImageClassification:
    config = RWKVCLIPForImageClassification.config_class.from_dict(config.to_dict())
    config.num_labels = len(SHAPES)
    classifier = randomize_(RWKVCLIPForImageClassification(config), seed=seed)
    classifier.save_pretrained(path)
    return classifier


def test_contrastive_defaults_are_the_librarys_paper_recipe(tmp_path, contrastive):
    _, _, args = contrastive.parse_arguments(["--output_dir", str(tmp_path), "--use_cpu", "true"])
    recipe = paper_training_arguments(str(tmp_path), use_cpu=True)
    assert {name: getattr(args, name) for name in paper_training_defaults()} == {
        name: getattr(recipe, name) for name in paper_training_defaults()
    }
    assert (args.learning_rate, args.adam_beta2, args.weight_decay) == (1e-3, 0.98, 0.2)
    assert (args.logging_steps, args.save_strategy, args.save_total_limit) == (10, "epoch", 2)


def test_vision_tower_comes_from_the_classifier_and_the_text_tower_from_scratch(tmp_path, contrastive):
    config = short_context_config()
    classifier = save_classifier(tmp_path / "cls", config, seed=1)
    torch.manual_seed(0)
    model = contrastive.build_model(
        model_arguments(contrastive, config, vision_model_name_or_path=str(tmp_path / "cls"))
    )
    torch.manual_seed(0)
    fresh = contrastive.build_model(model_arguments(contrastive, config))
    assert type(model) is RWKVCLIPModel
    for name, tensor in classifier.vision_model.state_dict().items():
        assert torch.equal(model.vision_model.state_dict()[name], tensor), name
        # randomize_ gave every parameter other values than a fresh init: the copy really happened
        if name in dict(classifier.vision_model.named_parameters()):
            assert not torch.equal(fresh.vision_model.state_dict()[name], tensor), name
    for name, tensor in fresh.text_model.state_dict().items():
        assert torch.equal(model.text_model.state_dict()[name], tensor), name
    assert torch.equal(model.logit_scale, fresh.logit_scale)


def test_vision_tower_from_a_full_rwkv_clip_checkpoint(tmp_path, contrastive):
    config = short_context_config()
    source = randomize_(RWKVCLIPModel(config), seed=2)
    source.save_pretrained(tmp_path / "clip")
    model = contrastive.build_model(
        model_arguments(contrastive, config, vision_model_name_or_path=str(tmp_path / "clip"))
    )
    for name, tensor in source.vision_model.state_dict().items():
        assert torch.equal(model.vision_model.state_dict()[name], tensor), name
    assert not torch.equal(model.text_model.token_embedding.weight, source.text_model.token_embedding.weight)


def test_vision_tower_of_another_architecture_is_refused(tmp_path, contrastive):
    save_classifier(tmp_path / "cls", short_context_config(patch_size=4), seed=3)
    arguments = model_arguments(contrastive, short_context_config(), vision_model_name_or_path=str(tmp_path / "cls"))
    with pytest.raises(SystemExit, match=r"patch_size: config 8, checkpoint 4"):
        contrastive.build_model(arguments)


def test_vision_tower_does_not_combine_with_a_model_to_fine_tune(tmp_path, contrastive):
    arguments = contrastive.ModelArguments(model_name_or_path=str(tmp_path), vision_model_name_or_path=str(tmp_path))
    with pytest.raises(SystemExit, match="does not combine with --model_name_or_path"):
        contrastive.build_model(arguments)


def test_classification_example_excludes_held_out_pairs():
    classification = load_example("finetune_classification")
    arguments = classification.Arguments(model_name_or_path="unused", generate_shapes=300, exclude_held_out_pairs=True)
    train, evaluation = classification.load_splits(arguments, seed=0)
    seen = {
        (row["color"], row["shape"])
        for split in (train, evaluation)
        for row in split.select_columns(["color", "shape"])
    }
    assert len(train) + len(evaluation) == 300
    assert not seen & set(held_out_pairs())
    assert len(seen) == len(COLORS) * len(SHAPES) - len(held_out_pairs())  # 300 images cover every other pair
    arguments.exclude_held_out_pairs = False
    train, evaluation = classification.load_splits(arguments, seed=0)
    assert {(row["color"], row["shape"]) for row in train.select_columns(["color", "shape"])} & set(held_out_pairs())


@pytest.mark.parametrize("label", ["shape", "color", "pair", "shape_or_color", "shape_and_color"])
def test_classification_example_labels_generated_shapes_by_shape_colour_or_pair(label):
    classification = load_example("finetune_classification")
    arguments = classification.Arguments(
        model_name_or_path="unused", generate_shapes=200, exclude_held_out_pairs=True, shapes_label=label
    )
    names = {
        "shape": SHAPES,
        "color": list(COLORS),
        "pair": [f"{c} {s}" for c in COLORS for s in SHAPES],
        "shape_or_color": SHAPES + list(COLORS),
        "shape_and_color": SHAPES + list(COLORS),
    }[label]
    by = []
    for split in classification.load_splits(arguments, seed=0):
        feature = split.features["label"]
        if label == "shape_and_color":  # multi-label: a list of classes per image
            assert isinstance(feature, datasets.List) and feature.feature.names == names
        else:
            assert feature.names == names
        for row in split.select_columns(["label", "color", "shape"]):
            if label == "shape_and_color":
                assert [names[i] for i in row["label"]] == [row["shape"], row["color"]]
                continue
            name = names[row["label"]]
            if label == "pair":
                assert name == f"{row['color']} {row['shape']}"
            elif label == "shape_or_color":
                assert name in (row["color"], row["shape"])
                by.append(name == row["shape"])
            else:
                assert name == row[label]
    if label == "shape_or_color":  # half the images by their shape, half by their colour
        assert len(by) == 200 and sum(by) == 100
    if label == "pair":  # an unknown kind of label is refused by the argument parser, naming the choices
        result = subprocess.run(
            [
                sys.executable,
                str(ROOT / "examples" / "finetune_classification.py"),
                "--shapes_label",
                "size",
                "--output_dir",
                "unused",
                "--model_name_or_path",
                "unused",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2 and "invalid choice: 'size'" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("labels", [["cat", "dog", "cat"], [[0, 2], [2], [5]]])
def test_classification_example_refuses_labels_that_are_not_class_indices(tmp_path, labels):
    """Plain (not ClassLabel) label columns must hold the class indices 0..N-1, single or multi-label."""
    images = [Image.new("RGB", (8, 8), color) for color in ("red", "green", "blue")]
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"image": images, "label": labels}),
            "test": datasets.Dataset.from_dict({"image": images, "label": labels}),
        }
    ).save_to_disk(str(tmp_path / "data"))
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "finetune_classification.py"),
            "--output_dir",
            str(tmp_path / "out"),
            "--model_name_or_path",
            "unused",
            "--dataset_name",
            str(tmp_path / "data"),
            "--eval_split",
            "test",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "label column 'label' must be a ClassLabel" in result.stderr, result.stderr[-2000:]
    assert str(sorted({c for row in labels for c in (row if isinstance(row, list) else [row])})) in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", sorted(p.stem for p in (ROOT / "examples").glob("*.py")))
def test_every_example_prints_its_help(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        load_example(script).main()
    assert exit_info.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["train_contrastive", "finetune_classification"])
def test_no_pinned_memory_without_cuda(script, monkeypatch):
    """DataLoader warns on every epoch when asked to pin memory without an accelerator."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    *_, training_args = load_example(script).parse_arguments(["--output_dir", "unused", "--model_name_or_path", "x"])
    assert training_args.dataloader_pin_memory is False
    *_, training_args = load_example(script).parse_arguments(
        ["--output_dir", "unused", "--model_name_or_path", "x", "--dataloader_pin_memory", "True"]
    )
    assert training_args.dataloader_pin_memory is True  # an explicit flag wins


@pytest.mark.parametrize("script", ["train_contrastive", "finetune_classification"])
def test_diverging_training_exits_non_zero_without_saving(tmp_path, script):
    """--learning_rate 1e6 makes the loss NaN within a few steps: a clear error and exit 1, no weights written."""
    config = short_context_config()
    RWKVCLIPModel(config).save_pretrained(tmp_path / "init")
    RWKVCLIPProcessor.from_bundled(image_size=32, context_length=16).save_pretrained(tmp_path / "init")
    command = [
        sys.executable,
        str(ROOT / "examples" / f"{script}.py"),
        "--output_dir",
        str(tmp_path / "out"),
        "--model_name_or_path",
        str(tmp_path / "init"),
        "--generate_shapes",
        "48",
        "--num_train_epochs",
        "4",
        "--per_device_train_batch_size",
        "16",
        "--learning_rate",
        "1e6",
        "--warmup_steps",
        "0",
        "--save_strategy",
        "no",
        "--eval_strategy",
        "no",
        "--dataloader_num_workers",
        "0",
        "--disable_tqdm",
        "True",
        "--use_cpu",
        "True",
        "--validation_fraction",
        "0.25",
    ]
    if script == "finetune_classification":
        command += ["--load_best_model_at_end", "False"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    assert "error: training diverged at optimizer step" in result.stderr, result.stderr[-3000:]
    assert (
        not list((tmp_path / "out").rglob("*.safetensors")) and not (tmp_path / "out" / "eval_results.json").exists()
    )


def test_torchrun_two_cpu_processes_train_data_parallel_with_one_writer(tmp_path):
    """README's `torchrun --nproc_per_node 2 examples/train_contrastive.py ...` on a CPU-only machine (as CI is):
    two gloo ranks splitting the data (half the optimizer steps of one process: global batch 2 x 8), one output."""
    config = short_context_config()
    overrides = {key: getattr(config, key).to_diff_dict() for key in ("text_config", "vision_config")}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "examples" / "train_contrastive.py"),
        "--output_dir",
        str(tmp_path / "ddp"),
        "--generate_shapes",
        "32",
        "--config_name",
        "tiny",
        "--config_overrides",
        json.dumps(overrides),
        "--num_train_epochs",
        "1",
        "--per_device_train_batch_size",
        "8",
        "--validation_fraction",
        "0",
        "--save_strategy",
        "no",
        "--dataloader_num_workers",
        "0",
        "--disable_tqdm",
        "True",
        "--logging_steps",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "2 processes (cpu), global batch 16" in output, output[-3000:]
    state = json.loads((tmp_path / "ddp" / "trainer_state.json").read_text())
    assert state["global_step"] == 2  # 32 rows / (2 ranks x 8); one process alone would take 4 steps
    assert output.count("saved model and processor to") == 1  # rank 0 writes, rank 1 does not
    RWKVCLIPModel.from_pretrained(tmp_path / "ddp")
    AutoProcessor.from_pretrained(tmp_path / "ddp")


@pytest.mark.parametrize("layout", ["Dataset", "DatasetDict"])
def test_both_training_examples_read_both_saved_layouts(tmp_path, contrastive, layout):
    """A `save_to_disk` Dataset or DatasetDict works in both scripts (the loader of rwkv-clip-eval); a missing
    split or path is an error naming the option, not a traceback."""
    classification = load_example("finetune_classification")
    images = [Image.new("RGB", (8, 8), color) for color in ("red", "green", "blue", "white")]
    rows = datasets.Dataset.from_dict({"image": images, "caption": ["r", "g", "b", "w"], "label": [0, 1, 2, 0]})
    data = datasets.DatasetDict({"train": rows, "test": rows.select(range(2))}) if layout == "DatasetDict" else rows
    data.save_to_disk(str(tmp_path / "data"))

    train, _ = contrastive.load_data(
        contrastive.DataArguments(dataset_name=str(tmp_path / "data"), validation_fraction=0), 32, seed=0
    )
    assert train["caption"] == ["r", "g", "b", "w"]
    arguments = classification.Arguments(
        model_name_or_path="unused", dataset_name=str(tmp_path / "data"), validation_fraction=0.25
    )
    train, evaluation = classification.load_splits(arguments, seed=0)
    assert len(train) + len(evaluation) == 4
    arguments.eval_split = "test"
    if layout == "DatasetDict":
        train, evaluation = classification.load_splits(arguments, seed=0)
        assert (len(train), len(evaluation)) == (4, 2)
        arguments.train_split = "training"
        with pytest.raises(
            SystemExit,
            match=r"has no split 'training'; available splits: \['train', 'test'\] \(choose with --train_split\)",
        ):
            classification.load_splits(arguments, seed=0)
        with pytest.raises(SystemExit, match=r"no split 'training'; .*\(choose with --train_split\)"):
            contrastive.load_data(
                contrastive.DataArguments(dataset_name=str(tmp_path / "data"), train_split="training"), 32, seed=0
            )
    else:
        with pytest.raises(SystemExit, match="a single dataset without splits: drop --eval_split"):
            classification.load_splits(arguments, seed=0)
    with pytest.raises(SystemExit, match=r"--dataset_name .*missing: no such file or directory"):
        contrastive.load_data(contrastive.DataArguments(dataset_name=str(tmp_path / "missing")), 32, seed=0)


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_both_examples_pass_random_colors_to_the_generator(contrastive, fraction):
    classification = load_example("finetune_classification")
    arguments = classification.Arguments(
        model_name_or_path="unused", generate_shapes=60, shapes_random_colors=fraction
    )
    rows = [
        row
        for split in classification.load_splits(arguments, seed=0)
        for row in split.select_columns(["color", "rgb"])
    ]
    data = contrastive.load_data(
        contrastive.DataArguments(generate_shapes=60, shapes_random_colors=fraction, validation_fraction=0), 64, seed=0
    )
    data = data[0] if isinstance(data, tuple) else data
    rows += list(data.select_columns(["color", "rgb"]))
    named = sum(tuple(row["rgb"]) == COLORS[row["color"]] for row in rows)
    assert named == (len(rows) if fraction == 0 else 0)


def test_two_stage_training_runs_end_to_end(tmp_path):
    """finetune_classification.py from a saved random model, then train_contrastive.py starting its image tower
    there: both run under Trainer, the classifier writes its eval accuracy, and the result loads as RWKV-CLIP
    (the copy of the tower is checked exactly by the tests above)."""
    config = short_context_config()
    RWKVCLIPModel(config).save_pretrained(tmp_path / "init")
    RWKVCLIPProcessor.from_bundled(image_size=32, context_length=16).save_pretrained(tmp_path / "init")
    common = [
        "--per_device_train_batch_size",
        "16",
        "--learning_rate",
        "3e-3",
        "--save_strategy",
        "no",
        "--dataloader_num_workers",
        "0",
        "--disable_tqdm",
        "True",
        "--use_cpu",
        "True",
    ]
    stage_1 = [
        sys.executable,
        str(ROOT / "examples" / "finetune_classification.py"),
        "--output_dir",
        str(tmp_path / "cls"),
        "--model_name_or_path",
        str(tmp_path / "init"),
        "--generate_shapes",
        "48",
        "--exclude_held_out_pairs",
        "--shapes_random_colors",
        "1",
        "--num_train_epochs",
        "1",
        "--eval_strategy",
        "no",
        "--load_best_model_at_end",
        "False",
        *common,
    ]
    result = subprocess.run(stage_1, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    accuracy = json.loads((tmp_path / "cls" / "eval_results.json").read_text())["eval_accuracy"]
    assert 0.0 <= accuracy <= 1.0
    overrides = {key: getattr(config, key).to_diff_dict() for key in ("text_config", "vision_config")}
    stage_2 = [
        sys.executable,
        str(ROOT / "examples" / "train_contrastive.py"),
        "--output_dir",
        str(tmp_path / "clip"),
        "--generate_shapes",
        "32",
        "--exclude_held_out_pairs",
        "--shapes_random_colors",
        "0.5",
        "--config_name",
        "tiny",
        "--config_overrides",
        json.dumps(overrides),
        "--vision_model_name_or_path",
        str(tmp_path / "cls"),
        "--caption_columns",
        "captions",
        "--num_train_epochs",
        "1",
        "--validation_fraction",
        "0",
        *common,
    ]
    result = subprocess.run(stage_2, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "image tower initialised from" in result.stdout + result.stderr
    trained = RWKVCLIPModel.from_pretrained(tmp_path / "clip")
    classifier = RWKVCLIPForImageClassification.from_pretrained(tmp_path / "cls")
    patch = "embeddings.patch_embedding.weight"
    start, end = classifier.vision_model.state_dict()[patch], trained.vision_model.state_dict()[patch]
    assert start.shape == end.shape and not torch.equal(start, end)  # trained on (the copy itself: tests above)

    # the same step with a locked image tower: the tower stays the classifier's, bit for bit (the unlocked run
    # above changed it)
    locked = [str(tmp_path / "locked") if a == str(tmp_path / "clip") else a for a in stage_2]
    result = subprocess.run([*locked, "--freeze_vision_model", "True"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    locked_tower = RWKVCLIPModel.from_pretrained(tmp_path / "locked").vision_model.state_dict()
    tower = classifier.vision_model.state_dict()
    assert locked_tower.keys() == tower.keys()
    assert all(torch.equal(tower[k], v) for k, v in locked_tower.items())


def test_similarity_heatmap_writes_the_matrix_of_the_model(tmp_path, capsys):
    heatmap = load_example("similarity_heatmap")
    images = sorted((ROOT / "examples" / "images").glob("*.png"))[:3]
    captions = ["a blue square", "a red circle"]
    output = tmp_path / "similarity.png"
    heatmap.main(["--images", *map(str, images), "--captions", *captions, "--output", str(output)])
    printed = capsys.readouterr().out.splitlines()
    # the printed matrix is the model's own logits divided by its temperature
    model_dir = rwkv_clip_hf.default_model_path()
    model, processor = AutoModel.from_pretrained(model_dir), AutoProcessor.from_pretrained(model_dir)
    inputs = processor(text=captions, images=[Image.open(p) for p in images], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits_per_text / model.logit_scale.exp()
    rows = [[float(v) for v in line.split()[-len(images) :]] for line in printed[1:3]]
    assert torch.allclose(torch.tensor(rows), expected, atol=6e-4), (rows, expected)
    with Image.open(output) as png:
        assert png.format == "PNG" and png.width > 300
    assert list(tmp_path.iterdir()) == [output]  # no temporary file left behind
    with pytest.raises(SystemExit, match="no such file: .*missing.png"):
        heatmap.main(["--images", str(tmp_path / "missing.png"), "--output", str(tmp_path / "other.png")])
    with pytest.raises(SystemExit, match="does not exist"):
        heatmap.main(["--output", str(tmp_path / "no" / "such" / "dir.png")])
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(SystemExit, match="--images: cannot read .*text.png as an image"):
        heatmap.main(["--images", str(tmp_path / "text.png"), "--output", str(tmp_path / "other.png")])
    with pytest.raises(SystemExit, match="--model .*no-model: cannot load"):
        heatmap.main(["--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "other.png")])
    assert not (tmp_path / "other.png").exists()
