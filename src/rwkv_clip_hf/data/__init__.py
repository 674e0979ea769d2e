"""The paper's data side: diverse description generation.

For every image: a synthetic caption Ts from an image-to-text model (`Captioner`), tags from an image classifier
or zero-shot over a tag vocabulary (`ClassifierTagger`, `ZeroShotTagger`), and a generated description Tg from an
instruction-tuned LLM that merges the raw text Tr, Ts and the tags (`DescriptionMerger` with a `MergePrompt`).
`DescriptionPipeline` runs them over a `datasets.Dataset` in resumable shards and writes the columns
`rwkv_clip_hf.training.ContrastiveTransform` samples from. `build_instruction_dataset` and
`tokenize_instruction_dataset` make fine-tuning data for the merger from the same prompt. The command line is
`rwkv-clip-data` (`cli.py`). Needs `datasets` (the `train` or `eval` extra).

This folder also holds the package's data files (the BPE vocabulary, the zero-shot templates and class names),
read with `importlib.resources.files("rwkv_clip_hf").joinpath("data", ...)`.
"""

from .captioning import Captioner
from .instructions import (
    IGNORE_INDEX,
    build_instruction_dataset,
    tokenize_conversation,
    tokenize_instruction_dataset,
)
from .merging import DescriptionMerger, clean_generation
from .pipeline import DescriptionPipeline, OutputColumns
from .prompts import DEFAULT_SYSTEM_PROMPT, DEFAULT_TEMPLATE, MergePrompt, normalize_tags, render_chat
from .stage import ModelStage
from .tagging import ClassifierTagger, ZeroShotTagger, clean_label, select_tags

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "DEFAULT_TEMPLATE",
    "IGNORE_INDEX",
    "Captioner",
    "ClassifierTagger",
    "DescriptionMerger",
    "DescriptionPipeline",
    "MergePrompt",
    "ModelStage",
    "OutputColumns",
    "ZeroShotTagger",
    "build_instruction_dataset",
    "clean_generation",
    "clean_label",
    "normalize_tags",
    "render_chat",
    "select_tags",
    "tokenize_conversation",
    "tokenize_instruction_dataset",
]
