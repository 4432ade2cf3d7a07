"""Chat templates: how a conversation ({"messages": [{"role": ..., "content": ...}, ...]}) becomes the
tokens a model reads, and which of them are its answers. Two kinds (chat_template picks one):

    ChatTemplate   a Hugging Face tokenizer's own Jinja template, rendered in jinja2's sandbox as transformers'
                   apply_chat_template renders it, then tokenized as transformers tokenizes it
    ChatML         tinygpt's format for the tokenizers made here (char, GPT-2's BPE, a learned BPE), built
                   from tokens: its markers are ids that no message can forge

    template = chat_template(meta)
    ids, mask, n_bytes = template.encode(tokenizer, messages)   # mask: the assistant's turns
"""

from __future__ import annotations

import json
from datetime import datetime

import numpy as np

from errors import DataError
from tokenizer import CHATML, MARKED, MARKERS, Tokenizer

# Put in place of an answer to see where the template puts the answer's content: no text holds it.
MARK = "\ue000tinygpt-answer\ue001"


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

    def encode(self, tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = False,
               answers: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
        """(token ids, mask of the answers' tokens, UTF-8 bytes of the text) of a conversation rendered as
        transformers renders it and tokenized as it tokenizes it (special tokens in the text read as such)."""
        text, spans = self.answers(messages) if answers else (self.render(messages, add_generation_prompt), [])
        return (*tokens_and_mask(tokenizer, text, spans), len(text.encode("utf-8")))

    def answer_ends(self, tokenizer: Tokenizer) -> set[int]:
        """The special token the template puts right after an assistant's message (ChatML's <|im_end|>), which
        ends an answer; none when it puts none."""
        probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": MARK}]
        tail = self.render(probe).partition(MARK)[2]
        ending = next((m for m in self.end_of_turn if tail.startswith(m)), None)
        turn = tokenizer.tok.token_to_id(ending) if ending else None
        return set() if turn is None else {turn}


def answer_stops(tokenizer: Tokenizer, template: ChatTemplate | ChatML | None) -> set[int]:
    """The tokens that end a generated answer (chat.py, eval.py --task): the tokenizer's end-of-text and
    end-of-sequence tokens, and the end-of-turn token the template puts after an assistant's message."""
    stops = set(tokenizer.stop_tokens) | ({tokenizer.eot_token} - {None})
    return stops | (template.answer_ends(tokenizer) if template else set())


class ChatML:
    """The chat format of tokenizers made here (char and GPT-2 BPE prepared from conversations, a learned
    BPE): each message as <|im_start|>role\\ncontent<|im_end|>\\n, the text tokenizer.CHATML renders, built
    from tokens rather than rendered: the markers are ids put here, and the messages are encoded as plain
    text, so that a "<|im_end|>" in a message stays text, and no one can end a turn by writing one."""

    def encode(self, tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = False,
               answers: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
        """(token ids, mask of the answers' tokens, UTF-8 bytes of the text) of a conversation: the mask holds
        each assistant turn's content and the <|im_end|> after it."""
        start, end = (tokenizer.markers[m] for m in MARKERS)
        newline = tokens_and_mask(tokenizer, "\n", [], literal=True)[0]
        parts, n_bytes = [], 0
        turns = [(m["role"], m["content"]) for m in messages] + ([("assistant", None)] if add_generation_prompt else [])
        for role, content in turns:
            head, trained = role + "\n", answers and role == "assistant"
            text = head + (content or "")
            ids, mask = tokens_and_mask(tokenizer, text, [(len(head), len(text))] if trained else [], literal=True)
            parts += [([start], [0]), (ids, mask)]
            if content is not None:
                parts += [([end], [int(trained)]), (newline, [0] * len(newline))]
            closed = len(MARKERS[1]) + 1 if content is not None else 0  # <|im_end|>\n
            n_bytes += len(MARKERS[0]) + len(text.encode("utf-8")) + closed
        return (np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in parts]),
                np.concatenate([np.asarray(m, dtype=np.uint8) for _, m in parts]), n_bytes)

    def answer_ends(self, tokenizer: Tokenizer) -> set[int]:
        """<|im_end|>, and <|im_start|>: a model that opens another turn has ended its own."""
        return {tokenizer.markers[m] for m in MARKERS}


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


def chat_template(meta: dict) -> ChatTemplate | ChatML | None:
    """How a tokenizer meta renders conversations: ChatML built from tokens for a tokenizer made here (with
    ChatML's markers: char and bpe prepared from conversations, a learned BPE), else a Hugging Face
    tokenizer's Jinja template (its chat_template.jinja, or the chat_template of its tokenizer_config.json);
    None when it has none."""
    if meta["tokenizer"] in MARKED:
        return ChatML() if meta.get("markers") else None
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
    if source == CHATML and set(MARKERS) <= set(special):  # a learned BPE's
        return ChatML()
    return ChatTemplate(source, variables, special)


def required_template(meta: dict, what: str, fix: str) -> ChatTemplate | ChatML:
    """The chat template of a tokenizer meta, for the conversations in `what`; refused, with `fix`, when it has
    none."""
    template = chat_template(meta)
    if template is None:
        raise DataError(f"{what} holds conversations, and the tokenizer has no chat template to render them with; "
                        f"{fix}")
    return template


def tokens_and_mask(tokenizer: Tokenizer, text: str, spans: list[tuple[int, int]], literal: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A text's token ids (no prefix) and the mask of those trained on: 1 for a token that starts inside a
    span. A Hugging Face tokenizer reads the special tokens in a text as special tokens (as transformers
    reads a rendered template), unless `literal`; char and bpe tokenizers read any text as text."""
    whole = not spans or spans == [(0, len(text))]  # none or all of it (a prompt, a completion)
    if tokenizer.kind == "hf":
        before, tokenizer.tok.encode_special_tokens = tokenizer.tok.encode_special_tokens, literal
        try:
            encoding = tokenizer.tok.encode(text, add_special_tokens=False)
        finally:
            tokenizer.tok.encode_special_tokens = before
        ids, starts = encoding.ids, [start for start, _ in encoding.offsets]
    elif whole:
        ids, starts = tokenizer.encode_array(text), []  # no offsets needed
    elif tokenizer.kind == "bpe":
        ids = tokenizer.encode(text)
        starts = tokenizer.enc.decode_with_offsets(ids)[1]  # the character where each token's text starts
    else:
        ids = tokenizer.encode(text)
        starts = range(len(ids))
    if whole:
        return np.asarray(ids, dtype=np.int64), np.full(len(ids), 1 if spans else 0, dtype=np.uint8)
    starts = np.asarray(starts, dtype=np.int64)
    mask = np.zeros(len(ids), dtype=np.uint8)
    for a, b in spans:
        mask[(starts >= a) & (starts < b)] = 1
    return np.asarray(ids, dtype=np.int64), mask
