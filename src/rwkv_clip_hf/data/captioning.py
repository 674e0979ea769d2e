"""Synthetic captions (the paper's Ts) from any transformers image-to-text model."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .stage import ModelStage, model_device_dtype, rgb_images, to_device


class Captioner(ModelStage):
    """Captions images with a transformers image-to-text model, in batches.

    Any model `AutoModelForImageTextToText` loads and that `generate`s text from `pixel_values` is meant to work:
    BLIP, GIT, Florence-2, `VisionEncoderDecoderModel` (ViT-GPT2 style). A chat VLM would need `prompt` written in
    its own chat format (with its image token); that is untested.

    Args:
        model: a model instance or a directory / Hub id.
        processor: a processor taking `images=` (and `text=` with a `prompt`) whose `batch_decode` (or
            `tokenizer`) decodes the output; or an image processor, with `tokenizer` given separately. Loaded from
            the model's name when omitted (`AutoProcessor`, or `AutoImageProcessor` + `AutoTokenizer` for models
            whose repository has no processor class, such as VisionEncoderDecoder).
        tokenizer: decodes the generated ids when `processor` cannot.
        prompt: text given to the processor with every image, for prompt-conditioned captioners (BLIP's "a
            photography of", Florence-2's "<MORE_DETAILED_CAPTION>"). Removed from the output when the model
            echoes it.
        max_new_tokens: caption length limit.
        generation_kwargs: more `generate` arguments (`num_beams`, `repetition_penalty`, ...). Greedy by default.
        device, dtype, revision, trust_remote_code: see `ModelStage`.

    Calling it with a list of images returns one caption per image: whitespace collapsed, possibly empty.
    """

    name = "caption"

    def __init__(
        self,
        model,
        processor=None,
        *,
        tokenizer=None,
        prompt: str | None = None,
        max_new_tokens: int = 40,
        generation_kwargs: dict | None = None,
        **stage_kwargs,
    ):
        super().__init__(model, **stage_kwargs)
        self.processor = processor
        self.tokenizer = tokenizer
        self.prompt = prompt or None
        self.max_new_tokens = max_new_tokens
        self.generation_kwargs = dict(generation_kwargs or {})

    def settings(self) -> dict:
        return {"prompt": self.prompt, "max_new_tokens": self.max_new_tokens, "generation": self.generation_kwargs}

    def _load_pretrained(self) -> None:
        from transformers import AutoModelForImageTextToText

        try:
            self.model = AutoModelForImageTextToText.from_pretrained(self.source, **self.pretrained_kwargs())
        except ValueError as error:  # "Unrecognized configuration class ..."
            raise ValueError(f"`model` {self.source}: cannot be loaded as an image-to-text model ({error})") from None
        self._complete_instance()

    def _complete_instance(self) -> None:
        name = self.source or getattr(self.model, "name_or_path", None)
        if self.processor is None:
            if not name:
                raise ValueError("Captioner: give the processor of a model passed as an instance")
            self.processor, self.tokenizer = _load_processor(
                name, self.tokenizer, self.revision, self.trust_remote_code
            )

    def _check(self) -> None:
        if not hasattr(self.model, "generate"):
            raise ValueError(f"Captioner: {type(self.model).__name__} cannot generate text")
        if _decoder(self.processor, self.tokenizer) is None:
            raise ValueError(
                f"Captioner: no tokenizer to decode {type(self.model).__name__}'s output; pass tokenizer="
            )
        if self.prompt and not _takes_text(self.processor):
            raise ValueError(
                "Captioner: a prompt needs a processor that takes text; "
                f"{type(self.processor).__name__} takes images only"
            )

    @torch.inference_mode()
    def __call__(self, images: Sequence) -> list[str]:
        self.load()
        images = rgb_images(images)
        if not images:
            return []
        device, dtype = model_device_dtype(self.model)
        if self.prompt:
            inputs = self.processor(images=images, text=[self.prompt] * len(images), return_tensors="pt")
        else:
            inputs = self.processor(images=images, return_tensors="pt")
        inputs = to_device(inputs, device, dtype)
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": False, **self.generation_kwargs}
        sequences = self.model.generate(**inputs, **kwargs)
        sequences = getattr(sequences, "sequences", sequences)
        input_ids = inputs.get("input_ids")
        # Decoder-only captioners return the prompt's ids first: cut them off exactly when they are there.
        if (
            input_ids is not None
            and sequences.shape[1] >= input_ids.shape[1]
            and torch.equal(sequences[:, : input_ids.shape[1]], input_ids)
        ):
            sequences = sequences[:, input_ids.shape[1] :]
        texts = _decoder(self.processor, self.tokenizer)(sequences, skip_special_tokens=True)
        return [_strip_prompt(" ".join(text.split()), self.prompt) for text in texts]


def _takes_text(processor) -> bool:
    return hasattr(processor, "tokenizer")


def _decoder(processor, tokenizer):
    for owner in (tokenizer, processor, getattr(processor, "tokenizer", None)):
        if owner is not None and hasattr(owner, "batch_decode"):
            return owner.batch_decode
    return None


def _strip_prompt(text: str, prompt: str | None) -> str:
    """Remove an echoed prompt (BLIP decodes "a photography of ..." with its conditioning text)."""
    if prompt:
        normalized = " ".join(prompt.split())
        if normalized and text.lower().startswith(normalized.lower()):
            text = text[len(normalized) :].strip()
    return text


def _load_processor(name, tokenizer, revision, trust_remote_code):
    """`AutoProcessor`; when that yields only a tokenizer or only an image processor (repositories without a
    processor class), the image processor and tokenizer separately."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        processor = AutoProcessor.from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError):
        processor = None
    if hasattr(processor, "image_processor"):
        return processor, tokenizer
    image_processor = AutoImageProcessor.from_pretrained(name, **kwargs)
    return image_processor, tokenizer or AutoTokenizer.from_pretrained(name, **kwargs)


__all__ = ["Captioner"]
