"""Generating text with a model: the KV cache's prefill and decode, and sampling the next token.

    model.eval()
    out = generate(model, idx, max_new_tokens=100, temperature=0.8, top_k=50)  # (B, T) -> (B, T + 100)
    for token in generate_stream(model, idx, 100): ...                         # each (B, 1) as it comes

Temperature 0 is greedy: the most likely token every time.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from attention import KVCache
from config import ConfigError
from model import GPT
from tokenizer import Tokenizer


@torch.no_grad()
def generate_stream(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None,
                    generator: torch.Generator | None = None, use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield each new token, shape (B, 1), as soon as it is sampled. idx: (B, T) prompt.
    Call model.eval() first, or dropout makes the samples noisier.

    The context the model sees is at most block_size tokens (learned position embeddings
    exist only for positions < block_size; rotary ones were never trained beyond). With the
    cache, the context is processed once (prefill) and then each step feeds only the newest
    token. When the context is full, the window slides by half a block: it keeps the last
    block_size // 2 tokens and prefills the cache on them once, rather than at every step
    (sliding by one token would shift every position, so each step would cost a full prefill).
    A new window starts again at position 0, learned or rotary. use_cache=False recomputes the
    same windows from scratch at every step, so both give the same tokens."""
    check_sampling_args(temperature, top_k, top_p)
    block_size = model.config.block_size
    start = max(0, idx.size(1) - block_size)  # first token of the window
    caches = None
    for _ in range(max_new_tokens):
        if idx.size(1) - start > block_size:  # full: keep the last half of the window
            start, caches = idx.size(1) - max(1, block_size // 2), None  # at least the newest token
        if not use_cache:
            logits, _ = model(idx[:, start:])  # recompute the whole window
        elif caches is None:
            caches = [KVCache(block_size) for _ in model.transformer.h]  # prefill
            logits, _ = model(idx[:, start:], caches=caches)
        else:
            logits, _ = model(idx[:, -1:], caches=caches)  # one new token
        next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)
        idx = torch.cat((idx, next_token), dim=1)
        yield next_token


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
    """Continue idx (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens)."""
    new = list(generate_stream(model, idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache))
    return torch.cat([idx, *new], dim=1)


def stream_text(model: GPT, idx: torch.Tensor, tokenizer: Tokenizer, stops, max_new_tokens: int,
                temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None,
                show: Callable[[str], None]) -> str:
    """The text generated after idx (1, T), up to a token in `stops` (not included) or max_new_tokens;
    each piece is given to `show` as soon as its token is sampled (sample.py --stream, chat.py)."""
    text, pieces = TextStream(tokenizer), []
    for token in generate_stream(model, idx, max_new_tokens, temperature, top_k, top_p, generator):
        if token.item() in stops:  # end-of-sequence, or a chat's end of turn: the text is complete
            break
        pieces.append(text.feed(token.item()))
        show(pieces[-1])
    pieces.append(text.flush())
    show(pieces[-1])
    return "".join(pieces)


# ----------------------------------------------------------------------------- sampling

def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    problems = []
    if not temperature >= 0:  # written this way so that nan fails too
        problems.append(f"temperature = {temperature} must be >= 0 (0 means greedy)")
    if top_k is not None and top_k < 1:
        problems.append(f"top_k = {top_k} must be at least 1")
    if top_p is not None and not 0 < top_p <= 1:
        problems.append(f"top_p = {top_p} must be in (0, 1]")
    if problems:
        raise ConfigError(problems)


def sample_next_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                      generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> token ids (B, 1). Temperature 0 is greedy (argmax), and so is one too small for
    float32 to hold (below 1e-38: the distribution is one token already)."""
    if temperature < torch.finfo(torch.float32).tiny:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float()
    if temperature < 1e-3:  # dividing could overflow to inf (then NaN): shift the largest to 0 first, same softmax
        logits = logits - logits.amax(dim=-1, keepdim=True)
    logits = logits / temperature  # < 1 sharpens the distribution, > 1 flattens it
    if top_k is not None:
        # Keep the k most likely tokens: everything below the k-th largest logit is removed.
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = F.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probabilities add up
    to at least top_p. The most likely token is always kept."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = F.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
    return sorted_logits.scatter(-1, order, sorted_logits)  # back to vocabulary order


# ----------------------------------------------------------------------------- tokens to text

class TextStream:
    """Token ids -> text, one token at a time. A BPE token can end in the middle of a UTF-8
    character (an emoji is often split over two tokens), so the bytes go through an incremental
    decoder, which holds back an incomplete character until the next token completes it. A Hugging
    Face tokenizer decodes whole sequences (its decoder may join tokens), so it decodes all the ids so
    far and gives what is new, holding back a trailing incomplete character (U+FFFD) the same way.
    ChatML's markers, in a char or BPE model trained on conversations, are given as their text."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ids, self.shown = [], ""  # hf: every id so far, and the text already given
        self.marker_ids = set(tokenizer.markers.values())

    def feed(self, token: int) -> str:
        if self.tokenizer.kind == "hf":
            self.ids.append(token)
            text = self.tokenizer.decode(self.ids)
            if text.endswith("\ufffd"):
                return ""
            new, self.shown = text[len(self.shown):], text
            return new
        if token in self.marker_ids:  # ChatML's (char, bpe): ids of their own, after the text's, shown as text
            return self.flush() + self.tokenizer.decode([token])
        if self.tokenizer.kind == "char":
            return self.tokenizer.chars[token]
        return self.utf8.decode(self.tokenizer.enc.decode_single_token_bytes(token))

    def flush(self) -> str:
        if self.tokenizer.kind == "hf":
            return self.tokenizer.decode(self.ids)[len(self.shown):]
        return self.utf8.decode(b"", final=True)  # a trailing incomplete character becomes U+FFFD
