"""Records: training data as JSON records rather than plain text, and the chat templates that turn
conversations into text. Three kinds, told apart by the first record's keys:

    {"text": "..."}                                   a document, trained on whole
    {"prompt": "...", "completion": "..."}            a pair: the loss on the completion
    {"messages": [{"role": "user", "content": "..."},  a conversation, rendered with the tokenizer's chat
                  {"role": "assistant", ...}, ...]}    template: the loss on the assistant's turns

in `.jsonl` files (one record per line), `.json` files (an array of records) or `.parquet` files (read with
pyarrow). prepare.py turns each record into pieces of text and the character spans of them that are
trained on (`record_text`), then into token ids and a mask of the ids trained on (`tokens_and_mask`),
which it stores beside the tokens, with where each record starts: with data.loss_on = "answers", a pair
trains on its completion and a conversation on each assistant turn's content and the end-of-turn token
after it, nothing of the template around them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np

from config import DataConfig
from data import Progress, longer_split
from errors import DataError
from files import publish
from tokenizer import Tokenizer

PROGRESS_RECORDS = 50_000  # show progress for over 50,000 records
KINDS = {"text": ("text",), "pair": ("prompt", "completion"), "messages": ("messages",)}
ROLES = ("system", "user", "assistant")
SHAPES = '{"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [{"role": ..., "content": ...}, ...]}'
# Put in place of an answer to see where the template puts the answer's content: no text holds it.
MARK = "\ue000tinygpt-answer\ue001"


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
            if d.tokenizer == "char" and kind != "messages":  # (conversations need a chat template: not char)
                chars.update(*(record[k] for k in KINDS[kind]))
    if kind is None:
        raise DataError(f"{d.input} holds no records; give a file with records in it, each {SHAPES}")
    return {"kind": kind, "kept": kept, "dropped": dropped, "chars": chars}


# ----------------------------------------------------------------------------- chat templates

class ChatTemplate:
    """A tokenizer's Jinja chat template, rendered in jinja2's sandbox the way transformers'
    apply_chat_template renders it (same environment settings, filters and globals; the tokenizer's
    special tokens as variables), so the text is byte for byte the one transformers would train on."""

    def __init__(self, source: str, variables: dict[str, str], end_of_turn: list[str]):
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols, generation_blocks()])
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)  # no HTML escapes
        env.globals["raise_exception"] = template_failure
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise DataError(f"the chat template cannot be read ({type(e).__name__}: {e}); fix the template "
                            "(chat_template.jinja, or chat_template in tokenizer_config.json)") from None
        self.variables = variables  # bos_token, eos_token, ...: what templates read besides the messages
        self.end_of_turn = sorted(end_of_turn, key=len, reverse=True)  # special tokens, the longest first

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        from jinja2.exceptions import SecurityError
        try:
            return self.template.render(messages=messages, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt, **self.variables)
        except SecurityError as e:
            raise DataError(f"the chat template tried to reach outside its sandbox ({e}); use a template that only "
                            "formats the messages") from None
        except Exception as e:  # the template is data, not our code: whatever it raises is a problem with it
            raise DataError(f"the chat template fails on a conversation ({type(e).__name__}: {e}); fix the template, "
                            "or the conversation") from None

    def answers(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant turns: each turn's content and
        the end-of-turn token the template puts right after it. Where a turn's content lands is found by
        rendering the conversation up to that turn with a mark in place of the content."""
        text, spans = self.render(messages), []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            head, _, tail = self.render(messages[:i] + [{**message, "content": MARK}]).partition(MARK)
            content = message["content"]
            if not text.startswith(head + content):
                content = content.strip()  # templates that trim the content (many do)
            if not text.startswith(head + content):
                raise DataError("the chat template renders an assistant turn differently once later turns follow "
                                "(or changes its text), so its answers cannot be found; set data.loss_on = all")
            end = len(head) + len(content)
            marker = next((m for m in self.end_of_turn if tail.startswith(m) and text.startswith(m, end)), "")
            spans.append((len(head), end + len(marker)))
        return text, spans


def end_of_turn_after_answer(template: ChatTemplate) -> str | None:
    """The special token the template puts right after an assistant's message (ChatML's <|im_end|>), which
    ends an answer in chat.py; None when it puts none."""
    probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": MARK}]
    tail = template.render(probe).partition(MARK)[2]
    return next((m for m in template.end_of_turn if tail.startswith(m)), None)


def answer_stops(tokenizer: Tokenizer, template: ChatTemplate | None) -> set[int]:
    """The tokens that end a generated answer (chat.py, eval.py --task): the tokenizer's end-of-text and
    end-of-sequence tokens, and the end-of-turn token the template puts after an assistant's message."""
    stops = set(tokenizer.stop_tokens) | ({tokenizer.eot_token} - {None})
    ending = end_of_turn_after_answer(template) if template else None
    turn = tokenizer.tok.token_to_id(ending) if ending and tokenizer.kind == "hf" else None
    return stops | ({turn} if turn is not None else set())


def records_summary(meta: dict) -> str:
    """One line on prepared records: how many in each split, dropped, and trained on (prepare.py, train.py)."""
    r, trained = meta["records"], meta.get("trained")
    return (f"records ({r['kind']}): {r['train']:,} train, {r['val']:,} val"
            + "".join(f"; {i['input']}: {i['train']:,} train" + (f" drawn as {i['train_copies']:,}" if
                      i["train_copies"] != i["train"] else "") + f", {i['val']:,} val" for i in r.get("inputs", []))
            + (f"; {r['dropped']:,} conversations without an assistant turn dropped" if r["dropped"] else "")
            + (f"; loss on the answers: {trained['train']:,} of {meta['tokens']['train']:,} train tokens"
               if trained else ""))


def generation_blocks() -> type:
    """{% generation %}...{% endgeneration %}, which some templates put around the assistant's text (for
    transformers' assistant masks): rendered as its body. The answers are found by rendering (answers)."""
    from jinja2.ext import Extension
    from jinja2.nodes import CallBlock

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return Generation


def template_failure(message: str) -> None:
    """raise_exception(...) in a template: the template refuses the conversation."""
    from jinja2.exceptions import TemplateError
    raise TemplateError(message)


def chat_template(meta: dict) -> ChatTemplate | None:
    """The chat template of a tokenizer meta (a Hugging Face tokenizer's chat_template.jinja, or the
    chat_template of its tokenizer_config.json), or None when it has none."""
    files = meta.get("files") or {}
    config = json.loads(files.get("tokenizer_config.json", "{}"))
    source = files.get("chat_template.jinja") or config.get("chat_template")
    if isinstance(source, list):  # named templates: the default one
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if not source:
        return None
    variables = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            variables[key] = value
    added = json.loads(files["tokenizer.json"]).get("added_tokens") or []
    special = [t["content"] for t in added
               if isinstance(t, dict) and t.get("special") and isinstance(t.get("content"), str)]
    return ChatTemplate(source, variables, special)


# ----------------------------------------------------------------------------- records to tokens

def record_text(record: dict, kind: str, template: ChatTemplate | None, loss_on: str
                ) -> list[tuple[str, list[tuple[int, int]]]]:
    """A record as pieces of text to tokenize one after the other, each with the character spans of it
    that are trained on. A pair is two pieces, its prompt and its completion, so that no token straddles
    them (the completion's first token is one the model learns to give after the prompt, as in eval.py
    --task); a conversation is its rendered text with each answer's span."""
    if kind == "text":
        return [(record["text"], [(0, len(record["text"]))])]
    if kind == "pair":
        prompt, completion = record["prompt"], record["completion"]
        return [(prompt, [(0, len(prompt))] if loss_on == "all" else []), (completion, [(0, len(completion))])]
    assert template is not None, "prepare.py refuses conversations without a chat template"
    if loss_on == "all":
        text = template.render(record["messages"])
        return [(text, [(0, len(text))])]
    return [template.answers(record["messages"])]


def encoded_records(docs: list[Path], kind: str, template: ChatTemplate | None, loss_on: str, tokenizer: Tokenizer
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Each record's (token ids, mask of those trained on, UTF-8 bytes of its text), in order, as a
    document: the tokenizer's prefix before it (a template writes its own), its end-of-text token after
    it, trained on when the record's end is (so that the model learns to stop there). The records must
    have passed scan_records; a conversation without an answer is left out (has_answer)."""
    for document in docs:
        for where, record in read_records(document):
            if not has_answer(record, kind, loss_on):
                continue
            try:
                pieces = record_text(record, kind, template, loss_on)
                parts = [tokens_and_mask(tokenizer, text, spans) for text, spans in pieces]
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
            if kind != "messages" and tokenizer.prefix:
                parts.insert(0, (np.array(tokenizer.prefix), np.zeros(len(tokenizer.prefix), np.uint8)))
            if tokenizer.eot_token is not None:
                text, spans = pieces[-1]
                trained = bool(spans) and spans[-1][1] == len(text)
                parts.append((np.array([tokenizer.eot_token]), np.array([trained], np.uint8)))
            yield (np.concatenate([ids for ids, _ in parts]).astype(np.int64), np.concatenate([m for _, m in parts]),
                   sum(len(text.encode("utf-8")) for text, _ in pieces))


def tokens_and_mask(tokenizer: Tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """A text's token ids (no prefix; special tokens in a rendered template are read as special tokens, as
    transformers reads them) and the mask of those trained on: 1 for a token that starts inside a span."""
    if not spans or spans == [(0, len(text))]:  # none or all of it (a prompt, a completion): no offsets needed
        ids = np.array(tokenizer.tok.encode(text, add_special_tokens=False).ids, dtype=np.int64) \
            if tokenizer.kind == "hf" else tokenizer.encode_array(text)
        return ids, np.full(len(ids), 1 if spans else 0, dtype=np.uint8)
    if tokenizer.kind == "hf":
        encoding = tokenizer.tok.encode(text, add_special_tokens=False)
        ids, starts = encoding.ids, [start for start, _ in encoding.offsets]
    elif tokenizer.kind == "bpe":
        ids = tokenizer.encode(text)
        starts = tokenizer.enc.decode_with_offsets(ids)[1]  # the character where each token's text starts
    else:
        ids = tokenizer.encode(text)
        starts = range(len(ids))
    starts = np.asarray(starts, dtype=np.int64)
    mask = np.zeros(len(ids), dtype=np.uint8)
    for a, b in spans:
        mask[(starts >= a) & (starts < b)] = 1
    return np.asarray(ids, dtype=np.int64), mask


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


def records_template(kind: str, wanted: dict, d: DataConfig) -> ChatTemplate | None:
    """The chat template conversations are rendered with: the Hugging Face tokenizer's own."""
    if kind != "messages":
        return None
    template = chat_template(wanted) if wanted["tokenizer"] == "hf" else None
    if template is None:
        raise DataError(f"{d.input} holds conversations, which need a tokenizer with a chat template: set "
                        "data.tokenizer = hf and data.tokenizer_path to a Hugging Face model's folder that has one "
                        "(or start from such a model: training.init_from)")
    return template


def write_record_splits(out: Path, docs: list[Path], d: DataConfig, tok: Tokenizer, meta: dict,
                        template: ChatTemplate | None,
                        min_tokens: int, progress: bool, split_files: tuple[str, ...]) -> dict:
    """Records in order, each a document (followed by the end-of-text token): of each input, the first
    of them go to train (as many times as the mixture says: records.inputs), the rest to val. For pairs
    and conversations, `{split}.starts` holds where each record starts (int64), and with data.loss_on =
    answers, `{split}.mask` one byte per token: 1 when the token is trained on (as a target), 0 when not."""
    kind, r = meta["records"]["kind"], meta["records"]
    masked = kind != "text" and d.loss_on == "answers"
    exts = ("bin",) + (("starts",) if kind != "text" else ()) + (("mask",) if masked else ())
    names = [f"{s}.{ext}" for s in ("train", "val") for ext in exts]
    files = {name: open(out / f"{name}.tmp", "wb") for name in names}
    counts = {s: {"tokens": 0, "bytes": 0, "trained": 0} for s in ("train", "val")}
    plan = r.get("inputs") or [{"train": r["train"], "val": r["val"], "train_copies": r["train"]}]
    places = ((split, copies_of(j, p["train"], p["train_copies"]) if split == "train" else 1)
              for p in plan for split in ("train", "val") for j in range(p[split]))
    encoding = Progress(sum(p["train"] + p["val"] for p in plan), "prepare: encoding", "records", PROGRESS_RECORDS,
                        progress)
    try:
        for (split, copies), (ids, mask, n_bytes) in zip(places, encoded_records(docs, kind, template, d.loss_on, tok)):
            for _ in range(copies):
                if kind != "text":  # where the record starts, for batches that keep records whole
                    files[f"{split}.starts"].write(np.int64(counts[split]["tokens"]).tobytes())
                files[f"{split}.bin"].write(ids.astype(meta["dtype"]).tobytes())
                if masked:
                    files[f"{split}.mask"].write(mask.tobytes())
                c = counts[split]
                c["tokens"], c["trained"], c["bytes"] = (c["tokens"] + len(ids), c["trained"] + int(mask.sum()),
                                                         c["bytes"] + n_bytes)
            encoding.add(1)
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
