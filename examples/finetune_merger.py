"""Fine-tune a description merger: a chat LLM trained with LoRA to merge raw text, caption and tags into one
description, on prompts built by the same `MergePrompt` the pipeline generates with (the paper fine-tuned its
merger LLM on such instructions).

Training rows need the merger's inputs and a target description, e.g. the output of `rwkv-clip-data` run on a
subset with a large instruction model (its `generated_description` is the target), or descriptions you wrote:

    python examples/finetune_merger.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset out/teacher/dataset --target_column generated_description \
        --output_dir runs/merger --num_train_epochs 2 --per_device_train_batch_size 8 --merge

`--dataset` is a save_to_disk directory, a parquet/csv/json(l) file or a Hub id; `--prompt_file` a prompt as for
`rwkv-clip-data --prompt-file`. Only the assistant's answer is learned (prompt labels are -100). The LoRA adapter
is saved to `--output_dir` with the tokenizer and `merger_prompt.json`; `--merge` also writes the merged model
to `<output_dir>/merged`, ready for `rwkv-clip-data --merger <output_dir>/merged --prompt-file
<output_dir>/merger_prompt.json`.

Offline smoke test (a tiny random Llama-style model and a tokenizer built in code, a few seconds on a CPU):

    python examples/finetune_merger.py --tiny --output_dir /tmp/merger-smoke --max_steps 3 --merge
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import transformers
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

from rwkv_clip_hf.data import MergePrompt, build_instruction_dataset, tokenize_instruction_dataset
from rwkv_clip_hf.evaluation.cli import cli_message

logger = logging.getLogger(__name__)

DEFAULTS = dict(
    learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.05, logging_steps=10, save_strategy="no",
    report_to="none", per_device_train_batch_size=8, num_train_epochs=2,
)  # fmt: skip


@dataclass
class Arguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "An instruction-tuned causal LM."})
    tiny: bool = field(default=False, metadata={"help": "Smoke test: a tiny random model and generated rows."})
    dataset: str | None = field(default=None, metadata={"help": "save_to_disk dir, data file or Hub id."})
    split: str = field(default="train")
    target_column: str = field(default="generated_description")
    raw_text_column: str = field(default="raw_text")
    caption_column: str = field(default="synthetic_caption")
    tags_column: str = field(default="tags")
    prompt_file: str | None = field(default=None, metadata={"help": "The merger prompt (default: the built-in one)."})
    max_length: int = field(default=1024, metadata={"help": "Conversations are cut to this many tokens."})
    max_train_samples: int | None = field(default=None)
    lora_r: int = field(default=16)
    lora_alpha: int = field(default=32)
    lora_dropout: float = field(default=0.05)
    lora_target_modules: str = field(default="all-linear", metadata={"help": "'all-linear' or comma-separated names."})
    merge: bool = field(default=False, metadata={"help": "Also save the adapter merged into the model."})


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_rows(count: int = 24):
    """Generated merger inputs and targets: raw text, a caption, tags and a description of coloured shapes."""
    import numpy as np
    from datasets import Dataset

    from rwkv_clip_hf.shapes import BACKGROUNDS, COLORS, SHAPES

    rng = np.random.default_rng(0)
    rows = {"raw_text": [], "synthetic_caption": [], "tags": [], "generated_description": []}
    for i in range(count):
        color, shape, background = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))
        rows["raw_text"].append("" if i % 6 == 5 else f"my {color} {shape} drawing no {i}")
        rows["synthetic_caption"].append(f"a {shape} on a {background} background")
        rows["tags"].append([str(color), str(shape)] if i % 4 else [])
        rows["generated_description"].append(f"A {color} {shape} drawn on a {background} background.")
    return Dataset.from_dict(rows)


def tiny_model_and_tokenizer(texts, directory: str):
    """A word-level tokenizer over the words of `texts` with a chat template, and a tiny random Llama-style
    model, both saved to `directory` (so the adapter refers to a base model that exists)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    splitter = pre_tokenizers.Whitespace()
    words = sorted({w for text in texts for w, _ in splitter.pre_tokenize_str(text)} - set(specials))
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>"))
    backend.pre_tokenizer = splitter
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=specials[4:],
    )  # fmt: skip
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_rows(args: Arguments):
    from rwkv_clip_hf.evaluation.data import load_eval_dataset

    if args.tiny:
        return tiny_rows()
    if not args.dataset:
        raise SystemExit("give --dataset (or --tiny for a smoke test)")
    try:
        return load_eval_dataset(args.dataset, args.split).dataset
    except (ValueError, OSError) as error:  # FileNotFoundError and datasets' DatasetNotFoundError are OSErrors
        raise SystemExit(f"error: {cli_message(str(error), {'dataset': '--dataset', 'split': '--split'})}") from None


def main(argv=None) -> dict:
    """Train; returns the paths written and the final training loss."""
    parser = HfArgumentParser((Arguments, TrainingArguments))
    parser.set_defaults(**DEFAULTS)
    args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout
    )
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    try:
        prompt = MergePrompt.from_file(args.prompt_file) if args.prompt_file else MergePrompt()
    except (ValueError, OSError) as error:
        raise SystemExit(f"error: --prompt_file: {error}") from None
    rows = load_rows(args)
    if args.max_train_samples:
        rows = rows.select(range(min(args.max_train_samples, len(rows))))

    def optional(name):
        return name if name in rows.column_names else None

    try:
        instructions = build_instruction_dataset(
            rows,
            target_column=args.target_column,
            raw_text_column=optional(args.raw_text_column),
            caption_column=optional(args.caption_column),
            tags_column=optional(args.tags_column),
            prompt=prompt,
        )
    except ValueError as error:  # a missing --target_column, or no row with a target
        raise SystemExit(f"error: {error}") from None
    model_path = args.model_name_or_path
    if args.tiny:
        texts = [m["content"] for conversation in instructions["messages"] for m in conversation]
        model_path = tiny_model_and_tokenizer(texts, os.path.join(training_args.output_dir, "tiny-base"))
    elif not model_path:
        raise SystemExit("give --model_name_or_path (or --tiny for a smoke test)")

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: --model_name_or_path {model_path}: {error}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train = tokenize_instruction_dataset(instructions, tokenizer, max_length=args.max_length)
    logger.info("%d training conversations", len(train))

    model = AutoModelForCausalLM.from_pretrained(model_path)
    targets = args.lora_target_modules
    lora = LoraConfig(
        task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
    )  # fmt: skip
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
        processing_class=tokenizer,
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()  # the adapter (adapter_config.json, adapter_model.safetensors) and the tokenizer
    written = {"adapter": training_args.output_dir, "merged": None, "train_loss": result.training_loss}
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, "merger_prompt.json"), "w") as handle:
            json.dump(prompt.to_dict(), handle, indent=1)
        if args.merge:
            merged_dir = os.path.join(training_args.output_dir, "merged")
            trainer.model.merge_and_unload().save_pretrained(merged_dir)
            tokenizer.save_pretrained(merged_dir)
            written["merged"] = merged_dir
            logger.info("merged model saved to %s", merged_dir)
    logger.info("adapter saved to %s (train loss %.4f)", training_args.output_dir, result.training_loss)
    return written


if __name__ == "__main__":
    main()
