"""Attention backends, the masks they take, and the key/value cache used in generation.

The three backends compute the same thing: eager_attention writes it out, sdpa_attention calls
PyTorch's fused kernel, flex_attention_checked calls FlexAttention with a block mask. model.py's
CausalSelfAttention picks one (model.attention) and gives it queries and keys that already carry
their positions, so rotary embeddings work the same way with each.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from config import ConfigError

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # older torch: "flex" is then refused with a clear error in GPT.__init__
    BlockMask = create_block_mask = flex_attention = None

FLEX_ALTERNATIVES = 'use model.attention = "sdpa" or "eager" instead (they compute the same thing)'


def flex_unavailable() -> str | None:
    """Why model.attention = "flex" cannot be used with this torch, or None when it can."""
    if flex_attention is None:
        return (f'model.attention = "flex" needs torch.nn.attention.flex_attention, which '
                f"torch {torch.__version__} does not have; {FLEX_ALTERNATIVES}")
    return None


# ----------------------------------------------------------------------------- attention backends
# All three take q of shape (B, nh, T, hd), k and v of shape (B, nkv, T, hd), and return (B, nh, T, hd).
# With grouped-query attention (nkv < nh), key/value head j serves query heads j * nh/nkv ... (j + 1) *
# nh/nkv - 1. A token may attend to itself and to earlier tokens (causal); with document ids, only to
# those of its own document.

def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    dropout_p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v, written out. mask: (B, 1, T, T) bool, True = may attend."""
    if k.size(1) != q.size(1):  # grouped-query: each key/value head repeated for the query heads it serves
        k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))  # (B, nh, T, hd)
    if mask is None:
        mask = causal_mask(q.size(-2), q.device)  # (T, T)
    # Dividing by sqrt(hd) keeps the scores' variance near 1, so softmax does not saturate.
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, T)
    scores = scores.masked_fill(~mask, float("-inf"))  # -inf becomes weight 0 after softmax
    weights = F.softmax(scores, dim=-1)  # each row sums to 1 over the keys it may see
    weights = F.dropout(weights, dropout_p)
    return weights @ v  # (B, nh, T, hd)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   dropout_p: float) -> torch.Tensor:
    """The same math as eager_attention, in PyTorch's fused kernel (flash/memory-efficient). On a CPU it
    computes in fp32 under autocast too: there the kernel's backward pass is slower in bf16 than in fp32
    (docs/benchmarks.md, SmolLM2's LoRA steps), and fp32 is the more exact."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):  # which would cast the fp32 inputs back
            y = sdpa_attention(q.float(), k.float(), v.float(), mask, dropout_p)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=mask is None, enable_gqa=k.size(1) != q.size(1))


def flex_attention_checked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           block_mask: BlockMask) -> torch.Tensor:
    """FlexAttention with a block mask. It has no dropout on the attention weights, so
    model.attn_dropout > 0 is refused for it.

    FlexAttention is meant to be compiled: uncompiled it runs reference math that builds the full
    (T, T) score matrix. So on CUDA it is compiled (fused Triton kernel). In torch 2.13 it has no
    backward pass on CPU (compiled or not), so on CPU it runs forward-only (evaluation, sampling);
    training there raises the error below instead of silently switching backend.
    """
    # Inside a compiled model, torch.compile fuses the plain call already.
    run = _compiled_flex() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
    try:
        return run(q, k, v, block_mask=block_mask, enable_gqa=k.size(1) != q.size(1))
    except NotImplementedError as err:  # e.g. "FlexAttention does not support backward on CPU"
        raise ConfigError(f'model.attention = "flex" cannot run here ({err}); {FLEX_ALTERNATIVES}, '
                          "or train on a CUDA GPU") from err


@functools.cache
def flex_cannot_train(device: str) -> str | None:
    """Why flex attention cannot train on `device` (torch 2.13 has no backward for it on a CPU), or None.
    Tried once, on a tiny input: a run is refused before its first evaluation, not after it."""
    q = torch.randn(1, 1, 16, 8, device=device, requires_grad=True)  # (B, nh, T, hd)
    try:
        flex_attention_checked(q, q, q, causal_block_mask(16, torch.device(device))).sum().backward()
    except ConfigError as e:
        return str(e)
    return None


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=8)
def causal_block_mask(T: int, device: torch.device) -> BlockMask:
    """Flex's causal mask, cached: the same for every batch of length T."""
    return create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx,
                             B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)


def document_block_mask(doc_ids: torch.Tensor) -> BlockMask:
    """Flex's mask for packed documents: causal and same document. doc_ids: (B, T)."""
    B, T = doc_ids.shape

    def causal_same_doc(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return create_block_mask(causal_same_doc, B=B, H=None, Q_LEN=T, KV_LEN=T, device=doc_ids.device)


def causal_mask(T: int, device: torch.device) -> torch.Tensor:
    """(T, T) bool, True where query i may attend to key j: j <= i, itself and the tokens before it."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def document_bool_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """The same rule as a dense boolean mask for eager/sdpa: (B, T) ids -> (B, 1, T, T)."""
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T): query doc == key doc
    return (causal_mask(doc_ids.size(1), doc_ids.device) & same_doc)[:, None]  # (B, 1, T, T), over heads


# ----------------------------------------------------------------------------- key/value cache

class KVCache:
    """One layer's keys and values for the tokens seen so far, so that generating a token costs
    one new query instead of recomputing the whole context. Storage takes its dtype and device from the
    keys (so it works under autocast) and grows as needed, doubling, up to max_len tokens: a model with
    a long context (8,192 tokens) does not set aside all of it for a short sample."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0  # tokens stored so far; also the position of the next token
        self.k = self.v = None  # (B, nkv, room, hd) once allocated

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v of shape (B, nkv, T, hd); return all keys and values so far (B, nkv, length, hd)."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} tokens; {end} do not fit")
        if self.k is None or end > self.k.size(2):
            room = min(self.max_len, max(256, 2 * end))
            grown = [t.new_zeros((t.size(0), t.size(1), room, t.size(3))) for t in (k, v)]
            if self.k is not None:
                for new, old in zip(grown, (self.k, self.v)):
                    new[:, :, :self.length] = old[:, :, :self.length]
            self.k, self.v = grown
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]
