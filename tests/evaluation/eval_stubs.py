"""A stub CLIP-API model and processor whose features are given by tables, and tiny generated datasets.

Each image is a solid PNG whose red value is its id; the stub processor reads the id back and the stub model
returns row `id` of its image table. Texts are looked up in a dict. So every feature that reaches a metric is
known exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value
from datasets import Image as ImageFeature
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling


def id_image(image_id: int, size: int = 6) -> Image.Image:
    """A solid RGB image whose red channel is `image_id` (0..255)."""
    pixels = np.zeros((size, size + 2, 3), dtype=np.uint8)
    pixels[..., 0] = image_id
    pixels[..., 1] = 255 - image_id
    return Image.fromarray(pixels)


class StubImageProcessor:
    def to_dict(self):
        return {"stub": True}


class StubTokenizer:
    model_max_length = 77


class StubProcessor:
    """`images=` -> pixel_values `(B, 1)` holding each image's id; `text=` -> input_ids `(B, 1)` from `vocab`."""

    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab
        self.image_processor = StubImageProcessor()
        self.tokenizer = StubTokenizer()

    def __call__(self, images=None, text=None, return_tensors="pt", **kwargs):
        if images is not None:
            ids = [int(np.asarray(image.convert("RGB"))[0, 0, 0]) for image in images]
            return {"pixel_values": torch.tensor(ids, dtype=torch.float32)[:, None]}
        ids = [self.vocab[t] for t in text]
        return {"input_ids": torch.tensor(ids)[:, None], "attention_mask": torch.ones(len(ids), 1, dtype=torch.long)}


class StubModel(torch.nn.Module):
    """`get_image_features` returns a `BaseModelOutputWithPooling` (as transformers v5 CLIPModel);
    `get_text_features` returns a plain tensor (as older models): both forms must work."""

    def __init__(self, image_table, text_table):
        super().__init__()
        self.register_buffer("image_table", torch.as_tensor(np.asarray(image_table), dtype=torch.float32))
        self.register_buffer("text_table", torch.as_tensor(np.asarray(text_table), dtype=torch.float32))
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device and dtype
        self.image_calls = 0
        self.text_calls = 0

    def get_image_features(self, pixel_values):
        self.image_calls += 1
        return BaseModelOutputWithPooling(pooler_output=self.image_table[pixel_values[:, 0].long()])

    def get_text_features(self, input_ids, attention_mask=None):
        self.text_calls += 1
        return self.text_table[input_ids[:, 0]]


def save_classification_dataset(path, labels, classnames, split="test") -> str:
    """A `save_to_disk` DatasetDict with one split: image i has id i, label `labels[i]`."""
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(classnames))})
    data = Dataset.from_dict(
        {"image": [id_image(i) for i in range(len(labels))], "label": list(labels)}, features=features
    )
    DatasetDict({split: data}).save_to_disk(str(path))
    return str(path)


def save_caption_dataset(path, captions, split="test") -> str:
    """A `save_to_disk` DatasetDict with one split: image i has id i and the list of captions `captions[i]`."""
    features = Features({"image": ImageFeature(), "caption": Sequence(Value("string"))})
    data = Dataset.from_dict(
        {"image": [id_image(i) for i in range(len(captions))], "caption": captions}, features=features
    )
    DatasetDict({split: data}).save_to_disk(str(path))
    return str(path)
