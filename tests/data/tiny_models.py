"""Tiny randomly initialised models for the data-side tests, all built from configs and local tokenizers (no
downloads): a chat LLM (Llama-style), a captioner (VisionEncoderDecoder: ViT + GPT-2), an image classifier (ViT)
and a zero-shot tagger (RWKV-CLIP), plus a small dataset of generated shapes with raw texts."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from rwkv_clip_hf import RWKVCLIPModel, RWKVCLIPProcessor
from rwkv_clip_hf.shapes import make_shapes_dataset

from conftest import randomize_, tiny_config

IMAGE_SIZE = 32
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = (
    "a an the one two three of on in with and is are picture image photo drawing shows showing near background "
    "canvas small large red green blue yellow purple orange black white gray beige circle circles square squares "
    "triangle triangles diamond diamonds star stars cross crosses left right top bottom center there "
    "disc box shape"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def word_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `WORDS` (other words become <unk>), with a chat template."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS + list(".,:;()-'\"!?"))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=SPECIALS[4:],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def no_special_tokens(tokenizer) -> dict:
    """`generate` arguments that keep a random model from emitting special tokens (so outputs are never empty)."""
    return {"suppress_tokens": [tokenizer.convert_tokens_to_ids(t) for t in SPECIALS], "min_new_tokens": 2}


def tiny_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_captioner(seed: int = 0):
    """`(model, image_processor, tokenizer)` of a ViT + GPT-2 VisionEncoderDecoder."""
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(chat_template=None)
    encoder = ViTConfig(
        image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=48,
    )  # fmt: skip
    decoder = GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    model = VisionEncoderDecoderModel(config).eval()
    image_processor = ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return model, image_processor, tokenizer


CLASSIFIER_LABELS = ["red_thing, crimson", "blue box", "green disc", "star"]


def tiny_classifier(seed: int = 0, multi_label: bool = False):
    """`(model, image_processor)` of a ViT classifier with `CLASSIFIER_LABELS`."""
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=48, id2label=dict(enumerate(CLASSIFIER_LABELS)),
        label2id={n: i for i, n in enumerate(CLASSIFIER_LABELS)},
        problem_type="multi_label_classification" if multi_label else None,
    )  # fmt: skip
    return ViTForImageClassification(config).eval(), ViTImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )


def tiny_rwkv_clip(seed: int = 3):
    """`(model, processor)`: a tiny RWKV-CLIP with the real tokenizer's vocabulary."""
    config = tiny_config(
        text_config={"vocab_size": 49408, "bos_token_id": 49406, "eos_token_id": 49407, "max_position_embeddings": 77},
        vision_config={"image_size": IMAGE_SIZE, "patch_size": 8},
    )
    model = randomize_(RWKVCLIPModel(config).eval(), seed=seed)
    return model, RWKVCLIPProcessor.from_bundled(image_size=IMAGE_SIZE)


def shapes_with_raw_text(rows: int, blank: tuple[int, ...] = ()):
    """Generated shapes with a raw-text column `alt_text` (the caption; rows in `blank` get `""`) and the
    shape attributes."""
    data = make_shapes_dataset(rows, seed=0, image_size=IMAGE_SIZE)
    texts = ["" if i in blank else t for i, t in enumerate(data["caption"])]
    data = data.select_columns(["image", "shape", "color"]).add_column("alt_text", texts)
    return data
