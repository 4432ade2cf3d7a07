"""A GPT-2 style language model, written to be read, with the switches that make it a Llama.

Shapes in comments use B = batch, T = sequence length, C = n_embd, V = vocab size,
nh = n_head, nkv = the key/value heads (n_kv_head, or nh), hd = the head size (head_dim, or C // nh:
ModelConfig.head_size), H = the MLP's hidden width.

    model = GPT(cfg.model)
    logits, loss = model(idx, targets)   # (B, T) token ids -> (B, T, V) scores, and the mean loss

Generating text with the model is in generate.py; its optimizer in muon.py.

The parameter names follow GPT-2's layout (transformer.wte, transformer.h.0.attn.c_attn, ...),
so exporting to Hugging Face is a rename of the prefix plus a transpose of the Linear weights
(GPT-2 stores them as Conv1D, i.e. (in, out)).

model.arch = "llama" (config.ARCHS) turns four switches, each a few lines beside GPT-2's version:
position = "rope" (RotaryEmbedding, apply_rotary instead of the wpe table), norm = "rmsnorm"
(RMSNorm instead of LayerNorm), mlp = "swiglu" (in MLP) and bias = false. qk_norm, logit_softcap,
tie_embeddings and mlp = "relu2" work with either.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import (BlockMask, KVCache, causal_block_mask, document_block_mask, document_bool_mask,
                       eager_attention, flex_attention_checked, flex_unavailable, sdpa_attention)
from config import ConfigError, ModelConfig, validate_section

# ----------------------------------------------------------------------------- Llama's pieces

class RotaryEmbedding(nn.Module):
    """Rotary position embeddings (RoFormer, Su et al. 2021), as Llama uses them. Instead of adding a
    learned position vector to each token (GPT-2's wpe), the queries and keys of a token at position
    p are rotated: channel pair i turns by the angle p * theta^(-2i / hd). A rotated query and key then
    score q . k according to how far apart they are (p_q - p_k), not where they are. No weights.

    The pairs are (channel i, channel i + hd/2) of each head: transformers' Llama convention
    ("rotate_half"), so its weights load as they are. cos and sin are tabulated for block_size positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hd = cfg.head_size()
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))  # (hd/2,) per position
        angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float), rope_scaled(inv_freq, cfg))  # (T, hd/2)
        # persistent=False: computed, not learned, so not in the state dict (nor in checkpoints).
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (T,) -> cos, sin of their angles, each (T, hd/2)."""
        return self.cos[pos], self.sin[pos]


def rope_scaled(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """model.rope_scaling: turn the pairs more slowly, so that a longer context than the model learned
    spans the angles it knows. linear slows every pair by rope_factor (positions are interpolated).
    llama3 slows only the slow pairs, whose wavelength 2 pi / inv_freq is longer than the original
    context / rope_low_freq_factor: they never turned a whole way round in training. Pairs with a
    wavelength below the context / rope_high_freq_factor keep their speed, and those between are a
    smooth mix of the two (as Llama 3.1 and 3.2 were trained; the same formula as transformers')."""
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_scaling != "llama3":
        return inv_freq
    context, low, high = cfg.rope_original_context, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelength = 2 * math.pi / inv_freq  # (hd/2,) tokens per full turn of each pair
    slowed = torch.where(wavelength > context / low, inv_freq / cfg.rope_factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)  # 0 at the slow edge, 1 at the fast edge
    mixed = (1 - smooth) * slowed / cfg.rope_factor + smooth * slowed
    between = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(between, mixed, slowed)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (x1, x2) of x (B, nh, T, hd) by its angle: a 2-D rotation
    (x1 cos - x2 sin, x2 cos + x1 sin), with cos and sin (T, hd/2) broadcast over batch and heads."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hd/2) each: channel i pairs with channel i + hd/2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # under autocast, q and k may be bf16
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RMSNorm(nn.Module):
    """Llama's norm: divide by the root mean square of the channels, then scale. LayerNorm also
    subtracts the mean and adds a bias; RMSNorm skips both, which works as well and costs less.
    Computed in fp32 whatever the input, as transformers' LlamaRMSNorm does (so logits match)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., size), rms 1
        return self.weight * x32.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """GPT-2's LayerNorm, or Llama's RMSNorm (model.norm), over the n_embd channels of the stream."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def mlp_hidden(cfg: ModelConfig) -> int:
    """The MLP's hidden width H. GPT-2 uses 4 * C with two matrices (8 C^2 weights); SwiGLU has three,
    so Llama shrinks H to 8/3 * C (here rounded up to a multiple of 8) for about the same count."""
    if cfg.mlp_hidden:
        return cfg.mlp_hidden
    if cfg.mlp == "swiglu":
        return math.ceil(8 * cfg.n_embd / 3 / 8) * 8
    return 4 * cfg.n_embd


# ----------------------------------------------------------------------------- the network

Rotary = tuple[torch.Tensor, torch.Tensor]  # cos, sin for this forward's positions, each (T, hd/2)


class CausalSelfAttention(nn.Module):
    """Each token's query is scored against the keys of the tokens before it, and it takes their values,
    weighted by those scores, in nh heads side by side. With grouped-query attention (n_kv_head < n_head)
    there are fewer key/value heads than query heads: each serves nh / nkv query heads, which makes the
    KV cache that much smaller, and the model barely worse."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = cfg.n_head, cfg.kv_heads(), cfg.head_size()
        self.sizes = (self.n_head * self.head_size, *2 * (self.n_kv_head * self.head_size,))  # q, k, v widths
        self.backend = cfg.attention
        self.attn_dropout = cfg.attn_dropout
        # q, k and v in one matmul; qkv_bias (Qwen2): biases here alone.
        self.c_attn = nn.Linear(cfg.n_embd, sum(self.sizes), bias=cfg.bias or cfg.qkv_bias)
        self.c_proj = nn.Linear(self.sizes[0], cfg.n_embd, bias=cfg.bias)  # the heads, side by side, back to C
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:  # one gain per channel of a head, shared by the heads (as in Qwen 3)
            self.q_norm = RMSNorm(cfg.head_size(), cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_size(), cfg.norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | BlockMask | None, rotary: Rotary | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.sizes, dim=2)  # (B, T, nh * hd), and (B, T, nkv * hd) twice
        # Give each head its own hd-wide slice of the channels: (B, T, nh * hd) -> (B, nh, T, hd).
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)
        k, v = (t.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2) for t in (k, v))  # (B, nkv, T, hd)
        if self.qk_norm:  # qk_norm: unit-rms queries and keys keep the scores from growing
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:  # rope: positions enter here, as rotations of q and k (v is left alone)
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)

        if cache is not None:
            y = self._attend_cached(q, k, v, cache)
        elif self.backend == "flex":
            y = flex_attention_checked(q, k, v, mask)
        else:
            attend = eager_attention if self.backend == "eager" else sdpa_attention
            y = attend(q, k, v, mask, self.attn_dropout if self.training else 0.0)

        y = y.transpose(1, 2).contiguous().view(B, T, self.sizes[0])  # heads side by side again
        return self.resid_dropout(self.c_proj(y))

    @staticmethod
    def _attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Generation only, so every backend uses sdpa here (no dropout, no document mask).
        Prefill (empty cache): the prompt attends causally to itself. Decode: one new query,
        which may see every cached key, so it needs no mask at all."""
        prefill = cache.length == 0
        if not prefill and q.size(2) != 1:
            raise ValueError("after the prefill, the KV cache takes one token at a time")
        k, v = cache.append(k, v)  # (B, nkv, length, hd): the cache holds the key/value heads only
        return F.scaled_dot_product_attention(q, k, v, is_causal=prefill, enable_gqa=k.size(1) != q.size(1))


class MLP(nn.Module):
    """Each token on its own: widen to H, a nonlinearity, back to C. model.mlp picks the nonlinearity:
    gelu (GPT-2), relu2 (ReLU squared, from Primer and modded-nanogpt) or swiglu (Llama)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, hidden = cfg.mlp, mlp_hidden(cfg)
        # swiglu's two input projections (gate and up) are one matmul, as c_attn holds q, k and v.
        self.c_fc = nn.Linear(cfg.n_embd, 2 * hidden if self.kind == "swiglu" else hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, H), or (B, T, 2H) for swiglu
        if self.kind == "gelu":
            h = F.gelu(h, approximate="tanh")  # GPT-2's approximation, so its logits match exactly
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:  # swiglu: one half, through SiLU, gates the other half channel by channel
            gate, up = h.chunk(2, dim=-1)  # (B, T, H) each
            h = F.silu(gate) * up
        return self.dropout(self.c_proj(h))  # (B, T, H) -> (B, T, C)


class Block(nn.Module):
    """Pre-norm block: normalise, transform, add back. The residual stream x itself is
    never normalised, which keeps gradients flowing straight through deep stacks."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)  # "ln" for GPT-2's LayerNorm, whichever norm it is
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | BlockMask | None, rotary: Rotary | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, rotary, cache)  # tokens exchange information
        return x + self.mlp(self.ln_2(x))  # each token is processed on its own


class DecodeLinear(nn.Linear):
    """nn.Linear as GPT.decode_layout leaves it, for generation on a CPU: the same Parameters, with the
    weight stored transposed in memory, W^T (in, out) row by row. A decode step multiplies one token's
    vector by every matrix, which reads the whole matrix for little arithmetic, so memory is the limit;
    MKL runs such a product on one core. Here W^T's rows are cut into one block per thread (n of them,
    each contiguous in memory), x into the matching slices, and bmm multiplies the n pairs in parallel:
    y = x W^T = sum over blocks of x_i W^T_i. docs/benchmarks.md has what it gains."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = torch.get_num_threads()
        one_row = x.numel() == self.in_features and not torch.is_autocast_enabled(x.device.type)
        if not one_row or n == 1 or self.in_features % n or not self.weight.t().is_contiguous():
            return super().forward(x)  # more rows (prefill, eval), autocast's casts, or no even cut: as usual
        blocks = self.weight.t().view(n, self.in_features // n, self.out_features)  # (n, in / n, out)
        y = torch.bmm(x.reshape(n, 1, -1), blocks).sum(dim=0)  # (n, 1, out) partial sums -> (1, out)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # The config's own rules, checked again here because a model can be built from any config.
        problems = validate_section(cfg, "model.")
        if cfg.vocab_size == 0:
            problems.append("model.vocab_size = 0 means not set: it is normally taken from the prepared data")
        if cfg.attention == "flex" and (why := flex_unavailable()):
            problems.append(why)
        if problems:
            raise ConfigError(problems)
        self.config = cfg
        V = cfg.padded_vocab_size()  # rows beyond vocab_size are never looked up, and sliced off the logits

        self.transformer = nn.ModuleDict()  # GPT-2's names: transformer.wte, .wpe, .h.0, ..., .ln_f
        self.transformer.wte = nn.Embedding(V, cfg.n_embd)  # token embeddings
        if cfg.position == "learned":
            self.transformer.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)  # GPT-2: learned positions
        else:  # rope: no table; the attention layers rotate queries and keys instead
            self.rotary = RotaryEmbedding(cfg)
        self.transformer.drop = nn.Dropout(cfg.dropout)
        self.transformer.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.transformer.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, V, bias=False)
        if cfg.tie_embeddings:
            # Weight tying: one matrix both embeds tokens and scores them as outputs (fewer parameters,
            # and it helps small models). It is the same Parameter object, not a copy.
            self.lm_head.weight = self.transformer.wte.weight
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # Each block adds two projections (attention and MLP) into the residual stream; scaling
        # them down by sqrt(2 * n_layer) keeps the stream's variance from growing with depth.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> GPT:
        """A GPT whose parameters are the tensors of `state` themselves: built with shapes only (the meta
        device: no random init, no memory), then given them, so that a loaded model is one copy of its
        weights, not two. A tied lm_head is wte again; the rotary tables, computed, not stored, are made."""
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(state, assign=True)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.transformer.wte.weight
        if cfg.position == "rope":
            model.rotary = RotaryEmbedding(cfg).to(model.transformer.wte.weight.device)
        return model

    @torch.no_grad()
    def decode_layout(self) -> GPT:
        """In place, for generation on a CPU (checkpoint.load_model does it): each Linear weight (the tied wte
        too) is stored transposed in memory, and is still the same (out, in) matrix to F.linear, as a strided
        view; each Linear becomes a DecodeLinear, which splits a one-token product over the CPU's threads.
        MKL reads this layout faster, and the split uses every core (docs/benchmarks.md has the figures for
        SmolLM2-135M). The same numbers, in another order in memory; training keeps the usual layout."""
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.weight.device.type == "cpu" and module.weight.is_contiguous():
                module.weight.data = module.weight.t().contiguous().t()  # (out, in), with strides (1, out)
                module.__class__ = DecodeLinear  # the same module and Parameters, DecodeLinear's forward
        return self

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (a tied wte/lm_head matrix counts once). non_embedding leaves out the
        tables that are only looked up, not multiplied: the learned position embeddings, and the
        token embeddings when the output layer has a matrix of its own (untied)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied matrix once
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        if non_embedding and not self.config.tie_embeddings:
            n -= self.transformer.wte.weight.numel()
        return n

    # ------------------------------------------------------------------------- forward

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                caches: list[KVCache] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) token ids; targets: (B, T) next-token ids, -1 = ignore; doc_ids: (B, T)
        document id per token, to keep attention within documents; caches: one KVCache per block, in
        generation (generate.py), which idx continues. Returns logits (B, T, V) and the mean
        cross-entropy loss (None without targets)."""
        self._check_input(idx)
        if doc_ids is not None and doc_ids.shape != idx.shape:
            raise ValueError(f"doc_ids has shape {tuple(doc_ids.shape)}, idx has {tuple(idx.shape)}")
        mask = None if caches else self._attention_mask(idx.size(1), doc_ids, idx.device)
        start = caches[0].length if caches else 0  # with a cache, idx continues what it holds
        pos = torch.arange(start, start + idx.size(1), device=idx.device)  # (T,)
        x = self.transformer.wte(idx)  # (B, T, C)
        rotary = None
        if self.config.position == "learned":
            x = x + self.transformer.wpe(pos)  # GPT-2: where a token is, added to what it is
        else:
            rotary = self.rotary(pos)  # rope: passed down to every attention layer
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, rotary, caches[i] if caches else None)
        logits = self._logits(self.transformer.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def _check_input(self, idx: torch.Tensor) -> None:
        # These read the data (idx.min/max), which torch.compile would split the graph on;
        # a bad id still fails there, just less legibly (an index error in the embedding).
        if torch.compiler.is_compiling():
            return
        T, block_size, V = idx.size(1), self.config.block_size, self.config.vocab_size
        if T == 0:
            raise ValueError("the sequence is empty: idx needs at least one token (T >= 1)")
        if T > block_size:
            raise ValueError(f"sequence length T={T} exceeds model.block_size={block_size}")
        lo, hi = idx.min().item(), idx.max().item()
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {V}) (model.vocab_size={V})")

    def _attention_mask(self, T: int, doc_ids: torch.Tensor | None,
                        device: torch.device) -> torch.Tensor | BlockMask | None:
        """Built once per forward and shared by all layers. None means plain causal attention."""
        if self.config.attention == "flex":
            if doc_ids is not None:
                return document_block_mask(doc_ids)
            # torch.compile ignores lru_cache (and warns); it builds the mask inside the graph instead.
            make = causal_block_mask.__wrapped__ if torch.compiler.is_compiling() else causal_block_mask
            return make(T, device)
        return None if doc_ids is None else document_bool_mask(doc_ids)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(x)  # (B, T, padded V)
        if logits.size(-1) != self.config.vocab_size:  # drop the padding rows: loss and sampling see real tokens
            logits = logits[..., :self.config.vocab_size]  # (B, T, V)
        cap = self.config.logit_softcap
        if cap:  # smooth and monotonic, so the ranking of tokens is unchanged; no logit runs away
            logits = cap * torch.tanh(logits / cap)
        return logits
