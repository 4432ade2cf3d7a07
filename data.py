"""Text files, prepared-data loading and training batches (the tokenizers are in tokenizer.py).

prepare.py writes a folder with meta.json and either train.bin/val.bin (flat token
arrays) or train.txt/val.txt (raw text splits). This file reads it back:

    meta = load_meta("data/processed/shakespeare_char")
    tok = tokenizer_from_meta(meta)
    train = load_tokens("data/processed/shakespeare_char", "train", meta)
    x, y = get_batch(train, block_size=256, batch_size=64, key=("train", seed, step, micro))

A batch is a pure function of its key, so the batch at a given step does not depend
on what ran before it: that is what makes resume exact and multi-process runs
reproducible.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from errors import DataError
from tokenizer import EOT_TEXT, encode_chunks, meta_disagreements, split_safely, tokenizer_from_meta

META_VERSION = 1
# GPT-2's BPE ("gpt2") has exactly the tokens of "r50k_base"; loading it from the
# r50k_base file means one cached file serves both names offline.
READ_BYTES = 1 << 22  # text files are read 4 MB at a time

# The settings that a named data folder (data.processed_dir) gives itself, from its meta.json, unless
# they are chosen (prepare.ensure_prepared).
FOLDER_SETTINGS = ("input", "tokenizer", "bpe_encoding", "format", "val_fraction")


# ----------------------------------------------------------------------------- text files

def text_chunks(path: str | Path, hasher=None, label: str | None = None) -> Iterator[str]:
    """The text of a UTF-8 file, a few MB at a time and exactly as stored (no newline translation), so
    that a file of any size fits in memory. `hasher` sees the raw bytes; `label` names the file in errors."""
    label = label or str(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.read(READ_BYTES)
                if hasher is not None:
                    hasher.update(raw)
                try:
                    text = decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as e:
                    raise DataError(f"{label} is not UTF-8 text ({e.reason} at a byte near "
                                    f"{f.tell() - len(raw) + e.start}); convert it to UTF-8") from None
                if text.count("\0") * 4 > len(text):  # valid UTF-8, but so many NULs: UTF-16 without BOM, or binary
                    raise DataError(f"{label} is not UTF-8 text (NUL bytes in many of its characters: UTF-16, or "
                                    "not text); convert it to UTF-8")
                if text:
                    yield text
                if not raw:
                    return
    except OSError as e:
        raise DataError(f"{label}: cannot read it ({e.strerror}); give the path of a UTF-8 text file") from None


def read_text(path: str | Path, label: str | None = None) -> tuple[str, int]:
    """A whole UTF-8 text file and its size in bytes (see text_chunks)."""
    text = "".join(text_chunks(path, label=label))
    return text, len(text.encode("utf-8"))


class Progress:
    """A line on stderr at every tenth of a long job ("prepare: reading:  40% of 52 MB"); nothing for a
    job of `total` at most `quiet_below`, or when not `enabled`."""

    def __init__(self, total: int, label: str, size: str, quiet_below: int = 0, enabled: bool = True):
        self.total, self.label, self.size = total, label, size  # size: the total as shown, e.g. "52 MB"
        self.done, self.shown = 0, 0
        self.enabled = enabled and total > quiet_below

    def add(self, n: int) -> None:
        self.done += n
        tenth = min(10, 10 * self.done // max(self.total, 1))
        if self.enabled and tenth > self.shown:
            self.shown = tenth
            print(f"{self.label}: {10 * tenth:3d}% of {self.size}", file=sys.stderr, flush=True)


def bits_per_byte(loss_nats: float, n_bytes: int) -> float:
    """Loss summed over a text's tokens (nats) -> bits per UTF-8 byte of the text: a measure that
    does not depend on the tokenizer, so a char model and a BPE model compare on the same text."""
    return loss_nats / n_bytes / math.log(2)


def split_bits_per_byte(meta: dict, split: str, mean_loss: float) -> float | None:
    """A split's bits per byte from a mean loss per token: its tokens per byte converts one into the
    other. None for data prepared before prepare.py counted the bytes (prepare it again with --force)."""
    if "bytes" not in meta:
        return None
    return bits_per_byte(mean_loss * meta["tokens"][split], meta["bytes"][split])


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned type that holds every token id."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


# ----------------------------------------------------------------------------- prepared data

def load_meta(folder: str | Path) -> dict:
    path = Path(folder) / "meta.json"
    fix = (f"python prepare.py --data.processed_dir {folder} --force (with the --data.input and "
           "--data.tokenizer you train with)")
    if not path.exists():
        raise DataError(f"no prepared data: {path} is missing; run: {fix.replace(' --force', '')}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} cannot be read ({e}); prepare the data again: {fix}") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if isinstance(version, int) and version > META_VERSION:
        raise DataError(f"{path} has format version {version}, newer than this code reads "
                        f"({META_VERSION}); update the code, or prepare the data again: {fix}")
    problems = meta_problems(meta, prepared=True)
    if problems:
        raise DataError(f"{path} is damaged ({'; '.join(problems)}); prepare the data again: {fix}")
    return meta


def meta_problems(meta, prepared: bool = False) -> list[str]:
    """What is wrong with a tokenizer meta (a prepared folder's meta.json when `prepared`): the
    fields and types this code reads, so that a damaged file is named rather than crashing later."""
    if not isinstance(meta, dict):
        return ["not a JSON object"]
    kind = meta.get("tokenizer")
    wanted = {"tokenizer": str, "vocab_size": int} | {
        "char": {"chars": str}, "hf": {"files": dict, "sha256": str, "stop_tokens": list}}.get(
        kind if isinstance(kind, str) else "", {"encoding": str})
    if prepared:
        wanted |= {"format_version": int, "format": str, "dtype": str}
    out = [f"{k} is missing or not a {t.__name__}" for k, t in wanted.items() if type(meta.get(k)) is not t]
    allowed = {"tokenizer": ("char", "bpe", "hf")} | ({"format": ("bin", "txt"), "dtype": ("uint16", "uint32")}
                                                if prepared else {})
    out += [f"{k} = {meta[k]!r} is not one of {', '.join(v)}" for k, v in allowed.items()
            if isinstance(meta.get(k), str) and meta[k] not in v]
    if type(meta.get("vocab_size")) is int and meta["vocab_size"] < 1:
        out.append(f"vocab_size is {meta['vocab_size']}, expected an integer >= 1")
    if prepared and type(meta.get("format_version")) is int and meta["format_version"] < 1:
        out.append(f"format_version is {meta['format_version']}, expected 1 to {META_VERSION}")
    if prepared:  # written by prepare.py since it records how the data was made: absent from older folders
        optional = {"source": dict, "bytes": dict, "tokens": dict, "val_fraction": float}
        out += [f"{k} is not a {t.__name__}" for k, t in optional.items() if k in meta and type(meta[k]) is not t]
        out += [f"{k} does not give train and val as positive whole numbers" for k in ("bytes", "tokens")
                if type(meta.get(k)) is dict and not all(type(meta[k].get(s)) is int and meta[k][s] > 0
                                                         for s in ("train", "val"))]
        if type(meta.get("val_fraction")) is float and not 0 < meta["val_fraction"] < 1:
            out.append(f"val_fraction is {meta['val_fraction']}, expected a number between 0 and 1")
        if "bytes" in meta and "tokens" not in meta:  # bits per byte needs both; older folders lack bytes only
            out.append("bytes is there without tokens")
    if not out and meta["tokenizer"] == "char" and meta["vocab_size"] != len(meta["chars"]):
        out.append("vocab_size is not the number of chars")
    if not out and meta["tokenizer"] == "char" and len(set(meta["chars"])) != len(meta["chars"]):
        out.append("chars repeats a character (two ids for one character)")
    if not out and meta["tokenizer"] == "hf" and not isinstance(meta["files"].get("tokenizer.json"), str):
        out.append("files has no tokenizer.json")
    return out or meta_disagreements(meta)


def resolve_bin_dir(folder: str | Path) -> Path:
    """The documented bin layout rule: `data/processed` without train.bin means `data/`."""
    folder = Path(folder)
    if folder.name == "processed" and not (folder / "train.bin").exists() \
            and (folder.parent / "train.bin").exists():
        return folder.parent
    return folder


@dataclass
class Data:
    """Prepared data as a run uses it: its two splits of token ids and its meta.json."""
    folder: Path
    meta: dict
    train: np.ndarray
    val: np.ndarray
    eot_token: int | None = None  # with data.doc_mask: the token that ends a document, else None

    def doc_ids(self, x: torch.Tensor) -> torch.Tensor | None:
        """(B, T) ids of the document of each token, to keep attention within documents; None: no mask."""
        return None if self.eot_token is None else document_ids(x, self.eot_token)


def load_tokens(folder: str | Path, split: str, meta: dict, tokenizer=None) -> np.ndarray:
    """The token ids of one split: a read-only memmap (bin) or an array encoded now (txt)."""
    folder = Path(folder)
    if meta["format"] == "bin":
        path = folder / f"{split}.bin"
        if not path.exists():
            raise DataError(f"{path} is missing; prepare the data again with --force")
        itemsize = np.dtype(meta["dtype"]).itemsize
        if path.stat().st_size % itemsize or path.stat().st_size == 0:
            raise DataError(f"{path} is damaged ({path.stat().st_size} bytes: not whole {meta['dtype']} tokens); "
                            f"prepare the data again: python prepare.py --data.processed_dir {folder} --force")
        # memmap: the file is paged in on demand, never read whole into memory.
        tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
        # One pass over the file (about a second per GB): ids that meta.json's vocabulary does not have
        # mean that they do not belong together, said now rather than as a model error in some batch.
        if (top := int(tokens.max())) >= meta["vocab_size"]:
            raise DataError(f"{path} holds token id {top}, beyond meta.json's vocab_size of {meta['vocab_size']}: "
                            f"they do not belong together (a damaged file, or not {meta['dtype']} tokens); prepare "
                            f"the data again: python prepare.py --data.processed_dir {folder} --force")
        return tokens
    if not (folder / f"{split}.txt").exists():
        raise DataError(f"{folder / f'{split}.txt'} is missing; prepare the data again with --force")
    text, _ = read_text(folder / f"{split}.txt")
    tokenizer = tokenizer or tokenizer_from_meta(meta)
    # "doc1<|endoftext|>doc2<|endoftext|>" splits into ["doc1", "doc2", ""]: every
    # piece but the last was followed by an end-of-text token.
    docs = text.split(EOT_TEXT) if tokenizer.kind == "bpe" else [text]
    parts = []
    for i, doc in enumerate(docs):
        parts.extend(encode_chunks(tokenizer, split_safely(doc)))
        if i < len(docs) - 1:
            parts.append(np.array([tokenizer.eot_token], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


# ----------------------------------------------------------------------------- batches

def batch_generator(key: tuple) -> torch.Generator:
    """A generator seeded from a key such as (split, seed, step, micro_step)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return g


def get_batch(tokens: np.ndarray, block_size: int, batch_size: int, key: tuple,
              device: str | torch.device = "cpu", part: int = 0, parts: int = 1
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of block_size + 1 tokens: x is the window, y the window shifted by one.

    The key fixes batch_size * parts windows (a whole optimizer step's worth); this returns
    rows [part * batch_size, (part + 1) * batch_size) of them. So 2 micro-batches of 4 hold
    exactly the windows of 1 batch of 8, and processes that split a step among them see
    the samples a single process would. Returns x, y of shape (batch_size, block_size), int64.
    """
    n = len(tokens) - block_size  # window starts that leave room for block_size + 1 tokens
    assert n > 0, "split shorter than block_size + 1 (check_split_lengths catches this first)"
    starts = torch.randint(n, (batch_size * parts,), generator=batch_generator(key))
    starts = starts[part * batch_size:(part + 1) * batch_size].tolist()
    windows = np.stack([tokens[s:s + block_size + 1] for s in starts]).astype(np.int64)
    xy = torch.from_numpy(windows)  # (B, T+1)
    x, y = xy[:, :-1], xy[:, 1:]
    if torch.device(device).type == "cuda":
        # Pinned host memory lets the copy run asynchronously with the GPU's work.
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.contiguous().to(device), y.contiguous().to(device)


def document_ids(x: torch.Tensor, eot_token: int) -> torch.Tensor:
    """(B, T) ids of the document each token belongs to; an end-of-text token ends its document."""
    is_eot = (x == eot_token).long()
    return torch.cumsum(is_eot, dim=1) - is_eot


def default_processed_dir(input_path: str, tokenizer: str, encoding: str, fmt: str, tokenizer_sha: str = "") -> str:
    """data/processed/<corpus>_<tokenizer>[_<encoding> or _<tokenizer.json's digest>][_txt]: one folder
    per way of preparing."""
    path = Path(input_path)
    corpus = path.parent.name if path.stem == "input" else path.stem
    name = f"{corpus}_{tokenizer}" + (f"_{encoding}" if tokenizer == "bpe" else f"_{tokenizer_sha[:8]}" if
                                      tokenizer == "hf" else "")
    return str(Path("data/processed") / (name + ("_txt" if fmt == "txt" else "")))


def longer_split(name: str) -> str:
    """How to make the train or val split longer with the same text."""
    return f"a {'larger' if name == 'val' else 'smaller'} data.val_fraction"


def check_split_lengths(splits: dict, block_size: int, folder) -> None:
    for name, tokens in splits.items():
        if len(tokens) < block_size + 1:
            raise DataError(
                f"the {name} split of {folder} has {len(tokens)} tokens, fewer than block_size + 1 "
                f"= {block_size + 1}; use a longer text, {longer_split(name)}, or a smaller model.block_size")
