"""A straightforward re-implementation of the original tokenizer from docs/architecture.md §8, for the tests.

Pure Python, independent of the package: its own byte alphabet, its own BPE loop over merge ranks, the
cleaning steps in the order of the spec. Slow, obviously correct.
"""

import gzip
import html

import ftfy
import regex

START, END, CONTEXT = 49406, 49407, 77


def _byte_alphabet():
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class ReferenceTokenizer:
    def __init__(self, bpe_path):
        with gzip.open(bpe_path, "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:48895]]
        self.byte_chars = _byte_alphabet()
        symbols = list(self.byte_chars.values())
        symbols = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        self.ids = {s: i for i, s in enumerate(symbols)}
        assert len(self.ids) == 49406
        self.rank = {m: i for i, m in enumerate(merges)}
        # as CLIP's: the special texts first, each a piece of its own that maps to its id
        self.specials = {"<start_of_text>": START, "<end_of_text>": END}
        self.pattern = regex.compile(
            r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )

    def clean(self, text):
        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
        text = text.strip()
        text = regex.sub(r"\s+", " ", text).strip()
        return text.lower()

    def bpe(self, piece):
        symbols = list(piece[:-1]) + [piece[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = [(self.rank.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
            best_rank, _ = min(pairs)
            if best_rank == float("inf"):
                break
            a, b = next((symbols[i], symbols[i + 1]) for r, i in pairs if r == best_rank)
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence of the best pair, left to right
                if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return [self.ids[s] for s in symbols]

    def encode(self, text):
        ids = []
        for piece in self.pattern.findall(self.clean(text)):
            if piece in self.specials:
                ids.append(self.specials[piece])
                continue
            mapped = "".join(self.byte_chars[b] for b in piece.encode("utf-8"))
            ids.extend(self.bpe(mapped))
        return ids

    def __call__(self, text):
        """The 77 ids the original feeds the text tower: start, bpe, end, cut with end forced, zero padded."""
        ids = [START] + self.encode(text) + [END]
        if len(ids) > CONTEXT:
            ids = ids[:CONTEXT]
            ids[-1] = END
        return ids + [0] * (CONTEXT - len(ids))
