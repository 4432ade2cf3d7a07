"""Sample text from a trained model: a checkpoint, a run folder or an exported folder.

    python sample.py --ckpt checkpoints/small --start "ROMEO:" --num-samples 3
    python sample.py --ckpt exports/small --start FILE:prompt.txt --stream
    python sample.py          # checkpoints/small (the README's first run): ckpt_best.pt, else ckpt_last.pt

The tokenizer comes with the weights (the checkpoint's or the export's meta), not from the data
folder, so a checkpoint copied to another machine samples correctly. Samples go to stdout;
notices go to stderr, so `python sample.py > out.txt` keeps only the text.
"""

from __future__ import annotations

# Before torch, which takes seconds to load: a Ctrl-C meanwhile ends in one line (errors.py).
from errors import DataError, command

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import checkpoint
from config import ConfigError, doc
from options import parse
from data import read_text
from tokenizer import Tokenizer, check_in_vocabulary, start_token, tokenizer_from_meta
from generate import check_sampling_args, stream_text
from model import GPT
from runtime import pick_device, use_threads

def load_for_sampling(path: str | Path, device: str = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """(model in eval mode on `device`, its tokenizer, info) from a checkpoint file, run folder or
    export folder. info: {"path", "format" ("checkpoint", "native" or "hf"), "step", "val_loss", "meta"}."""
    model, src = checkpoint.load_model(path, device)
    info = {"path": str(src.path), "format": src.format, "step": src.step, "val_loss": src.val_loss,
            "meta": src.meta}
    return model, tokenizer_from_meta(src.meta), info


def read_start(start: str) -> str:
    """The prompt: the text itself, or the contents of a file given as FILE:path."""
    if not start.startswith("FILE:"):
        return start
    return read_text(start[len("FILE:"):], f"--start {start}")[0]


def encode_prompt(text: str, tokenizer: Tokenizer, block_size: int, vocab_size: int) -> list[int]:
    """Token ids to start from. An empty prompt starts where a text would: after a newline (char)
    or at the end-of-text token that separates documents (bpe)."""
    if not text:
        ids = [start_token(tokenizer)]
    else:
        try:
            ids = tokenizer.encode(text)
        except DataError as e:
            raise DataError(f"the prompt has {e}") from None
    check_in_vocabulary(ids, vocab_size, "the prompt")
    if len(ids) > block_size:
        # The model has position embeddings for block_size tokens only; it sees the most recent ones.
        print(f"notice: the prompt is {len(ids)} tokens, longer than the model's context "
              f"(block_size {block_size}); the model sees its last {block_size} tokens", file=sys.stderr)
        ids = ids[-block_size:]
    return ids


def sample(model: GPT, tokenizer: Tokenizer, prompt: str, ids: list[int], opts: SampleOptions,
           generator: torch.Generator) -> str:
    """One sample: the prompt's text, then the generated tokens' text. With `stream`, each piece
    is printed as soon as its token is sampled; both ways produce the same text."""
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)

    def show(piece: str) -> None:
        if opts.stream:
            print(piece, end="", flush=True)  # flush: show it now, not when the buffer fills

    show(prompt)
    # A Hugging Face model's end-of-sequence token ends the sample.
    new = stream_text(model, idx, tokenizer, tokenizer.stop_tokens, opts.max_new_tokens, opts.temperature,
                      opts.top_k or None, opts.top_p if opts.top_p < 1 else None, generator, show)
    show("\n")
    return prompt + new


@dataclass
class SampleOptions:
    ckpt: str = doc("run folder, checkpoint, export, Hugging Face folder or GGUF file", "checkpoints/small")
    start: str = doc("prompt text, or FILE:path to read it from a file; empty: the start of a text", "")
    num_samples: int = doc("samples to draw", 3, within="[1, inf)")
    max_new_tokens: int = doc("tokens per sample", 500, within="[0, inf)")
    temperature: float = doc("0: greedy; < 1 safer, > 1 wilder", 0.8)
    top_k: int = doc("sample among the k most likely tokens; 0: all", 0, within="[0, inf)")
    top_p: float = doc("sample among the most likely tokens whose probabilities add up to p; 1: all", 1.0)
    seed: int = doc("the same seed gives the same text", 1337)
    device: str = doc("auto: a GPU if there is one, else the CPU", "auto", choices=("auto", "cpu", "cuda", "mps"))
    threads: int = doc("CPU threads; 0: the cores this process may use (lower it when other work keeps them busy)", 0,
                       within="[0, inf)")
    stream: bool = doc("print tokens as they are sampled", False)

    def problems(self) -> list[str]:
        try:
            check_sampling_args(self.temperature, self.top_k if self.top_k > 0 else None, self.top_p)  # < 0: the schema
        except ConfigError as e:  # the model's own rules, reported with the other options' problems
            return [f"--{p.replace('_', '-')}" for p in e.problems]
        return []


@command
def main(argv: list[str] | None = None) -> int:
    opts, _ = parse(argv, SampleOptions, sections=(), program="sample.py", about=__doc__)
    prompt = read_start(opts.start)
    device, threads = pick_device(opts.device, "--device"), use_threads(opts.threads)
    model, tokenizer, info = load_for_sampling(opts.ckpt, device)
    ids = encode_prompt(prompt, tokenizer, model.config.block_size, model.config.vocab_size)
    step = "" if info["step"] is None else f", step {info['step']}"
    print(f"sampling from {info['path']} ({info['format']}{step}, {tokenizer.kind} tokenizer) on {device}"
          + (f", threads {threads}" if device == "cpu" else ""),
          file=sys.stderr)
    generator = torch.Generator(device).manual_seed(opts.seed)
    for i in range(1, opts.num_samples + 1):
        print(f"---------- sample {i}/{opts.num_samples} ----------", flush=True)
        text = sample(model, tokenizer, prompt, ids, opts, generator)
        if not opts.stream:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
