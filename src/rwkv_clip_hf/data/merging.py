"""Generated descriptions (the paper's Tg): an instruction-tuned causal LM merges the raw text, the synthetic
caption and the tags of each image into one description."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .prompts import MergePrompt, normalize_tags, render_chat
from .stage import ModelStage, model_device_dtype

_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "`": "`"}


def clean_generation(text: str) -> str:
    """Post-processing of a generated description: whitespace collapsed to single spaces (one paragraph), and
    quotes wrapping the whole answer removed."""
    text = " ".join(text.split())
    while len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


class DescriptionMerger(ModelStage):
    """Merges each image's raw text, caption and tags into a description with a chat LLM, in batches.

    Prompts are `prompt.messages(raw_text, caption, tags)` through the tokenizer's chat template with the
    generation prompt; the batch is left-padded; decoding is greedy unless `generation_kwargs` says otherwise;
    only the new tokens are decoded, then `clean_generation` is applied. A row with no raw text, no caption and no
    tags gets `""` without calling the model (there is nothing to describe from).

    Args:
        model: a causal LM instance or a directory / Hub id (`AutoModelForCausalLM`), instruction-tuned.
        tokenizer: its tokenizer (`AutoTokenizer` from the model's name if omitted); it needs a chat template. One
            without a pad token is given its EOS token as pad token.
        prompt: a `MergePrompt` (default: this project's instruction, see `prompts.DEFAULT_TEMPLATE`).
        max_new_tokens: description length limit (default 128).
        generation_kwargs: more `generate` arguments (`do_sample=True, temperature=0.7`, `repetition_penalty`, ...).
        chat_template: a Jinja chat template to use instead of the tokenizer's (for models without one).
        device, dtype, revision, trust_remote_code: see `ModelStage`.
    """

    name = "merge"

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        prompt: MergePrompt | None = None,
        max_new_tokens: int = 128,
        generation_kwargs: dict | None = None,
        chat_template: str | None = None,
        **stage_kwargs,
    ):
        super().__init__(model, **stage_kwargs)
        if max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be at least 1, got {max_new_tokens}")
        self.tokenizer = tokenizer
        self.prompt = prompt or MergePrompt()
        self.max_new_tokens = max_new_tokens
        self.generation_kwargs = dict(generation_kwargs or {})
        self.chat_template = chat_template

    def settings(self) -> dict:
        return {
            "prompt": self.prompt.to_dict(),
            "max_new_tokens": self.max_new_tokens,
            "generation": self.generation_kwargs,
            "chat_template": self.chat_template,
        }

    def _load_tokenizer(self, name) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(
            name, revision=self.revision, trust_remote_code=self.trust_remote_code
        )

    def _prepare_tokenizer(self) -> None:
        if self.chat_template is not None:
            self.tokenizer.chat_template = self.chat_template
        # Fails here, before any weights are loaded, when there is no chat template.
        render_chat(self.tokenizer, [self.prompt.messages("text", "caption", ["tag"])], add_generation_prompt=True)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def precheck(self) -> None:
        """Load the tokenizer (not the weights) and check that it can render the prompt."""
        if self.tokenizer is None:
            name = self.source or getattr(self.model, "name_or_path", None)
            if not name:
                raise ValueError("DescriptionMerger: give the tokenizer of a model passed as an instance")
            self._load_tokenizer(name)
        self._prepare_tokenizer()

    def _load_pretrained(self) -> None:
        from transformers import AutoModelForCausalLM

        self.precheck()
        self.model = AutoModelForCausalLM.from_pretrained(self.source, **self.pretrained_kwargs())

    def _complete_instance(self) -> None:
        self.precheck()

    def _check(self) -> None:
        if not hasattr(self.model, "generate"):
            raise ValueError(f"DescriptionMerger: {type(self.model).__name__} cannot generate text")

    def conversations(self, raw_texts: Sequence, captions: Sequence, tags: Sequence) -> list[list[dict]]:
        """The chat messages of each row (what the model is asked)."""
        return [self.prompt.messages(r, c, t) for r, c, t in zip(raw_texts, captions, tags, strict=True)]

    @torch.inference_mode()
    def __call__(self, raw_texts: Sequence, captions: Sequence, tags: Sequence) -> list[str]:
        """One description per row; `captions` / `tags` entries may be None or empty."""
        self.load()
        outputs = [""] * len(raw_texts)
        todo = [
            i
            for i, (r, c, t) in enumerate(zip(raw_texts, captions, tags, strict=True))
            if (isinstance(r, str) and r.strip()) or (isinstance(c, str) and c.strip()) or normalize_tags(t)
        ]
        if not todo:
            return outputs
        conversations = self.conversations(
            [raw_texts[i] for i in todo], [captions[i] for i in todo], [tags[i] for i in todo]
        )
        texts = render_chat(self.tokenizer, conversations, add_generation_prompt=True)
        batch = self.tokenizer(texts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
        device, _ = model_device_dtype(self.model)
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": False,
            "pad_token_id": self.tokenizer.pad_token_id,
            **self.generation_kwargs,
        }
        sequences = self.model.generate(**batch, **kwargs)
        sequences = getattr(sequences, "sequences", sequences)
        generated = sequences[:, batch["input_ids"].shape[1] :]
        for i, text in zip(todo, self.tokenizer.batch_decode(generated, skip_special_tokens=True)):
            outputs[i] = clean_generation(text)
        return outputs


__all__ = ["DescriptionMerger", "clean_generation"]
