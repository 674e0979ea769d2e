"""Training helpers for `transformers.Trainer`: contrastive pre-training / fine-tuning and classification.

* `ContrastiveTransform`: a `datasets` `set_transform` that turns rows with an image column and one or more
  caption columns into model inputs, lazily, choosing one caption per sample and step (the paper's text
  augmentation, docs/architecture.md §8).
* `ContrastiveCollator` / `classification_collator`: batch what the transforms produce.
* `LogitScaleClampCallback`: clamps `logit_scale` to [0, ln 100] after every optimizer step.
* `ContrastiveLoss`: the symmetric InfoNCE of CLIP training over the global batch of every rank
  (open_clip's `ClipLoss`: `local_loss`, `gather_with_grad`, cached labels).
* `contrastive_accumulation_step`: gradient accumulation that keeps every negative (GradCache): a large
  contrastive batch in micro-batches, with the memory of one micro-batch and the gradients of the whole batch.
* `RWKVCLIPTrainer`: a `Trainer` that computes the contrastive loss with a `ContrastiveLoss`, adds the clamp
  and applies weight decay as CLIP training does (not to biases, norm gains or the temperature); with
  `contrastive_micro_batches`, it accumulates as `contrastive_accumulation_step` does; with `group_by_column`,
  rows that share that column's value are batched together (`GroupedRandomSampler`), e.g. hard negatives.
* `NonFiniteTrainingCallback`: stops a diverging run (NaN / infinite gradients or weights) with
  `NonFiniteTrainingError` before its weights are saved; `RWKVCLIPTrainer` adds it by default.
* `paper_training_arguments`: `TrainingArguments` with the paper's recipe as defaults (`paper_training_defaults`:
  the same as a dict).
* `accuracy_metric` / `compute_accuracy`: an `evaluate` accuracy for `compute_metrics`.

`RWKVCLIPModel(..., return_loss=True)` alone gives the loss of its local batch, as transformers' CLIP does.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
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
        if (
            probabilities.shape != (len(self.caption_columns),)
            or (probabilities < 0).any()
            or probabilities.sum() <= 0
        ):
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
    """Stacks `pixel_values`, pads `input_ids` (with an attention mask) and marks the batch as contrastive
    (`return_loss=True`, which `RWKVCLIPTrainer` answers with its `ContrastiveLoss`)."""

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

    def __init__(
        self, image_processor, image_column: str = "image", label_column: str = "label", num_labels: int | None = None
    ):
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


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside `torch.distributed`."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_gather_sizes(features: torch.Tensor, world_size: int) -> list[int]:
    size = torch.tensor([features.shape[0]], device=features.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    torch.distributed.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def gather_features(features: torch.Tensor, with_grad: bool = True) -> tuple[torch.Tensor, int]:
    """Concatenate `features` `(local_batch, dim)` of every rank in rank order; returns it and the offset of this
    rank's rows in it. Outside `torch.distributed` (or with one process): `(features, 0)`.

    Local batches may differ in size between ranks (they are padded for the collective and cut back).
    `with_grad=True`: the backward of the gather sums the gradient of every rank's loss into each rank's own
    features (open_clip's `gather_with_grad`). `with_grad=False`: other ranks' rows are constants and this
    rank's rows are its own features, so gradients reach only them.
    """
    rank, world_size = _world()
    if world_size == 1:
        return features, 0
    sizes = _all_gather_sizes(features, world_size)
    longest = max(sizes)
    padded = F.pad(features, (0, 0, 0, longest - features.shape[0]))
    if with_grad:
        try:  # torch >= 2.13 renamed it (the old name warns)
            from torch.distributed._functional_collectives import (
                all_gather_single_autograd as all_gather_autograd,
            )
        except ImportError:
            from torch.distributed._functional_collectives import all_gather_tensor_autograd as all_gather_autograd
        # the autograd all-gather's backward reduce-scatters (sums) the gradients back to their ranks
        gathered = all_gather_autograd(padded, gather_dim=0, group=torch.distributed.group.WORLD)
        parts = [gathered[r * longest : r * longest + n] for r, n in enumerate(sizes)]
    else:
        buffers = [torch.empty_like(padded) for _ in range(world_size)]
        torch.distributed.all_gather(buffers, padded.detach())
        parts = [buffer[:n] for buffer, n in zip(buffers, sizes)]
        parts[rank] = features
    return torch.cat(parts), sum(sizes[:rank])


class ContrastiveLoss(torch.nn.Module):
    """Symmetric InfoNCE of CLIP training (text i matches image i) over the global batch of every rank.

    `loss = ContrastiveLoss()(image_embeds, text_embeds, model.logit_scale)` with L2-normalised embeddings
    (`RWKVCLIPOutput.image_embeds` / `text_embeds`) and the model's log-temperature. Outside
    `torch.distributed` it equals `RWKVCLIPModel(..., return_loss=True).loss`. Under DDP, every setting
    gives each rank's parameters the gradient of the single-process loss on the concatenated global batch
    once DDP has averaged them (tested with two processes); they differ in cost:

    Args:
        local_loss: score only this rank's rows (its images against all captions, its captions against all
            images): local x global logits instead of global x global. The loss value then differs between
            ranks (their mean is the global loss); the averaged gradient is the same.
        gather_with_grad: gather the other ranks' features with a differentiable all-gather (its backward
            sends each rank the gradient of every rank's loss with respect to its features). With `False`, the
            gathered rows are constants and each rank back-propagates only into its own rows, whose gradient is
            multiplied by `world_size` (their values are unchanged) so that DDP's average is still the global
            gradient; `False` needs `local_loss=False` for that equivalence.
        cache_labels: keep the label tensors between steps (keyed by device, batch size and offset).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True, cache_labels: bool = True):
        super().__init__()
        if local_loss and not gather_with_grad:
            raise ValueError(
                "ContrastiveLoss: local_loss=True needs gather_with_grad=True (without it, the gradients of the "
                "other ranks' rows with respect to this rank's features are lost)"
            )
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self._labels: dict[tuple, torch.Tensor] = {}

    def labels(self, count: int, offset: int, device: torch.device) -> torch.Tensor:
        """`offset, offset + 1, ..., offset + count - 1`: the column of each row's matching pair."""
        key = (device, count, offset)
        labels = self._labels.get(key)
        if labels is None:
            labels = torch.arange(offset, offset + count, device=device)
            if self.cache_labels:
                self._labels[key] = labels
        return labels

    def forward(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        if image_embeds.shape[0] != text_embeds.shape[0]:
            raise ValueError(
                f"ContrastiveLoss needs one caption per image, got {text_embeds.shape[0]} captions and "
                f"{image_embeds.shape[0]} images"
            )
        _, world_size = _world()
        if not self.gather_with_grad and world_size > 1:
            # only this rank's rows carry gradients: count them world_size times (DDP divides by it)
            image_embeds = image_embeds + (world_size - 1) * (image_embeds - image_embeds.detach())
            text_embeds = text_embeds + (world_size - 1) * (text_embeds - text_embeds.detach())
        scale = logit_scale.exp()
        all_images, offset = gather_features(image_embeds, self.gather_with_grad)
        all_text, _ = gather_features(text_embeds, self.gather_with_grad)
        if self.local_loss:
            count = image_embeds.shape[0]
            labels = self.labels(count, offset, image_embeds.device)
            per_image = F.cross_entropy(image_embeds @ all_text.t() * scale, labels, reduction="sum")
            per_text = F.cross_entropy(text_embeds @ all_images.t() * scale, labels, reduction="sum")
            # weighted so that the mean over ranks is the global mean, also for uneven local batches
            return (per_image + per_text) / 2.0 * world_size / all_images.shape[0]
        logits_per_text = all_text @ all_images.t() * scale
        labels = self.labels(all_images.shape[0], 0, image_embeds.device)
        return (F.cross_entropy(logits_per_text, labels) + F.cross_entropy(logits_per_text.t(), labels)) / 2.0


def _capture_rng(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _restore_rng(state: tuple, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def contrastive_accumulation_step(
    model: torch.nn.Module,
    inputs: dict,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    micro_batches: int,
    logit_scale: torch.Tensor | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    loss_divisor: float = 1.0,
) -> torch.Tensor:
    """One contrastive batch in `micro_batches` pieces, with every negative kept (GradCache; open_clip's
    `--accum-freq`); accumulates into `.grad` the gradients of `loss_fn` on the whole batch and returns its value.

    1. Each micro-batch is embedded without a graph (its random state, e.g. drop-path, is remembered).
    2. `loss_fn(image_embeds, text_embeds, logit_scale)` on all embeddings gives the loss and its gradients with
       respect to the embeddings and the temperature.
    3. Each micro-batch is embedded again, with a graph and the same random state, and its embeddings are
       back-propagated with those gradients.
    Peak activation memory is that of one micro-batch; the cost is one extra forward pass.

    Args:
        model: a CLIP-style model returning `image_embeds` and `text_embeds` (possibly DDP-wrapped).
        inputs: the batch (`pixel_values`, `input_ids`, `attention_mask`, ...), split along dimension 0.
        loss_fn: e.g. a `ContrastiveLoss`.
        micro_batches: how many pieces (the batch need not divide evenly).
        logit_scale: the model's temperature parameter (default `model.logit_scale`, unwrapping `.module`).
        backward: runs the backward of a scalar (default `Tensor.backward`; Trainer passes the accelerator's).
        no_sync: a context that suspends DDP's gradient synchronisation, used for all but the last piece.
        autocast: a context for the forward passes and the loss (e.g. mixed precision).
        loss_divisor: the gradients (not the returned value) are divided by it (Trainer's own accumulation).
    """
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    if logit_scale is None:
        logit_scale = getattr(model, "module", model).logit_scale
    backward = backward or torch.Tensor.backward
    no_sync = no_sync or contextlib.nullcontext
    autocast = autocast or contextlib.nullcontext
    tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    others = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)}
    sizes = {v.shape[0] for v in tensors.values()}
    if len(sizes) != 1:
        raise ValueError(f"contrastive_accumulation_step: the inputs have different batch sizes {sorted(sizes)}")
    batch = sizes.pop()
    if micro_batches > batch:
        raise ValueError(f"micro_batches ({micro_batches}) is larger than the batch ({batch})")
    pieces = [
        {**others, **dict(zip(tensors, chunk))}
        for chunk in zip(*(torch.tensor_split(v, micro_batches) for v in tensors.values()))
    ]
    device = next(iter(tensors.values())).device

    states, images, texts = [], [], []
    with torch.no_grad():
        for piece in pieces:
            states.append(_capture_rng(device))
            with autocast():
                outputs = model(**piece)
            images.append(outputs.image_embeds)
            texts.append(outputs.text_embeds)
    after = _capture_rng(device)
    all_images = torch.cat(images).detach().requires_grad_()
    all_texts = torch.cat(texts).detach().requires_grad_()
    scale = logit_scale.detach().requires_grad_()
    with autocast():
        loss = loss_fn(all_images, all_texts, scale)
    image_grads, text_grads, scale_grad = torch.autograd.grad(loss, (all_images, all_texts, scale))
    image_grads, text_grads = image_grads.split([len(x) for x in images]), text_grads.split([len(x) for x in texts])

    for index, piece in enumerate(pieces):
        last = index == len(pieces) - 1
        _restore_rng(states[index], device)
        with contextlib.nullcontext() if last else no_sync():
            with autocast():
                outputs = model(**piece)
                surrogate = (outputs.image_embeds * image_grads[index].to(outputs.image_embeds.dtype)).sum()
                surrogate = surrogate + (outputs.text_embeds * text_grads[index].to(outputs.text_embeds.dtype)).sum()
                if last:  # the temperature's gradient, once
                    surrogate = surrogate + (logit_scale * scale_grad).sum()
            backward(surrogate / loss_divisor)
    _restore_rng(after, device)
    return loss.detach()


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
    norms = torch.stack(
        [torch.linalg.vector_norm(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t) for t in tensors]
    )
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
    """`Trainer` with the RWKV-CLIP recipe: the contrastive loss over the global batch (`ContrastiveLoss`),
    logit-scale clamp, and weight decay on every parameter except biases, LayerNorm/GroupNorm gains and the
    temperature (CLIP training's exclusions; the RWKV mixing and decay parameters are matrices in the original
    and are decayed).

    Batches marked `return_loss=True` (`ContrastiveCollator`) of a model with a `logit_scale` get the contrastive
    loss; other batches (e.g. classification) get `Trainer`'s. A `NonFiniteTrainingCallback` stops a diverging
    run before NaN weights are saved.

    Args:
        contrastive_loss: the loss of contrastive batches (default `ContrastiveLoss()`: global x global logits,
            gathered with gradients).
        contrastive_micro_batches: split each contrastive batch into this many micro-batches with
            `contrastive_accumulation_step`: the gradients of the whole batch (every negative kept) with the
            activation memory of one micro-batch, for one extra forward pass. Use this, not
            `gradient_accumulation_steps`, to reach a large contrastive batch: Trainer's accumulation gives each
            micro-batch only its own negatives, which changes the objective.
        group_by_column: a column of the training dataset; rows with the same value are kept in one batch
            (`GroupedRandomSampler`), e.g. the `scene` of `rwkv_clip_hf.shapes.make_shapes_dataset(...,
            scene_size=K)`, or product photos of one item: hard negatives for the contrastive loss.
        *args, **kwargs: those of `Trainer`.
    """

    def __init__(
        self,
        *args,
        contrastive_loss: torch.nn.Module | None = None,
        contrastive_micro_batches: int = 1,
        group_by_column: str | None = None,
        **kwargs,
    ):
        if int(contrastive_micro_batches) != contrastive_micro_batches or contrastive_micro_batches < 1:
            raise ValueError(
                f"contrastive_micro_batches must be a positive integer, got {contrastive_micro_batches!r}"
            )
        super().__init__(*args, **kwargs)
        self.contrastive_loss = contrastive_loss if contrastive_loss is not None else ContrastiveLoss()
        self.contrastive_micro_batches = int(contrastive_micro_batches)
        self.group_by_column = group_by_column
        if group_by_column is not None:
            dataset = self.train_dataset
            names = getattr(dataset, "column_names", None)
            if names is None:
                raise TypeError(f"group_by_column={group_by_column!r} needs a datasets.Dataset to train on")
            if group_by_column not in names:
                raise KeyError(
                    f"group_by_column={group_by_column!r} is not a column of the training dataset ({names})"
                )
        model = self.model
        if hasattr(model, "logit_scale") and not any(
            isinstance(cb, LogitScaleClampCallback) for cb in self.callback_handler.callbacks
        ):
            self.add_callback(LogitScaleClampCallback())
        if not any(isinstance(cb, NonFiniteTrainingCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(NonFiniteTrainingCallback())

    def _is_contrastive(self, model: torch.nn.Module, inputs: dict) -> bool:
        return bool(inputs.get("return_loss")) and hasattr(self.accelerator.unwrap_model(model), "logit_scale")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._is_contrastive(model, inputs):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        inputs = {k: v for k, v in inputs.items() if k != "return_loss"}
        outputs = model(**inputs)
        logit_scale = self.accelerator.unwrap_model(model).logit_scale
        loss = self.contrastive_loss(outputs.image_embeds, outputs.text_embeds, logit_scale)
        outputs["loss"] = loss
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.contrastive_micro_batches == 1 or not self._is_contrastive(model, inputs):
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = {k: v for k, v in self._prepare_inputs(inputs).items() if k != "return_loss"}
        steps = self.current_gradient_accumulation_steps
        loss = contrastive_accumulation_step(
            model,
            inputs,
            self.contrastive_loss,
            self.contrastive_micro_batches,
            logit_scale=self.accelerator.unwrap_model(model).logit_scale,
            backward=self.accelerator.backward,
            no_sync=lambda: self.accelerator.no_sync(model),
            autocast=self.compute_loss_context_manager,
            loss_divisor=steps,
        )
        return loss / steps

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
        return GroupedRandomSampler(
            groups, seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed
        )

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        no_decay = {"logit_scale"}
        for module_name, module in model.named_modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
                no_decay.update(
                    f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters(recurse=False)
                )
        return [
            name
            for name, _ in model.named_parameters()
            if name not in no_decay and not name.endswith("bias") and not name.endswith(".logit_scale")
        ]


def paper_training_arguments(output_dir: str, **overrides) -> TrainingArguments:
    """`TrainingArguments` following the paper's recipe (docs/architecture.md §9), any field overridable.

    AdamW with betas (0.9, 0.98), eps 1e-6, weight decay 0.2, learning rate 1e-3 with 10 % warmup
    (`warmup_steps=0.1`, a fraction) then cosine decay (the paper's OneCycle), gradient clipping at norm 1, bf16
    autocast when the hardware has it, and `remove_unused_columns=False` (the transforms need the raw columns). The
    paper's batch is 4096 over 8 GPUs: scale `per_device_train_batch_size` x processes to your budget, and where
    one device's memory is the limit, keep the batch and split it with
    `RWKVCLIPTrainer(contrastive_micro_batches=K)`, not with `gradient_accumulation_steps` (which gives each
    micro-batch only its own negatives).
    """
    return TrainingArguments(output_dir=output_dir, **{**paper_training_defaults(), **overrides})


def paper_training_defaults() -> dict:
    """The fields `paper_training_arguments` sets, as a dict (e.g. for a script's `parser.set_defaults`)."""
    return dict(
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


def _bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def machine_training_defaults() -> dict:
    """`TrainingArguments` defaults that depend on this machine (for a script's `parser.set_defaults`).

    Without CUDA: no pinned memory (torch warns about it on every dataloader), and under torchrun /
    `accelerate launch` (`WORLD_SIZE` > 1) `use_cpu=True`, with which `TrainingArguments` sets up data-parallel
    training over gloo; without it every process would train on the whole dataset alone.
    """
    if torch.cuda.is_available():
        return {}
    defaults = {"dataloader_pin_memory": False}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        defaults["use_cpu"] = True
    return defaults


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
    "ContrastiveLoss",
    "ContrastiveTransform",
    "GroupedRandomSampler",
    "LogitScaleClampCallback",
    "NonFiniteTrainingCallback",
    "NonFiniteTrainingError",
    "RWKVCLIPTrainer",
    "accuracy_metric",
    "classification_collator",
    "compute_accuracy",
    "contrastive_accumulation_step",
    "gather_features",
    "machine_training_defaults",
    "paper_training_arguments",
    "paper_training_defaults",
]
