"""Tokenizers: text to token ids and back. Three kinds, chosen by data.tokenizer and recorded in a
tokenizer meta (a dict in meta.json, in checkpoints and in exports, so the tokenizer travels with the
weights):

    char   one token per character of the corpus          {"tokenizer": "char", "chars": ...}
    bpe    a tiktoken byte-pair encoding (GPT-2's)         {"tokenizer": "bpe", "encoding": "gpt2", ...}
           (either, prepared from conversations: ChatML's two markers as two more ids, "markers": [...])
    hf     a Hugging Face tokenizer.json, as models on     {"tokenizer": "hf", "files": {"tokenizer.json":
           the hub ship it (read with `tokenizers`)          ..., ...}, "eot_token": ..., "stop_tokens": ...}

    tokenizer = tokenizer_from_meta(meta)
    ids = tokenizer.encode("ROMEO:"); text = tokenizer.decode(ids)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from checks import tokenizer_files_problems
from errors import DataError

# GPT-2's BPE ("gpt2") has exactly the tokens of "r50k_base"; loading it from the
# r50k_base file means one cached file serves both names offline.
ENCODING_FILES = {"gpt2": "r50k_base"}
EOT_TEXT = "<|endoftext|>"  # how the txt format marks a document end for bpe
# ChatML's markers around each message of a conversation: two ids more for char and bpe tokenizers prepared
# from conversations (after their own), special tokens in a learned BPE's.
MARKERS = ("<|im_start|>", "<|im_end|>")
MARKED = ("char", "bpe")  # the tokenizers that take them as ids of their own
# A Hugging Face tokenizer's files, carried in its meta and written back into exports.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                      "generation_config.json")


class CharTokenizer:
    """One token per character; the vocabulary is the sorted characters of the corpus (or, to
    fine-tune a char model on another text, the model's own characters in the model's order)."""

    kind = "char"
    eot_token = eot_text = None  # one text: documents are not marked
    prefix: list[int] = []  # nothing before a text
    stop_tokens: list[int] = []  # nothing ends a sample before its length

    def __init__(self, chars: str, markers: tuple[str, ...] = ()):
        self.chars, self.markers = chars, {m: len(chars) + i for i, m in enumerate(markers)}
        self.vocab_size = len(chars) + len(markers)
        # Lookup table from code point to token id (-1: not in the vocabulary), so that
        # encoding a large text is one numpy indexing operation instead of a Python loop.
        codes = np.array([ord(c) for c in chars], dtype=np.int64)
        self.table = np.full(int(codes.max()) + 1 if len(codes) else 1, -1, dtype=np.int64)
        self.table[codes] = np.arange(len(codes))

    def encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.full(len(codes), -1, dtype=np.int64)
        known = codes < len(self.table)
        ids[known] = self.table[codes[known]]
        unknown = codes[ids < 0]
        if len(unknown):
            bad = [chr(c) for c in np.unique(unknown)]
            shown = ", ".join(map(repr, bad[:20])) + (f" and {len(bad) - 20} more" if bad[20:] else "")
            raise DataError(f"characters not in the vocabulary: {shown} ({len(unknown):,} "
                            f"occurrence{'s' if len(unknown) > 1 else ''}); use text made of the training "
                            "corpus's characters")
        return ids

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        names = list(self.markers)
        return "".join(self.chars[i] if i < len(self.chars) else names[i - len(self.chars)] for i in ids)


class BPETokenizer:
    """A tiktoken byte-pair encoding, with its end-of-text token between documents."""

    kind = "bpe"
    eot_text = EOT_TEXT
    prefix: list[int] = []
    stop_tokens: list[int] = []

    def __init__(self, name: str, markers: tuple[str, ...] = ()):
        self.name = name
        self.enc = load_tiktoken(name)
        self.markers = {m: self.enc.n_vocab + i for i, m in enumerate(markers)}
        self.vocab_size = self.enc.n_vocab + len(markers)
        self.eot_token = self.enc.eot_token

    def encode_array(self, text: str) -> np.ndarray:
        return np.array(self.encode(text), dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        # Ordinary text only: a literal "<|endoftext|>" in a corpus is not a control token.
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # tiktoken encodes outside the GIL, so threads share the work: the texts in a few runs, a run per
        # task (tiktoken's own encode_ordinary_batch makes a task of each text, which costs more than
        # encoding one of many short records).
        threads = os.cpu_count() or 1
        size = max(1, -(-len(texts) // (4 * threads)))  # 4 runs per thread: a long text delays only its own
        with ThreadPoolExecutor(threads) as pool:
            runs = pool.map(lambda run: [self.enc.encode_ordinary(t) for t in run],
                            [texts[i:i + size] for i in range(0, len(texts), size)])
            return [ids for run in runs for ids in run]

    def decode(self, ids) -> str:
        if not self.markers:
            return self.enc.decode(list(ids))
        names, pieces, run = list(self.markers), [], []
        for i in list(ids) + [None]:  # tiktoken knows nothing of the markers: decoded between them
            if i is None or i >= self.enc.n_vocab:
                pieces.append(self.enc.decode(run) + (names[i - self.enc.n_vocab] if i is not None else ""))
                run = []
            else:
                run.append(i)
        return "".join(pieces)


def load_tiktoken(name: str):
    import tiktoken

    if name not in tiktoken.list_encoding_names():
        raise DataError(f"unknown bpe encoding {name!r}; valid: {', '.join(tiktoken.list_encoding_names())}")
    try:
        return tiktoken.get_encoding(ENCODING_FILES.get(name, name))
    except Exception as e:  # tiktoken raises requests' errors when offline
        raise DataError(
            f"cannot load tiktoken encoding {name!r} ({type(e).__name__}): tiktoken downloads an encoding's "
            "file once and caches it; offline, set TIKTOKEN_CACHE_DIR to a folder holding that cache (fill one "
            f"where there is internet: TIKTOKEN_CACHE_DIR=DIR python -c \"import tiktoken; "
            f"tiktoken.get_encoding('{ENCODING_FILES.get(name, name)}')\", then copy DIR)") from None


class HFTokenizer:
    """A Hugging Face tokenizer (its tokenizer.json, read with the `tokenizers` library that transformers
    uses too), so token ids equal AutoTokenizer's for the same text, special tokens included. Documents
    are separated by its end-of-sequence token (tokenizer_config.json's eos_token), and start with
    what it puts before every text (`prefix`: Llama 3's <|begin_of_text|>, nothing for SmolLM2)."""

    kind = "hf"

    def __init__(self, meta: dict):
        from tokenizers import Tokenizer
        self.tok = Tokenizer.from_str(meta["files"]["tokenizer.json"])
        self.vocab_size, self.eot_token, self.stop_tokens = meta["vocab_size"], meta["eot_token"], meta["stop_tokens"]
        self.eot_text = None if self.eot_token is None else self.tok.id_to_token(self.eot_token)
        self.markers = {m: i for m in MARKERS if (i := self.tok.token_to_id(m)) is not None}
        with_special, plain = self.tok.encode("a").ids, self.tok.encode("a", add_special_tokens=False).ids
        self.prefix = with_special[:with_special.index(plain[0])] if plain[0] in with_special else []

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids  # with the prefix, as AutoTokenizer(text).input_ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.array(self.encode(text), dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Pieces of documents: no prefix (SplitWriter puts one at each document's start)."""
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


Tokenizer = CharTokenizer | BPETokenizer | HFTokenizer


def hf_tokenizer_meta(folder: str | Path) -> dict | None:
    """The tokenizer of a Hugging Face folder (its tokenizer.json and the files beside it) as a meta; None
    when the folder has no tokenizer.json. Stop tokens: the eos_token of tokenizer_config.json and the
    eos_token_id of generation_config.json (sample.py ends a sample at one)."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        return None
    try:
        files = {name: (folder / name).read_text(encoding="utf-8") for name in HF_TOKENIZER_FILES
                 if (folder / name).is_file()}
        return hf_meta(files)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # json's and tokenizers' errors are ValueErrors
        raise DataError(f"{folder}/tokenizer.json (or a file beside it) cannot be read ({e}); download the "
                        "model's tokenizer files again") from None


def hf_meta(files: dict[str, str]) -> dict:
    """A Hugging Face tokenizer's meta from its files ({name: text}); ValueError names a damaged one."""
    from tokenizers import Tokenizer
    try:
        tok = Tokenizer.from_str(files["tokenizer.json"])
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
        raise ValueError(f"tokenizer.json: {e}") from None
    problems = tokenizer_files_problems(files, tok.get_vocab_size())
    if problems:
        raise ValueError("; ".join(problems))
    config = json.loads(files.get("tokenizer_config.json", "{}"))
    eos = config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    eot = tok.token_to_id(eos) if isinstance(eos, str) else None
    generation = json.loads(files.get("generation_config.json", "{}")).get("eos_token_id")
    stops = {eot, *(generation if isinstance(generation, list) else [generation])} - {None}
    return {"tokenizer": "hf", "vocab_size": tok.get_vocab_size(), "eot_token": eot, "stop_tokens": sorted(stops),
            "sha256": hashlib.sha256(files["tokenizer.json"].encode()).hexdigest(), "files": files}


# ChatML, the chat format of SmolLM2 and Qwen: each message between <|im_start|>role and <|im_end|>.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def learn_bpe(texts: Iterator[str], vocab_size: int) -> dict:
    """A byte-level BPE learned from `texts` (an iterator of strings) with the `tokenizers` library, as a
    Hugging Face tokenizer's meta (its tokenizer.json and tokenizer_config.json, so that checkpoints and
    exports carry it and AutoTokenizer loads it): "<|endoftext|>" ends documents, and ChatML's markers are
    special tokens, with ChatML as its chat template, so that it can be trained on conversations (built
    from tokens by templates.ChatML: a message that holds a marker's text keeps it as text).
    bpe.py shows how the merges are learned."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split; any text is bytes
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TEXT, "<|im_start|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT_TEXT, "bos_token": EOT_TEXT,
              "unk_token": EOT_TEXT, "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False,
              "chat_template": CHATML}
    return hf_meta({"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(config, indent=2)})


def meta_disagreements(meta: dict) -> list[str]:
    """Where a bpe or hf meta disagrees with its own tokenizer (an edited or damaged file): the numbers
    that training, sampling and exports take from the meta must be the tokenizer's."""
    if meta["tokenizer"] == "char":
        return []
    if meta["tokenizer"] == "bpe":
        import tiktoken
        if meta["encoding"] not in tiktoken.list_encoding_names():
            names = ", ".join(tiktoken.list_encoding_names())
            return [f"encoding is {json.dumps(meta['encoding'])}, not one of {names}"]
        try:
            enc = load_tiktoken(meta["encoding"])
        except DataError:  # offline without its cache: said where the tokenizer is used, not here
            return []
        own = {"vocab_size": enc.n_vocab + len(meta.get("markers", [])), "eot_token": enc.eot_token}
    else:
        try:
            own = hf_meta(meta["files"])
        except (ValueError, KeyError) as e:
            return [f"files holds a tokenizer that cannot be read ({e})"]
        own = {k: own[k] for k in ("vocab_size", "eot_token", "stop_tokens", "sha256")}
    return [f"{k} is {json.dumps(meta.get(k))}, its tokenizer's is {json.dumps(v)}" for k, v in own.items()
            if meta.get(k) != v]


def start_token(tokenizer) -> int:
    """The token a text starts after: the end-of-text token that separates documents (bpe, hf), or a
    newline (char; token 0 for a vocabulary without one). An empty prompt starts here, and the
    first token of a scored text is predicted from it."""
    if tokenizer.kind != "char":
        return tokenizer.eot_token if tokenizer.eot_token is not None else (tokenizer.prefix or [0])[0]
    return tokenizer.chars.index("\n") if "\n" in tokenizer.chars else 0


def tokenizer_from_meta(meta: dict):
    if meta["tokenizer"] == "char":
        return CharTokenizer(meta["chars"], tuple(meta.get("markers", ())))
    if meta["tokenizer"] == "hf":
        return HFTokenizer(meta)
    return BPETokenizer(meta["encoding"], tuple(meta.get("markers", ())))


def tokenizer_differences(a: dict, b: dict, a_name: str, b_name: str) -> list[str]:
    """How two tokenizer metas differ (empty: the same ids mean the same text in both); a `b` without
    "chars", "encoding", "markers" or "sha256" (a data folder's own tokenizer, whichever it is) accepts any.
    The one place that decides whether two sides share tokens."""
    if a.get("tokenizer") != b.get("tokenizer"):
        return [f"data.tokenizer: {a.get('tokenizer')!r} {a_name}, {b.get('tokenizer')!r} {b_name}"]
    if a["tokenizer"] == "bpe" and "encoding" in b and a.get("encoding") != b["encoding"]:
        return [f"data.bpe_encoding: {a.get('encoding')!r} {a_name}, {b.get('encoding')!r} {b_name}"]
    if a["tokenizer"] == "char" and b.get("chars") is not None and a.get("chars") != b["chars"]:
        return [f"other characters ({len(a.get('chars') or '')} {a_name}, {len(b['chars'])} {b_name})"]
    # A whole meta (a model's, with its vocab_size) has markers or none; settings leave them to the data.
    if a["tokenizer"] in MARKED and ("markers" in b or "vocab_size" in b) and a.get("markers") != b.get("markers"):
        return [f"chat markers: {a.get('markers', 'none')} {a_name}, {b.get('markers', 'none')} {b_name}"]
    if a["tokenizer"] == "hf" and "sha256" in b and a.get("sha256") != b["sha256"]:
        return [f"another tokenizer.json {a_name} than {b_name}"]
    return []


def check_in_vocabulary(ids, vocab_size: int, what: str) -> None:
    """Refuse token ids that the model cannot take: a BPE model trained on fewer tokens than its
    encoding has (its vocabulary is the data's) meets a text with the others. `what` names the text;
    `ids` a list or an array."""
    top = int(np.max(ids)) if len(ids) else 0
    if top >= vocab_size:
        raise DataError(f"{what} has token {top}, outside this model's vocabulary of {vocab_size}; this model "
                        "cannot read it: use another text")



# ----------------------------------------------------------------------------- encoding long texts

def split_safely(text: str, size: int = 1 << 16) -> list[str]:
    """Cut text into pieces of about `size` characters where BPE cannot merge across.

    A cut just after a single newline between two non-space characters ("x\ny") falls
    on a pre-tokenizer boundary of tiktoken's encodings, so encoding the pieces
    separately gives exactly the tokens of encoding the whole text. (After "\n\n" or
    " \n" it would not: runs of whitespace merge into one token.)
    """
    pieces, start = [], 0
    while len(text) - start > size:
        cut = safe_cut(text, start + size)
        if cut < 0:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def safe_cut(text: str, pos: int) -> int:
    """The first safe cut at or after pos (see split_safely), or -1 if there is none."""
    nl = text.find("\n", max(pos - 1, 1))
    while nl >= 0 and nl + 1 < len(text):
        if not text[nl - 1].isspace() and not text[nl + 1].isspace():
            return nl + 1
        nl = text.find("\n", nl + 1)
    return -1


def encode_chunks(tokenizer, pieces: list[str]):
    """The token ids of consecutive pieces of one text, as arrays (bpe and hf on several threads)."""
    if tokenizer.kind != "char":
        for ids in tokenizer.encode_batch(pieces):
            yield np.array(ids, dtype=np.int64)
    else:
        for piece in pieces:
            yield tokenizer.encode_array(piece)


