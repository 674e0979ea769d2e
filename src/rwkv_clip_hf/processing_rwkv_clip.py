"""Processor of RWKV-CLIP: the image processor and the tokenizer behind one call, as `CLIPProcessor`."""

from __future__ import annotations

from transformers.processing_utils import ProcessorMixin

from .image_processing_rwkv_clip import RWKVCLIPImageProcessor
from .tokenization_rwkv_clip import RWKVCLIPTokenizer


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
    def from_bundled(cls, image_size: int = 224, context_length: int = 77) -> "RWKVCLIPProcessor":
        """The default processor, built from the files shipped in the package (no download).

        Args:
            image_size: the side of the square crop; the shorter side is resized to it.
            context_length: the text tower's context length (`max_position_embeddings`).
        """
        image_processor = RWKVCLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        return cls(image_processor=image_processor, tokenizer=RWKVCLIPTokenizer(model_max_length=context_length))


# saving writes this module and the `auto_map` entry next to the files (remote code, see remote_code_rwkv_clip)
RWKVCLIPProcessor.register_for_auto_class()

__all__ = ["RWKVCLIPProcessor"]
