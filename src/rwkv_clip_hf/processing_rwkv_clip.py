"""Processor of RWKV-CLIP: the image processor and the tokenizer behind one call, as `CLIPProcessor`."""

from __future__ import annotations

from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging

from .image_processing_rwkv_clip import RWKVCLIPImageProcessor
from .tokenization_rwkv_clip import RWKVCLIPTokenizer

logger = logging.get_logger(__name__)


class RWKVCLIPProcessor(ProcessorMixin):
    """Wraps an `RWKVCLIPImageProcessor` and an `RWKVCLIPTokenizer`.

    `processor(text=..., images=..., return_tensors="pt")` returns `input_ids`, `attention_mask` and
    `pixel_values`, exactly the inputs the original code gave its checkpoints. Text is truncated to the
    tokenizer's `model_max_length` (77); padding is optional (the model gives the same result for any
    padding) and uses id 0 like the original.
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_bundled(
        cls, image_size: int | None = None, context_length: int | None = None, config=None
    ) -> "RWKVCLIPProcessor":
        """The default processor, built from the files shipped in the package (no download).

        For a saved model, `AutoProcessor.from_pretrained(path)` loads the processor saved with it (the bundled
        default model: `AutoProcessor.from_pretrained(rwkv_clip_hf.default_model_path())`); this builds one for
        a model that has none, e.g. a fresh `RWKVCLIPModel(config)`: pass `config=model.config`.

        Args:
            image_size: the side of the square crop; the shorter side is resized to it. Default: the
                config's `vision_config.image_size`, else 224 (the released checkpoints).
            context_length: the text tower's context length. Default: the config's
                `text_config.max_position_embeddings`, else 77.
            config: an `RWKVCLIPConfig` (or a model) whose sizes the processor should match.
        """
        if config is not None:
            config = getattr(config, "config", config)
            sizes = {"image_size": config.vision_config.image_size,
                     "context_length": config.text_config.max_position_embeddings}  # fmt: skip
            given = {"image_size": image_size, "context_length": context_length}
            for name, value in given.items():
                if value is not None and value != sizes[name]:
                    logger.warning(
                        f"RWKVCLIPProcessor.from_bundled: {name}={value} differs from the config's {sizes[name]}"
                    )
            image_size = sizes["image_size"] if image_size is None else image_size
            context_length = sizes["context_length"] if context_length is None else context_length
        image_size = 224 if image_size is None else image_size
        context_length = 77 if context_length is None else context_length
        image_processor = RWKVCLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        return cls(image_processor=image_processor, tokenizer=RWKVCLIPTokenizer(model_max_length=context_length))


def check_processor_matches_model(processor, model_or_config) -> list[str]:
    """Warn (and return the warnings) when a processor prepares inputs of another size than the model's config
    says: another crop than `vision_config.image_size` (the model still runs, on a resized position grid, but
    gives other, usually worse, results), or a longer tokenizer context than `max_position_embeddings`.

    `processor`: an `RWKVCLIPProcessor`, or just its image processor or tokenizer.
    """
    config = getattr(model_or_config, "config", model_or_config)
    image_processor = getattr(processor, "image_processor", processor)
    tokenizer = getattr(processor, "tokenizer", processor)
    problems = []
    vision = getattr(config, "vision_config", None)
    crop = getattr(image_processor, "crop_size", None)
    if vision is not None and crop is not None and getattr(image_processor, "do_center_crop", True):
        height, width = _size_pair(crop)
        if (height, width) != (vision.image_size, vision.image_size):
            problems.append(
                f"the image processor crops {height}x{width} images but the model was built for "
                f"{vision.image_size}x{vision.image_size}; load the processor saved with the model "
                "(AutoProcessor.from_pretrained) or RWKVCLIPProcessor.from_bundled(config=model.config)"
            )
    text = getattr(config, "text_config", None)
    length = getattr(tokenizer, "model_max_length", None)
    if text is not None and isinstance(length, int) and length > text.max_position_embeddings:
        problems.append(
            f"the tokenizer keeps {length} tokens but the text tower's context is {text.max_position_embeddings}"
        )
    for problem in problems:
        logger.warning(problem)
    return problems


def _size_pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict):
        return size.get("height"), size.get("width")
    return getattr(size, "height", None), getattr(size, "width", None)


# saving writes this module and the `auto_map` entry next to the files (remote code, see remote_code_rwkv_clip)
RWKVCLIPProcessor.register_for_auto_class()

__all__ = ["RWKVCLIPProcessor", "check_processor_matches_model"]
