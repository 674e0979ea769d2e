"""Tokenizer of RWKV-CLIP: CLIP's byte-level BPE with the original text cleaning (docs/architecture.md §8).

The ids are those of the original code: `[49406] + bpe(clean(text)) + [49407]`, cut to 77 with the last id
forced to 49407, padded with id 0.

The byte-level BPE runs in `tokenizers` (Rust). The cleaning the original applies before it (ftfy repair,
HTML-unescaping twice, whitespace collapse, lower-casing) has no exact `tokenizers` normalizer: ftfy and
HTML entities have none at all, and `tokenizers`' lower-casing works character by character where Python's
`str.lower` (the original's) knows the final sigma. So `RWKVCLIPTokenizer` cleans every input string in
Python (`clean_text`) before handing it to the backend, whose normalizer is empty. Anything that encodes
through the tokenizer's public methods (`__call__`, `encode`, `tokenize`, the processor, the pipeline) gets
the original ids; calling `tokenizer.backend_tokenizer` directly skips the cleaning.

The original recognises the texts `<start_of_text>` and `<end_of_text>` inside a caption (after cleaning, so
in any letter case) and emits their ids, except where its split pattern has already swallowed the `<` into a
run of punctuation (a special text preceded by a character other than a space, letter or digit). The backend
matches the two as added tokens; `RWKVCLIPTokenizer` hides the occurrences the original does not recognise by
putting a marker (`\x01`, which the cleaning never lets through) inside them, and the backend's normalizer
deletes the marker again before the split.

The saved `tokenizer.json` carries the cleaning steps that `tokenizers` can express (NFC, whitespace collapse,
strip, lower-case) as its normalizer, so tools that read it directly get the original ids for plain text; HTML
entities, ftfy's repairs and the final sigma need this class.
"""

from __future__ import annotations

import gzip
import html
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

import ftfy
import numpy as np
import regex
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers.tokenization_utils_base import BatchEncoding
from transformers.tokenization_utils_tokenizers import TokenizersBackend

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 48894  # lines 1..48894 after the header: 256 + 256 + 48894 + 2 = 49408 ids
BOS_TOKEN = "<start_of_text>"
EOS_TOKEN = "<end_of_text>"
# The original pads with id 0, the byte symbol "!"; it is a padding value, not a special token.
PAD_TOKEN = "!"

# CLIP's split: the contractions, runs of letters, single digits, runs of anything else but spaces.
SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# The original's pattern also matches the special texts first (only for pieces of `tokenizer.json` users: in
# this class the backend has already cut them out as added tokens).
SPECIAL_SPLIT_PATTERN = "<start_of_text>|<end_of_text>|" + SPLIT_PATTERN

_WHITESPACE = regex.compile(r"\s+")
# Hides a special text from the backend's added-token matching; deleted by the backend's normalizer. ftfy
# removes this control character and HTML-unescaping never produces it, so no cleaned text contains it.
_HIDE = "\x01"
# A run of special texts; the original recognises it unless the character before it is punctuation (neither
# space, letter nor digit), which its split pattern joins with the "<" into one piece.
_SPECIAL_RUN = regex.compile(r"(?:<start_of_text>|<end_of_text>)+")
_SPECIAL_TEXT = regex.compile(r"<(?=start_of_text>|end_of_text>)")
_RUN_STARTER = regex.compile(r"[\s\p{L}\p{N}]")
# Characters ftfy may change in otherwise plain ASCII text: HTML entities, terminal escapes, control
# characters and carriage returns. Printable ASCII without "&" is left exactly as it is by ftfy.
_ASCII_SAFE = regex.compile(r"[\x20-\x25\x27-\x7e]*")


def bytes_to_unicode() -> dict[int, str]:
    """The byte-level alphabet: every byte maps to a printable character.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, soft hyphen, ...) are
    moved to code points 256 and up, in byte order. The dict's order is the vocabulary's order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def clean_text(text: str) -> str:
    """The original's text cleaning: ftfy repair, HTML-unescape twice, collapse whitespace, lower-case."""
    if not _ASCII_SAFE.fullmatch(text):
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return _WHITESPACE.sub(" ", text.strip()).strip().lower()


def hide_unrecognised_special_texts(text: str) -> str:
    """Mark the special texts of a cleaned caption that the original tokenizes as plain text (see module doc)."""
    if "_of_text>" not in text:
        return text
    pieces, end = [], 0
    for run in _SPECIAL_RUN.finditer(text):
        start = run.start()
        if start == 0 or _RUN_STARTER.match(text[start - 1]):
            continue
        pieces += [text[end:start], _SPECIAL_TEXT.sub("<" + _HIDE, run.group())]
        end = run.end()
    return "".join(pieces) + text[end:]


def saved_normalizer() -> normalizers.Normalizer:
    """The normalizer written to `tokenizer.json`: the original's cleaning as far as `tokenizers` can express it."""
    return normalizers.Sequence(
        [
            normalizers.Replace(_HIDE, ""),
            normalizers.NFC(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
            normalizers.Lowercase(),
        ]
    )


@lru_cache(maxsize=1)
def bundled_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges built from the BPE file shipped in the package (§8)."""
    with resources.files("rwkv_clip_hf").joinpath("data", BPE_FILE).open("rb") as handle:
        lines = gzip.decompress(handle.read()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(merge) != 2 for merge in merges):
        raise RuntimeError(f"{BPE_FILE}: expected {NUM_MERGES} merge lines of two symbols after the header")
    symbols = list(bytes_to_unicode().values())
    symbols += [symbol + "</w>" for symbol in symbols]
    symbols += ["".join(merge) for merge in merges]
    symbols += [BOS_TOKEN, EOS_TOKEN]
    return {symbol: index for index, symbol in enumerate(symbols)}, merges


class RWKVCLIPTokenizer(TokenizersBackend):
    """CLIP byte-level BPE tokenizer giving the original RWKV-CLIP ids (backed by `tokenizers`).

    Defaults: start id 49406 (`<start_of_text>`), end id 49407 (`<end_of_text>`), pad id 0, at most 77
    tokens. Unlike other transformers tokenizers, it truncates to `model_max_length` unless asked not to
    (`truncation=False`), as the original always did; the cut keeps the end token last.

    Args:
        vocab (`dict[str, int]`, *optional*): the vocabulary; defaults to the one built from the bundled
            CLIP BPE file.
        merges (`list`, *optional*): the BPE merges; defaults to the bundled ones.
        model_max_length (`int`, *optional*, defaults to 77): the context length of the text tower.
    """

    vocab_files_names = {"tokenizer_file": "tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]
    model = BPE

    def __init__(
        self,
        vocab: dict[str, int] | None = None,
        merges: list | None = None,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        pad_token: str = PAD_TOKEN,
        unk_token: str = EOS_TOKEN,
        model_max_length: int = 77,
        **kwargs,
    ):
        if vocab is None or merges is None:
            vocab, merges = bundled_vocab_and_merges()
        merges = [tuple(merge.split()) if isinstance(merge, str) else tuple(merge) for merge in merges]
        backend = Tokenizer(
            BPE(vocab=dict(vocab), merges=merges, end_of_word_suffix="</w>", unk_token=str(unk_token), fuse_unk=False)
        )
        # cleaning happens in Python, see the module docstring; the backend only deletes the hiding marker
        backend.normalizer = normalizers.Replace(_HIDE, "")
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex("(?i)" + SPECIAL_SPLIT_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        backend.decoder = decoders.Sequence(
            [decoders.ByteLevel(), decoders.Replace("</w>", " "), decoders.Strip(" ", 0, 1)]
        )
        self._tokenizer = backend
        # The original recognises the special texts in a caption (module docstring); saved configs of earlier
        # versions say otherwise.
        kwargs["split_special_tokens"] = False
        super().__init__(
            bos_token=AddedToken(bos_token, special=True) if isinstance(bos_token, str) else bos_token,
            eos_token=AddedToken(eos_token, special=True) if isinstance(eos_token, str) else eos_token,
            unk_token=unk_token,
            pad_token=pad_token,
            model_max_length=model_max_length,
            **kwargs,
        )
        self._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{self.bos_token} $A {self.eos_token}",
            pair=f"{self.bos_token} $A {self.eos_token} $B:1 {self.eos_token}:1",
            special_tokens=[(self.bos_token, self.bos_token_id), (self.eos_token, self.eos_token_id)],
        )
        self._tokenizer = _only_text_markers_added(self._tokenizer, (str(self.bos_token), str(self.eos_token)))

    def _get_padding_truncation_strategies(self, padding=False, truncation=None, max_length=None, **kwargs):
        # The original always cut captions to the context length; keep that unless the caller says otherwise.
        if truncation is None:
            truncation = True
        return super()._get_padding_truncation_strategies(
            padding=padding, truncation=truncation, max_length=max_length, **kwargs
        )

    def _save_pretrained(self, save_directory, file_names, legacy_format=None, filename_prefix=None):
        file_names = super()._save_pretrained(save_directory, file_names, legacy_format, filename_prefix)
        # tokenizer.json for readers without this class: the cleaning that `tokenizers` can express (module doc)
        tokenizer_file = next(name for name in file_names if str(name).endswith("tokenizer.json"))
        saved = Tokenizer.from_file(str(tokenizer_file))
        saved.normalizer = saved_normalizer()
        data = json.loads(saved.to_str())
        for token in data["added_tokens"]:
            token["normalized"] = True  # matched after the lower-casing, as the original does
        Path(tokenizer_file).write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
        return file_names

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        # The pad id 0 is also the text symbol "!", so padding is recognised by position (before the start
        # token, after the last end token) rather than by id, which would drop real exclamation marks.
        if isinstance(token_ids, dict):
            token_ids = token_ids["input_ids"]
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if skip_special_tokens:
            ids = [int(i) for i in token_ids]
            start = ids.index(self.bos_token_id) if self.bos_token_id in ids else 0
            end = len(ids) - ids[::-1].index(self.eos_token_id) if self.eos_token_id in ids else len(ids)
            if any(i != self.pad_token_id for i in ids[:start]):
                start = 0
            if any(i != self.pad_token_id for i in ids[end:]):
                end = len(ids)
            specials = {self.bos_token_id, self.eos_token_id}
            token_ids = [i for i in ids[start:end] if i not in specials]
        return super()._decode(token_ids, skip_special_tokens=False, **kwargs)

    def _encode_plus(self, text, text_pair=None, *args, is_split_into_words: bool = False, **kwargs):
        if isinstance(text, (list, tuple)) and len(text) == 0:
            # transformers fails with an IndexError here; the zero-shot pipeline passes its labels straight in
            raise ValueError(
                "RWKVCLIPTokenizer: got an empty list of texts (for zero-shot classification, give at least one "
                "candidate label)"
            )
        text = _clean_inputs(text, is_split_into_words)
        if text_pair is not None:
            text_pair = _clean_inputs(text_pair, is_split_into_words)
        batched = isinstance(text, (list, tuple)) and (
            not is_split_into_words or (len(text) > 0 and isinstance(text[0], (list, tuple)))
        )
        return_tensors = kwargs.get("return_tensors")
        if not batched or return_tensors is None or kwargs.get("return_overflowing_tokens"):
            return super()._encode_plus(text, text_pair, *args, is_split_into_words=is_split_into_words, **kwargs)
        # transformers converts batches to tensors through a pure-Python flatten of every list, which costs
        # more than the BPE itself for thousands of captions; rectangular batches go through numpy instead.
        kwargs["return_tensors"] = None
        output = super()._encode_plus(text, text_pair, *args, is_split_into_words=is_split_into_words, **kwargs)
        data = {}
        for key, value in output.items():
            lengths = {len(row) for row in value} if value and isinstance(value[0], list) else set()
            data[key] = np.asarray(value, dtype=np.int64) if len(lengths) == 1 else value
        return BatchEncoding(data, output.encodings, tensor_type=return_tensors)


def _only_text_markers_added(backend: Tokenizer, specials: tuple[str, ...]) -> Tokenizer:
    # transformers adds every special token to the backend's added vocabulary, the pad "!" too; matched in the
    # text, it would cut every "!" out of its BPE word. Only the start / end texts are matched.
    fresh = Tokenizer(backend.model)
    fresh.normalizer = backend.normalizer
    fresh.pre_tokenizer = backend.pre_tokenizer
    fresh.post_processor = backend.post_processor
    fresh.decoder = backend.decoder
    fresh.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    fresh.encode_special_tokens = False
    return fresh


def _clean_inputs(text, is_split_into_words: bool):
    if isinstance(text, str):
        return hide_unrecognised_special_texts(clean_text(text))
    if isinstance(text, (list, tuple)):
        return [_clean_inputs(item, is_split_into_words) for item in text]
    return text  # not text: the base class raises its usual error


# saving writes this module and the `auto_map` entry next to the files (remote code, see remote_code_rwkv_clip)
RWKVCLIPTokenizer.register_for_auto_class()

__all__ = ["RWKVCLIPTokenizer", "bytes_to_unicode", "clean_text"]
