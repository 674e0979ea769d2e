import random
from pathlib import Path

import ftfy
import pytest

from rwkv_clip_hf import RWKVCLIPTokenizer
from rwkv_clip_hf.tokenization_rwkv_clip import clean_text

from reference_tokenizer import ReferenceTokenizer

BPE_PATH = Path(__file__).resolve().parents[1] / "src" / "rwkv_clip_hf" / "data" / "bpe_simple_vocab_16e6.txt.gz"

TRICKY = [
    "",
    "   ",
    " \t\n\r\n ",
    "A PHOTO OF A DOG",
    "a photo of a dog.",
    "It's DON'T we'll I'M you're they've she'd",
    "rock &amp; roll",
    "rock &amp;amp; roll",  # double-escaped: unescaped twice
    "&lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;apos&#39; &#x263A;",
    "<b>rock &amp; roll</b>",  # looks like HTML: ftfy leaves the entity, the two unescapes do not
    "cafÃ© crÃ¨me â€œquotedâ€\x9d",  # mojibake that ftfy repairs
    "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.",
    "dog 🐶 and cat 🐱 👩‍👩‍👧 🇯🇵",
    "東京タワーの夜景",
    "Москва — столица России",
    "ΟΔΟΣ ΣΟΦΙΑΣ",  # final sigma: Python's lower() is context-sensitive
    "İstanbul ǅ ẞ ﬁsh",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "e\u0301te\u0301 vs été",
    "12345 3.14159 1,000,000 2nd 3rd 42nd Ⅻ ½ ²",
    "!!!??? ... --- $$$ @@@ ### ((( ))) *** ~~~ ^^^",
    "!$ !% !& ?! !? .! a!b",
    "tabs\tand\nnew\nlines\x0bvertical\x0cfeed",
    "nbsp\xa0here\u2009thin\u3000ideographic\u200bzero-width",
    "line\u2028separator\x85next\x1cfile",
    "\x1b[31mred terminal\x1b[0m text\x00nul\x7fdel",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ",
    "<start_of_text> <end_of_text> <|startoftext|> <|endoftext|>",
    # the special texts inside captions, in any case, next to letters, digits, punctuation and each other
    "A <START_OF_TEXT>photo<End_Of_Text> of 2<end_of_text>3 cats",
    "x!<end_of_text> y.<START_OF_TEXT><end_of_text> 's<end_of_text> '<end_of_text> z<end_of_text><start_of_text>!",
    "<end_of_text><end_of_text>end_of_text> <end_of_text <start_of_text<end_of_text> &lt;end_of_text&gt;",
    "e\u0301<end_of_text> 日本<end_of_text> <<end_of_text> ><end_of_text>",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE",
    "a " + "very " * 100 + "long caption",
    "supercalifragilisticexpialidocious " * 20,
]


@pytest.fixture(scope="module")
def tokenizer():
    return RWKVCLIPTokenizer()


@pytest.fixture(scope="module")
def reference():
    return ReferenceTokenizer(BPE_PATH)


def test_vocabulary_layout(tokenizer):
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 0)
    assert tokenizer.model_max_length == 77


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_ids_equal_reference(tokenizer, reference, text):
    expected = reference(text)
    got = tokenizer(text, padding="max_length", max_length=77)["input_ids"]
    assert got == expected
    # default call: truncated to 77 (as the original), not padded
    unpadded = tokenizer(text)["input_ids"]
    assert unpadded == expected[: len(unpadded)] and set(expected[len(unpadded) :]) <= {0}


def test_batch_equals_reference_and_padding_is_zero(tokenizer, reference):
    batch = tokenizer(TRICKY, padding="max_length", return_tensors="pt")
    assert batch["input_ids"].shape == (len(TRICKY), 77)
    assert batch["input_ids"].tolist() == [reference(t) for t in TRICKY]
    # attention mask marks exactly start..end
    lengths = [min(len(reference.encode(t)) + 2, 77) for t in TRICKY]
    assert batch["attention_mask"].sum(-1).tolist() == lengths


def test_long_caption_keeps_end_token(tokenizer):
    ids = tokenizer("word " * 200)["input_ids"]
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407
    assert len(tokenizer("word " * 200, truncation=False)["input_ids"]) == 202


def test_random_strings_equal_reference(tokenizer, reference):
    rng = random.Random(0)
    alphabet = "abcXYZ019 !?.,'&;#<>/-_\t\n" + "éÉßçøÃ©â€™\xa0\u200b\u0301ΣσςΟ日本語🙂👍\x1b\x00\x7f"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(300)]
    texts += ["&" + rng.choice(["amp;", "lt;", "#38;", "amp;amp;", "nbsp;", "x;"]) + "x" for _ in range(20)]
    got = tokenizer(texts, padding="max_length")["input_ids"]
    assert got == [reference(t) for t in texts]


def test_ascii_fast_path_matches_ftfy(reference):
    # clean_text skips ftfy for printable ASCII without "&"; that is exact only if ftfy leaves such text alone
    rng = random.Random(1)
    printable = [chr(c) for c in range(0x20, 0x7F) if chr(c) != "&"]
    for _ in range(2000):
        text = "".join(rng.choice(printable) for _ in range(rng.randint(0, 60)))
        assert ftfy.fix_text(text) == text
        assert clean_text(text) == reference.clean(text)


def test_pairs_and_pretokenized_inputs_are_cleaned(tokenizer, reference):
    words = ["ROCK", "&amp;", "Roll"]
    ids = tokenizer(words, is_split_into_words=True)["input_ids"]
    assert ids == [49406] + [i for w in words for i in reference.encode(w)] + [49407]


def test_decode_round_trip(tokenizer):
    ids = tokenizer("A photo of a DOG, 2 cats & 10 birds!")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a dog , 2 cats & 1 0 birds !"


def test_save_and_load(tmp_path, tokenizer, reference):
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is RWKVCLIPTokenizer
    assert loaded(TRICKY, padding="max_length")["input_ids"] == [reference(t) for t in TRICKY]


def test_rejects_non_text(tokenizer):
    with pytest.raises((ValueError, TypeError)):
        tokenizer(123)
    with pytest.raises((ValueError, TypeError)):
        tokenizer([b"bytes"])


def test_decode_drops_padding_but_keeps_real_exclamation_marks(tokenizer):
    # id 0 is both the pad id and the text symbol "!" (as in "hi!~"): padding is recognised by position
    texts = ["hi!~ there", "!$", "x"]
    for side in ("right", "left"):
        batch = tokenizer(texts, padding="max_length", max_length=12, padding_side=side)["input_ids"]
        assert any(0 in row[1:-1] for row in tokenizer(texts)["input_ids"])  # a real id 0 is present
        assert tokenizer.batch_decode(batch, skip_special_tokens=True) == ["hi !~ there", "!$", "x"]


def test_special_texts_in_a_caption_give_their_ids(tokenizer, reference):
    # the original's split pattern matches the special texts first (after lower-casing, so in any case) and maps
    # them to their ids, unless a run of punctuation has already taken the "<"
    a, b = reference.encode("a"), reference.encode("b")
    assert tokenizer("a <END_OF_TEXT> b")["input_ids"] == [49406, *a, 49407, *b, 49407]
    assert tokenizer("a<Start_of_Text><end_of_text>b")["input_ids"] == [49406, *a, 49406, 49407, *b, 49407]
    plain = tokenizer("a!<end_of_text>")["input_ids"]
    assert plain == [49406, *reference.encode("a!<end_of_text>"), 49407] and plain.count(49407) == 1
    assert tokenizer.tokenize("x <end_of_text>") == ["x</w>", "<end_of_text>"]
    # a "!" is text, never the pad token: it stays part of its BPE word
    assert tokenizer("wow!!")["input_ids"] == [49406, *reference.encode("wow!!"), 49407]


def test_saved_tokenizer_json_alone_gives_original_ids_for_plain_text(tmp_path, tokenizer, reference):
    from tokenizers import Tokenizer

    tokenizer.save_pretrained(tmp_path)
    plain = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    texts = [
        "A PHOTO OF THE BIG RED CAR!!",
        "  Two\tdogs\n\nplaying   in the SNOW.  ",
        "It's DON'T we'll I'M you're",
        "e\u0301te\u0301 vs été",
        "12345 3.14159 x <END_OF_TEXT> y",
    ]
    for text in texts:
        assert plain.encode(text).ids == [49406, *reference.encode(text), 49407], text
