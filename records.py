"""Records: training data as JSON records rather than plain text. Three kinds, told apart by the first
record's keys:

    {"text": "..."}                                   a document, trained on whole
    {"prompt": "...", "completion": "..."}            a pair: the loss on the completion
    {"messages": [{"role": "user", "content": "..."},  a conversation, rendered with the tokenizer's chat
                  {"role": "assistant", ...}, ...]}    template (templates.py): the loss on the assistant's turns

in `.jsonl` files (one record per line), `.json` files (an array of records) or `.parquet` files (read with
pyarrow); several inputs may be mixed (`mixture`). prepare.py turns each record into token ids and a mask
of the ids trained on (`encoded_records`: a text or a pair by `record_pieces`, a
conversation by its template), which it stores beside the tokens, with where each record starts: with
data.loss_on = "answers", a pair trains on its completion and a conversation on each assistant turn's
content and the end-of-turn token after it, nothing of the template around them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from config import DataConfig
from data import Progress, longer_split
from errors import DataError
from files import publish
from templates import ChatML, ChatTemplate, required_template
from tokenizer import MARKED, MARKERS, Tokenizer

PROGRESS_RECORDS = 50_000  # show progress for over 50,000 records
BATCH_RECORDS = 512  # records tokenized together
MAX_REPEATS = 100  # a mixture repeats an input's records at most this many times each
KINDS = {"text": ("text",), "pair": ("prompt", "completion"), "messages": ("messages",)}
ROLES = ("system", "user", "assistant")
SHAPES = '{"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [{"role": ..., "content": ...}, ...]}'


# ----------------------------------------------------------------------------- reading records

def read_records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) for each record of a file, `where` naming the file and line (or record number) for
    errors. A .jsonl file streams line by line and a .parquet file in batches; a .json array is read whole."""
    if path.suffix == ".parquet":
        yield from parquet_records(path)
        return
    try:
        if path.suffix == ".json":
            try:
                records = json.loads(path.read_bytes())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path} is not JSON ({e}); fix it, or write one record per line in a .jsonl "
                                "file") from None
            if not isinstance(records, list):
                raise DataError(f"{path} holds a JSON {json_type(records)}, not an array of records; put the "
                                f"records in a list [...], each {SHAPES}")
            yield from ((f"{path}: record {n}", r) for n, r in enumerate(records, 1))
            return
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        raise DataError(f"{path}:{n}: not a JSON record ({e}); fix or remove that line") from None
                    yield f"{path}:{n}", record
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror}); give the path of a records file") from None


def parquet_records(path: Path) -> Iterator[tuple[str, object]]:
    try:
        import pyarrow.parquet as pq
        from pyarrow import ArrowException
    except ImportError:
        raise DataError(f"{path}: reading .parquet files needs pyarrow, which is not installed; pip install pyarrow "
                        "(or give the records as .jsonl)") from None
    n = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):  # a few records in memory at a time
            for record in batch.to_pylist():
                n += 1
                yield f"{path}: record {n}", record
    except (ArrowException, OSError) as e:
        raise DataError(f"{path} cannot be read as Parquet ({e}); write it again, or give the records as "
                        ".jsonl") from None


def record_kind(record: object, where: str) -> str:
    """The kind of the first record, which every other record must be."""
    for kind, keys in KINDS.items():
        if isinstance(record, dict) and all(k in record for k in keys):
            return kind
    shown = (f"keys {', '.join(map(repr, record))}" if record else "no keys") if isinstance(record, dict) else \
        f"a JSON {json_type(record)}"
    raise DataError(f"{where}: a record is {SHAPES}, this one has {shown}; write the records in one of these shapes")


def json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def record_problem(record: object, kind: str) -> str | None:
    """What is wrong with a record that should be of `kind`, or None."""
    if not isinstance(record, dict) or not all(k in record for k in KINDS[kind]):
        return f"it is not a {kind} record like the first ({', '.join(KINDS[kind])}); give every record the same shape"
    if kind != "messages":
        texts = {k: record[k] for k in KINDS[kind]}
    elif not isinstance(record["messages"], list) or not record["messages"]:
        return "messages is not a list of messages; write [{\"role\": ..., \"content\": ...}, ...]"
    else:
        texts = {}
        for i, message in enumerate(record["messages"], 1):
            if not isinstance(message, dict):
                return f"message {i} is a JSON {json_type(message)}, not an object; write " \
                       "{\"role\": ..., \"content\": ...}"
            if message.get("role") not in ROLES:
                return f"message {i} has the role {json.dumps(message.get('role'))}, not one of {', '.join(ROLES)}; " \
                       "use one of these"
            texts[f"message {i}'s content"] = message.get("content")
    for name, text in texts.items():
        if not isinstance(text, str):
            what = "missing" if text is None else f"a JSON {json_type(text)}"
            return f"{name} is {what}, not a string; write it as text"
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON allows "\ud83d" alone, half of a character: no text has it
            return f"{name} holds half of a character ({text[e.start]!r}, an unpaired \\u escape); fix that escape"
    return None


def record_texts(record: dict, kind: str) -> list[str]:
    """The texts a record holds: its text, its prompt and completion, or each message's role and content
    (a char tokenizer's characters, and what a BPE is learned from)."""
    if kind == "messages":
        return [m["role"] + "\n" + m["content"] for m in record["messages"]] + [role + "\n" for role in ROLES]
    return [record[k] for k in KINDS[kind]]


def has_answer(record: dict, kind: str, loss_on: str) -> bool:
    """Whether a record has anything to train on: a conversation without an assistant turn has not (with the
    loss on the answers), and is dropped."""
    return kind != "messages" or loss_on == "all" or any(m["role"] == "assistant" for m in record["messages"])


def scan_records(groups: list[list[Path]], d: DataConfig) -> dict:
    """Pass 1 over records (prepare.py), input after input (`groups`: each input's files): each record
    checked, so that a bad one is named by file and line before anything is written; the kind (the first
    record's); how many of each input are kept, and how many dropped (a conversation without an assistant
    turn has nothing to train on with data.loss_on = answers); (char) the characters of their texts."""
    kind, kept, dropped, chars = None, [0] * len(groups), 0, set()
    for i, group in enumerate(groups):
        for where, record in (item for document in group for item in read_records(document)):
            kind = kind or record_kind(record, where)
            if problem := record_problem(record, kind):
                raise DataError(f"{where}: {problem}")
            if not has_answer(record, kind, d.loss_on):
                dropped += 1
                continue
            kept[i] += 1
            if d.tokenizer == "char":
                chars.update(*record_texts(record, kind))
    if kind is None:
        raise DataError(f"{d.input} holds no records; give a file with records in it, each {SHAPES}")
    return {"kind": kind, "kept": kept, "dropped": dropped, "chars": chars}


def records_summary(meta: dict) -> str:
    """One line on prepared records: how many in each split, dropped, and trained on (prepare.py, train.py)."""
    r, trained = meta["records"], meta.get("trained")
    return (f"records ({r['kind']}): {r['train']:,} train, {r['val']:,} val"
            + "".join(f"; {i['input']}: {i['train']:,} train" + (f" drawn as {i['train_copies']:,}" if
                      i["train_copies"] != i["train"] else "") + f", {i['val']:,} val" for i in r.get("inputs", []))
            + (f"; {r['dropped']:,} conversations without an assistant turn dropped" if r["dropped"] else "")
            + (f"; loss on the answers: {trained['train']:,} of {meta['tokens']['train']:,} train tokens"
               if trained else ""))


# ----------------------------------------------------------------------------- records to tokens

def record_pieces(record: dict, kind: str, loss_on: str) -> list[tuple[str, list[tuple[int, int]]]]:
    """A document or a pair as pieces of text to tokenize one after the other, each with the character spans
    of it that are trained on. A pair is two pieces, its prompt and its completion, so that no token
    straddles them (the completion's first token is one the model learns to give after the prompt, as in
    eval.py --task). (Conversations: their template's encode.)"""
    if kind == "text":
        return [(record["text"], [(0, len(record["text"]))])]
    prompt, completion = record["prompt"], record["completion"]
    return [(prompt, [(0, len(prompt))] if loss_on == "all" else []), (completion, [(0, len(completion))])]


def encoded_records(docs: list[Path], kind: str, template: ChatTemplate | ChatML | None, loss_on: str,
                    tokenizer: Tokenizer) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Each record's (token ids, mask of those trained on, UTF-8 bytes of its text), in order, as a
    document: the tokenizer's prefix before it (a template writes its own), its end-of-text token after
    it, trained on when the record's last token is (so that the model learns to stop there). The records
    must have passed scan_records; a conversation without an answer is left out (has_answer). Records are
    read BATCH_RECORDS at a time, so that a BPE tokenizes their texts in one call, on several threads."""
    for document in docs:
        batch = []
        for where, record in read_records(document):
            if has_answer(record, kind, loss_on):
                batch.append((where, record))
            if len(batch) == BATCH_RECORDS:
                yield from encoded_batch(batch, kind, template, loss_on, tokenizer)
                batch = []
        yield from encoded_batch(batch, kind, template, loss_on, tokenizer)


def encoded_batch(batch: list[tuple[str, dict]], kind: str, template: ChatTemplate | ChatML | None, loss_on: str,
                  tokenizer: Tokenizer) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """encoded_records of a batch of (where, record). A text or a pair is pieces trained on whole or not at
    all (record_pieces), so its mask is each piece's flag repeated over its tokens."""
    eot = [] if tokenizer.eot_token is None else [tokenizer.eot_token]
    if kind == "messages":
        assert template is not None, "prepare.py refuses conversations without a chat template"
        for where, record in batch:
            try:
                ids, mask, n_bytes = template.encode(tokenizer, record["messages"], answers=loss_on == "answers")
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
            mask = mask if loss_on == "answers" else np.ones_like(mask)
            trained_end = bool(len(mask) and mask[-1])  # the template's text ends with an answer
            yield (np.concatenate([ids, np.array(eot, dtype=np.int64)]),
                   np.concatenate([mask, np.full(len(eot), trained_end, np.uint8)]), n_bytes)
        return
    pieces = [record_pieces(record, kind, loss_on) for _, record in batch]
    encoded = iter(encoded_texts(tokenizer, [[text for text, _ in p] for p in pieces], [w for w, _ in batch]))
    for parts in pieces:  # (text, spans) of one record
        texts_ids = [next(encoded) for _ in parts]
        # Not trained: the prefix; each piece as record_pieces says; the end-of-text when the last piece is.
        flags = [0] + [1 if spans else 0 for _, spans in parts] + [1 if parts[-1][1] else 0]
        lengths = [len(tokenizer.prefix)] + [len(ids) for ids in texts_ids] + [len(eot)]
        ids = tokenizer.prefix + [i for piece in texts_ids for i in piece] + eot
        yield (np.array(ids, dtype=np.int64), np.repeat(np.array(flags, dtype=np.uint8), lengths),
               sum(len(text.encode("utf-8")) for text, _ in parts))


def encoded_texts(tokenizer: Tokenizer, texts: list[list[str]], wheres: list[str]) -> list[list[int]]:
    """The token ids of each record's texts, one list after another (texts: each record's; no prefix)."""
    if tokenizer.kind != "char":  # bpe and hf read any text (hf its special tokens as special, as transformers)
        return tokenizer.encode_batch([text for record in texts for text in record])
    encoded = []
    for where, record in zip(wheres, texts):
        try:  # a character the vocabulary lacks (a char model fine-tuned on new records) is named with its record
            encoded += [tokenizer.encode(text) for text in record]
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
    return encoded


# ----------------------------------------------------------------------------- prepared records

def records_meta(scan: dict, d: DataConfig, inputs: list[str]) -> dict:
    """meta.json's account of records: their kind, how many went to each split (the last val_fraction of
    each input's to val) and how many were dropped; data.loss_on for the kinds it applies to. With
    several inputs, each one's records and copies of them in the train split (mixture)."""
    if d.format != "bin":
        raise DataError(f"{d.input} holds records, which are prepared as tokens: set data.format = bin")
    train, val = [], []
    for name, kept in zip(inputs, scan["kept"]):
        n_train = int(kept * (1 - d.val_fraction))
        if not 0 < n_train < kept:
            fix = "" if kept < 2 else f", or {longer_split('val' if n_train == kept else 'train')}"
            raise DataError(f"{name} has {kept} record{'s' * (kept != 1)} to train on, too few for both a train "
                            f"and a val split; give more records{fix}")
        train, val = train + [n_train], val + [kept - n_train]
    copies = mixture(train, d.weight_list())
    for name, n, c in zip(inputs, train, copies):  # a weight far from the others would fill the disk
        if c > MAX_REPEATS * n:
            raise DataError(f"data.weights = {d.weights!r} would repeat each record of {name} {c / n:.0f} times "
                            f"(at most {MAX_REPEATS}); give weights closer to the inputs' sizes, or more records")
    out = {"records": {"kind": scan["kind"], "train": sum(copies), "val": sum(val), "dropped": scan["dropped"]}}
    if len(inputs) > 1:
        out["records"]["inputs"] = [{"input": name, "train": t, "val": v, "train_copies": c}
                                    for name, t, v, c in zip(inputs, train, val, copies)]
    return out | ({"loss_on": d.loss_on} if scan["kind"] != "text" else {})


def mixture(train: list[int], weights: list[float]) -> list[int]:
    """How many records of each input the train split holds, given each input's train records and weights
    (its share of the split; none: each record once). The input with the most records for its weight is
    taken once; the others are repeated up to their share, so that no record is left out."""
    if not weights:
        return train
    most = max(n / w for n, w in zip(train, weights))
    return [max(n, round(w * most)) for n, w in zip(train, weights)]


def copies_of(j: int, n: int, total: int) -> int:
    """How many times record j of an input's n train records goes into the train split, for `total` in all:
    spread evenly (weight 2.5: records twice or three times, alternately)."""
    return (j + 1) * total // n - j * total // n


def records_in_order(groups: list[list[Path]], plan: list[dict], encode) -> Iterator[tuple[str, tuple, bool]]:
    """(split, encoded record, whether it is the record's first time) as the splits hold them: input after
    input, its first plan["train"] records to train, the rest to val. An input repeated in the train split
    (a mixture) is read again for each round of copies, so that a record's copies never sit side by side
    (a window would hold the answer twice): a0 a1 a2 a0 a1 a2 a0 ..., each record as often as copies_of says."""
    for docs, p in zip(groups, plan):
        for round_ in range(-(-p["train_copies"] // p["train"])):  # ceil: the most copies of one record
            for j, record in enumerate(encode(docs)):
                if j >= p["train"] and round_:
                    break
                if j >= p["train"]:
                    yield "val", record, True
                elif copies_of(j, p["train"], p["train_copies"]) > round_:
                    yield "train", record, round_ == 0


def records_template(kind: str, wanted: dict, d: DataConfig) -> ChatTemplate | ChatML | None:
    """How conversations are rendered: a Hugging Face tokenizer's own template, or ChatML (with_markers)."""
    if kind != "messages":
        return None
    return required_template(wanted, str(d.input), "use a model (or data.tokenizer_path) whose tokenizer has one, "
                             "or for a new model a tokenizer made here: data.tokenizer = char, bpe or train-bpe "
                             "(ChatML)")


def with_markers(kind: str, wanted: dict, from_model: bool, d: DataConfig) -> dict:
    """A char or bpe tokenizer for conversations: with ChatML's two markers as two more ids. A model whose
    tokenizer has none (trained on text) has no rows for them."""
    if kind != "messages" or wanted["tokenizer"] not in MARKED or wanted.get("markers"):
        return wanted
    if from_model:
        raise DataError(f"{d.input} holds conversations, and the model's {wanted['tokenizer']} tokenizer has no "
                        "chat markers (the model was trained on text); train a model on the conversations from the "
                        "start (without training.init_from), or start from a model that has a chat template")
    return wanted | {"markers": list(MARKERS)}


def write_record_splits(out: Path, groups: list[list[Path]], d: DataConfig, tok: Tokenizer, meta: dict,
                        template: ChatTemplate | ChatML | None,
                        min_tokens: int, progress: bool, split_files: tuple[str, ...]) -> dict:
    """Records, each a document (followed by the end-of-text token), input after input (`groups`: each
    input's files) in the order of records_in_order. For pairs and conversations, `{split}.starts` holds
    where each record starts (int64), and with data.loss_on = answers, `{split}.mask` one byte per token:
    1 when the token is trained on (as a target), 0 when not."""
    kind, r = meta["records"]["kind"], meta["records"]
    masked = kind != "text" and d.loss_on == "answers"
    exts = ("bin",) + (("starts",) if kind != "text" else ()) + (("mask",) if masked else ())
    names = [f"{s}.{ext}" for s in ("train", "val") for ext in exts]
    files = {name: open(out / f"{name}.tmp", "wb") for name in names}
    counts = {s: {"tokens": 0, "bytes": 0, "trained": 0} for s in ("train", "val")}
    plan = r.get("inputs") or [{"train": r["train"], "val": r["val"], "train_copies": r["train"]}]
    encoding = Progress(sum(p["train"] + p["val"] for p in plan), "prepare: encoding", "records", PROGRESS_RECORDS,
                        progress)
    try:
        for split, (ids, mask, n_bytes), first in records_in_order(
                groups, plan, lambda docs: encoded_records(docs, kind, template, d.loss_on, tok)):
            if kind != "text":  # where the record starts, for batches that keep records whole
                files[f"{split}.starts"].write(np.int64(counts[split]["tokens"]).tobytes())
            files[f"{split}.bin"].write(ids.astype(meta["dtype"]).tobytes())
            if masked:
                files[f"{split}.mask"].write(mask.tobytes())
            c = counts[split]
            c["tokens"], c["trained"], c["bytes"] = (c["tokens"] + len(ids), c["trained"] + int(np.count_nonzero(mask)),
                                                     c["bytes"] + n_bytes)
            encoding.add(first)
        for split, c in counts.items():
            if c["tokens"] < min_tokens or c["trained"] == 0:
                raise DataError(f"the {split} split of {d.input} would have {c['tokens']} tokens ({c['trained']} to "
                                f"train on), fewer than the {min_tokens} needed (block_size + 1 when training), or "
                                f"none to train on; give more records, or {longer_split(split)}")
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
        publish(out, names, split_files)
    finally:
        for name, f in files.items():
            f.close()
            (out / f"{name}.tmp").unlink(missing_ok=True)
    tokens = {s: c["tokens"] for s, c in counts.items()}
    # Bits per byte needs the loss over every token of the text; with a mask, the loss is over the answers.
    return {"tokens": tokens} | ({"trained": {s: c["trained"] for s, c in counts.items()}} if masked else
                                {"bytes": {s: c["bytes"] for s, c in counts.items()}})
