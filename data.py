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
import glob
import hashlib
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from config import DataConfig, inputs_of
from errors import DataError
from tokenizer import EOT_TEXT, MARKED, MARKERS, encode_chunks, meta_disagreements, split_safely, tokenizer_from_meta

META_VERSION = 1
# GPT-2's BPE ("gpt2") has exactly the tokens of "r50k_base"; loading it from the
# r50k_base file means one cached file serves both names offline.
READ_BYTES = 1 << 22  # text files are read 4 MB at a time
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")  # files of records (records.py)

# The settings that a named data folder (data.processed_dir) gives itself, from its meta.json, unless
# they are chosen (prepare.ensure_prepared).
FOLDER_SETTINGS = ("input", "tokenizer", "bpe_encoding", "format", "val_fraction", "loss_on", "vocab_size", "weights")


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


def is_records(input_path: str) -> bool:
    """Whether data.input (or eval.py's --text) names records rather than text (list_documents refuses a mix);
    a file that is not there is what its name says."""
    input_path = inputs_of(input_path)[0]
    path = Path(input_path)
    if not path.is_dir() and not (any(c in input_path for c in "*?[") and not path.exists()):
        return path.suffix in RECORD_SUFFIXES
    return list_documents(input_path)[0].suffix in RECORD_SUFFIXES


def list_documents(input_path: str) -> list[Path]:
    """The files of data.input, input after input (input_groups)."""
    return [p for group in input_groups(input_path) for p in group]


def input_groups(input_path: str) -> list[list[Path]]:
    """The files of each of data.input's inputs; text and records are not mixed."""
    groups = [documents_of(p) for p in inputs_of(input_path)]
    if len({p.suffix in RECORD_SUFFIXES for group in groups for p in group}) > 1:
        raise DataError(f"{input_path} mixes text files and records; give one kind (a folder or pattern of each)")
    return groups


def documents_of(input_path: str) -> list[Path]:
    """The files of one input: a file, a folder (its *.txt files, or else its records files) or a glob,
    sorted by path."""
    path = Path(input_path)
    if path.is_dir():
        docs = sorted(p for p in path.rglob("*.txt") if p.is_file()) or \
            sorted(p for p in path.rglob("*") if p.suffix in RECORD_SUFFIXES and p.is_file())
        if not docs:
            raise DataError(f"{path} holds no .txt files and no records ({', '.join(RECORD_SUFFIXES)}); set "
                            "data.input to a text file, a records file or a folder of them")
    elif path.is_file():
        docs = [path]
    elif any(c in input_path for c in "*?["):
        docs = sorted(Path(p) for p in glob.glob(input_path, recursive=True) if Path(p).is_file())
        if not docs:
            raise DataError(f"no file matches data.input = {input_path!r}; give a pattern that matches your files")
    else:
        raise DataError(f"input {path} does not exist; set data.input to a text file or folder")
    if sum(p.stat().st_size for p in docs) == 0:
        raise DataError(f"input {path} is empty; set data.input to a file with text in it")
    return docs


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
        optional = {"source": dict, "bytes": dict, "tokens": dict, "val_fraction": float, "records": dict,
                    "trained": dict, "loss_on": str, "learned_vocab": int, "learned_from": str, "weights": str}
        out += [f"{k} is not a {t.__name__}" for k, t in optional.items() if k in meta and type(meta[k]) is not t]
        out += [f"{k} does not give train and val as positive whole numbers" for k in ("bytes", "tokens", "trained")
                if type(meta.get(k)) is dict and not all(type(meta[k].get(s)) is int and meta[k][s] > 0
                                                         for s in ("train", "val"))]
        if type(meta.get("val_fraction")) is float and not 0 < meta["val_fraction"] < 1:
            out.append(f"val_fraction is {meta['val_fraction']}, expected a number between 0 and 1")
        path = str(meta["source"].get("path")) if isinstance(meta.get("source"), dict) else ""
        if isinstance(meta.get("weights"), str) and DataConfig(input=path, weights=meta["weights"]).problems():
            out.append(f"weights = {meta['weights']!r} is not one number greater than 0 per input")
        if meta.get("loss_on", "all") not in ("answers", "all"):
            out.append(f"loss_on = {meta['loss_on']!r} is not one of answers, all")
        if "bytes" in meta and "tokens" not in meta:  # bits per byte needs both; older folders lack bytes only
            out.append("bytes is there without tokens")
    if "markers" in meta and (meta["markers"] != list(MARKERS) or meta.get("tokenizer") not in MARKED):
        out.append(f"markers is {json.dumps(meta['markers'])}, and only a char or bpe tokenizer has any: "
                   f"{json.dumps(list(MARKERS))}")
    n_markers = len(meta["markers"]) if not out and "markers" in meta else 0
    if not out and meta["tokenizer"] == "char" and meta["vocab_size"] != len(meta["chars"]) + n_markers:
        out.append("vocab_size is not the number of chars (and markers)")
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
    """Prepared data as a run uses it: its two splits of token ids and its meta.json, and for records the
    mask of the answers and where each record starts."""
    folder: Path
    meta: dict
    train: np.ndarray
    val: np.ndarray
    eot_token: int | None = None  # the token that ends a document (bpe, hf), else None
    doc_mask: bool = False  # data.doc_mask: batches come with the document of each token (attention stays in it)
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # split -> (N,) 1 = trained on; none: every token
    starts: dict[str, np.ndarray] = field(default_factory=dict)  # split -> where each record starts, then N
    drop_long: bool = False  # data.long_records = drop: records longer than a window are never drawn
    windows: dict[tuple[str, int], np.ndarray] = field(default_factory=dict, repr=False)  # trained_windows, kept

    def batch(self, split: str, block_size: int, batch_size: int, key: tuple, device: str | torch.device = "cpu",
              part: int = 0, parts: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x, y as get_batch draws them, and with data.doc_mask the (B, T) document id of each token, else
        None. With records, windows start where a record starts, only among those with answers in them
        (trained_windows); targets not trained on, and those of a record the window cuts short, are -1;
        a document is a record (its end-of-text token can be a turn's end too: SmolLM2's <|im_end|>)."""
        tokens, mask, bounds = getattr(self, split), self.masks.get(split), self.starts.get(split)
        if (mask is not None or bounds is not None) and (split, block_size) not in self.windows:
            self.windows[split, block_size] = trained_windows(mask, block_size, f"the {split} split of {self.folder}",
                                                              bounds, len(tokens), self.drop_long)
        windows = self.windows.get((split, block_size))
        starts = window_starts(len(tokens) - block_size if windows is None else windows, batch_size, key, part, parts)
        x, y = windows_at(tokens, starts, block_size, mask, bounds)
        docs = None
        if self.doc_mask:  # (B, T): which record (or document, by its end-of-text token) each token is in
            docs = document_ids(x, self.eot_token) if bounds is None else \
                torch.from_numpy(np.searchsorted(bounds, starts[:, None] + np.arange(block_size), side="right"))
        return to_device((x, y, docs), device)


def load_mask(folder: str | Path, split: str, meta: dict, n_tokens: int) -> np.ndarray | None:
    """The mask of the tokens trained on beside a split's tokens (records with data.loss_on = answers), a
    memmap of one byte per token; None when every token is trained on."""
    if "trained" not in meta:
        return None
    path = Path(folder) / f"{split}.mask"
    if not path.exists() or path.stat().st_size != n_tokens:
        state = "missing" if not path.exists() else f"{path.stat().st_size} bytes for {n_tokens} tokens"
        raise DataError(f"{path} is {state}; prepare the data again: python prepare.py --data.processed_dir "
                        f"{folder} --force (with the --data.input and --data.tokenizer you train with)")
    return np.memmap(path, dtype=np.uint8, mode="r")


def load_starts(folder: str | Path, split: str, meta: dict, n_tokens: int) -> np.ndarray | None:
    """Where each record of a split of pairs or conversations starts (then the split's end): batches keep
    records whole (get_batch). None for text and documents, which windows cut anywhere."""
    if meta.get("records", {}).get("kind") not in ("pair", "messages"):
        return None
    path = Path(folder) / f"{split}.starts"
    starts = np.fromfile(path, dtype=np.int64) if path.exists() and path.stat().st_size % 8 == 0 else np.zeros(0)
    if not len(starts) or starts[0] != 0 or starts[-1] >= n_tokens or np.any(np.diff(starts) <= 0):
        raise DataError(f"{path} is missing or damaged; prepare the data again: python prepare.py "
                        f"--data.processed_dir {folder} --force (with the --data.input and --data.tokenizer you "
                        "train with)")
    return np.append(starts, n_tokens)


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
    starts = window_starts(len(tokens) - block_size, batch_size, key, part, parts)
    return to_device(windows_at(tokens, starts, block_size), device)


def window_starts(windows: int | np.ndarray, batch_size: int, key: tuple, part: int = 0, parts: int = 1
                  ) -> np.ndarray:
    """Where the rows of part `part` of the key's batch start: among the first `windows` tokens (those
    that leave room for block_size + 1), or among the starts a `windows` array gives."""
    n = windows if isinstance(windows, int) else len(windows)
    assert n > 0, "split shorter than block_size + 1 (check_split_lengths catches this first)"
    picks = torch.randint(n, (batch_size * parts,), generator=batch_generator(key))
    picks = picks[part * batch_size:(part + 1) * batch_size].numpy()
    return picks if isinstance(windows, int) else np.asarray(windows)[picks].astype(np.int64)


def windows_at(tokens: np.ndarray, starts: np.ndarray, block_size: int, mask: np.ndarray | None = None,
               boundaries: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows of block_size + 1 tokens at `starts`, as x and y (the next tokens), (B, T) int64 each.
    `mask`: targets whose mask is 0 become -1 (ignored by the loss); `boundaries`: where records start
    (and the split's end): the targets of a record that the window cuts at its end become -1, so that no
    record is trained on in part (unless it is longer than a window)."""
    rows = np.stack([tokens[s:s + block_size + 1] for s in starts]).astype(np.int64)
    xy = torch.from_numpy(rows)  # (B, T+1)
    x, y = xy[:, :-1], xy[:, 1:]
    if mask is not None:
        trained = torch.from_numpy(np.stack([mask[s + 1:s + block_size + 1] for s in starts]).astype(bool))  # (B, T)
        y = y.masked_fill(~trained, -1)
    if boundaries is not None:
        # The last record boundary within reach of each window: what follows it is a record cut short
        # (unless the window's own first record is: then it is longer than a window, and cut anyway).
        last = boundaries[np.searchsorted(boundaries, starts + block_size + 1, side="right") - 1]  # (B,)
        cut = torch.arange(block_size)[None] >= torch.from_numpy(last - starts - 1)[:, None]  # (B, T) targets after it
        y = y.masked_fill(cut & torch.from_numpy(last > starts)[:, None], -1)
    return x, y


def to_device(tensors: tuple, device: str | torch.device) -> tuple:
    """The tensors (None stays None) on `device`, contiguous."""
    if torch.device(device).type == "cuda":
        # Pinned host memory lets the copy run asynchronously with the GPU's work.
        return tuple(t if t is None else t.pin_memory().to(device, non_blocking=True) for t in tensors)
    return tuple(t if t is None else t.contiguous().to(device) for t in tensors)


def trained_windows(mask: np.ndarray | None, block_size: int, what: str, starts: np.ndarray | None = None,
                    n: int = 0, drop_long: bool = False) -> np.ndarray:
    """The window starts to draw batches from: where a record starts (`starts`, with the split's end `n`
    last; one longer than the window: where its last block_size + 1 tokens start, or with `drop_long`
    nowhere), or anywhere, and only where the window's
    targets (tokens s+1 .. s+block_size) include one that is trained on (`mask`, or every token): a
    window without any would have no loss (0 / 0) and teach nothing."""
    n = len(mask) if mask is not None else n
    small = np.int32 if n < 2**31 else np.int64  # 4 bytes a token, not 8, for splits of up to 2G tokens
    if starts is None:
        candidates = np.arange(n - block_size, dtype=small)
    else:
        # A record longer than a window is cut at its start: its window ends where it ends, since the answers
        # come last (a conversation's last turn is the assistant's); data.long_records = drop leaves it out.
        long = np.diff(starts) > block_size + 1
        begins = np.where(long, starts[1:] - block_size - 1, starts[:-1])
        candidates = begins[(begins < n - block_size) & ~(long & drop_long)].astype(small)
    if mask is not None:
        seen = np.concatenate([[0], np.cumsum(mask, dtype=small)])  # seen[k]: trained tokens among the first k
        candidates = candidates[seen[candidates + block_size + 1] - seen[candidates + 1] > 0]
    if not len(candidates):
        raise DataError(f"{what} has no token to train on in any window of block_size + 1 tokens "
                        "(that starts where a record starts); give records with answers, or shorter ones, or set "
                        "data.loss_on = all")
    return candidates


def document_ids(x: torch.Tensor, eot_token: int) -> torch.Tensor:
    """(B, T) ids of the document each token belongs to; an end-of-text token ends its document."""
    is_eot = (x == eot_token).long()
    return torch.cumsum(is_eot, dim=1) - is_eot


def default_processed_dir(input_path: str, tokenizer: str, encoding: str, fmt: str, tokenizer_sha: str = "") -> str:
    """data/processed/<corpus>_<tokenizer>[_<encoding>, _<tokenizer.json's digest> or _<vocab_size>][_txt]: one
    folder per way of preparing; several inputs: their names joined by "+"."""
    corpus = "+".join(corpus_name(Path(p)) for p in inputs_of(input_path))
    name = f"{corpus}_{tokenizer}" + (f"_{encoding}" if tokenizer == "bpe" else f"_{tokenizer_sha[:8]}" if
                                      tokenizer in ("hf", "train-bpe") else "")
    return str(Path("data/processed") / (name + ("_txt" if fmt == "txt" else "")))


def corpus_name(path: Path) -> str:
    while any(c in path.name for c in "*?[") and path.parent != path:  # a glob: named by its folder
        path = path.parent
    return path.parent.name if path.stem == "input" else path.stem


def longer_split(name: str) -> str:
    """How to make the train or val split longer with the same text."""
    return f"a {'larger' if name == 'val' else 'smaller'} data.val_fraction"


def check_split_lengths(splits: dict, block_size: int, folder) -> None:
    for name, tokens in splits.items():
        if len(tokens) < block_size + 1:
            raise DataError(
                f"the {name} split of {folder} has {len(tokens)} tokens, fewer than block_size + 1 "
                f"= {block_size + 1}; use a longer text, {longer_split(name)}, or a smaller model.block_size")
