"""Training helpers for `transformers.Trainer`: contrastive pre-training / fine-tuning and classification.

* `ContrastiveTransform`: a `datasets` `set_transform` that turns rows with an image column and one or more
  caption columns into model inputs, lazily, choosing one caption per sample and step (the paper's text
  augmentation, ARCHITECTURE.md §8).
* `ContrastiveCollator` / `ClassificationCollator`: batch what the transforms produce.
* `LogitScaleClampCallback`: clamps `logit_scale` to [0, ln 100] after every optimizer step.
* `NonFiniteTrainingCallback`: stops a diverging run (NaN / infinite gradients or weights) with
  `NonFiniteTrainingError` before its weights are saved.
* `RWKVCLIPTrainer`: a `Trainer` that adds the clamp and applies weight decay as CLIP training does (not to
  biases, norm gains or the temperature); with `group_by_column`, rows that share that column's value are
  batched together (`GroupedRandomSampler`), e.g. hard negatives for the contrastive loss.
* `paper_training_arguments`: `TrainingArguments` with the paper's recipe (§9) as defaults.
* `accuracy_metric` / `compute_accuracy`: an `evaluate` accuracy for `compute_metrics`.

The contrastive loss itself is computed by `RWKVCLIPModel(..., return_loss=True)`; under `torch.distributed`
it gathers the features of every rank with gradients, so the loss is over the global batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging


logger = logging.get_logger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)


class ContrastiveTransform:
    """`dataset.set_transform(ContrastiveTransform(processor, ...))`: rows -> `pixel_values` + `input_ids`.

    Args:
        processor: an `RWKVCLIPProcessor` (or any processor with `image_processor` and `tokenizer`).
        image_column: the column holding images (PIL images, arrays or paths).
        caption_columns: one or more text columns, e.g. `("raw_text", "synthetic_caption",
            "generated_description")` for the paper's Tr, Ts, Tg. Each sample uses one of them per access.
            A column may also hold a list of captions per row; one of them is then drawn uniformly.
        probabilities: how often each column is chosen (default uniform, as in the paper). Columns that are
            empty or missing for a row are skipped and the others renormalised.
        seed: seeds the choice. The sequence of choices is reproducible for the same sequence of accesses
            (Trainer's sampler is seeded too); each dataloader worker folds in its worker id.
    """

    def __init__(
        self,
        processor,
        image_column: str = "image",
        caption_columns: str | Sequence[str] = ("caption",),
        probabilities: Sequence[float] | None = None,
        seed: int = 0,
    ):
        self.processor = processor
        self.image_column = image_column
        self.caption_columns = [caption_columns] if isinstance(caption_columns, str) else list(caption_columns)
        if not self.caption_columns:
            raise ValueError("ContrastiveTransform: give at least one caption column")
        if probabilities is None:
            probabilities = [1.0] * len(self.caption_columns)
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if probabilities.shape != (len(self.caption_columns),) or (probabilities < 0).any() or probabilities.sum() <= 0:
            raise ValueError(
                f"ContrastiveTransform: probabilities {probabilities.tolist()} must be {len(self.caption_columns)} "
                "non-negative numbers, not all zero, one per caption column"
            )
        self.probabilities = probabilities / probabilities.sum()
        self.seed = seed
        self._rng = None
        self._worker = None

    def _generator(self) -> np.random.Generator:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else -1
        if self._rng is None or worker != self._worker:
            self._rng, self._worker = np.random.default_rng([self.seed, worker + 1]), worker
        return self._rng

    def choose_captions(self, batch: dict) -> list[str]:
        """One caption per row of `batch` (a dict of columns), drawn from the caption columns."""
        missing = [c for c in self.caption_columns if c not in batch]
        if len(missing) == len(self.caption_columns):
            raise KeyError(_missing_columns_message(missing, batch))
        rng = self._generator()
        rows = len(batch[self.image_column]) if self.image_column in batch else len(next(iter(batch.values())))
        captions = []
        for row in range(rows):
            options = []
            for column, weight in zip(self.caption_columns, self.probabilities):
                value = batch[column][row] if column in batch else None
                if isinstance(value, (list, tuple)):
                    value = [v for v in value if isinstance(v, str) and v.strip()]
                    value = value[rng.integers(len(value))] if value else None
                if isinstance(value, str) and value.strip() and weight > 0:
                    options.append((value, weight))
            if not options:
                raise ValueError(f"ContrastiveTransform: row {row} has no non-empty caption in {self.caption_columns}")
            weights = np.array([w for _, w in options])
            captions.append(options[rng.choice(len(options), p=weights / weights.sum())][0])
        return captions

    def __call__(self, batch: dict) -> dict:
        if self.image_column not in batch:
            raise KeyError(_missing_columns_message([self.image_column], batch))
        captions = self.choose_captions(batch)
        pixels = self.processor.image_processor(batch[self.image_column], return_tensors="pt")["pixel_values"]
        ids = self.processor.tokenizer(captions, truncation=True)["input_ids"]
        return {"pixel_values": list(pixels), "input_ids": ids}


def _missing_columns_message(missing, batch) -> str:
    return (
        f"columns {missing} are not in the batch (it has {sorted(batch)}). With `set_transform`, pass "
        "`TrainingArguments(remove_unused_columns=False)`: otherwise Trainer drops the raw columns before the "
        "transform sees them."
    )


class ContrastiveCollator:
    """Stacks `pixel_values`, pads `input_ids` (with an attention mask) and asks the model for the loss."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, features: list[dict]) -> dict:
        batch = self.tokenizer.pad({"input_ids": [f["input_ids"] for f in features]}, return_tensors="pt")
        batch["pixel_values"] = torch.stack([torch.as_tensor(f["pixel_values"]) for f in features])
        batch["return_loss"] = True
        return batch


class ClassificationTransform:
    """`dataset.set_transform(ClassificationTransform(image_processor))`: rows -> `pixel_values` + `labels`.

    A label is a class index, or, for multi-label classification, a list of class indices (e.g. a
    `Sequence(ClassLabel)` column), which becomes a multi-hot float vector of length `num_labels`.
    """

    def __init__(self, image_processor, image_column: str = "image", label_column: str = "label",
                 num_labels: int | None = None):
        self.image_processor = image_processor
        self.image_column = image_column
        self.label_column = label_column
        self.num_labels = num_labels

    def __call__(self, batch: dict) -> dict:
        missing = [c for c in (self.image_column, self.label_column) if c not in batch]
        if missing:
            raise KeyError(_missing_columns_message(missing, batch))
        pixels = self.image_processor(batch[self.image_column], return_tensors="pt")["pixel_values"]
        return {"pixel_values": list(pixels), "labels": [self._label(label) for label in batch[self.label_column]]}

    def _label(self, label):
        if not isinstance(label, (list, tuple)):
            return label
        if self.num_labels is None:
            raise ValueError(
                f"column {self.label_column!r} holds lists of classes (multi-label); "
                "give ClassificationTransform(..., num_labels=N) to turn them into multi-hot vectors"
            )
        bad = [c for c in label if not 0 <= int(c) < self.num_labels]
        if bad:
            raise ValueError(f"column {self.label_column!r}: class {bad[0]} is not in [0, {self.num_labels})")
        hot = torch.zeros(self.num_labels)
        hot[[int(c) for c in label]] = 1.0
        return hot


def classification_collator(features: list[dict]) -> dict:
    """Stacks `pixel_values`; labels become a `(batch,)` long tensor of class indices, or, when they are
    multi-hot vectors (multi-label classification), a `(batch, num_labels)` float tensor."""
    labels = [f["labels"] for f in features]
    if torch.as_tensor(labels[0]).dim() > 0:
        labels = torch.stack([torch.as_tensor(label, dtype=torch.float32) for label in labels])
    else:
        labels = torch.tensor([int(label) for label in labels])
    return {"pixel_values": torch.stack([torch.as_tensor(f["pixel_values"]) for f in features]), "labels": labels}


class LogitScaleClampCallback(TrainerCallback):
    """Clamps the model's `logit_scale` to `[0, ln 100]` after every optimizer step (the paper's recipe)."""

    def __init__(self, min_value: float = 0.0, max_value: float = MAX_LOGIT_SCALE):
        self.min_value, self.max_value = min_value, max_value

    def on_step_end(self, args, state, control, model=None, **kwargs):
        parameter = getattr(model, "logit_scale", None)
        if parameter is not None:
            with torch.no_grad():
                parameter.clamp_(self.min_value, self.max_value)


class NonFiniteTrainingError(RuntimeError):
    """Training diverged: the gradients or the weights hold NaN or infinite values (`NonFiniteTrainingCallback`)."""


class NonFiniteTrainingCallback(TrainerCallback):
    """Stops a diverging run: raises `NonFiniteTrainingError` out of `Trainer.train()` as soon as the gradients of
    an optimizer step (checked before the step, so the weights stay those of the last good step) or the weights
    after it hold NaN or infinite values.

    `Trainer` itself replaces a NaN loss by the running mean in its logs (`logging_nan_inf_filter`) and goes on
    training and saving, so without this a diverged run ends "successfully" with NaN weights. Raising stops it
    before the checkpoint of that step is written; the script around `train()` then does not reach its
    `save_model()`. With `fp16` (a loss scaler, which skips steps with infinite gradients by design) only the
    weights are checked. One norm over the gradients and one over the weights per optimizer step.
    """

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None or args.fp16:
            return
        gradients = [p.grad for p in model.parameters() if p.grad is not None]
        if gradients and not _all_finite(gradients):
            names = _non_finite_names(model, grads=True)
            raise NonFiniteTrainingError(_divergence_message(state.global_step + 1, state, "gradients", names))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        if not _all_finite([p.detach() for p in model.parameters()]):
            names = _non_finite_names(model, grads=False)
            raise NonFiniteTrainingError(_divergence_message(state.global_step, state, "weights", names))


def _divergence_message(step: int, state, what: str, names: list[str]) -> str:
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (
        f"training diverged at optimizer step {step} (epoch {state.epoch or 0:.2f}): the {what} hold NaN or "
        f"infinite values ({shown}). Stopped without saving this step's weights. Lower the learning rate, keep "
        "gradient clipping on (max_grad_norm) or use more warmup."
    )


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    # one reduction (and one host sync) over all tensors; a NaN or inf anywhere makes the sum of norms non-finite
    norms = torch.stack([torch.linalg.vector_norm(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t)
                         for t in tensors])
    return bool(torch.isfinite(norms.sum()))


def _non_finite_names(model: torch.nn.Module, grads: bool) -> list[str]:
    names = []
    for name, parameter in model.named_parameters():
        tensor = parameter.grad if grads else parameter
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            names.append(name)
    return names


class GroupedRandomSampler(torch.utils.data.Sampler[int]):
    """Random order of groups, each group's rows consecutive: batches cut from it hold whole groups (but the
    one a batch boundary falls in). Rows of a group need not be adjacent in the dataset.

    Args:
        groups: one group key per row (any hashable values, e.g. a dataset column).
        seed: seeds the order; epoch `e` (`set_epoch`, as Trainer / accelerate call it, or one more per
            iteration otherwise) uses `(seed, e)`, so every epoch has a new, reproducible order.
    """

    def __init__(self, groups: Sequence, seed: int = 0):
        members: dict = {}
        for index, key in enumerate(groups):
            members.setdefault(key, []).append(index)
        if not members:
            raise ValueError("GroupedRandomSampler: no rows")
        self.groups = list(members.values())
        self.length = sum(len(g) for g in self.groups)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        for group in rng.permutation(len(self.groups)):
            members = self.groups[group]
            yield from (members[i] for i in rng.permutation(len(members)))


class RWKVCLIPTrainer(Trainer):
    """`Trainer` with the RWKV-CLIP recipe: logit-scale clamp, and weight decay on every parameter except
    biases, LayerNorm/GroupNorm gains and the temperature (CLIP training's exclusions; the RWKV mixing and
    decay parameters are matrices in the original and are decayed).

    Args:
        group_by_column: a column of the training dataset; rows with the same value are kept in one batch
            (`GroupedRandomSampler`), e.g. the `scene` of `rwkv_clip_hf.shapes.make_shapes_dataset(...,
            scene_size=K)`, or product photos of one item: hard negatives for the contrastive loss.
        *args, **kwargs: those of `Trainer`.
    """

    def __init__(self, *args, group_by_column: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.group_by_column = group_by_column
        if group_by_column is not None:
            dataset = self.train_dataset
            names = getattr(dataset, "column_names", None)
            if names is None:
                raise TypeError(f"group_by_column={group_by_column!r} needs a datasets.Dataset to train on")
            if group_by_column not in names:
                raise KeyError(f"group_by_column={group_by_column!r} is not a column of the training dataset ({names})")
        model = self.model
        if hasattr(model, "logit_scale") and not any(isinstance(cb, LogitScaleClampCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(LogitScaleClampCallback())

    def _get_train_sampler(self, train_dataset=None):
        if self.group_by_column is None:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.group_by_column not in dataset.column_names:
            raise KeyError(
                f"group_by_column={self.group_by_column!r} was removed from the training dataset: pass "
                "TrainingArguments(remove_unused_columns=False)"
            )
        # read the column without the dataset's transform (which would decode every image)
        groups = dataset.with_format("arrow")[self.group_by_column].to_pylist()
        return GroupedRandomSampler(groups, seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed)

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        no_decay = {"logit_scale"}
        for module_name, module in model.named_modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
                no_decay.update(f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters(recurse=False))
        return [
            name
            for name, _ in model.named_parameters()
            if name not in no_decay and not name.endswith("bias") and not name.endswith(".logit_scale")
        ]


def paper_training_arguments(output_dir: str, **overrides) -> TrainingArguments:
    """`TrainingArguments` following the paper's recipe (ARCHITECTURE.md §9), any field overridable.

    AdamW with betas (0.9, 0.98), eps 1e-6, weight decay 0.2, learning rate 1e-3 with 10 % warmup (`warmup_steps=0.1`, a fraction) then cosine
    decay (the paper's OneCycle), gradient clipping at norm 1, bf16 autocast when the hardware has it, and
    `remove_unused_columns=False` (the transforms need the raw columns). The paper's batch is 4096 over
    8 GPUs: scale `per_device_train_batch_size` x processes x `gradient_accumulation_steps` to your budget.
    """
    defaults = dict(
        learning_rate=1e-3,
        adam_beta1=0.9,
        adam_beta2=0.98,
        adam_epsilon=1e-6,
        weight_decay=0.2,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        max_grad_norm=1.0,
        bf16=_bf16_available(),
        remove_unused_columns=False,
        report_to="none",
    )
    defaults.update(overrides)
    return TrainingArguments(output_dir=output_dir, **defaults)


def _bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def accuracy_metric(config_name: str | None = None):
    """transformers' usual `evaluate.load("accuracy")` (`config_name="multilabel"`: exact match of multi-hot
    rows); offline without a cached copy, the same metric computed locally (with a warning), so
    `compute_metrics` works everywhere."""
    import evaluate

    try:
        return evaluate.load("accuracy", config_name)
    except Exception as error:  # offline and not cached: evaluate raises various connection errors
        logger.warning_once(f"evaluate.load('accuracy') unavailable ({type(error).__name__}); using a local accuracy")
        return _LocalAccuracy()


class _LocalAccuracy:
    def compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        correct = predictions == references
        if correct.ndim > 1:  # multi-label: a row is right when all of its labels are
            correct = correct.all(axis=tuple(range(1, correct.ndim)))
        return {"accuracy": float(correct.mean())}


def compute_accuracy(eval_prediction) -> dict:
    """`compute_metrics` for classification: top-1 accuracy of the logits' argmax; for multi-label classification
    (multi-hot label rows), the fraction of rows whose every label is right (logit > 0, i.e. probability > 0.5)."""
    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    labels = np.asarray(labels)
    if labels.ndim > 1:
        predictions = (np.asarray(logits) > 0).astype(np.int64)
        return accuracy_metric("multilabel").compute(predictions=predictions, references=labels.astype(np.int64))
    return accuracy_metric().compute(predictions=np.argmax(logits, axis=-1), references=labels)


#: LoRA target modules of RWKV-CLIP (both towers): time-mix and channel-mix projections.
LORA_TARGET_MODULES = ["receptance", "key", "value", "gate", "output"]


__all__ = [
    "LORA_TARGET_MODULES",
    "ClassificationTransform",
    "ContrastiveCollator",
    "ContrastiveTransform",
    "GroupedRandomSampler",
    "LogitScaleClampCallback",
    "NonFiniteTrainingCallback",
    "NonFiniteTrainingError",
    "RWKVCLIPTrainer",
    "accuracy_metric",
    "classification_collator",
    "compute_accuracy",
    "paper_training_arguments",
]
