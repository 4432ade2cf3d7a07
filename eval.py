"""Score a model on a text: mean loss, perplexity, and bits per byte.

    python eval.py --ckpt checkpoints/small --text data/shakespeare/input.txt
    python eval.py --ckpt exports/bpe_hf --text notes.txt --stride 64 --json

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
from data import Progress, bits_per_byte, read_text
from tokenizer import check_in_vocabulary, encode_chunks, split_safely, start_token, tokenizer_from_meta
from files import finite
from model import GPT
from runtime import pick_device, use_threads


@dataclass
class EvalOptions:
    ckpt: str = doc("checkpoint file, run folder or export folder", "checkpoints/small")
    text: str = doc("the UTF-8 text file to score", "")
    stride: int = doc("tokens each window moves on; 0: half the model's context", 0, within="[0, inf)")
    batch_size: int = doc("windows per forward pass; 0: as many as fit in 16,384 tokens and 256 MB of logits",
                          0, within="[0, inf)")
    device: str = doc("auto: a GPU if there is one, else the CPU", "auto", choices=("auto", "cpu", "cuda", "mps"))
    threads: int = doc("CPU threads; 0: the cores this process may use (lower it when other work keeps them busy)", 0,
                       within="[0, inf)")
    json: bool = doc("print the result as one JSON object", False)

    def problems(self) -> list[str]:
        return [] if self.text else ["--text is missing: give the text file to score, e.g. --text notes.txt"]


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


@command
def main(argv: list[str] | None = None) -> int:
    opts, _ = parse(argv, EvalOptions, sections=(), program="eval.py", about=__doc__)
    text, n_bytes = read_scored_text(opts.text)
    device, threads = pick_device(opts.device, "--device"), use_threads(opts.threads)
    model, src = load_model(opts.ckpt, device)
    block_size = model.config.block_size
    stride = opts.stride or max(1, block_size // 2)
    if stride > block_size:
        raise ConfigError(f"--stride {stride} is larger than the model's context (block_size {block_size}): "
                          f"windows would skip tokens; use at most {block_size} (0: half of it)")
    tokenizer = tokenizer_from_meta(src.meta)
    ids = encode(text, opts.text, tokenizer, model.config.vocab_size)
    step = "" if src.step is None else f", step {src.step}"
    print(f"scoring {opts.text} with {src.path} ({src.format}{step}, {tokenizer.kind} tokenizer) on {device}"
          + (f", threads {threads}" if device == "cpu" else ""),
          file=sys.stderr)
    windows = len(window_ends(len(ids), block_size, stride))
    progress = Progress(windows, "scoring", f"{windows:,} windows", quiet_below=50)
    result = evaluate_text(model, tokenizer, ids, n_bytes, stride, opts.batch_size, progress.add)
    result = {"ckpt": str(src.path), "format": src.format, "tokenizer": tokenizer.kind, "text": opts.text,
              "characters": len(text), **result}
    if opts.json:
        print(json.dumps(finite(result), indent=2, allow_nan=False))  # valid JSON: a loss that is not finite is null
    else:
        print(f"{result['tokens']:,} tokens, {len(text):,} characters, {n_bytes:,} bytes; context {block_size}, "
              f"stride {stride}: {result['windows']:,} windows\n"
              f"mean loss {result['mean_loss']:.4f} nats/token | perplexity {result['perplexity']:.2f} | "
              f"{result['bits_per_byte']:.4f} bits per byte")
    return 0


if __name__ == "__main__":
    sys.exit(main())
