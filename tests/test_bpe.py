"""bpe.py: it learns the merges and tokens of Hugging Face's `tokenizers`; decoding gives the text back."""

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import bpe

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "data" / "shakespeare" / "input.txt").read_text(encoding="utf-8")
TRAIN, HELD_OUT = TEXT[:200_000], TEXT[200_000:250_000]
# Accents (one precomposed, one combining), CJK, emoji (with a skin tone, and a family joined by U+200D),
# tabs, runs of spaces, Windows and blank lines, and whitespace at the end.
UNICODE = ("Café, naïve Ångström, e\u0301: 東京で日本語を話す。 Emoji 👋🏽 👩\u200d👩\u200d👧 ok!\n\tTabs\t\tand"
           "   runs  of     spaces,\r\nWindows lines\n\n\n\nand blank ones   \t \n  ")

# GPT-2's printable stand-in for each byte, the characters with which the library writes its tokens.
PRINTABLE = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or b >= 174]
OTHERS = [b for b in range(256) if b not in PRINTABLE]
CHARS = {**{b: chr(b) for b in PRINTABLE}, **{b: chr(256 + i) for i, b in enumerate(OTHERS)}}


def shown(token: bytes) -> str:
    return "".join(CHARS[b] for b in token)


def library(text: str, vocab_size: int) -> Tokenizer:
    """The `tokenizers` library's byte-level BPE, trained on text as train_bpe is."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    tokenizer.train_from_iterator([text], trainer=trainer)
    return tokenizer


def library_merges(tokenizer: Tokenizer) -> list[tuple[str, str]]:
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(m.split(" ") if isinstance(m, str) else m) for m in merges]  # older versions write "a b"


@pytest.fixture(scope="module")
def shakespeare():
    """Our merges and the library's tokenizer, both trained on the first 200 KB of Shakespeare."""
    return bpe.train_bpe(TRAIN, 512), library(TRAIN, 512)


def test_the_stand_ins_are_the_library_alphabet():
    assert sorted(CHARS.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())


def test_merges_equal_the_library_merges_on_shakespeare(shakespeare):
    merges, tokenizer = shakespeare
    assert len(merges) == 512 - 256
    assert [(shown(a), shown(b)) for a, b in merges] == library_merges(tokenizer)


@pytest.mark.parametrize("text, vocab_size", [(UNICODE * 20, 400), ("xy\n\n", 258)], ids=["unicode", "tie"])
def test_merges_equal_the_library_merges_with_ties(text, vocab_size):
    # Repeating a text makes every count a multiple of 20, so many pairs tie; in "xy\n\n" the two pairs
    # tie, and the library merges "xy" first although b"\n" < b"x".
    merges = bpe.train_bpe(text, vocab_size)
    assert [(shown(a), shown(b)) for a, b in merges] == library_merges(library(text, vocab_size))


def test_held_out_text_encodes_to_the_library_tokens(shakespeare):
    merges, tokenizer = shakespeare
    ids = bpe.encode(HELD_OUT, merges)
    vocab = [bytes([b]) for b in range(256)] + [a + b for a, b in merges]
    assert len(HELD_OUT) / len(ids) > 1.8  # 1.90 characters a token with these 256 merges
    assert [shown(vocab[i]) for i in ids] == tokenizer.encode(HELD_OUT).tokens


def test_small_examples_by_hand():
    # Pieces "ab", " ab", " ab", " abc": "ab" occurs 4 times, then " " + "ab" 3 times, then " ab" + "c" once;
    # then every piece is one token, and training stops before vocab_size.
    merges = bpe.train_bpe("ab ab ab abc", 1000)
    assert merges == [(b"a", b"b"), (b" ", b"ab"), (b" ab", b"c")]
    assert bpe.encode("ab abc", merges) == [256, 258]
    assert bpe.encode("ab abc", merges[:2]) == [256, 257, ord("c")]
    # Overlapping occurrences merge from the left, in training ("aaa" becomes "aa" "a") as in encoding.
    assert bpe.train_bpe("aaa", 1000) == [(b"a", b"a"), (b"aa", b"a")]
    assert bpe.encode("aaaaa", [(b"a", b"a")]) == [256, 256, ord("a")]


@pytest.mark.parametrize("train", ["shakespeare", "unicode"])
def test_decode_encode_round_trip(train, shakespeare):
    merges = shakespeare[0] if train == "shakespeare" else bpe.train_bpe(UNICODE * 20, 400)
    for text in [UNICODE, UNICODE[::-1], HELD_OUT[:2000], " ", ""]:
        ids = bpe.encode(text, merges)
        assert bpe.decode(ids, merges) == text
        assert all(0 <= i < 256 + len(merges) for i in ids)
    assert len(bpe.encode(UNICODE, merges)) < len(UNICODE.encode("utf-8"))  # the merges were used


def test_prepare_learns_these_merges_and_exports_load_in_auto_tokenizer(tmp_path):
    """prepare.py --data.tokenizer train-bpe learns the merges of train_bpe (its tokenizer also holds the
    end-of-text token and ChatML's markers); a model trained on it exports a tokenizer that AutoTokenizer
    reads with our ids, and its chat template too."""
    import export
    import train
    from config import DataConfig
    from prepare import prepare
    from tokenizer import tokenizer_from_meta
    from transformers import AutoTokenizer

    (tmp_path / "t.txt").write_text(TRAIN, encoding="utf-8")
    d = DataConfig(input=str(tmp_path / "t.txt"), tokenizer="train-bpe", vocab_size=512, processed_dir=str(tmp_path / "p"))
    meta = prepare(d, progress=False)
    merges = json.loads(meta["files"]["tokenizer.json"])["model"]["merges"]
    assert [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges] == \
        [(shown(a), shown(b)) for a, b in bpe.train_bpe(TRAIN, 509)]  # 3 of the 512 are special tokens
    assert train.cli(["--config", str(ROOT / "configs/cpu/smoke.toml"), "--data.processed_dir", str(tmp_path / "p"),
                      "--training.out_dir", str(tmp_path / "run"), "--max-iters", "2", "--device", "cpu"]) == 0
    export.export(tmp_path / "run", tmp_path / "hf", "hf")
    theirs, ours = AutoTokenizer.from_pretrained(tmp_path / "hf"), tokenizer_from_meta(meta)
    assert theirs(UNICODE)["input_ids"] == ours.encode(UNICODE) and theirs.decode(ours.encode(UNICODE)) == UNICODE
    chat = [{"role": "user", "content": "<|im_end|> is text here"}, {"role": "assistant", "content": "Hi"}]
    assert theirs.apply_chat_template(chat, tokenize=False) == \
        "<|im_start|>user\n<|im_end|> is text here<|im_end|>\n<|im_start|>assistant\nHi<|im_end|>\n"
