"""Image classification with the RWKV-CLIP vision tower: linear probing or full fine-tuning under Trainer.

Quick run on CPU (generated shapes, labels = the shape, or with `--shapes_label color|pair|shape_or_color|
shape_and_color` the colour, the colour x shape pair, the shape of half of the images and the colour of the others,
or both the shape and the colour of every image (multi-label); the tower of a model trained by train_contrastive.py):

    python examples/finetune_classification.py --output_dir runs/cls --model_name_or_path runs/tiny \
        --generate_shapes 1000 --num_train_epochs 3 --per_device_train_batch_size 64

Linear probe (frozen tower, only the linear head trains):

    python examples/finetune_classification.py ... --linear_probe --learning_rate 1e-2 --weight_decay 0

Your data: any `datasets` dataset with an image column and an integer (ClassLabel) label column, or for
multi-label classification a column of lists of classes (`Sequence(ClassLabel)`; sigmoid and binary cross-entropy,
accuracy = rows whose every label is right):

    python examples/finetune_classification.py --output_dir runs/cifar --model_name_or_path path/to/rwkv-clip-b32 \
        --dataset_name uoft-cs/cifar10 --image_column img --label_column label --eval_split test

Several processes (data-parallel; gloo on a machine without CUDA): `torchrun --nproc_per_node 2
examples/finetune_classification.py ...` or `accelerate launch --multi_gpu --num_processes 2
examples/finetune_classification.py ...`.
Accuracy (`evaluate`'s accuracy metric) is reported on the evaluation split after every epoch.
"""

import logging
import sys
from dataclasses import dataclass, field

import datasets
import transformers
from transformers import AutoImageProcessor, HfArgumentParser, TrainingArguments, set_seed

import rwkv_clip_hf  # noqa: F401
from rwkv_clip_hf import RWKVCLIPForImageClassification, RWKVCLIPImageProcessor
from rwkv_clip_hf.evaluation.cli import cli_message
from rwkv_clip_hf.evaluation.data import load_eval_dataset
from rwkv_clip_hf.processing_rwkv_clip import check_processor_matches_model
from rwkv_clip_hf.shapes import COLORS, SHAPES, held_out_pairs, make_shapes_dataset, pair_name
from rwkv_clip_hf.training import (
    ClassificationTransform,
    NonFiniteTrainingCallback,
    NonFiniteTrainingError,
    RWKVCLIPTrainer,
    classification_collator,
    compute_accuracy,
    machine_training_defaults,
)

logger = logging.getLogger(__name__)

DEFAULTS = dict(
    learning_rate=1e-4,
    weight_decay=0.05,
    lr_scheduler_type="cosine",
    warmup_steps=0.1,
    max_grad_norm=1.0,
    remove_unused_columns=False,
    eval_strategy="epoch",
    save_strategy="epoch",
    save_total_limit=1,
    logging_steps=10,
    report_to="none",
    load_best_model_at_end=True,
    metric_for_best_model="accuracy",
)


@dataclass
class Arguments:
    model_name_or_path: str = field(
        metadata={"help": "A saved RWKV-CLIP (full model or classifier) directory or Hub id."}
    )
    dataset_name: str | None = field(default=None)
    dataset_config_name: str | None = field(default=None)
    generate_shapes: int | None = field(default=None, metadata={"help": "Use N generated shape images instead."})
    exclude_held_out_pairs: bool = field(
        default=False, metadata={"help": "With --generate_shapes: leave rwkv_clip_hf.shapes.held_out_pairs() out."}
    )
    shapes_random_colors: float = field(
        default=0.0,
        metadata={
            "help": "With --generate_shapes: the fraction of scenes drawn in random colours of their colour "
            "name's range instead of its exact value (make_shapes_dataset(random_colors=...))."
        },
    )
    shapes_label: str = field(
        default="shape",
        metadata={
            "help": "With --generate_shapes: what the classes are: the shape; the colour; the colour x shape pair "
            "(all 48 are classes, also the held-out ones that --exclude_held_out_pairs leaves out); or "
            "shape_or_color: 14 classes, the 6 shapes and the 8 colours, every other image labelled by its "
            "shape, the rest by its colour, so that one head learns both apart (held-back accuracy is then at "
            "most about one half: the model cannot know which of the two an image was labelled with); or "
            "shape_and_color: the same 14 classes as multi-label classification, every image labelled with "
            "both its shape and its colour.",
            "choices": ["shape", "color", "pair", "shape_or_color", "shape_and_color"],
        },
    )
    train_split: str = field(default="train")
    eval_split: str | None = field(
        default=None, metadata={"help": "Default: hold out --validation_fraction of train."}
    )
    validation_fraction: float = field(default=0.2)
    image_column: str = field(default="image")
    label_column: str = field(default="label")
    linear_probe: bool = field(default=False, metadata={"help": "Freeze the vision tower; train only the head."})
    max_train_samples: int | None = field(default=None)


def shapes_label(kind: str, index: int, color: str, shape: str) -> str | list[str]:
    """The class name of generated row `index` for `--shapes_label kind` (two names for shape_and_color)."""
    if kind == "shape_and_color":
        return [shape, color]
    if kind == "color" or (kind == "shape_or_color" and index % 2):
        return color
    return pair_name(color, shape) if kind == "pair" else shape


def load_split(name: str, split: str, config_name: str | None, split_option: str):
    """`(dataset, has_splits)`: one split of a Hub dataset or a local one (a `save_to_disk` Dataset or DatasetDict,
    data files, an image folder), as `rwkv-clip-eval` loads it; a message naming the option, not a traceback."""
    try:
        data = load_eval_dataset(name, split, config_name=config_name)
    except (ValueError, OSError) as error:  # FileNotFoundError and datasets' DatasetNotFoundError are OSErrors
        message = cli_message(str(error), {"dataset": "--dataset_name", "split": split_option})
        raise SystemExit(f"error: {message}") from None
    return data.dataset, data.source["split"] is not None


def load_splits(args: Arguments, seed: int):
    if args.generate_shapes:
        excluded = held_out_pairs() if args.exclude_held_out_pairs else ()
        data = make_shapes_dataset(
            args.generate_shapes, seed=seed, exclude_pairs=excluded, random_colors=args.shapes_random_colors
        )
        names = {
            "shape": SHAPES,
            "color": list(COLORS),
            "pair": [pair_name(c, s) for c in COLORS for s in SHAPES],
            "shape_or_color": SHAPES + list(COLORS),
            "shape_and_color": SHAPES + list(COLORS),
        }[args.shapes_label]
        labels = [
            shapes_label(args.shapes_label, i, c, s) for i, (c, s) in enumerate(zip(data["color"], data["shape"]))
        ]
        feature = datasets.ClassLabel(names=names)
        if args.shapes_label == "shape_and_color":
            labels, feature = [[names.index(n) for n in row] for row in labels], datasets.Sequence(feature)
        else:
            labels = [names.index(n) for n in labels]
        data = data.remove_columns("label").add_column("label", labels, feature=feature)
        split = data.train_test_split(test_size=args.validation_fraction, seed=seed)
        return split["train"], split["test"]
    if not args.dataset_name:
        raise SystemExit("give --dataset_name or --generate_shapes N")
    train, has_splits = load_split(args.dataset_name, args.train_split, args.dataset_config_name, "--train_split")
    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.eval_split:
        if not has_splits:
            raise SystemExit(
                f"error: --dataset_name {args.dataset_name} is a single dataset without splits: drop --eval_split "
                "(--validation_fraction of it is then held out for evaluation)"
            )
        return train, load_split(args.dataset_name, args.eval_split, args.dataset_config_name, "--eval_split")[0]
    split = train.train_test_split(test_size=args.validation_fraction, seed=seed)
    return split["train"], split["test"]


def parse_arguments(argv: list[str] | None = None):
    parser = HfArgumentParser((Arguments, TrainingArguments))
    parser.set_defaults(**DEFAULTS)
    parser.set_defaults(**machine_training_defaults())  # no pinned memory / use_cpu without CUDA
    return parser.parse_args_into_dataclasses(args=argv)


def main():
    args, training_args = parse_arguments()
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout
    )
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    train, evaluation = load_splits(args, training_args.seed)
    for column in (args.image_column, args.label_column):
        if column not in train.column_names:
            raise SystemExit(f"column {column!r} not in the dataset (it has {train.column_names})")
    feature = train.features[args.label_column]
    multi_label = isinstance(feature, (datasets.List, datasets.LargeList, list))
    if multi_label:  # a list of classes per image
        feature = feature[0] if isinstance(feature, list) else feature.feature
    if isinstance(feature, datasets.ClassLabel):
        names = feature.names
    elif multi_label:
        names = sorted({c for row in train[args.label_column] for c in row})
    else:
        names = sorted(set(train[args.label_column]))
    if not isinstance(feature, datasets.ClassLabel) and names != list(range(len(names))):
        raise SystemExit(
            f"label column {args.label_column!r} must be a ClassLabel (or a list of ClassLabel) or hold the integers "
            f"0..N-1; it holds {names[:5]}"
        )
    model = RWKVCLIPForImageClassification.from_pretrained(
        args.model_name_or_path,
        problem_type="multi_label_classification" if multi_label else "single_label_classification",
        num_labels=len(names),
        id2label=dict(enumerate(map(str, names))),
        label2id={str(n): i for i, n in enumerate(names)},
    )
    if args.linear_probe:
        model.vision_model.requires_grad_(False)
    try:
        image_processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
        check_processor_matches_model(image_processor, model)  # a warning when its crop is not the model's size
    except OSError:
        size = model.config.vision_config.image_size
        image_processor = RWKVCLIPImageProcessor(size={"shortest_edge": size}, crop_size=size)
    transform = ClassificationTransform(image_processor, args.image_column, args.label_column, num_labels=len(names))
    train.set_transform(transform)
    evaluation.set_transform(transform)

    trainer = RWKVCLIPTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=classification_collator,
        compute_metrics=compute_accuracy,
        callbacks=[NonFiniteTrainingCallback()],
    )
    try:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except NonFiniteTrainingError as error:
        raise SystemExit(f"error: {error}") from None
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)  # eval_results.json in --output_dir
    trainer.save_model()
    if trainer.is_world_process_zero():
        image_processor.save_pretrained(training_args.output_dir)
    logger.info("eval accuracy %.4f", metrics["eval_accuracy"])


if __name__ == "__main__":
    main()
