"""Tasks: records whose answers can be checked (prompts with completions, or conversations that end with
the assistant's turn), and the share of them a model answers exactly, generating greedily up to the end
of its turn. eval.py --task tests a model on one; training.task tests a run at every evaluation.

    task = load_task("data/arithmetic/test.jsonl", "--task", meta, vocab_size, limit=200, max_new_tokens=64)
    task.score(model)   # {"examples": 200, "correct": 197, "accuracy": 0.985}
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from config import DataConfig
from data import RECORD_SUFFIXES, list_documents
from errors import DataError
from generate import generate_stream
from model import GPT
from records import read_records, scan_records
from templates import ChatML, ChatTemplate, answer_stops, required_template, tokens_and_mask
from tokenizer import Tokenizer, check_in_vocabulary, tokenizer_from_meta

MAX_NEW_TOKENS = 64  # the longest answer generated, in tokens, by default


@dataclass
class Task:
    kind: str                                     # pair or messages
    tokenizer: Tokenizer
    examples: list[tuple[list[int], str, int]]    # (prompt ids, expected answer, tokens to generate at most)
    stops: set[int]                               # the tokens that end an answer

    @torch.no_grad()
    def score(self, model: GPT, stopping: Callable[[], bool] = lambda: False, whole: bool = False) -> dict | None:
        return exact_match(model, self.tokenizer, self.examples, self.stops, stopping, whole)


def load_task(path: str, flag: str, meta: dict, vocab_size: int, limit: int, max_new_tokens: int) -> Task:
    """The task in the records file(s) `path` (named `flag` in errors), its first `limit` examples (0: all),
    read and checked now: a mistake in it is one line before anything runs."""
    found = read_records_for(path, flag, meta, "answers")
    tokenizer = tokenizer_from_meta(meta)
    stops = answer_stops(tokenizer, found[2])
    return Task(found[0], tokenizer, task_examples(found, tokenizer, vocab_size, limit, max_new_tokens, stops), stops)


def read_records_for(path: str, flag: str, meta: dict, loss_on: str
                     ) -> tuple[str, list, ChatTemplate | ChatML | None]:
    """(kind, files, chat template) of records given as --text or --task, checked as prepare.py checks them."""
    d = DataConfig(input=path, tokenizer=meta["tokenizer"], loss_on=loss_on)
    if not Path(path).exists() and not any(c in path for c in "*?["):
        raise DataError(f"{flag} {path} does not exist; give a file of records ({', '.join(RECORD_SUFFIXES)})")
    docs = list_documents(path)
    if docs[0].suffix not in RECORD_SUFFIXES:
        what = "text files (give one of them)" if flag == "--text" else \
            "a text (give it as --text)" if flag == "--task" else "a text"
        raise DataError(f"{flag} {path} is {what}, not records ({', '.join(RECORD_SUFFIXES)})")
    kind = scan_records([docs], d)["kind"]
    if flag != "--text" and kind == "text":
        raise DataError(f"{flag} {path} holds texts; a task is prompts with answers: pairs, or conversations that "
                        "end with the assistant's turn")
    template = required_template(meta, f"{flag} {path}", "give prompts and completions, or a model that has one") \
        if kind == "messages" else None
    return kind, docs, template


def task_examples(found: tuple, tokenizer: Tokenizer, vocab_size: int, limit: int, max_new_tokens: int,
                  stops: set[int]) -> list[tuple[list[int], str, int]]:
    """(prompt ids, expected answer, tokens to generate at most) of each example of a task (the first `limit`,
    if > 0): a pair's prompt, or the conversation before its last turn rendered with the assistant's turn
    opened. Without stop tokens (char), as many tokens as the answer has."""
    kind, docs, template = found
    examples, records = [], (r for document in docs for r in read_records(document))
    for where, record in itertools.islice(records, limit or None):
        if kind == "messages" and record["messages"][-1]["role"] != "assistant":
            raise DataError(f"{where}: the conversation does not end with the assistant's turn, the answer to "
                            "check; end each with one")
        try:
            if kind == "messages":
                ids = template.encode(tokenizer, record["messages"][:-1], add_generation_prompt=True,
                                      answers=False)[0].tolist()
                expected = record["messages"][-1]["content"]
            else:
                ids = tokenizer.prefix + tokens_and_mask(tokenizer, record["prompt"], [])[0].tolist()
                expected = record["completion"]
            budget = max_new_tokens if stops else len(tokenizer.encode(expected))
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        check_in_vocabulary(ids, vocab_size, where)
        examples.append((ids, expected, budget))
    return examples


@torch.no_grad()
def exact_match(model: GPT, tokenizer: Tokenizer, examples: list[tuple[list[int], str, int]], stops: set[int],
                stopping: Callable[[], bool] = lambda: False, whole: bool = False) -> dict | None:
    """The share of the examples whose greedy continuation, up to a stop token, is the expected answer
    (whitespace around it aside); a token the tokenizer does not have (a model with more rows than it)
    makes the answer wrong. `whole`: generate every example's whole budget, cut at the stop afterwards (under
    FSDP every process must make the same forward passes). None when `stopping()` (Ctrl-C) comes first."""
    device, correct = next(model.parameters()).device, 0
    for ids, expected, budget in examples:
        if stopping():
            return None
        out = []
        for token in generate_stream(model, torch.tensor([ids], device=device), budget, temperature=0):
            out.append(token.item())
            if out[-1] in stops and not whole:
                break
        out = out[:next((i for i, t in enumerate(out) if t in stops), len(out))]
        correct += max(out, default=0) < tokenizer.vocab_size and tokenizer.decode(out).strip() == expected.strip()
    return {"examples": len(examples), "correct": correct, "accuracy": correct / max(len(examples), 1)}
