"""`rwkv-clip-data` end to end with tiny models saved to local directories, and its error messages."""

import logging
from pathlib import Path

import datasets
import pytest
import tomllib

from rwkv_clip_hf.data.cli import main, run

from tiny_models import (
    shapes_with_raw_text,
    tiny_captioner,
    tiny_classifier,
    tiny_llama,
    tiny_rwkv_clip,
    word_tokenizer,
)

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Model directories and a save_to_disk dataset."""
    root = tmp_path_factory.mktemp("cli")
    paths = {name: root / name for name in ("captioner", "classifier", "clip", "merger", "plain_lm", "data")}
    model, image_processor, tokenizer = tiny_captioner()
    for part in (model, image_processor, tokenizer):
        part.save_pretrained(paths["captioner"])
    model, image_processor = tiny_classifier()
    model.save_pretrained(paths["classifier"])
    image_processor.save_pretrained(paths["classifier"])
    model, processor = tiny_rwkv_clip()
    model.save_pretrained(paths["clip"])
    processor.save_pretrained(paths["clip"])
    tokenizer = word_tokenizer()
    model = tiny_llama(tokenizer)
    model.save_pretrained(paths["merger"])
    tokenizer.save_pretrained(paths["merger"])
    model.save_pretrained(paths["plain_lm"])
    word_tokenizer(chat_template=None).save_pretrained(paths["plain_lm"])
    shapes_with_raw_text(5, blank=(1,)).save_to_disk(str(paths["data"]))
    (root / "tags.txt").write_text("circle\nsquare\n\nstar\n")
    paths["tags"] = root / "tags.txt"
    return {k: str(v) for k, v in paths.items()}


def test_cli_end_to_end(saved, tmp_path, capsys, caplog):
    output = tmp_path / "out"
    argv = [
        "--dataset", saved["data"], "--text-column", "alt_text", "--output", str(output),
        "--captioner", saved["captioner"], "--caption-max-new-tokens", "4",
        "--tagger", saved["clip"], "--tag-vocabulary", saved["tags"], "--tag-threshold", "0", "--tag-top-k", "2",
        "--merger", saved["merger"], "--max-new-tokens", "3", "--shard-size", "2", "--batch-size", "2",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    columns = ["image", "shape", "color", "raw_text", "synthetic_caption", "tags", "generated_description"]
    assert f"5 rows, columns {columns}, written to {output}/dataset" in printed
    assert "caption_columns=['raw_text', 'synthetic_caption', 'generated_description']" in printed
    result = datasets.load_from_disk(str(output / "dataset"))
    assert result["raw_text"][1] == "" and all(isinstance(c, str) for c in result["synthetic_caption"])
    assert all(len(t) == 2 and set(t) <= {"circle", "square", "star"} for t in result["tags"])
    assert all(isinstance(d, str) for d in result["generated_description"])
    # The same command again is refused, in the command line's words; with --resume it finds the run complete.
    assert error_of(argv, caplog) == (
        f"--output {output} holds an earlier run: pass --resume to continue it (same configuration) or --overwrite "
        "to start over"
    )
    assert len(run(argv + ["--resume"])) == 5


def test_cli_classifier_tagger_and_skipped_steps(saved, tmp_path):
    output = tmp_path / "out"
    result = run(
        ["--dataset", saved["data"], "--no-raw-text", "--output", str(output), "--tagger", saved["classifier"],
         "--tag-top-k", "1", "--tag-threshold", "0", "--max-samples", "3", "--description-column", "tg"]
    )  # fmt: skip
    assert result.column_names == ["image", "shape", "color", "alt_text", "tags"]
    assert all(len(t) == 1 and t[0] in {"red thing", "blue box", "green disc", "star"} for t in result["tags"])


def error_of(argv, caplog) -> str:
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="rwkv_clip_hf.data"):
        assert main(argv) == 2
    return caplog.records[-1].getMessage()


def test_cli_error_messages(saved, tmp_path, caplog):
    base = ["--dataset", saved["data"], "--output", str(tmp_path / "out")]
    assert "nothing to do" in error_of(base, caplog)
    message = error_of(base + ["--captioner", saved["captioner"], "--text-column", "caption"], caplog)
    assert "--text-column 'caption'" in message and "['image', 'shape', 'color', 'alt_text']" in message
    message = error_of(base + ["--captioner", saved["captioner"], "--image-column", "img", "--no-raw-text"], caplog)
    assert "--image-column 'img'" in message and "'alt_text'" in message
    data = datasets.Dataset.from_dict({"photo_id": [1, 2], "alt_text": ["a", "b"]})
    data.save_to_disk(str(tmp_path / "ints"))
    message = error_of(
        ["--dataset", str(tmp_path / "ints"), "--output", str(tmp_path / "o2"), "--captioner", saved["captioner"],
         "--image-column", "photo_id", "--text-column", "alt_text"], caplog,
    )  # fmt: skip
    assert (
        "'photo_id' holds values of type int64, not images" in message
        and "image columns of this dataset: none" in message
    )
    message = error_of(base + ["--merger", saved["plain_lm"], "--text-column", "alt_text"], caplog)
    assert "has no chat template" in message and "give a Jinja template as --chat-template" in message
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert error_of(base + ["--tag-vocabulary", saved["tags"], "--merger", saved["merger"]], caplog) == (
        "--tag-vocabulary needs --tagger"
    )
    message = error_of(base + ["--tagger", saved["clip"], "--tag-vocabulary", str(tmp_path / "missing.txt")], caplog)
    assert "no such file" in message
    message = error_of(base + ["--tagger", saved["merger"], "--text-column", "alt_text"], caplog)
    assert message.startswith(f"--tagger {saved['merger']}: cannot be loaded as an image classifier")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("x")
    message = error_of(
        ["--dataset", saved["data"], "--output", str(tmp_path / "mine"), "--tagger", saved["classifier"],
         "--no-raw-text", "--overwrite"], caplog,
    )  # fmt: skip
    assert "not an output of this pipeline" in message


def test_console_script_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["rwkv-clip-data"] == "rwkv_clip_hf.data.cli:main"


def test_models_that_cannot_load_leave_no_run_behind(saved, tmp_path, caplog):
    """A missing model or a bad --device: one error line (logged as rwkv_clip_hf.data), the output not claimed,
    so the corrected command runs without --overwrite."""
    output = tmp_path / "out"
    base = ["--dataset", saved["data"], "--text-column", "alt_text", "--output", str(output), "--shard-size", "3"]
    missing = str(tmp_path / "models" / "no-such-captioner")
    assert error_of(base + ["--captioner", missing], caplog) == f"--captioner {missing}: no such directory"
    assert caplog.records[-1].name == "rwkv_clip_hf.data"
    message = error_of(base + ["--captioner", saved["captioner"], "--device", "tpu9"], caplog)
    assert message.startswith("--device 'tpu9' is not a device")
    assert not output.exists()
    assert main(base + ["--tagger", saved["classifier"]]) == 0  # the rerun needs no --overwrite
    assert (output / "dataset").is_dir()


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(saved, tmp_path, caplog):
    from filelock import FileLock

    output = tmp_path / "out"
    argv = ["--dataset", saved["data"], "--output", str(output), "--tagger", saved["classifier"], "--no-raw-text",
            "--resume"]  # fmt: skip
    with FileLock(str(tmp_path / ".out.lock")):  # what a running rwkv-clip-data holds
        message = error_of(argv, caplog)
    assert "is in use by another rwkv-clip-data run" in message
    assert not output.exists()
    assert main(argv) == 0  # released: the same command runs
