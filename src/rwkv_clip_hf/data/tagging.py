"""Tags for each image (the paper's open-set detection tags): from an image classifier's labels, or zero-shot
over a tag vocabulary with any CLIP-API model (RWKV-CLIP included)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch

from ..evaluation.features import encode_texts, pooled
from .stage import ModelStage, model_device_dtype, rgb_images, to_device


def select_tags(
    scores: torch.Tensor, labels: Sequence[str], threshold: float | None, top_k: int | None
) -> list[list[str]]:
    """Per row of `scores` (images x labels): the labels scoring at least `threshold`, best first, at most
    `top_k` of them (None: no limit of that kind). Labels that are blank are never returned."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    tags = []
    for row, ranking in zip(scores.tolist(), order.tolist()):
        chosen = []
        for index in ranking:
            if top_k is not None and len(chosen) >= top_k:
                break
            if threshold is not None and row[index] < threshold:
                break
            if labels[index].strip() and labels[index] not in chosen:
                chosen.append(labels[index])
        tags.append(chosen)
    return tags


def _check_limits(threshold, top_k) -> None:
    if top_k is not None and top_k < 1:
        raise ValueError(f"`top_k` must be at least 1, got {top_k}")
    if threshold is None and top_k is None:
        raise ValueError("give a tag threshold, a top-k, or both (with neither, every label would be a tag)")


def clean_label(label: str) -> str:
    """A classifier label as a tag: its first comma-separated name, underscores as spaces
    (`"tabby, tabby_cat"` -> `"tabby"`)."""
    return " ".join(str(label).split(",")[0].replace("_", " ").split())


class ClassifierTagger(ModelStage):
    """Tags from an image-classification model (`AutoModelForImageClassification`): its labels that score at
    least `threshold`, best first, at most `top_k`.

    Args:
        model: a model instance or a directory / Hub id, with `config.id2label`.
        image_processor: its image processor (loaded with `AutoImageProcessor` from the model's name if omitted).
        threshold: minimum probability (default 0.25).
        top_k: maximum number of tags (default 5).
        activation: `"sigmoid"` (multi-label models, e.g. RAM-style taggers), `"softmax"`, or `"auto"`: sigmoid
            when `config.problem_type == "multi_label_classification"`, else softmax.
        clean_labels: turn labels into tags with `clean_label` (first comma-separated name, underscores as spaces).
        device, dtype, revision, trust_remote_code: see `ModelStage`.

    Calling it with a list of images returns a list of tags (strings) per image.
    """

    name = "tags"

    def __init__(
        self,
        model,
        image_processor=None,
        *,
        threshold: float | None = 0.25,
        top_k: int | None = 5,
        activation: str = "auto",
        clean_labels: bool = True,
        **stage_kwargs,
    ):
        super().__init__(model, **stage_kwargs)
        if activation not in ("auto", "sigmoid", "softmax"):
            raise ValueError(f"activation {activation!r}: choose auto, sigmoid or softmax")
        _check_limits(threshold, top_k)
        self.image_processor = image_processor
        self.threshold, self.top_k = threshold, top_k
        self.activation = activation
        self.clean_labels = clean_labels
        self.labels: list[str] = []

    def settings(self) -> dict:
        return {
            "threshold": self.threshold,
            "top_k": self.top_k,
            "activation": self.activation,
            "clean_labels": self.clean_labels,
        }

    def _load_pretrained(self) -> None:
        from transformers import AutoModelForImageClassification

        import rwkv_clip_hf  # noqa: F401  (registers RWKVCLIPForImageClassification)

        try:
            self.model = AutoModelForImageClassification.from_pretrained(self.source, **self.pretrained_kwargs())
        except ValueError as error:  # "Unrecognized configuration class ..."
            raise ValueError(
                f"`model` {self.source}: cannot be loaded as an image classifier ({error}); for a CLIP-style model "
                "give a tag list (`ZeroShotTagger(model, vocabulary=...)`)"
            ) from None
        self._complete_instance()

    def _complete_instance(self) -> None:
        if self.image_processor is None:
            self.image_processor = self._load_companion("AutoImageProcessor", "image processor")

    def _check(self) -> None:
        id2label = getattr(self.model.config, "id2label", None) or {}
        num_labels = getattr(self.model.config, "num_labels", len(id2label))
        if not id2label or set(map(int, id2label)) != set(range(num_labels)):
            raise ValueError(
                f"ClassifierTagger: {type(self.model).__name__} has no label names (config.id2label); "
                "for a tag list of your own use a CLIP-style model with a tag vocabulary (ZeroShotTagger)"
            )
        names = [str(id2label[i] if i in id2label else id2label[str(i)]) for i in range(num_labels)]
        self.labels = [clean_label(n) for n in names] if self.clean_labels else names
        self._activation = self.activation
        if self.activation == "auto":
            multi = getattr(self.model.config, "problem_type", None) == "multi_label_classification"
            self._activation = "sigmoid" if multi else "softmax"

    @torch.inference_mode()
    def __call__(self, images: Sequence) -> list[list[str]]:
        self.load()
        images = rgb_images(images)
        if not images:
            return []
        device, dtype = model_device_dtype(self.model)
        inputs = to_device(self.image_processor(images=images, return_tensors="pt"), device, dtype)
        logits = self.model(**inputs).logits.float()
        scores = logits.sigmoid() if self._activation == "sigmoid" else logits.softmax(dim=-1)
        return select_tags(scores.cpu(), self.labels, self.threshold, self.top_k)


class ZeroShotTagger(ModelStage):
    """Tags from a user-supplied vocabulary, scored zero-shot by a CLIP-API model: anything with
    `get_image_features` / `get_text_features` (RWKV-CLIP, transformers CLIP and SigLIP, ...).

    Each tag is embedded once through `template` ("a photo of {}."); each image's cosine similarities to the
    tags are turned into scores, and the tags scoring at least `threshold` (best first, at most `top_k`) are kept.

    Args:
        model: a model instance or a directory / Hub id (loaded with `AutoModel`; `import rwkv_clip_hf` registers
            RWKV-CLIP).
        processor: its processor (`AutoProcessor` from the model's name if omitted).
        vocabulary: the tags, e.g. a RAM-style tag list or the class names of your domain.
        template: how a tag is phrased for the text tower; `{}` is the tag.
        threshold: minimum score (default 0.05).
        top_k: maximum number of tags (default 5).
        score: `"softmax"` (default): zero-shot classification probabilities over the vocabulary,
            `softmax(logit_scale * cosine)` with the model's `logit_scale` (100 without one): the tags compete, so
            a large vocabulary needs a lower threshold; or `"cosine"`: the raw cosine similarity (model-specific
            scale, e.g. 0.25-0.35 for a CLIP match).
        text_batch_size: batch size for embedding the vocabulary.
        device, dtype, revision, trust_remote_code: see `ModelStage`.
    """

    name = "tags"

    def __init__(
        self,
        model,
        processor=None,
        *,
        vocabulary: Sequence[str],
        template: str = "a photo of {}.",
        threshold: float | None = 0.05,
        top_k: int | None = 5,
        score: str = "softmax",
        text_batch_size: int = 256,
        **stage_kwargs,
    ):
        super().__init__(model, **stage_kwargs)
        vocabulary = [" ".join(str(t).split()) for t in vocabulary]
        vocabulary = list(dict.fromkeys(t for t in vocabulary if t))
        if not vocabulary:
            raise ValueError("ZeroShotTagger: the tag vocabulary is empty")
        if template.count("{}") != 1:
            raise ValueError(f"ZeroShotTagger: the template {template!r} must contain one '{{}}' for the tag")
        if score not in ("softmax", "cosine"):
            raise ValueError(f"score {score!r}: choose softmax or cosine")
        _check_limits(threshold, top_k)
        self.processor = processor
        self.vocabulary = vocabulary
        self.template = template
        self.threshold, self.top_k = threshold, top_k
        self.score = score
        self.text_batch_size = text_batch_size
        self._tag_features: torch.Tensor | None = None

    def settings(self) -> dict:
        digest = hashlib.sha256(json.dumps(self.vocabulary).encode()).hexdigest()[:16]
        return {
            "vocabulary_size": len(self.vocabulary),
            "vocabulary_sha256": digest,
            "template": self.template,
            "threshold": self.threshold,
            "top_k": self.top_k,
            "score": self.score,
        }

    def _load_pretrained(self) -> None:
        from transformers import AutoModel

        import rwkv_clip_hf  # noqa: F401  (registers RWKV-CLIP with the Auto classes)

        self.model = AutoModel.from_pretrained(self.source, **self.pretrained_kwargs())
        self._complete_instance()

    def _complete_instance(self) -> None:
        if self.processor is None:
            self.processor = self._load_companion("AutoProcessor", "processor")

    def _check(self) -> None:
        for method in ("get_image_features", "get_text_features"):
            if not hasattr(self.model, method):
                raise ValueError(
                    f"ZeroShotTagger: {type(self.model).__name__} has no {method}(); a tag vocabulary needs a "
                    "CLIP-style dual encoder (an image classifier is a `ClassifierTagger`)"
                )
        device, _ = model_device_dtype(self.model)
        prompts = [self.template.format(tag) for tag in self.vocabulary]
        features = encode_texts(self.model, self.processor, prompts, self.text_batch_size, desc="tag vocabulary")
        self._tag_features = torch.nn.functional.normalize(features, dim=-1).to(device)

    def _logit_scale(self) -> float:
        scale = getattr(self.model, "logit_scale", None)
        return float(scale.exp()) if isinstance(scale, torch.Tensor) else 100.0

    @torch.inference_mode()
    def __call__(self, images: Sequence) -> list[list[str]]:
        self.load()
        images = rgb_images(images)
        if not images:
            return []
        device, dtype = model_device_dtype(self.model)
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        features = pooled(self.model.get_image_features(pixel_values=pixel_values.to(device=device, dtype=dtype)))
        similarity = torch.nn.functional.normalize(features.float(), dim=-1) @ self._tag_features.T
        scores = (self._logit_scale() * similarity).softmax(dim=-1) if self.score == "softmax" else similarity
        return select_tags(scores.cpu(), self.vocabulary, self.threshold, self.top_k)


__all__ = ["ClassifierTagger", "ZeroShotTagger", "clean_label", "select_tags"]
