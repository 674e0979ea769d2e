"""`rwkv-clip-data`: the paper's diverse description generation over a dataset of images with raw texts.

    rwkv-clip-data --dataset DIR_OR_HUB_ID --text-column text --output out/descriptions \\
        --captioner CAPTIONER --tagger CLIP_MODEL --tag-vocabulary tags.txt --merger CHAT_LLM

adds `synthetic_caption` (captioner), `tags` (tagger) and `generated_description` (merger, an instruction-tuned
LLM merging raw text, caption and tags), renames the raw-text column to `raw_text`, and writes the result to
`<output>/dataset` (`datasets.load_from_disk`). Any step can be left out. Work is saved shard by shard: after
an interruption, the same command with --resume continues where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..evaluation.features import DTYPES

logger = logging.getLogger("rwkv_clip_hf.data")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `rwkv-clip-data`."""
    parser = argparse.ArgumentParser(
        prog="rwkv-clip-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data = parser.add_argument_group("input")
    data.add_argument(
        "--dataset",
        required=True,
        help="a save_to_disk directory, an imagefolder (with metadata.jsonl/csv for the texts) or other directory "
        "`datasets.load_dataset` reads, a parquet/csv/json file, or a Hub dataset id",
    )
    data.add_argument("--dataset-config", default=None, help="configuration name of a Hub dataset")
    data.add_argument("--split", default="train", help="the split to process (default: train)")
    data.add_argument("--image-column", default="image")
    data.add_argument("--text-column", default="raw_text", help="the raw web text (alt-text) column")
    data.add_argument("--no-raw-text", action="store_true", help="the images have no raw text")
    data.add_argument("--max-samples", type=int, default=None, help="process only the first N rows (a trial run)")

    caption = parser.add_argument_group("captions (Ts)")
    caption.add_argument("--captioner", default=None, help="an image-to-text model (BLIP, GIT, Florence-2, ...)")
    caption.add_argument("--caption-prompt", default=None, help="text prompt for conditional captioners")
    caption.add_argument("--caption-max-new-tokens", type=int, default=40)

    tags = parser.add_argument_group("tags")
    tags.add_argument(
        "--tagger",
        default=None,
        help="an image classifier (its labels are the tags), or with --tag-vocabulary a CLIP-style model "
        "(RWKV-CLIP, CLIP, SigLIP) scoring your tags zero-shot",
    )
    tags.add_argument("--tag-vocabulary", default=None, help="a text file (one tag per line) or a JSON list")
    tags.add_argument("--tag-template", default="a photo of {}.", help="phrasing of a tag for the text tower")
    tags.add_argument("--tag-score", default="softmax", choices=["softmax", "cosine"], help="zero-shot score")
    tags.add_argument(
        "--tag-threshold",
        type=float,
        default=None,
        help="minimum score of a tag (default: 0.25 for a classifier, 0.05 for a zero-shot softmax, 0.25 cosine)",
    )
    tags.add_argument("--tag-top-k", type=int, default=5, help="at most this many tags per image (default 5)")

    merge = parser.add_argument_group("generated descriptions (Tg)")
    merge.add_argument("--merger", default=None, help="an instruction-tuned causal LM with a chat template")
    merge.add_argument(
        "--prompt-file",
        default=None,
        help='the merger\'s prompt: a JSON object {"system": ..., "template": ...} or a text file holding the '
        "template; the template uses {raw_text}, {caption} and {tags}",
    )
    merge.add_argument("--chat-template", default=None, help="a Jinja chat template file, for models without one")
    merge.add_argument("--max-new-tokens", type=int, default=128, help="description length limit in tokens")

    run = parser.add_argument_group("running")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    run.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *sorted(DTYPES)],
        help="auto: the checkpoint's dtype on a GPU, float32 on the CPU",
    )
    run.add_argument("--batch-size", type=int, default=16, help="images / prompts per model call")
    run.add_argument("--trust-remote-code", action="store_true")

    output = parser.add_argument_group("output")
    output.add_argument("--output", required=True, help="directory of the run; the result is <output>/dataset")
    output.add_argument("--shard-size", type=int, default=1000, help="rows per saved shard (the unit of resuming)")
    output.add_argument("--resume", action="store_true", help="continue an interrupted run in --output")
    output.add_argument("--overwrite", action="store_true", help="delete an earlier run in --output first")
    output.add_argument("--keep-shards", action="store_true", help="keep <output>/shards after the final dataset")
    output.add_argument("--raw-text-column", default="raw_text", help="output name of the raw text (Tr)")
    output.add_argument("--caption-column", default="synthetic_caption", help="output name of the caption (Ts)")
    output.add_argument("--tags-column", default="tags", help="output name of the tags")
    output.add_argument("--description-column", default="generated_description", help="output name of Tg")
    return parser


def _check_arguments(args) -> None:
    if not (args.captioner or args.tagger or args.merger):
        raise ValueError("nothing to do: give at least one of --captioner, --tagger, --merger")
    orphans = {
        "--caption-prompt": (args.caption_prompt, args.captioner, "--captioner"),
        "--tag-vocabulary": (args.tag_vocabulary, args.tagger, "--tagger"),
        "--prompt-file": (args.prompt_file, args.merger, "--merger"),
        "--chat-template": (args.chat_template, args.merger, "--merger"),
    }
    for option, (value, owner, owner_option) in orphans.items():
        if value is not None and not owner:
            raise ValueError(f"{option} needs {owner_option}")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    for option, value in (("--batch-size", args.batch_size), ("--shard-size", args.shard_size)):
        if value < 1:
            raise ValueError(f"{option} must be positive, got {value}")
    if args.max_samples is not None and args.max_samples < 1:
        raise ValueError(f"--max-samples must be positive, got {args.max_samples}")


def build_pipeline(args):
    """The `DescriptionPipeline` the arguments describe (models are loaded later, when there is work)."""
    from pathlib import Path

    from ..evaluation.zero_shot import read_string_list
    from .captioning import Captioner
    from .merging import DescriptionMerger
    from .pipeline import DescriptionPipeline, OutputColumns
    from .prompts import MergePrompt
    from .tagging import ClassifierTagger, ZeroShotTagger

    common = {"device": args.device, "dtype": args.dtype, "trust_remote_code": args.trust_remote_code}
    captioner = tagger = merger = None
    if args.captioner:
        captioner = Captioner(
            args.captioner, prompt=args.caption_prompt, max_new_tokens=args.caption_max_new_tokens, **common
        )
    if args.tagger:
        limits = {"top_k": args.tag_top_k}
        if args.tag_vocabulary:
            path = Path(args.tag_vocabulary).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"--tag-vocabulary {args.tag_vocabulary}: no such file")
            vocabulary = read_string_list([str(path)], "--tag-vocabulary")
            if args.tag_threshold is not None:
                limits["threshold"] = args.tag_threshold
            elif args.tag_score == "cosine":
                limits["threshold"] = 0.25
            tagger = ZeroShotTagger(
                args.tagger,
                vocabulary=vocabulary,
                template=args.tag_template,
                score=args.tag_score,
                **limits,
                **common,
            )
        else:
            if args.tag_threshold is not None:
                limits["threshold"] = args.tag_threshold
            tagger = ClassifierTagger(args.tagger, **limits, **common)
    if args.merger:
        prompt = MergePrompt.from_file(args.prompt_file) if args.prompt_file else MergePrompt()
        chat_template = None
        if args.chat_template:
            template_path = Path(args.chat_template).expanduser()
            if not template_path.is_file():
                raise FileNotFoundError(f"--chat-template {args.chat_template}: no such file")
            chat_template = template_path.read_text(encoding="utf-8")
        merger = DescriptionMerger(
            args.merger, prompt=prompt, max_new_tokens=args.max_new_tokens, chat_template=chat_template, **common
        )
    columns = OutputColumns(args.raw_text_column, args.caption_column, args.tags_column, args.description_column)
    return DescriptionPipeline(
        captioner,
        tagger,
        merger,
        image_column=args.image_column,
        text_column=None if args.no_raw_text else args.text_column,
        columns=columns,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        keep_shards=args.keep_shards,
    )


def _load_models(pipeline, args) -> None:
    """Load every model now, before the output directory is claimed: a model that cannot be loaded (a wrong
    name, a bad --device) is then a one-line error and leaves no run behind that would need --overwrite."""
    from ..evaluation.cli import cli_message, model_load_error

    for option, stage in (("--captioner", pipeline.captioner), ("--tagger", pipeline.tagger),
                          ("--merger", pipeline.merger)):  # fmt: skip
        if stage is None:
            continue
        try:
            stage.load()
        except ValueError as error:
            if str(error).startswith("`model`"):  # already names the model: as this stage's option
                raise ValueError(cli_message(str(error), {"model": option})) from None
            raise model_load_error(option, stage.source or type(stage.model).__name__, error) from None
        except (OSError, RuntimeError) as error:  # missing files, unknown Hub repository, offline, device errors
            raise model_load_error(option, stage.source or type(stage.model).__name__, error) from None


def _lock(output: str):
    """An exclusive lock on --output for this run (a hidden `.NAME.lock` beside it): a second run on the same
    output is refused at once instead of failing half-way on the first one's files."""
    from filelock import FileLock, Timeout

    path = Path(output).expanduser().absolute()
    from ..evaluation.cli import check_directory_option

    check_directory_option("--output", path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path.parent / f".{path.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ValueError(
            f"--output {output} is in use by another rwkv-clip-data run (lock {lock.lock_file}); wait for it to "
            "finish, or give another --output"
        ) from None
    return lock


def _is_complete(output: str) -> bool:
    from .pipeline import FINAL

    return (Path(output).expanduser() / FINAL).is_dir()


def run(argv: list[str] | None = None):
    """Parse `argv` and run the pipeline. Returns the final `datasets.Dataset`."""
    from ..evaluation.cli import check_device
    from ..evaluation.data import load_eval_dataset

    args = build_parser().parse_args(argv)
    _check_arguments(args)
    check_device(args.device)
    pipeline = build_pipeline(args)
    data = load_eval_dataset(args.dataset, args.split, config_name=args.dataset_config).dataset
    if args.max_samples is not None and args.max_samples < len(data):
        data = data.select(range(args.max_samples))
    lock = _lock(args.output)
    try:
        if not _is_complete(args.output) or args.overwrite:
            pipeline.validate(data)  # the cheap checks first: a wrong column before minutes of model loading
            for stage in pipeline.stages:
                stage.precheck()
            _load_models(pipeline, args)
        result = pipeline.run(data, args.output, resume=args.resume, overwrite=args.overwrite)
    finally:
        lock.release()
    final = f"{args.output.rstrip('/')}/dataset"
    print(f"{len(result)} rows, columns {result.column_names}, written to {final}")
    captions = [c for c in pipeline.columns.caption_columns if c in result.column_names]
    print(
        f"train on it: dataset = datasets.load_from_disk({final!r}); dataset.set_transform(ContrastiveTransform("
        f"processor, image_column={args.image_column!r}, caption_columns={captions!r}))"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    """Console entry point of `rwkv-clip-data`; returns the exit status."""
    from ..evaluation.cli import console_entry, parser_flags

    # the library's names of what the command line calls otherwise
    renamed = {"top_k": "--tag-top-k", "output_dir": "--output", "columns.raw_text": "--raw-text-column"}
    return console_entry(run, argv, logger_name="rwkv_clip_hf.data", flags={**parser_flags(build_parser()), **renamed})


if __name__ == "__main__":
    sys.exit(main())
