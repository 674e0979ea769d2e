"""Instruction data for fine-tuning a description merger (as the paper fine-tuned its merger LLM).

`build_instruction_dataset` turns rows with a raw text, a caption, tags and a target description into chat
`messages` (system / user / assistant) built by the same `MergePrompt` as `DescriptionMerger`;
`tokenize_conversation` renders them with the same `render_chat` and masks everything but the assistant's answer
with -100. The prompt tokens a fine-tuned merger is trained on are therefore exactly those it is given later.

A typical source of targets: run the pipeline on a subset with a large instruction model, build instructions from
its `generated_description`, fine-tune a small model on them (`examples/finetune_merger.py`), and run the pipeline
on everything with the small one.
"""

from __future__ import annotations

import logging

from .prompts import MergePrompt, render_chat

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def build_instruction_dataset(
    dataset,
    *,
    target_column: str = "generated_description",
    raw_text_column: str | None = "raw_text",
    caption_column: str | None = "synthetic_caption",
    tags_column: str | None = "tags",
    prompt: MergePrompt | None = None,
    keep_columns: bool = False,
):
    """Chat-format fine-tuning rows from a dataset of inputs and target descriptions.

    Args:
        dataset: a `datasets.Dataset`, e.g. the pipeline's output, or your own rows with a curated target.
        target_column: the assistant's answer. Rows whose target is empty or None are dropped.
        raw_text_column, caption_column, tags_column: the merger's inputs (None: not available, the prompt then
            says so, as it does for empty values).
        prompt: the `MergePrompt` (default: the merger's default); use the one you will generate with.
        keep_columns: keep the input columns next to `messages` (default: only `messages`).

    Returns:
        A `datasets.Dataset` with a `messages` column: `[{"role": "system", ...}, {"role": "user", ...},
        {"role": "assistant", "content": target}]` (no system message when `prompt.system` is empty).
    """
    prompt = prompt or MergePrompt()
    wanted = {"target": target_column, "raw text": raw_text_column, "caption": caption_column, "tags": tags_column}
    missing = [
        f"{what} column {name!r}"
        for what, name in wanted.items()
        if name is not None and name not in dataset.column_names
    ]
    if missing:
        raise ValueError(f"no such column: {', '.join(missing)}; the dataset's columns are {dataset.column_names}")
    dataset = dataset.filter(
        lambda targets: [isinstance(t, str) and bool(t.strip()) for t in targets],
        input_columns=[target_column],
        batched=True,
        desc="dropping empty targets",
    )
    if len(dataset) == 0:
        raise ValueError(f"no row has a non-empty {target_column!r}")
    inputs = [c for c in (raw_text_column, caption_column, tags_column, target_column) if c is not None]

    def to_messages(batch):
        rows = len(batch[target_column])
        empty = [None] * rows
        return {
            "messages": [
                prompt.messages(raw, caption, tags, target=" ".join(target.split()))
                for raw, caption, tags, target in zip(
                    batch.get(raw_text_column, empty) if raw_text_column else empty,
                    batch.get(caption_column, empty) if caption_column else empty,
                    batch.get(tags_column, empty) if tags_column else empty,
                    batch[target_column],
                )
            ]
        }

    if keep_columns:
        return dataset.map(to_messages, batched=True, desc="building instructions")
    return dataset.select_columns(inputs).map(
        to_messages, batched=True, remove_columns=inputs, desc="building instructions"
    )


def tokenize_conversation(messages: list[dict], tokenizer, max_length: int | None = None) -> dict:
    """Token ids and labels of one conversation that ends with the assistant's answer.

    The prompt (every message but the last, with the generation prompt) is rendered and tokenized exactly as
    `DescriptionMerger` does; the rest of the full rendering (the answer and the template's end-of-turn markup)
    is tokenized after it. Labels are -100 on the prompt and the ids on the answer. If the answer carries no EOS
    token, EOS is appended (so the model learns to stop). `max_length` cuts the end.

    Returns:
        `{"input_ids", "attention_mask", "labels"}` lists; `labels` is all -100 when the prompt alone fills
        `max_length`.
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the conversation must end with the assistant's answer")
    prompt_text = render_chat(tokenizer, [messages[:-1]], add_generation_prompt=True)[0]
    full_text = render_chat(tokenizer, [messages], add_generation_prompt=False)[0]
    if not full_text.startswith(prompt_text):
        raise ValueError(
            "the chat template renders the conversation so that the generation prompt is not a prefix of the full "
            "conversation; the answer tokens cannot be separated from the prompt"
        )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in answer_ids:
        answer_ids = answer_ids + [eos]
    input_ids = prompt_ids + answer_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def tokenize_instruction_dataset(dataset, tokenizer, max_length: int | None = 1024, messages_column: str = "messages"):
    """`tokenize_conversation` over a dataset of `messages`; rows left without answer tokens by `max_length`
    are dropped (with a warning). Pad batches with `transformers.DataCollatorForSeq2Seq(tokenizer)`, which
    pads `labels` with -100."""
    tokenized = dataset.map(
        lambda messages: tokenize_conversation(messages, tokenizer, max_length),
        input_columns=[messages_column],
        remove_columns=dataset.column_names,
        desc="tokenizing instructions",
    )
    kept = tokenized.filter(lambda labels: any(label != IGNORE_INDEX for label in labels), input_columns=["labels"])
    if len(kept) < len(tokenized):
        logger.warning(
            "%d of %d conversations have no answer tokens within max_length=%s and are dropped",
            len(tokenized) - len(kept), len(tokenized), max_length,
        )  # fmt: skip
    return kept


__all__ = ["IGNORE_INDEX", "build_instruction_dataset", "tokenize_conversation", "tokenize_instruction_dataset"]
