"""Sample text from a trained model: a checkpoint, a run folder or an exported folder.

    python sample.py --ckpt checkpoints/small --start "ROMEO:" --num-samples 3
    python sample.py --ckpt exports/small --start FILE:prompt.txt --stream
    python sample.py          # checkpoints/ckpt_best.pt, else checkpoints/ckpt_last.pt

The tokenizer comes with the weights (the checkpoint's or the export's meta), not from the data
folder, so a checkpoint copied to another machine samples correctly. Samples go to stdout;
notices go to stderr, so `python sample.py > out.txt` keeps only the text.
"""

from __future__ import annotations

import argparse
import codecs
import sys
from pathlib import Path

import torch

from checkpoint import CheckpointError
from data import BPETokenizer, CharTokenizer, DataError, tokenizer_from_meta
from export import META_FILE, ExportError, Parser, find_checkpoint, load_weights, model_config_from_dict
from model import GPT, check_sampling_args
from train import TrainError, pick_device


Tokenizer = CharTokenizer | BPETokenizer


def load_model(path: str | Path, device: str = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """(model in eval mode on `device`, its tokenizer, info) from a checkpoint file or export folder.
    info: {"path", "format" ("checkpoint", "native" or "hf"), "step", "val_loss", "meta"}."""
    src = load_weights(path)
    if src["meta"] is None:
        raise ExportError(f"{path} has no tokenizer ({META_FILE} is missing), so its tokens cannot be "
                          "turned into text; export it again from its checkpoint")
    model = GPT(model_config_from_dict(src["model_config"]))
    model.load_state_dict(src["state_dict"])
    model.to(device).eval()  # eval: no dropout while sampling
    info = {"path": str(path), "format": src["format"], "step": src.get("step"),
            "val_loss": src.get("val_loss"), "meta": src["meta"]}
    return model, tokenizer_from_meta(src["meta"]), info


def read_start(start: str) -> str:
    """The prompt: the text itself, or the contents of a file given as FILE:path."""
    if not start.startswith("FILE:"):
        return start
    path = Path(start[len("FILE:"):])
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--start {start}: cannot read {path} ({getattr(e, 'strerror', None) or e}); "
                         "give the path of a UTF-8 text file") from None


def encode_prompt(text: str, tokenizer: Tokenizer, block_size: int) -> list[int]:
    """Token ids to start from. An empty prompt starts where a text would: after a newline (char)
    or at the end-of-text token that separates documents (bpe)."""
    if not text:
        if tokenizer.kind == "bpe":
            return [tokenizer.eot_token]
        return [tokenizer.chars.index("\n")] if "\n" in tokenizer.chars else [0]
    try:
        ids = tokenizer.encode(text)
    except DataError as e:
        raise DataError(f"the prompt has {e}") from None
    if len(ids) > block_size:
        # The model has position embeddings for block_size tokens only; it sees the most recent ones.
        print(f"notice: the prompt is {len(ids)} tokens, longer than the model's context "
              f"(block_size {block_size}); the model sees its last {block_size} tokens", file=sys.stderr)
        ids = ids[-block_size:]
    return ids


class TextStream:
    """Token ids -> text, one token at a time. A BPE token can end in the middle of a UTF-8
    character (an emoji is often split over two tokens), so the bytes go through an incremental
    decoder, which holds back an incomplete character until the next token completes it."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        if self.tokenizer.kind == "char":
            return self.tokenizer.chars[token]
        return self.utf8.decode(self.tokenizer.enc.decode_single_token_bytes(token))

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)  # a trailing incomplete character becomes U+FFFD


def sample(model: GPT, tokenizer: Tokenizer, prompt: str, ids: list[int], args: argparse.Namespace,
           generator: torch.Generator, stream: bool) -> str:
    """One sample: the prompt's text, then the generated tokens' text. With `stream`, each piece
    is printed as soon as its token is sampled; both ways produce the same text."""
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    text = TextStream(tokenizer)
    pieces = [prompt]

    def show(piece: str) -> None:
        if stream:
            print(piece, end="", flush=True)  # flush: show it now, not when the buffer fills

    show(prompt)
    for token in model.generate_stream(idx, args.max_new_tokens, args.temperature, args.top_k,
                                       args.top_p, generator):
        pieces.append(text.feed(token.item()))
        show(pieces[-1])
    pieces.append(text.flush())
    show(pieces[-1] + "\n")
    return "".join(pieces)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="sample.py", description="Sample text from a checkpoint or an exported folder.")
    p.add_argument("--ckpt", help="checkpoint, run folder or export folder "
                                  "(default: checkpoints/ckpt_best.pt, then checkpoints/ckpt_last.pt)")
    p.add_argument("--start", default="", help='prompt text, or FILE:path to read it from a file '
                                               '(default: empty, i.e. the start of a text)')
    p.add_argument("--num-samples", type=int, default=3, help="default: 3")
    p.add_argument("--max-new-tokens", type=int, default=500, help="tokens per sample (default: 500)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="0: greedy; < 1 safer, > 1 wilder (default: 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens "
                                                             "whose probabilities add up to p")
    p.add_argument("--seed", type=int, default=1337, help="the same seed gives the same text (default: 1337)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="auto: a GPU if there is one, else the CPU")
    p.add_argument("--stream", action="store_true", help="print tokens as they are sampled")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (2, already reported)
        return int(e.code or 0)
    try:
        # Check the cheap things before loading the model, so a typo fails at once.
        check_sampling_args(args.temperature, args.top_k, args.top_p)
        if args.num_samples < 1 or args.max_new_tokens < 0:
            raise ValueError("--num-samples must be at least 1 and --max-new-tokens at least 0")
        prompt = read_start(args.start)
        device = pick_device(args.device)
        path = find_checkpoint(args.ckpt)
        model, tokenizer, info = load_model(path, device)
        ids = encode_prompt(prompt, tokenizer, model.config.block_size)
    except (CheckpointError, ExportError, DataError, TrainError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    step = "" if info["step"] is None else f", step {info['step']}"
    print(f"sampling from {path} ({info['format']}{step}, {tokenizer.kind} tokenizer) on {device}",
          file=sys.stderr)
    generator = torch.Generator(device).manual_seed(args.seed)
    try:
        for i in range(1, args.num_samples + 1):
            print(f"---------- sample {i}/{args.num_samples} ----------", flush=True)
            text = sample(model, tokenizer, prompt, ids, args, generator, args.stream)
            if not args.stream:
                print(text)
    except KeyboardInterrupt:  # Ctrl-C while a long sample streams: stop quietly
        print("\ninterrupted", file=sys.stderr)
        return 130
    except ValueError as e:  # e.g. a prompt token the model's smaller vocabulary does not have
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
