"""Contrastive training / fine-tuning of RWKV-CLIP with `transformers.Trainer`.

Quick run on CPU (a generated shapes dataset, a tiny model, a few minutes):

    python examples/train_contrastive.py --output_dir runs/tiny --generate_shapes 2000 \
        --config_name tiny --num_train_epochs 3 --per_device_train_batch_size 64

Fine-tune a converted checkpoint on your own data (image column + one or more caption columns; with several,
each sample uses one of them per step, uniformly unless --caption_probabilities says otherwise, as the paper
does with raw text / synthetic caption / generated description):

    python examples/train_contrastive.py --output_dir runs/ft --model_name_or_path path/to/rwkv-clip-b32 \
        --dataset_name my/dataset --image_column image --caption_columns raw_text caption description \
        --learning_rate 1e-5 --per_device_train_batch_size 128

Hard negatives: batches made of whole groups of rows that share a column's value, e.g. generated scenes of
6 images that differ in shape only (the bundled default model uses scenes of 3):

    python examples/train_contrastive.py --output_dir runs/scenes --generate_shapes 2000 --shapes_scene_size 6 \
        --group_by_column scene --config_name tiny --num_train_epochs 3 --per_device_train_batch_size 64

Image tower pre-trained on labels first (a classifier saved by finetune_classification.py, same vision
architecture), text tower from scratch (how the bundled default model is trained, with `--freeze_vision_model True`:
the image tower then stays the classifier's):

    python examples/train_contrastive.py --output_dir runs/two-stage --generate_shapes 2000 --config_name tiny \
        --vision_model_name_or_path runs/cls --num_train_epochs 3 --per_device_train_batch_size 64

Several processes, data-parallel (the contrastive loss is then over the global batch of all ranks; rank 0 writes
--output_dir). On a machine without CUDA the processes use gloo (`use_cpu` is set for them). `accelerate launch`
starts several processes without an `accelerate config` only with --multi_gpu (also on CPUs):

    torchrun --nproc_per_node 2 examples/train_contrastive.py --output_dir runs/ddp --generate_shapes 2000 \
        --config_name tiny
    accelerate launch --multi_gpu --num_processes 2 examples/train_contrastive.py --output_dir runs/ddp \
        --generate_shapes 2000 --config_name tiny

Defaults follow the paper's recipe (AdamW betas (0.9, 0.98), eps 1e-6, weight decay 0.2, lr 1e-3, 10 %
warmup then cosine, gradient clipping 1.0); every `TrainingArguments` flag can override them. The model and
its processor are saved to --output_dir at the end.
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
import transformers
from transformers import AutoModel, AutoProcessor, HfArgumentParser, TrainingArguments, set_seed

import rwkv_clip_hf  # noqa: F401  (registers RWKV-CLIP with the Auto classes)
from rwkv_clip_hf import RWKVCLIPConfig, RWKVCLIPForImageClassification, RWKVCLIPModel, RWKVCLIPProcessor
from rwkv_clip_hf.evaluation.cli import cli_message
from rwkv_clip_hf.evaluation.data import load_eval_dataset
from rwkv_clip_hf.processing_rwkv_clip import check_processor_matches_model
from rwkv_clip_hf.shapes import held_out_pairs, make_shapes_dataset
from rwkv_clip_hf.training import (
    ContrastiveCollator,
    ContrastiveTransform,
    NonFiniteTrainingCallback,
    NonFiniteTrainingError,
    RWKVCLIPTrainer,
    machine_training_defaults,
    paper_training_defaults,
)

logger = logging.getLogger(__name__)

# A small architecture for CPU runs (the bundled default model's family): 2 + 2 blocks of width 128.
TINY_CONFIG = {
    "text_config": {
        "hidden_size": 128,
        "head_size": 32,
        "num_hidden_layers": 2,
        "intermediate_size": 256,
        "mix_lora_rank": 8,
        "decay_lora_rank": 16,
    },
    "vision_config": {
        "hidden_size": 128,
        "head_size": 32,
        "num_hidden_layers": 2,
        "intermediate_size": 256,
        "mix_lora_rank": 8,
        "decay_lora_rank": 16,
        "image_size": 64,
        "patch_size": 8,
        "drop_path_rate": 0.0,
    },
}

# The paper's recipe (docs/architecture.md §9, `paper_training_arguments`), as defaults of the TrainingArguments
# flags, with this script's logging and checkpointing.
PAPER_DEFAULTS = {**paper_training_defaults(), "logging_steps": 10, "save_strategy": "epoch", "save_total_limit": 2}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A saved RWKV-CLIP directory or Hub id to fine-tune."}
    )
    config_name: str | None = field(
        default=None,
        metadata={"help": "Train from scratch: 'tiny', a preset ('B/32', 'B/16') or a config.json path."},
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": 'JSON merged into the config, e.g. \'{"vision_config": {"image_size": 96}}\'.'}
    )
    vision_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Train from scratch, but start the image tower from this checkpoint: a classifier saved by "
            "finetune_classification.py or any RWKV-CLIP directory (its vision architecture must match the config)."
        },
    )
    freeze_vision_model: bool = field(
        default=False,
        metadata={
            "help": "Keep the image tower fixed (locked-image tuning, as in LiT): only the text tower and the "
            "temperature train (RWKV-CLIP has no projection layers). Useful with --vision_model_name_or_path."
        },
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub id or local path of a datasets dataset."})
    dataset_config_name: str | None = field(default=None)
    train_split: str = field(default="train")
    generate_shapes: int | None = field(
        default=None, metadata={"help": "Instead of --dataset_name: generate this many captioned shape images."}
    )
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
    shapes_scene_size: int = field(
        default=1,
        metadata={
            "help": "With --generate_shapes: scenes of up to this many images that differ in shape only "
            "(a 'scene' column; combine with --group_by_column scene for hard-negative batches)."
        },
    )
    group_by_column: str | None = field(
        default=None, metadata={"help": "Keep rows that share this column's value in one batch (hard negatives)."}
    )
    contrastive_micro_batches: int = field(
        default=1,
        metadata={
            "help": "Split each batch into this many micro-batches with every negative kept (GradCache): "
            "the gradients of the whole batch with the memory of one micro-batch. Use it instead of "
            "--gradient_accumulation_steps, which gives each micro-batch only its own negatives."
        },
    )
    image_column: str = field(default="image")
    caption_columns: list[str] = field(default_factory=lambda: ["caption"])
    caption_probabilities: list[float] | None = field(default=None)
    validation_fraction: float = field(default=0.05, metadata={"help": "Held out for evaluation (0 disables)."})
    max_train_samples: int | None = field(default=None)


# The vision-config fields that define the tower's weights and computation (the rest are run-time settings).
VISION_ARCHITECTURE_FIELDS = (
    "hidden_size",
    "head_size",
    "num_hidden_layers",
    "intermediate_size",
    "mix_lora_rank",
    "decay_lora_rank",
    "image_size",
    "patch_size",
    "num_channels",
    "token_shift",
    "layer_norm_eps",
    "group_norm_eps",
)


def load_vision_tower(model: RWKVCLIPModel, path: str) -> None:
    """Copy the image tower of a saved classifier (`RWKVCLIPForImageClassification`) or RWKV-CLIP model into
    `model`, after checking that the two vision architectures agree."""
    source, info = RWKVCLIPForImageClassification.from_pretrained(path, output_loading_info=True)
    missing = [k for k in info["missing_keys"] if k.startswith("vision_model.")]
    if missing:
        raise SystemExit(
            f"--vision_model_name_or_path {path}: no image-tower weights for {missing[:5]} "
            f"({len(missing)} missing); give a classifier or RWKV-CLIP checkpoint"
        )
    ours, theirs = model.config.vision_config, source.config.vision_config
    differ = [
        f"{name}: config {getattr(ours, name)!r}, checkpoint {getattr(theirs, name)!r}"
        for name in VISION_ARCHITECTURE_FIELDS
        if getattr(ours, name) != getattr(theirs, name)
    ]
    if differ:
        raise SystemExit(
            f"--vision_model_name_or_path {path}: its vision tower differs from the model's config ("
            + "; ".join(differ)
            + "); make --config_name/--config_overrides match it"
        )
    model.vision_model.load_state_dict(source.vision_model.state_dict())
    logger.info("image tower initialised from %s", path)


def build_model(model_args: ModelArguments) -> RWKVCLIPModel:
    if model_args.model_name_or_path:
        if model_args.vision_model_name_or_path:
            raise SystemExit(
                "--vision_model_name_or_path starts a model from scratch; it does not combine with "
                "--model_name_or_path"
            )
        return AutoModel.from_pretrained(model_args.model_name_or_path)
    name = model_args.config_name or "tiny"
    if name == "tiny":
        config = RWKVCLIPConfig(**json.loads(json.dumps(TINY_CONFIG)))
    elif name.endswith(".json") or os.path.isdir(name):
        config = RWKVCLIPConfig.from_pretrained(name)
    else:
        config = RWKVCLIPConfig.from_preset(name)
    if model_args.config_overrides:
        overrides = json.loads(model_args.config_overrides)
        merged = config.to_dict()
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key].update(value)
            else:
                merged[key] = value
        config = RWKVCLIPConfig.from_dict(merged)
    model = RWKVCLIPModel(config)
    if model_args.vision_model_name_or_path:
        load_vision_tower(model, model_args.vision_model_name_or_path)
    return model


def load_split(name: str, split: str, config_name: str | None, split_option: str):
    """One split of a Hub dataset or a local one (a `save_to_disk` Dataset or DatasetDict, data files, an image
    folder), as `rwkv-clip-eval` loads it; a message naming the option instead of a traceback."""
    try:
        return load_eval_dataset(name, split, config_name=config_name).dataset
    except (ValueError, OSError) as error:  # FileNotFoundError and datasets' DatasetNotFoundError are OSErrors
        message = cli_message(str(error), {"dataset": "--dataset_name", "split": split_option})
        raise SystemExit(f"error: {message}") from None


def load_data(data_args: DataArguments, image_size: int, seed: int):
    if data_args.generate_shapes:
        excluded = held_out_pairs() if data_args.exclude_held_out_pairs else ()
        dataset = make_shapes_dataset(
            data_args.generate_shapes,
            seed=seed,
            image_size=max(image_size, 64),
            exclude_pairs=excluded,
            scene_size=data_args.shapes_scene_size,
            random_colors=data_args.shapes_random_colors,
        )
    elif data_args.dataset_name:
        dataset = load_split(
            data_args.dataset_name, data_args.train_split, data_args.dataset_config_name, "--train_split"
        )
    else:
        raise SystemExit("give --dataset_name or --generate_shapes N")
    wanted = [data_args.image_column, *data_args.caption_columns] + (
        [data_args.group_by_column] if data_args.group_by_column else []
    )
    missing = [c for c in wanted if c not in dataset.column_names]
    if missing:
        raise SystemExit(f"columns {missing} not in the dataset (it has {dataset.column_names})")
    if data_args.max_train_samples:
        dataset = dataset.select(range(min(data_args.max_train_samples, len(dataset))))
    if data_args.validation_fraction > 0:
        split = dataset.train_test_split(test_size=data_args.validation_fraction, seed=seed)
        return split["train"], split["test"]
    return dataset, None


def parse_arguments(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    parser.set_defaults(**PAPER_DEFAULTS)
    parser.set_defaults(**machine_training_defaults())  # no pinned memory / use_cpu without CUDA
    return parser.parse_args_into_dataclasses(args=argv)


def main():
    model_args, data_args, training_args = parse_arguments()

    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout
    )
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    model = build_model(model_args)
    if model_args.freeze_vision_model:
        model.vision_model.requires_grad_(False)
    image_size = model.config.vision_config.image_size
    if model_args.model_name_or_path:
        processor = AutoProcessor.from_pretrained(model_args.model_name_or_path)
        check_processor_matches_model(processor, model)  # a warning when its sizes are not the model's
    else:
        processor = RWKVCLIPProcessor.from_bundled(config=model.config)
    logger.info("model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    if training_args.world_size > 1 and training_args.process_index == 0:
        logger.info(
            "%d processes (%s), global batch %d",
            training_args.world_size,
            training_args.device.type,
            training_args.world_size
            * training_args.per_device_train_batch_size
            * training_args.gradient_accumulation_steps,
        )

    train, validation = load_data(data_args, image_size, training_args.seed)
    transform = ContrastiveTransform(
        processor,
        data_args.image_column,
        data_args.caption_columns,
        data_args.caption_probabilities,
        seed=training_args.seed,
    )
    train.set_transform(transform)
    if validation is not None:
        # evaluation always sees the first caption column, so the validation loss is comparable across runs
        validation.set_transform(
            ContrastiveTransform(processor, data_args.image_column, data_args.caption_columns[:1])
        )
    if training_args.eval_strategy == "no" and validation is not None:
        training_args.eval_strategy = training_args.save_strategy

    trainer = RWKVCLIPTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=ContrastiveCollator(processor.tokenizer),
        group_by_column=data_args.group_by_column,
        contrastive_micro_batches=data_args.contrastive_micro_batches,
        callbacks=[NonFiniteTrainingCallback()],
    )
    try:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except NonFiniteTrainingError as error:
        raise SystemExit(f"error: {error}") from None
    trainer.log_metrics("train", result.metrics)
    if validation is not None:
        trainer.log_metrics("eval", trainer.evaluate())
    trainer.save_model()
    trainer.save_state()  # trainer_state.json: steps, global batch, log history
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)
        logger.info(
            "saved model and processor to %s (logit scale %.3f)",
            training_args.output_dir,
            torch.exp(model.logit_scale).item(),
        )


if __name__ == "__main__":
    main()
