"""Score a model on a text or records (mean loss, perplexity, bits per byte), or on a task (exact answers).

    python eval.py --ckpt checkpoints/small --text data/shakespeare/input.txt
    python eval.py --ckpt exports/bpe_hf --text notes.txt --stride 64 --json
    python eval.py --ckpt checkpoints/arithmetic --text data/arithmetic/test_pairs.jsonl  # the loss on the answers
    python eval.py --ckpt checkpoints/arithmetic --task data/arithmetic/test_pairs.jsonl  # answers exactly right

Bits per byte is the loss summed over the text's tokens, in bits, divided by the text's UTF-8
bytes: it does not depend on the tokenizer, so a char model and a BPE model compare on the same
text (mean loss and perplexity are per token, and a BPE token holds several characters).

Every token is scored once. The text is read in windows of the model's context (block_size)
tokens that move on by --stride tokens: the first window scores all its tokens, each later one
only its last, new tokens, which so see at least block_size - stride earlier tokens (a smaller
stride: more context, more compute). The first token is predicted after the start of a text
(end-of-text for BPE, a newline for char, as sample.py starts an empty prompt). A char model
refuses a text with characters it never saw, naming them: scoring the rest would leave those
bytes out and make the result incomparable. The result goes to stdout, progress to stderr.

Records (.jsonl, .json, .parquet: docs/records.md) are scored as prepare.py prepares them, one after
the other, and the mean is over the tokens training trains on: for pairs and conversations (with
--loss-on answers), the answers alone (bits per byte is then not given: it is a measure of a whole
text). --task takes pairs, or conversations whose last turn is the assistant's: each prompt (the
conversation before the last turn, rendered with the assistant's turn opened) is continued greedily
until an end-of-text or end-of-turn token, and the answer counts when it equals the expected one
(leading and trailing whitespace aside). A char model has no such token: it generates as many
tokens as the expected answer has.
"""

from __future__ import annotations

# Before torch, which takes seconds to load: a Ctrl-C meanwhile ends in one line (errors.py).
from errors import DataError, command

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import load_model
from config import ConfigError, doc
from options import parse
from data import Progress, bits_per_byte, is_records, read_text
from tokenizer import Tokenizer, check_in_vocabulary, encode_chunks, split_safely, start_token, tokenizer_from_meta
from files import finite
from model import GPT
from records import encoded_records
from tasks import MAX_NEW_TOKENS, load_task, read_records_for
from runtime import pick_device, use_threads


@dataclass
class EvalOptions:
    ckpt: str = doc("run folder, checkpoint, export, Hugging Face folder or GGUF file", "checkpoints/small")
    text: str = doc("the UTF-8 text file to score, or records (a file, folder or glob, as data.input)", "")
    task: str = doc("records of prompts and answers: report the share answered exactly right", "")
    loss_on: str = doc("records: answers scores the completions and the assistant's turns, all every token",
                       "answers", choices=("answers", "all"))
    max_new_tokens: int = doc("--task: the longest answer generated, in tokens", MAX_NEW_TOKENS, within="[1, inf)")
    limit: int = doc("--task: check the first N examples only; 0: all of them", 0, within="[0, inf)")
    stride: int = doc("tokens each window moves on; 0: half the model's context", 0, within="[0, inf)")
    batch_size: int = doc("windows per forward pass; 0: as many as fit in 16,384 tokens and 256 MB of logits",
                          0, within="[0, inf)")
    device: str = doc("auto: a GPU if there is one, else the CPU", "auto", choices=("auto", "cpu", "cuda", "mps"))
    threads: int = doc("CPU threads; 0: the cores this process may use (lower it when other work keeps them busy)", 0,
                       within="[0, inf)")
    json: bool = doc("print the result as one JSON object", False)

    def problems(self) -> list[str]:
        if not self.text and not self.task:
            return ["nothing to do: give --text FILE (a text or records to score) or --task FILE (prompts whose "
                    "answers to check)"]
        if self.text and self.task:
            return ["give --text (to score) or --task (to check answers), not both"]
        if self.text and (self.limit or self.max_new_tokens != MAX_NEW_TOKENS):  # silently unused otherwise
            return ["--limit and --max-new-tokens are for --task; --text scores the whole text"]
        return []


def read_scored_text(path: str) -> tuple[str, int]:
    """The text to score and its size in UTF-8 bytes, exactly as stored (no newline translation)."""
    text, n_bytes = read_text(path, f"--text {path}")
    if not text:
        raise DataError(f"--text {path} is empty: there is nothing to score")
    return text, n_bytes


def encode(text: str, path: str, tokenizer, vocab_size: int) -> np.ndarray:
    """The text's token ids (N,). A char text is encoded in one piece, so that an unknown character's
    error counts all of its occurrences; BPE in pieces tiktoken encodes on several threads."""
    try:
        ids = tokenizer.encode_array(text) if tokenizer.kind == "char" else \
            np.concatenate(list(encode_chunks(tokenizer, split_safely(text))))
    except DataError as e:
        raise DataError(f"--text {path} has {e}, or evaluate a BPE model, which reads any text") from None
    check_in_vocabulary(ids.tolist(), vocab_size, f"--text {path}")
    return ids


def window_ends(n: int, block_size: int, stride: int) -> list[int]:
    """Where each window ends, for n tokens to score: the first window holds min(block_size, n) of
    them, each later one `stride` more (the last one fewer, so that it ends at the text's end)."""
    ends = [min(block_size, n)]
    while ends[-1] < n:
        ends.append(min(ends[-1] + stride, n))
    return ends


def auto_batch_size(length: int, vocab_size: int) -> int:
    """Windows per forward pass: up to 16,384 tokens, and logits (B, L, V) of at most 256 MB in fp32."""
    return max(1, min(2**14 // length, 2**26 // (length * vocab_size)))


@torch.no_grad()
def token_losses(model: GPT, seq: torch.Tensor, stride: int, batch_size: int = 0,
                 progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """The loss (nats) of each token seq[1:] given the tokens before it in its window: (N,) float32.

    seq: (N + 1,) token ids, the start token first. The window ending at target e holds the inputs
    seq[e - L : e] and the targets seq[e - L + 1 : e + 1], L = min(block_size, N): every window has
    the same length, so windows stack into batches. It scores its targets after the previous end."""
    n, block_size = len(seq) - 1, model.config.block_size
    length = min(block_size, n)
    batch_size = batch_size or auto_batch_size(length, model.config.vocab_size)
    ends = torch.tensor(window_ends(n, block_size, stride), device=seq.device)  # (W,)
    scored_from = torch.cat([ends.new_zeros(1), ends[:-1]])  # (W,) each window scores targets after this
    offsets = torch.arange(length, device=seq.device)  # (L,)
    losses = []
    for first in range(0, len(ends), batch_size):
        e, done = ends[first:first + batch_size], scored_from[first:first + batch_size]  # (B,)
        x = seq[(e - length)[:, None] + offsets]      # (B, L) inputs
        y = seq[(e - length + 1)[:, None] + offsets]  # (B, L) their next tokens
        logits, _ = model(x)  # (B, L, V)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)  # (B, L)
        # Window b's new targets are its last e - done columns; row after row, they are the targets
        # done[0] + 1 ... e[-1] in order.
        new = offsets >= (length - (e - done))[:, None]  # (B, L)
        losses.append(nll[new].cpu())
        if progress:
            progress(len(e))  # windows done
    losses = torch.cat(losses)
    assert len(losses) == n, "every token is scored exactly once"
    return losses


def evaluate_text(model: GPT, tokenizer, ids: np.ndarray, n_bytes: int, stride: int, batch_size: int,
                  progress: Callable[[int], None] | None = None) -> dict:
    """Mean loss, perplexity and bits per byte of the text whose tokens are `ids` (N,)."""
    device = next(model.parameters()).device
    seq = torch.from_numpy(np.concatenate([[start_token(tokenizer)], ids])).to(device)  # (N + 1,)
    losses = token_losses(model, seq, stride, batch_size, progress)
    total = losses.double().sum().item()  # nats, summed in float64: a long text has millions of terms
    mean = total / len(losses)
    return {"tokens": len(losses), "bytes": n_bytes, "block_size": model.config.block_size, "stride": stride,
            "windows": len(window_ends(len(losses), model.config.block_size, stride)), "loss_sum": total,
            "mean_loss": mean, "perplexity": math.exp(mean), "bits_per_byte": bits_per_byte(total, n_bytes)}


# ----------------------------------------------------------------------------- records and tasks

def records_to_score(found: tuple, tokenizer: Tokenizer, vocab_size: int, path: str, loss_on: str
                     ) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """Records (`found`: read_records_for's) as prepare.py writes them: each one's (token ids, mask of the
    tokens scored), and their UTF-8 bytes."""
    kind, docs, template = found
    parts = list(encoded_records(docs, kind, template, loss_on, tokenizer))
    check_in_vocabulary(np.concatenate([ids for ids, _, _ in parts]), vocab_size, f"--text {path}")
    return [(ids, mask if loss_on == "answers" else np.ones_like(mask)) for ids, mask, _ in parts], \
        sum(n for *_, n in parts)


@torch.no_grad()
def score_records(model: GPT, parts: list[tuple[np.ndarray, np.ndarray]], n_bytes: int, stride: int,
                  batch_size: int) -> dict:
    """Pairs and conversations scored as training sees them, each record from its start (a window starts
    where a record does): each of its tokens after the first, given those before it, and the mean over
    the tokens its mask marks (the answers). No bits per byte: it is a measure of a whole text."""
    device, block_size = next(model.parameters()).device, model.config.block_size
    total, scored, windows = 0.0, 0, 0
    for ids, mask in parts:
        if len(ids) < 2:
            continue
        losses = token_losses(model, torch.from_numpy(ids).to(device), stride, batch_size)  # (L - 1,): ids[1:]
        keep = torch.from_numpy(mask[1:].astype(bool))
        total, scored = total + losses[keep].double().sum().item(), scored + int(keep.sum())
        windows += len(window_ends(len(ids) - 1, block_size, stride))
    mean = total / scored if scored else math.nan
    return {"tokens": scored, "bytes": n_bytes, "block_size": block_size, "stride": stride, "windows": windows,
            "loss_sum": total, "mean_loss": mean, "perplexity": math.exp(mean), "bits_per_byte": None}


@command
def main(argv: list[str] | None = None) -> int:
    opts, _ = parse(argv, EvalOptions, sections=(), program="eval.py", about=__doc__)
    records = bool(opts.task) or is_records(opts.text)
    text, n_bytes = ("", 0) if records else read_scored_text(opts.text)
    device, threads = pick_device(opts.device, "--device"), use_threads(opts.threads)
    model, src = load_model(opts.ckpt, device)
    block_size, vocab_size = model.config.block_size, model.config.vocab_size
    opts.stride = opts.stride or max(1, block_size // 2)
    if opts.stride > block_size:
        raise ConfigError(f"--stride {opts.stride} is larger than the model's context (block_size {block_size}): "
                          f"windows would skip tokens; use at most {block_size} (0: half of it)")
    tokenizer, n_records = tokenizer_from_meta(src.meta), 0
    if opts.task:  # everything read and checked before the first line on stderr: an error is one line
        task = load_task(opts.task, "--task", src.meta, vocab_size, opts.limit, opts.max_new_tokens)
    elif records:
        found = read_records_for(opts.text, "--text", src.meta, opts.loss_on)
        if found[0] == "text":  # documents: one text, as prepare.py writes them
            parts, n_bytes = records_to_score(found, tokenizer, vocab_size, opts.text, "all")
            ids = np.concatenate([ids for ids, _ in parts])
        else:
            parts, n_bytes = records_to_score(found, tokenizer, vocab_size, opts.text, opts.loss_on)
        n_records = len(parts)
    else:
        ids = encode(text, opts.text, tokenizer, vocab_size)
    step = "" if src.step is None else f", step {src.step}"
    print(f"{'testing on' if opts.task else 'scoring'} {opts.task or opts.text} with {src.path} ({src.format}{step}, "
          f"{tokenizer.kind} tokenizer) on {device}" + (f", threads {threads}" if device == "cpu" else ""),
          file=sys.stderr)
    if opts.task:
        result = {"task": opts.task, "kind": task.kind, **task.score(model)}
    elif records and found[0] != "text":
        result = {"text": opts.text, "records": n_records, "kind": found[0],
                  **score_records(model, parts, n_bytes, opts.stride, opts.batch_size)}
    else:
        windows = len(window_ends(len(ids), block_size, opts.stride))
        progress = Progress(windows, "scoring", f"{windows:,} windows", quiet_below=50)
        result = evaluate_text(model, tokenizer, ids, n_bytes, opts.stride, opts.batch_size, progress.add)
        result = {"records": n_records, "kind": found[0], **result} if records else {"characters": len(text), **result}
        result = {"text": opts.text, **result}
    report({"ckpt": str(src.path), "format": src.format, "tokenizer": tokenizer.kind, **result}, opts, block_size)
    return 0


def report(result: dict, opts: EvalOptions, block_size: int) -> None:
    """The result on stdout: JSON, or two lines for a text or records, one for a task."""
    if opts.json:
        print(json.dumps(finite(result), indent=2, allow_nan=False))  # valid JSON: a loss that is not finite is null
    elif opts.task:
        print(f"{result['correct']:,} of {result['examples']:,} answers exactly right: "
              f"accuracy {result['accuracy']:.4f}")
    else:
        what = (f"{result['records']:,} records ({result['kind']}): {result['tokens']:,} tokens scored"
                if "records" in result else
                f"{result['tokens']:,} tokens, {result['characters']:,} characters, {result['bytes']:,} bytes")
        bpb = "" if result["bits_per_byte"] is None else f" | {result['bits_per_byte']:.4f} bits per byte"
        windows = f"{result['windows']:,} window{'s' * (result['windows'] != 1)}"
        print(f"{what}; context {block_size}, stride {opts.stride}: {windows}\n"
              f"mean loss {result['mean_loss']:.4f} nats/token | perplexity {result['perplexity']:.2f}{bpb}")


if __name__ == "__main__":
    sys.exit(main())
