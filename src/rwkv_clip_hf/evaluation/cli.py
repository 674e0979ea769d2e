"""`rwkv-clip-eval`: the paper's evaluation protocols on any `datasets` dataset, for any CLIP-API model.

    rwkv-clip-eval zero-shot    --model DIR_OR_HUB_ID --dataset uoft-cs/cifar10 --image-column img
    rwkv-clip-eval retrieval    --model DIR_OR_HUB_ID --dataset nlphuji/flickr_1k_test_image_text_retrieval
    rwkv-clip-eval linear-probe --model DIR_OR_HUB_ID --dataset uoft-cs/cifar10 --image-column img

Each run writes `<output-dir>/<name>.json` and `<name>.md` and prints the markdown table. Image and text
features are cached (see --cache-dir), so a second run with the same model, data and processor skips the
encoding.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from ..processing_rwkv_clip import check_processor_matches_model
from .data import labels_as_ints, load_eval_dataset, require_column
from .features import (
    DTYPES,
    FeatureCache,
    FeatureExtractor,
    default_cache_dir,
    load_model_and_processor,
    model_fingerprint,
)
from .report import plot_per_class_accuracy, plot_similarity_heatmap, results_markdown, write_report

logger = logging.getLogger("rwkv_clip_hf.evaluation")


def _common(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", required=True, help="a local directory or a Hub id (RWKV-CLIP, transformers CLIPModel, ...)"
    )
    model.add_argument("--revision", default=None, help="Hub revision of --model")
    model.add_argument("--trust-remote-code", action="store_true")
    model.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    model.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    model.add_argument("--batch-size", type=int, default=64, help="images per batch (texts: 4x)")

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        required=True,
        help="Hub dataset id, a save_to_disk directory, an imagefolder / parquet directory, or one file",
    )
    data.add_argument("--dataset-config", default=None, help="configuration name of a Hub dataset")
    data.add_argument("--dataset-revision", default=None)
    data.add_argument("--split", default="test", help="the evaluated split (default: test)")
    data.add_argument("--max-samples", type=int, default=None, help="evaluate a seeded random subset of this size")
    data.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="COLUMN=VALUE",
        help="keep rows whose COLUMN equals VALUE (repeatable)",
    )
    data.add_argument("--seed", type=int, default=0, help="seed of --max-samples and of the linear probe")
    data.add_argument("--image-column", default="image")
    data.add_argument("--datasets-cache-dir", default=None, help="cache directory of `datasets`")

    output = parser.add_argument_group("output")
    output.add_argument("--output-dir", default="eval_results")
    output.add_argument("--name", default=None, help="file name stem of the results (default: from the arguments)")
    output.add_argument("--plots", action="store_true", help="also write PNG plots (needs matplotlib)")
    output.add_argument("--cache-dir", default=None, help=f"feature cache (default: {default_cache_dir()})")
    output.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `rwkv-clip-eval`."""
    parser = argparse.ArgumentParser(
        prog="rwkv-clip-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="protocol", required=True)

    zero_shot = commands.add_parser("zero-shot", help="zero-shot classification with prompt templates")
    _common(zero_shot)
    zero_shot.add_argument("--label-column", default="label")
    zero_shot.add_argument(
        "--benchmark",
        default=None,
        help="key of the bundled templates/class names (cifar10, imagenet, pets, ...); "
        "default: inferred from --dataset",
    )
    zero_shot.add_argument(
        "--classnames",
        nargs="+",
        default=None,
        help="a JSON file (a list, or a dict keyed by benchmark), a text file (one per line), or the names",
    )
    zero_shot.add_argument(
        "--templates",
        nargs="+",
        default=None,
        help="a JSON file, a text file, or the templates themselves, each with one '{}'",
    )
    zero_shot.add_argument(
        "--metric",
        default="auto",
        choices=["auto", "top1", "mean_per_class"],
        help="auto: mean per-class accuracy for caltech101/aircraft/flowers/pets, else top-1",
    )

    retrieval = commands.add_parser("retrieval", help="image-text retrieval recall@1/5/10")
    _common(retrieval)
    retrieval.add_argument("--caption-column", default="caption", help="a caption or a list of captions per image")

    probe = commands.add_parser("linear-probe", help="logistic regression on frozen image features")
    _common(probe)
    probe.add_argument("--label-column", default="label")
    probe.add_argument("--train-split", default="train")
    probe.add_argument("--val-split", default=None, help="choose C on this split (default: hold out part of train)")
    probe.add_argument("--val-fraction", type=float, default=0.2)
    probe.add_argument("--max-train-samples", type=int, default=None, help="subset of train (and of --val-split)")
    probe.add_argument(
        "--c-values",
        type=float,
        nargs="+",
        default=None,
        help="grid of C values (default: CLIP's search over 1e-6 .. 1e6)",
    )
    probe.add_argument("--max-iter", type=int, default=1000)
    return parser


def check_device(device: str | None, option: str = "--device") -> None:
    """Raise a `ValueError` for a device string torch does not know, or a CUDA device on a machine without one."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{option} {device!r} is not a device; use cpu, cuda, cuda:1, mps, ...") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{option} {device}: CUDA is not available on this machine (torch {torch.__version__}); "
                "use --device cpu"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{option} {device}: MPS is not available on this machine; use --device cpu")


def check_directory_option(option: str, path: str | Path | None) -> None:
    """Raise a `ValueError` when `path` (to be created as a directory) or one of its parents is a file."""
    if path is None:
        return
    path = Path(path).expanduser()
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "is a file" if candidate == path else f"is inside {candidate}, which is a file"
                raise ValueError(f"{option} {path} {where}, not a directory")
            return


def model_load_error(option: str, name: str, error: BaseException) -> ValueError:
    """A one-line `ValueError` for a model that cannot be loaded: a missing local directory says so (not the
    Hub's "Repo id must use alphanumeric chars"), other failures give the loader's first line."""
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or path.is_absolute()
    if looks_local and not path.exists():
        return ValueError(f"{option} {name}: no such directory")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return ValueError(f"{option} {name}: cannot be loaded ({type(error).__name__}: {lines[0] if lines else ''})")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text).rstrip("/").split("/")[-1]).strip("-") or "x"


def _load(args, split: str | None, max_samples: int | None):
    return load_eval_dataset(
        args.dataset,
        split,
        config_name=args.dataset_config,
        revision=args.dataset_revision,
        max_samples=max_samples,
        filters=args.filter,
        seed=args.seed,
        cache_dir=args.datasets_cache_dir,
    )


def run(argv: list[str] | None = None) -> dict:
    """Parse `argv`, run the protocol, write the reports. Returns the result dict (also written as JSON)."""
    from .linear_probe import linear_probe
    from .retrieval import evaluate_retrieval
    from .zero_shot import evaluate_zero_shot, read_string_list, resolve_benchmark

    args = build_parser().parse_args(argv)
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    check_device(args.device)
    check_directory_option("--output-dir", args.output_dir)
    if not args.no_cache:
        check_directory_option("--cache-dir", args.cache_dir or default_cache_dir())
    # The data first: a wrong split or column should fail before the model is loaded.
    splits = {"test": _load(args, args.split, args.max_samples)}
    if args.protocol == "linear-probe":
        splits["train"] = _load(args, args.train_split, args.max_train_samples)
        if args.val_split:
            splits["val"] = _load(args, args.val_split, args.max_train_samples)
        if splits["train"].fingerprint == splits["test"].fingerprint:
            raise ValueError(
                f"--train-split {args.train_split!r} and --split {args.split!r} are the same rows of {args.dataset}"
            )
        labels = {part: labels_as_ints(d.dataset, args.label_column, d.source) for part, d in splits.items()}
    for data in splits.values():
        require_column(data.dataset, args.image_column, "--image-column", data.source)

    try:
        model, processor = load_model_and_processor(
            args.model,
            device=args.device,
            dtype=args.dtype,
            revision=args.revision,
            trust_remote_code=args.trust_remote_code,
        )
    except ValueError as error:
        if str(error).startswith("--"):  # already names the option
            raise
        raise model_load_error("--model", args.model, error) from None
    except OSError as error:  # missing files, unknown Hub repository, offline
        raise model_load_error("--model", args.model, error) from None
    check_processor_matches_model(processor, model)
    cache = FeatureCache(None if args.no_cache else (args.cache_dir or default_cache_dir()))
    model_key = model_fingerprint(model, source=args.model, revision=args.revision, dtype=args.dtype)
    extractor = FeatureExtractor(model, processor, model_key, cache, args.batch_size)
    name = args.name or "_".join(_slug(p) for p in (args.protocol, args.model, args.dataset, args.split))
    output_dir = Path(args.output_dir)
    title = f"{_slug(args.model)} on {_slug(args.dataset)}"
    plots = {}
    data = splits["test"]

    if args.protocol == "zero-shot":
        benchmark = resolve_benchmark(args.benchmark or args.dataset) or args.benchmark
        result = evaluate_zero_shot(
            extractor,
            data,
            image_column=args.image_column,
            label_column=args.label_column,
            benchmark=benchmark,
            classnames=read_string_list(args.classnames, "--classnames", benchmark),
            templates=read_string_list(args.templates, "--templates", benchmark),
            metric=args.metric,
        )
        if args.plots:
            output_dir.mkdir(parents=True, exist_ok=True)
            plots["per_class_accuracy"] = plot_per_class_accuracy(
                result["per_class_accuracy"], result["classnames"], output_dir / f"{name}_per_class.png", title
            )
    elif args.protocol == "retrieval":
        result, similarity, owner = evaluate_retrieval(
            extractor, data, image_column=args.image_column, caption_column=args.caption_column
        )
        if args.plots:
            output_dir.mkdir(parents=True, exist_ok=True)
            plots["similarity"] = plot_similarity_heatmap(
                similarity.numpy(), owner, output_dir / f"{name}_similarity.png", title=title
            )
    else:
        features = {part: extractor.image_features(d, args.image_column).numpy() for part, d in splits.items()}
        result = linear_probe(
            features["train"],
            labels["train"],
            features["test"],
            labels["test"],
            val_features=features.get("val"),
            val_labels=labels.get("val"),
            val_fraction=args.val_fraction,
            c_values=args.c_values,
            max_iter=args.max_iter,
            seed=args.seed,
        )

    result = {
        **result,
        "model": args.model,
        "dataset": args.dataset,
        "split": data.source.get("split"),
        "data": data.source,
        "arguments": vars(args),
    }
    written = write_report(result, output_dir, name)
    result["files"] = {k: str(v) for k, v in {**written, **plots}.items() if v is not None}
    print(results_markdown(result))
    logger.info("results written to %s", ", ".join(result["files"].values()))
    return result


def main(argv: list[str] | None = None) -> int:
    """Console entry point of `rwkv-clip-eval`; returns the exit status."""
    return console_entry(run, argv, flags={**parser_flags(build_parser()), "filters": "--filter"})


def parser_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's destination -> its long flag (e.g. "label_column" -> "--label-column"), sub-commands too."""
    flags = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                flags.update(parser_flags(subparser))
        elif action.option_strings and action.dest != "help":
            flags[action.dest] = max(action.option_strings, key=len)
    return flags


def cli_message(message: str, flags: dict[str, str]) -> str:
    """A library message for a command-line user: the library names its arguments in backticks (`label_column`,
    `overwrite=True` for a switch); those in `flags` (argument -> flag) become the command line's flags."""
    return re.sub(r"`([A-Za-z_][\w.]*)(?:=True)?`", lambda match: flags.get(match.group(1), match.group(0)), message)


class _FlagNames(logging.Filter):
    """Rewrites the package's log messages with `cli_message` (attached to the handlers while a CLI runs)."""

    def __init__(self, flags: dict[str, str]):
        super().__init__()
        self.flags = flags

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("rwkv_clip_hf") and "`" in str(record.msg):
            record.msg, record.args = cli_message(record.getMessage(), self.flags), None
        return True


def console_entry(
    run_fn,
    argv: list[str] | None = None,
    logger_name: str = "rwkv_clip_hf.evaluation",
    flags: dict[str, str] | None = None,
) -> int:
    """Runs a CLI's `run(argv)` with INFO logging; a `ValueError` or `OSError` (a missing or unwritable file, a
    full disk) is logged under `logger_name` as one error line and exit status 2 instead of a traceback. The
    library's argument names in messages and log lines are given as the CLI's `flags` (`cli_message`)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("rwkv_clip_hf").setLevel(logging.INFO)
    flags = flags or {}
    handlers = list(logging.getLogger().handlers)
    translate = _FlagNames(flags)
    for handler in handlers:
        handler.addFilter(translate)
    try:
        run_fn(argv)
    except ValueError as error:
        logging.getLogger(logger_name).error("%s", cli_message(str(error), flags))
        return 2
    except OSError as error:
        detail = f"{error.strerror} ({error.filename})" if error.strerror and error.filename else str(error)
        logging.getLogger(logger_name).error("%s", cli_message(detail, flags) or type(error).__name__)
        return 2
    finally:
        for handler in handlers:
            handler.removeFilter(translate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
