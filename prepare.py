"""Turn a text file (or a folder of text files) into training data.

    python prepare.py                                   # shipped corpus, characters, bin
    python prepare.py --tokenizer bpe --encoding gpt2   # GPT-2 BPE tokens
    python prepare.py --input my.txt --out data/processed/my_char --format txt

Writes into --out: train/val splits (`train.bin`/`val.bin`: flat token arrays, or
`train.txt`/`val.txt`: the raw text) and `meta.json`, which says how to read them.
The last val_fraction of the text is the validation split. For a folder, each
`*.txt` file (sorted by path) is one document; BPE puts its end-of-text token after
each document. The input streams in chunks, so memory stays bounded for any size.
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from data import (EOT_TEXT, META_VERSION, BPETokenizer, CharTokenizer, DataError, atomic_write_text,
                  default_processed_dir, encode_chunks, safe_cut, split_safely, token_dtype)

READ_BYTES = 1 << 22      # 4 MB reads
ENCODE_CHARS = 1 << 23    # encode in batches of about 8 M characters
PROGRESS_BYTES = 5 << 20  # show progress for inputs over 5 MB


def list_documents(input_path: str) -> list[Path]:
    path = Path(input_path)
    if path.is_dir():
        docs = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not docs:
            raise DataError(f"{path} holds no .txt files; pass a text file or a folder of .txt files")
    elif path.is_file():
        docs = [path]
    else:
        raise DataError(f"input {path} does not exist; pass --input FILE (a text file or folder)")
    if sum(p.stat().st_size for p in docs) == 0:
        raise DataError(f"input {path} is empty; pass a file with text in it")
    return docs


def read_text(path: Path, hasher=None):
    """Yield the text of a file in chunks, exactly as stored (no newline translation)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        while True:
            raw = f.read(READ_BYTES)
            if hasher is not None:
                hasher.update(raw)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not UTF-8 text ({e.reason} at a byte near "
                                f"{f.tell() - len(raw) + e.start}); convert it to UTF-8") from None
            if text:
                yield text
            if not raw:
                return


class Progress:
    def __init__(self, total_bytes: int, label: str, enabled: bool):
        self.total, self.label, self.done, self.shown = total_bytes, label, 0, -1
        self.enabled = enabled and total_bytes > PROGRESS_BYTES

    def add(self, n_bytes: int) -> None:
        self.done += n_bytes
        pct = min(100, 100 * self.done // max(self.total, 1))
        if self.enabled and pct // 10 != self.shown:
            self.shown = pct // 10
            print(f"{self.label}: {pct:3d}% of {self.total / 1e6:.0f} MB", file=sys.stderr, flush=True)


class SplitWriter:
    """Streams one split to disk: encodes text in batches, writes tokens (bin) or text (txt)."""

    def __init__(self, path: Path, fmt: str, tokenizer, dtype: str):
        self.fmt, self.tokenizer, self.dtype = fmt, tokenizer, np.dtype(dtype)
        self.tmp = path.with_name(path.name + ".tmp")
        self.file = open(self.tmp, "wb")
        self.buffer, self.n_tokens = "", 0

    def add(self, text: str) -> None:
        self.buffer += text
        if len(self.buffer) >= ENCODE_CHARS:
            # Encode up to a cut where BPE cannot merge across; keep the rest for later.
            cut = safe_cut(self.buffer, len(self.buffer) - ENCODE_CHARS // 8)
            if cut > 0:
                self._encode(self.buffer[:cut])
                self.buffer = self.buffer[cut:]

    def end_document(self) -> None:
        self._encode(self.buffer)
        self.buffer = ""
        if self.tokenizer.eot_token is not None:
            self._write(np.array([self.tokenizer.eot_token]), EOT_TEXT)

    def _encode(self, text: str) -> None:
        for ids in encode_chunks(self.tokenizer, split_safely(text)):
            self._write(ids, None)
        if self.fmt == "txt":
            self.file.write(text.encode("utf-8"))

    def _write(self, ids: np.ndarray, text: str | None) -> None:
        self.n_tokens += len(ids)
        if self.fmt == "bin":
            self.file.write(ids.astype(self.dtype).tobytes())
        elif text is not None:
            self.file.write(text.encode("utf-8"))

    def close(self) -> None:
        self.file.close()


def existing_differences(out: Path, meta: dict) -> list[str]:
    """What an earlier preparation in `out` did differently from `meta` (empty: nothing)."""
    path = out / "meta.json"
    if not path.exists():
        return []
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return ["meta.json is corrupt"]
    keys = ("tokenizer", "encoding", "format", "val_fraction")
    diffs = [f"{k}: {old.get(k)!r} there, {meta.get(k)!r} now" for k in keys if old.get(k) != meta.get(k)]
    if old.get("tokenizer") == meta["tokenizer"] == "char" and old.get("chars") != meta["chars"]:
        diffs.append(f"other characters ({len(old.get('chars') or '')} there, {len(meta['chars'])} now)")
    if old.get("source", {}).get("sha256") != meta["source"]["sha256"]:
        diffs.append(f"source: {old.get('source', {}).get('path')!r} (other contents) there, "
                     f"{meta['source']['path']!r} now")
    return diffs


def prepare(input_path: str = "data/shakespeare/input.txt", out: str | None = None,
            tokenizer: str = "char", fmt: str = "bin", encoding: str = "gpt2",
            val_fraction: float = 0.1, force: bool = False, progress: bool = True,
            vocab: str | None = None) -> dict:
    """Prepare `input_path` into `out`; returns the meta dict that was written. `vocab` (char only):
    a model's characters to encode with, instead of the corpus's own, so that model can train on it."""
    if tokenizer not in ("char", "bpe"):
        raise DataError(f"--tokenizer {tokenizer!r} is not one of: char, bpe")
    if fmt not in ("txt", "bin"):
        raise DataError(f"--format {fmt!r} is not one of: txt, bin")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction} is not allowed: use a value in (0, 1), e.g. 0.1")
    out = Path(out or default_processed_dir(input_path, tokenizer, encoding, fmt))
    docs = list_documents(input_path)
    total_bytes = sum(p.stat().st_size for p in docs)

    # Pass 1: hash the source, count characters, and (char) collect the vocabulary.
    hasher, n_chars, chars = hashlib.sha256(), 0, set()
    progress = Progress(total_bytes, "prepare: reading", progress)
    for doc in docs:
        for text in read_text(doc, hasher):
            n_chars += len(text)
            if tokenizer == "char":
                chars.update(text)
            progress.add(len(text.encode("utf-8")) if progress.enabled else 0)
    if tokenizer == "char":
        missing = sorted(chars - set(vocab)) if vocab is not None else []
        if missing:
            shown = ", ".join(map(repr, missing[:20])) + (f" and {len(missing) - 20} more" if missing[20:] else "")
            raise DataError(f"{input_path} has characters the model does not know: {shown}; remove them from "
                            "the text, or use a bpe model, which reads any text")
        tok = CharTokenizer(vocab if vocab is not None else "".join(sorted(chars)))
    else:
        tok = BPETokenizer(encoding)
    meta = {
        "format_version": META_VERSION, "tokenizer": tokenizer, "format": fmt,
        "vocab_size": tok.vocab_size, "dtype": token_dtype(tok.vocab_size),
        **({"chars": tok.chars} if tokenizer == "char" else {"encoding": encoding,
                                                              "eot_token": tok.eot_token}),
        "val_fraction": val_fraction,
        "source": {"path": str(input_path), "sha256": hasher.hexdigest(), "bytes": total_bytes,
                   "documents": len(docs)},
    }
    diffs = existing_differences(out, meta)
    if diffs and not force:
        raise DataError(f"{out} already holds data prepared differently ({'; '.join(diffs)}); "
                        "choose another --out, or pass --force to replace it")

    # Pass 2: the first (1 - val_fraction) of the characters are train, the rest val.
    out.mkdir(parents=True, exist_ok=True)
    suffix = ".bin" if fmt == "bin" else ".txt"
    writers = {s: SplitWriter(out / f"{s}{suffix}", fmt, tok, meta["dtype"]) for s in ("train", "val")}
    n_train_chars, seen = int(n_chars * (1 - val_fraction)), 0
    progress = Progress(total_bytes, "prepare: encoding", progress.enabled)
    try:
        for doc in docs:
            for text in read_text(doc):
                head = max(0, min(len(text), n_train_chars - seen))
                if head:
                    writers["train"].add(text[:head])
                if head < len(text):
                    writers["val"].add(text[head:])
                seen += len(text)
                progress.add(len(text.encode("utf-8")) if progress.enabled else 0)
            # The document ends in whichever split its last character went to.
            writers["train" if seen <= n_train_chars else "val"].end_document()
        for w in writers.values():
            w._encode(w.buffer)
            w.buffer = ""
            w.close()
        (out / "meta.json").unlink(missing_ok=True)  # no meta: the folder is not complete
        for split, w in writers.items():
            os.replace(w.tmp, out / f"{split}{suffix}")
        for stale in ("train.bin", "val.bin", "train.txt", "val.txt"):
            if not stale.endswith(suffix):
                (out / stale).unlink(missing_ok=True)
    finally:
        for w in writers.values():
            w.file.close()
            w.tmp.unlink(missing_ok=True)
    meta["tokens"] = {s: w.n_tokens for s, w in writers.items()}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    meta["out"] = str(out)
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default="data/shakespeare/input.txt", help="text file or folder of .txt files")
    p.add_argument("--out", default=None, help="output folder (default: data/processed/<corpus>_<tokenizer>)")
    p.add_argument("--tokenizer", default="char", help="char or bpe")
    p.add_argument("--format", default="bin", help="bin (token arrays) or txt (text splits)")
    p.add_argument("--encoding", default="gpt2", help="tiktoken encoding for bpe (gpt2, cl100k_base, ...)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction held out for validation")
    p.add_argument("--force", action="store_true", help="replace data prepared with other settings")
    args = p.parse_args(argv)
    start = time.time()
    try:
        meta = prepare(args.input, args.out, args.tokenizer, args.format, args.encoding,
                       args.val_fraction, args.force)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kind = meta["tokenizer"] + (f" {meta['encoding']}" if meta["tokenizer"] == "bpe" else "")
    print(f"prepared {meta['out']}: train {meta['tokens']['train']:,} tokens, val "
          f"{meta['tokens']['val']:,} tokens, vocab {meta['vocab_size']:,} ({kind}), "
          f"{meta['format']} {meta['dtype'] if meta['format'] == 'bin' else ''}".rstrip()
          + f" in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
