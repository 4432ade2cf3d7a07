"""Turn a text file, records (JSONL, JSON, Parquet: docs/records.md), or a folder of either, into training data.

    python prepare.py                                            # shipped corpus, characters, bin
    python prepare.py --tokenizer bpe                            # GPT-2 BPE tokens
    python prepare.py --data.input my.txt --data.processed_dir data/processed/my_char --data.format txt
    python prepare.py --config configs/bpe/shakespeare_bpe.toml  # the data that preset trains on
    python prepare.py --data.input pairs.jsonl --data.tokenizer train-bpe  # records, a BPE learned from them

It takes the [data] settings of train.py, spelt the same way (a preset's other sections are checked,
not used). It writes into data.processed_dir the train/val splits (`train.bin`/`val.bin`: flat token
arrays, or `train.txt`/`val.txt`: the raw text) and `meta.json`, which says how to read them and how
they were made: the settings and a fingerprint of the input. The last val_fraction of the text is the
validation split. For a folder, each `*.txt` file (sorted by path) is one document; BPE puts its end-of-text
token after each. The input streams in chunks, so memory stays bounded for any size. train.py
prepares data through `ensure_prepared`, which never trains on a split the config does not describe.
"""

from __future__ import annotations

# Before torch, which takes seconds to load: a Ctrl-C meanwhile ends in one line (errors.py).
from errors import DataError, command

import hashlib
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from config import DataConfig, doc, inputs_of
from options import parse
from data import (FOLDER_SETTINGS, META_VERSION, READ_BYTES, RECORD_SUFFIXES, Progress, default_processed_dir,
                  input_groups, list_documents, load_meta, longer_split, resolve_bin_dir, text_chunks, token_dtype)
from records import (read_records, record_texts, records_meta, records_summary, records_template, scan_records,
                     with_markers, write_record_splits)
import gguf_format
from files import FileError, lock, make_folder, others, publish, write_json
from tokenizer import (encode_chunks, hf_tokenizer_meta, learn_bpe, safe_cut, split_safely, tokenizer_differences,
                       tokenizer_from_meta)

ENCODE_CHARS = 1 << 23    # encode in batches of about 8 M characters
PROGRESS_BYTES = 5 << 20  # show progress for inputs over 5 MB


def output_dir(d: DataConfig, wanted: dict | None = None) -> Path:
    """data.processed_dir, or data/processed/<corpus>_<tokenizer>... when it is empty (`wanted`: the
    tokenizer meta, which names the folder of a Hugging Face tokenizer by its digest)."""
    wanted = wanted or {}
    sha = str(wanted.get("learned_vocab") or wanted.get("vocab_size")) if d.tokenizer == "train-bpe" else \
        wanted.get("sha256", "")  # a learned BPE's size, a Hugging Face tokenizer's digest
    folder = Path(d.processed_dir or default_processed_dir(d.input, d.tokenizer, d.bpe_encoding, d.format, sha))
    return resolve_bin_dir(folder) if d.format == "bin" else folder


def wanted_tokenizer(d: DataConfig, model_meta: dict | None) -> dict | None:
    """The tokenizer to encode with, as a meta: the starting weights' own (`model_meta`: a char model's
    characters, a BPE model's encoding, a Hugging Face model's tokenizer.json), or the one the settings
    name; None for a new char model, whose characters come from the text."""
    if model_meta is not None:
        return model_meta
    if d.tokenizer == "train-bpe":  # learned in pass 1 of prepare (learned_tokenizer)
        return {"tokenizer": "train-bpe", "vocab_size": d.vocab_size}
    if d.tokenizer == "bpe":
        return {"tokenizer": "bpe", "encoding": d.bpe_encoding}
    if d.tokenizer != "hf":
        return None
    if not d.tokenizer_path:
        raise DataError("data.tokenizer = hf needs data.tokenizer_path: the folder of a Hugging Face model, which "
                        "holds its tokenizer.json, or a GGUF file")
    path = Path(d.tokenizer_path)
    if gguf_format.read_as_gguf(path):  # a GGUF file carries its tokenizer in its metadata
        meta = gguf_format.read_gguf(path, "cpu")[3]
    else:
        meta = hf_tokenizer_meta(path)
    if meta is None:
        raise DataError(f"data.tokenizer_path = {d.tokenizer_path!r} holds no tokenizer.json; give the folder of a "
                        "Hugging Face model, which has one, or a GGUF file with its tokenizer")
    return meta


def stat_digest(docs: list[Path]) -> str:
    """A cheap fingerprint (names, sizes, modification times): when it matches, the input is unchanged."""
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in docs]
    return hashlib.sha256(repr(stats).encode()).hexdigest()[:16]


def content_digest(docs: list[Path]) -> str:
    """The sha256 of the files' bytes, one after the other (what pass 1 of prepare computes as it reads)."""
    hasher = hashlib.sha256()
    for document in docs:
        with open(document, "rb") as f:
            while chunk := f.read(READ_BYTES):
                hasher.update(chunk)
    return hasher.hexdigest()


class SplitWriter:
    """Streams one split to disk: encodes text in batches, writes tokens (bin) or text (txt). Both splits
    are written at once, as the text goes by, so each is a temporary file of its own, renamed into place
    when both are done (files.atomic_file does one file at a time); the folder's lock keeps out others."""

    def __init__(self, path: Path, fmt: str, tokenizer, dtype: str):
        self.fmt, self.tokenizer, self.dtype = fmt, tokenizer, np.dtype(dtype)
        self.tmp = path.with_name(path.name + ".tmp")
        self.file = open(self.tmp, "wb")
        self.buffer, self.n_tokens, self.n_bytes = "", 0, 0  # n_bytes: UTF-8 bytes of the text encoded
        self.starting = True  # the next text begins a document

    def add(self, text: str) -> None:
        if self.starting and text and self.tokenizer.prefix:  # e.g. Llama 3's <|begin_of_text|>
            self._write(np.array(self.tokenizer.prefix), self.tokenizer.decode(self.tokenizer.prefix))
        self.starting = self.starting and not text
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
            self._write(np.array([self.tokenizer.eot_token]), self.tokenizer.eot_text)
        self.starting = True

    def _encode(self, text: str) -> None:
        for ids in encode_chunks(self.tokenizer, split_safely(text)):
            self._write(ids, None)
        raw = text.encode("utf-8")
        self.n_bytes += len(raw)
        if self.fmt == "txt":
            self.file.write(raw)

    def _write(self, ids: np.ndarray, text: str | None) -> None:
        self.n_tokens += len(ids)
        if self.fmt == "bin":
            self.file.write(ids.astype(self.dtype).tobytes())
        elif text is not None:
            self.file.write(text.encode("utf-8"))

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())  # on the disk before it is renamed into place
        self.file.close()


def differences(meta: dict, d: DataConfig, wanted: dict | None, source: dict | None) -> list[str]:
    """How the data described by `meta` differs from what `d` asks for (empty: it is that data).
    `wanted`: the tokenizer the text must be encoded with (None: char, any characters); `source`: the
    input's fingerprint, or None when the input cannot be read (then it is not compared)."""
    if wanted and wanted["tokenizer"] == "train-bpe":  # the same input (below) and size learn the same tokenizer
        # learned from this very input, not copied from a model that learned it from other text
        learned_here = meta.get("learned_from") == meta.get("source", {}).get("sha256")
        out = [] if meta.get("learned_vocab") == wanted["vocab_size"] and learned_here else [
            f"data.tokenizer = train-bpe with data.vocab_size = {wanted['vocab_size']} learned from this input now, "
            "not there"]
    else:
        out = tokenizer_differences(meta, wanted or {"tokenizer": d.tokenizer}, "there", "now")
    out += [f"data.{k}: {meta.get(k)!r} there, {v!r} now" for k, v in (("format", d.format),
            ("val_fraction", d.val_fraction), ("loss_on", d.loss_on), ("weights", weights_text(d)))
            if meta.get(k, {"loss_on": v, "weights": ""}.get(k)) != v]  # no loss_on there: text or documents
    old = meta.get("source") or {}
    if source and old.get("stat") != source["stat"]:  # maybe changed: compare the contents
        if old.get("sha256") != (source.get("sha256") or content_digest(source["docs"])):
            out.append(f"data.input: {old.get('path')!r} there (other contents), {d.input!r} now")
    return out


def ensure_prepared(d: DataConfig, model_meta: dict | None = None, min_tokens: int = 2,
                    explicit: set[str] | None = None) -> tuple[Path, dict]:
    """The prepared folder for `d` and its meta, preparing it when it is missing or was made otherwise.

    The default folder (data.processed_dir empty) is prepared again when it was made otherwise. A
    folder the user named is never replaced: the settings left at their defaults are taken from how
    it was made (like a model shape from its weights), and a setting the user chose (`explicit`,
    e.g. {"data.val_fraction"}) that differs is an error. `model_meta`: the starting weights' tokenizer,
    to encode the text with the model's own ids. `min_tokens`: the shortest usable split."""
    wanted = wanted_tokenizer(d, model_meta)
    folder = output_dir(d, wanted)
    with_chars = " with the model's tokenizer" if model_meta else ""
    if not (folder / "meta.json").exists():
        print(f"no prepared data in {folder}: preparing it from {d.input}{with_chars}", flush=True)
        return folder, prepare(d, model_meta=model_meta, min_tokens=min_tokens)
    meta = load_meta(folder)
    if d.processed_dir:
        made = {"input": meta.get("source", {}).get("path"), "tokenizer": meta["tokenizer"],
                "bpe_encoding": meta.get("encoding"), "format": meta["format"],
                "val_fraction": meta.get("val_fraction"), "loss_on": meta.get("loss_on"),
                "vocab_size": meta.get("learned_vocab"), "weights": meta.get("weights", "")}
        made["tokenizer"] = "train-bpe" if "learned_vocab" in meta else made["tokenizer"]
        assert tuple(made) == FOLDER_SETTINGS
        for key, value in made.items():
            if value is not None and f"data.{key}" not in (explicit or set()):
                setattr(d, key, value)
        if d.tokenizer == "train-bpe" and model_meta is None:  # as the folder was made: compared by its size
            wanted = wanted_tokenizer(d, None)
    try:
        docs = list_documents(d.input)
        source = {"stat": stat_digest(docs), "docs": docs}
    except DataError:  # no input here (e.g. only the prepared folder was copied): use the folder as it is
        source = None
    diffs = differences(meta, d, wanted, source)
    if not diffs:
        return folder, meta
    if d.processed_dir:
        fix = ("set data.processed_dir to a new folder (train.py prepares the text there with the model's "
               "tokenizer)" if model_meta else f"prepare it again: {prepare_command(d)}, or set "
               "data.processed_dir to another folder")
        raise DataError(f"{folder} holds data prepared differently ({'; '.join(diffs)}); {fix}")
    print(f"{folder} was prepared differently ({'; '.join(diffs)}): preparing it again{with_chars}", flush=True)
    return folder, prepare(d, force=True, model_meta=model_meta, min_tokens=min_tokens)


def weights_text(d: DataConfig) -> str:
    """data.weights as meta.json keeps it and compares it: "3, 1" (the same weights however spelt)."""
    return ", ".join(f"{w:g}" for w in d.weight_list())


def prepare_command(d: DataConfig) -> str:
    bpe = f" --data.bpe_encoding {d.bpe_encoding}" if d.tokenizer == "bpe" else \
        f" --data.tokenizer_path {d.tokenizer_path}" if d.tokenizer == "hf" else \
        f" --data.vocab_size {d.vocab_size}" if d.tokenizer == "train-bpe" else ""
    return (f"python prepare.py --data.input {shlex.quote(d.input)} --data.processed_dir {d.processed_dir} "
            f"--data.tokenizer {d.tokenizer}{bpe} --data.format {d.format} --data.val_fraction {d.val_fraction}"
            + (f" --data.loss_on {d.loss_on}" if d.loss_on != "answers" else "")
            + (f" --data.weights {shlex.quote(d.weights)}" if d.weights else "") + " --force")


def prepare(d: DataConfig, force: bool = False, model_meta: dict | None = None, progress: bool = True,
            min_tokens: int = 2) -> dict:
    """Prepare d.input into output_dir(d); returns the meta dict that was written. `model_meta`: the
    tokenizer of the model that will train on it (a char model's own characters, not the corpus's).
    A split of fewer than `min_tokens` tokens is refused before anything is replaced."""
    wanted = wanted_tokenizer(d, model_meta)
    out = output_dir(d, wanted)
    groups = input_groups(d.input)
    docs = [p for group in groups for p in group]
    for name in inputs_of(d.input):
        check_owned(out, Path(name))
    total_bytes = sum(p.stat().st_size for p in docs)

    # Pass 1: hash the source, count characters or check records, and (char) collect the vocabulary.
    is_records = docs[0].suffix in RECORD_SUFFIXES
    scan = scan_records(groups, d) | {"sha256": content_digest(docs)} if is_records else \
        scan_text(docs, d, total_bytes, progress)
    wanted = with_markers(scan.get("kind"), wanted or {"tokenizer": "char"}, model_meta is not None, d)
    if wanted["tokenizer"] == "char":  # the model's characters, or the text's
        wanted = wanted | {"chars": char_vocabulary(wanted.get("chars"), scan["chars"], d)}
    records = records_meta(scan, d, inputs_of(d.input)) if is_records else {}  # quick checks before learning a BPE
    if wanted["tokenizer"] == "train-bpe":
        wanted = learned_tokenizer(docs, d, scan.get("kind")) | {"learned_from": scan["sha256"]}
    template = records_template(scan["kind"], wanted, d) if is_records else None
    tok = tokenizer_from_meta(wanted)
    source = {"path": str(d.input), "sha256": scan["sha256"], "bytes": total_bytes, "documents": len(docs),
              "stat": stat_digest(docs)}
    own = {"char": ("chars",), "bpe": ("encoding", "eot_token"), "hf": ("eot_token", "stop_tokens", "sha256", "files")}
    meta = {
        "format_version": META_VERSION, "tokenizer": wanted["tokenizer"], "format": d.format,
        "vocab_size": tok.vocab_size, "dtype": token_dtype(tok.vocab_size),
        **{k: getattr(tok, k) if k in ("chars", "eot_token") else wanted[k] for k in own[wanted["tokenizer"]]},
        "val_fraction": d.val_fraction, "source": source,
    }
    meta |= {k: wanted[k] for k in ("learned_vocab", "learned_from", "markers") if k in wanted} | records
    meta |= {"weights": weights_text(d)} if d.weights else {}
    before = None if force else check_not_otherwise(out, d, meta, source)

    # Pass 2, in a folder locked against a second prepare.py (which waits): encode, check, then publish.
    with lock(make_folder(out, "data.processed_dir") / ".lock", f"data.processed_dir = {str(out)!r}", wait=True):
        if not force and before is None and check_not_otherwise(out, d, meta, source) == []:  # by the one waited for
            print(f"{out} was prepared by the other process in the meantime, from the same text: using it",
                  file=sys.stderr, flush=True)
            return load_meta(out) | {"out": str(out)}
        try:
            # "bytes": each split's UTF-8 text bytes (end-of-text tokens not counted), for bits per byte.
            if is_records:
                meta |= write_record_splits(out, groups, d, tok, meta, template, min_tokens, progress, SPLIT_FILES)
            else:
                meta["tokens"], meta["bytes"] = write_splits(out, docs, d, tok, meta["dtype"], scan["n_chars"],
                                                             min_tokens, Progress(total_bytes, "prepare: encoding",
                                                                                  f"{total_bytes / 1e6:.0f} MB",
                                                                                  PROGRESS_BYTES, progress))
        except OSError as e:
            raise FileError(f"cannot write into {out} ({e.strerror}); free some space or choose another "
                            "data.processed_dir") from None
        write_json(out / "meta.json", meta)
    return meta | {"out": str(out)}


def scan_text(docs: list[Path], d: DataConfig, total_bytes: int, progress: bool) -> dict:
    """Pass 1 over a text: its digest, its number of characters and (char) the characters themselves."""
    if d.weights:
        raise DataError(f"data.weights mixes inputs of records, and {d.input} is text; leave data.weights empty (the "
                        "texts follow one another), or give the texts as records ({\"text\": ...} per line)")
    hasher, n_chars, seen_chars = hashlib.sha256(), 0, set()
    reading = Progress(total_bytes, "prepare: reading", f"{total_bytes / 1e6:.0f} MB", PROGRESS_BYTES, progress)
    for document in docs:
        for text in text_chunks(document, hasher):
            n_chars += len(text)
            if d.tokenizer == "char":
                seen_chars.update(text)
            reading.add(len(text.encode("utf-8")) if reading.enabled else 0)
    return {"sha256": hasher.hexdigest(), "n_chars": n_chars, "chars": seen_chars}


def learned_tokenizer(docs: list[Path], d: DataConfig, kind: str | None) -> dict:
    """data.tokenizer = train-bpe: a byte-level BPE of data.vocab_size tokens learned from the input (its
    texts; records: their texts, prompts, completions, messages), as a Hugging Face tokenizer's meta."""
    if kind is None:
        texts = (text for document in docs for text in text_chunks(document))
    else:
        texts = (text for document in docs for _, record in read_records(document)
                 for text in record_texts(record, kind))
    print(f"learning a BPE of {d.vocab_size:,} tokens from {d.input}", file=sys.stderr, flush=True)
    return learn_bpe(texts, d.vocab_size) | {"learned_vocab": d.vocab_size}


def char_vocabulary(own: str | None, seen_chars: set, d: DataConfig) -> str:
    """A char model's characters: the model's own (`own`), which must hold the text's, or the text's."""
    chars = own if own is not None else "".join(sorted(seen_chars))
    missing = sorted(seen_chars - set(chars))
    if missing:
        shown = ", ".join(map(repr, missing[:20])) + (f" and {len(missing) - 20} more" if missing[20:] else "")
        raise DataError(f"{d.input} has characters the model does not know: {shown}; remove them from "
                        "the text, or use a bpe model, which reads any text")
    return chars


def check_not_otherwise(out: Path, d: DataConfig, meta: dict, source: dict) -> list | None:
    """Refuse a folder holding data prepared otherwise; [] when it holds this very data, None when none."""
    if not (out / "meta.json").exists():
        return None
    try:
        diffs = differences(load_meta(out), d, meta, source)
    except DataError:
        diffs = ["meta.json is corrupt"]
    if diffs:
        raise DataError(f"{out} already holds data prepared differently ({'; '.join(diffs)}); "
                        "set data.processed_dir to another folder, or pass --force to replace it")
    return []


SPLIT_FILES = tuple(f"{split}.{ext}" for ext in ("bin", "txt", "mask", "starts") for split in ("train", "val"))


def check_owned(out: Path, source: Path) -> None:
    """Preparing replaces the splits in `out`: refuse when they could be the user's own files (the input
    itself, files beside it, or files that no meta.json of ours vouches for)."""
    where, text = out.resolve(), source.resolve()
    if where == text or where in text.parents or text in where.parents:
        raise DataError(f"data.processed_dir = {str(out)!r} and data.input = {str(source)!r} overlap: preparing "
                        "would write among your text; set data.processed_dir to a folder outside the input")
    foreign = others(out, (*SPLIT_FILES, *(f"{name}.tmp" for name in SPLIT_FILES), "meta.json"))
    if foreign:
        raise DataError(f"data.processed_dir = {str(out)!r} holds files that prepare.py did not write "
                        f"({', '.join(foreign[:3])}); set data.processed_dir to a folder of its own")
    theirs = [name for name in SPLIT_FILES if (out / name).exists()]
    if theirs and not (out / "meta.json").exists():
        raise DataError(f"{out} holds {', '.join(theirs)} but no meta.json, so prepare.py did not write them and "
                        "will not replace them; set data.processed_dir to another folder (or delete them if an "
                        "interrupted prepare.py left them)")


def write_splits(out: Path, docs: list[Path], d: DataConfig, tok, dtype: str, n_chars: int, min_tokens: int,
                 progress: Progress) -> tuple[dict[str, int], dict[str, int]]:
    """The first (1 - val_fraction) of the characters are train, the rest val. The splits are written
    to temporary files, renamed into place only when both are complete and long enough."""
    suffix = ".bin" if d.format == "bin" else ".txt"
    writers = {s: SplitWriter(out / f"{s}{suffix}", d.format, tok, dtype) for s in ("train", "val")}
    n_train_chars, seen = int(n_chars * (1 - d.val_fraction)), 0
    try:
        for document in docs:
            for text in text_chunks(document):
                head = max(0, min(len(text), n_train_chars - seen))
                if head:
                    writers["train"].add(text[:head])
                if head < len(text):
                    writers["val"].add(text[head:])
                seen += len(text)
                progress.add(len(text.encode("utf-8")) if progress.enabled else 0)
            # The document ends in whichever split its last character went to.
            writers["train" if seen <= n_train_chars else "val"].end_document()
        for split, w in writers.items():
            w._encode(w.buffer)
            w.buffer = ""
            w.close()
            if w.n_tokens < min_tokens:
                raise DataError(f"the {split} split of {d.input} would have {w.n_tokens} tokens, fewer than the "
                                f"{min_tokens} needed (block_size + 1 when training); use a longer text, or "
                                f"{longer_split(split)}")
        publish(out, [f"{split}{suffix}" for split in writers], SPLIT_FILES)
    finally:
        for w in writers.values():
            w.file.close()
            w.tmp.unlink(missing_ok=True)
    return {s: w.n_tokens for s, w in writers.items()}, {s: w.n_bytes for s, w in writers.items()}


@dataclass
class PrepareOptions:
    force: bool = doc("replace a folder that holds data prepared with other settings", False)


@command
def main(argv: list[str] | None = None) -> int:
    opts, cfg = parse(argv, PrepareOptions, sections=("data",), program="prepare.py", about=__doc__)
    start = time.time()
    meta = prepare(cfg.data, opts.force)
    kind = meta["tokenizer"] + (f" {meta['encoding']}" if meta["tokenizer"] == "bpe" else "")
    kind = "learned bpe" if "learned_vocab" in meta else kind
    print(f"prepared {meta['out']}: train {meta['tokens']['train']:,} tokens, val "
          f"{meta['tokens']['val']:,} tokens, vocab {meta['vocab_size']:,} ({kind}), "
          f"{meta['format']} {meta['dtype'] if meta['format'] == 'bin' else ''}".rstrip()
          + f" in {time.time() - start:.1f}s")
    if "records" in meta:
        print(records_summary(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
