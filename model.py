"""A GPT-2 style language model, written to be read, with the switches that make it a Llama.

Shapes in comments use B = batch, T = sequence length, C = n_embd, V = vocab size,
nh = n_head, hd = head_dim = C // nh, H = the MLP's hidden width.

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
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))  # (hd/2,)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float), inv_freq)  # (max_len, hd/2)
        # persistent=False: computed, not learned, so not in the state dict (nor in checkpoints).
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (T,) -> cos, sin of their angles, each (T, hd/2)."""
        return self.cos[pos], self.sin[pos]


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
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.backend = cfg.attention
        self.attn_dropout = cfg.attn_dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:  # one gain per channel of a head, shared by the heads (as in Qwen 3)
            self.q_norm = RMSNorm(cfg.n_embd // cfg.n_head, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.n_embd // cfg.n_head, cfg.norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | BlockMask | None, rotary: Rotary | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        # Give each head its own hd-wide slice of the channels: (B, T, C) -> (B, nh, T, hd).
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
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

        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again: (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    @staticmethod
    def _attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Generation only, so every backend uses sdpa here (no dropout, no document mask).
        Prefill (empty cache): the prompt attends causally to itself. Decode: one new query,
        which may see every cached key, so it needs no mask at all."""
        prefill = cache.length == 0
        if not prefill and q.size(2) != 1:
            raise ValueError("after the prefill, the KV cache takes one token at a time")
        k, v = cache.append(k, v)  # (B, nh, length, hd)
        return F.scaled_dot_product_attention(q, k, v, is_causal=prefill)


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
        # Rounding the table up (e.g. to a multiple of 64) makes the big output matmul faster on GPUs.
        # The extra rows are never looked up and are sliced off the logits.
        m = cfg.pad_vocab_multiple
        self.padded_vocab_size = (cfg.vocab_size + m - 1) // m * m

        self.transformer = nn.ModuleDict()  # GPT-2's names: transformer.wte, .wpe, .h.0, ..., .ln_f
        self.transformer.wte = nn.Embedding(self.padded_vocab_size, cfg.n_embd)  # token embeddings
        if cfg.position == "learned":
            self.transformer.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)  # GPT-2: learned positions
        else:  # rope: no table; the attention layers rotate queries and keys instead
            self.rotary = RotaryEmbedding(cfg.n_embd // cfg.n_head, cfg.block_size, cfg.rope_theta)
        self.transformer.drop = nn.Dropout(cfg.dropout)
        self.transformer.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.transformer.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, self.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            # Weight tying: one matrix both embeds tokens and scores them as outputs (fewer parameters,
            # and it helps small models). It is the same Parameter object, not a copy.
            self.lm_head.weight = self.transformer.wte.weight
        # Activation checkpointing (train.py sets it from training.activation_checkpointing): see _hidden_states.
        self.activation_checkpointing = False
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

    # ------------------------------------------------------------------------- forward

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) token ids; targets: (B, T) next-token ids, -1 = ignore; doc_ids: (B, T)
        document id per token, to keep attention within documents. Returns logits (B, T, V) and
        the mean cross-entropy loss (None without targets)."""
        self._check_input(idx)
        if doc_ids is not None and doc_ids.shape != idx.shape:
            raise ValueError(f"doc_ids has shape {tuple(doc_ids.shape)}, idx has {tuple(idx.shape)}")
        mask = self._attention_mask(idx.size(1), doc_ids, idx.device)
        logits = self._logits(self._hidden_states(idx, mask))
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

    def _hidden_states(self, idx: torch.Tensor, mask: torch.Tensor | BlockMask | None,
                       caches: list[KVCache] | None = None) -> torch.Tensor:
        """Token ids (B, T) -> final normalised hidden states (B, T, C)."""
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
            if self.activation_checkpointing and torch.is_grad_enabled():
                # Keep only the block's input x (B, T, C) for the backward pass; the backward runs the
                # block's forward again to get the activations it needs. The replay draws the same
                # dropout masks: checkpoint saves the RNG state and restores it for the replay.
                x = checkpoint(block, x, mask, rotary, use_reentrant=False)
            else:
                x = block(x, mask, rotary, caches[i] if caches else None)
        return self.transformer.ln_f(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        # Drop the padding rows, so loss and sampling only ever see real tokens.
        logits = self.lm_head(x)[..., :self.config.vocab_size]  # (B, T, V)
        cap = self.config.logit_softcap
        if cap:  # smooth and monotonic, so the ranking of tokens is unchanged; no logit runs away
            logits = cap * torch.tanh(logits / cap)
        return logits

    # ------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None,
                        generator: torch.Generator | None = None,
                        use_cache: bool = True) -> Iterator[torch.Tensor]:
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
        block_size = self.config.block_size
        start = max(0, idx.size(1) - block_size)  # first token of the window
        caches = None
        for _ in range(max_new_tokens):
            if idx.size(1) - start > block_size:  # full: keep the last half of the window
                start, caches = idx.size(1) - max(1, block_size // 2), None  # at least the newest token
            if not use_cache:
                logits, _ = self(idx[:, start:])  # recompute the whole window
            elif caches is None:
                caches = [KVCache(block_size) for _ in self.transformer.h]  # prefill
                logits = self._forward_cached(idx[:, start:], caches)
            else:
                logits = self._forward_cached(idx[:, -1:], caches)  # one new token
            next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)
            idx = torch.cat((idx, next_token), dim=1)
            yield next_token

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
        """Continue idx (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens)."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, generator,
                                        use_cache))
        return torch.cat([idx, *new], dim=1)

    def _forward_cached(self, idx: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """Run idx (B, T) through the network, appending to the caches; logits (B, T, V)."""
        self._check_input(idx)
        return self._logits(self._hidden_states(idx, None, caches))

    # ------------------------------------------------------------------------- accounting, optimizer

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

    def flops_per_token(self) -> int:
        """Training FLOPs per token, the standard estimate (Kaplan et al. 2020; PaLM appendix B):
        6 per parameter (2 for the forward multiply-add, 4 for the backward), plus attention's
        q k^T and weights @ v, which use no parameters: each costs 2 * n_embd * T per token and
        layer in the forward, times 3 with the backward, so 12 * n_layer * n_embd * T, counted
        for a full context of T = block_size. Element-wise work (norms, activations, the SwiGLU
        product, rotary, softmax, soft-cap) is left out, as is usual: it is small next to matmuls."""
        cfg = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def estimate_mfu(self, tokens_per_s: float, peak_flops: float) -> float:
        """Model FLOPs utilisation: the fraction of the hardware's peak that training achieves."""
        return self.flops_per_token() * tokens_per_s / peak_flops

    def configure_optimizer(self, weight_decay: float, learning_rate: float, betas: tuple[float, float],
                            device_type: str, name: str = "adamw", muon_lr: float = 0.02
                            ) -> torch.optim.Optimizer:
        """AdamW with weight decay on matrices and embeddings (dim >= 2) only: decaying biases and
        LayerNorm gains towards 0 would fight their job of shifting and scaling activations.
        name="muon": the matrices inside the blocks get Muon instead (see muon.py).
        A group's "lr_scale" is its learning rate relative to the schedule's.
        Frozen weights (requires_grad False) are left out. With LoRA (lora.py) that leaves only the
        adapters' A and B: matrices, so they are decayed, which pulls B A, the change made to the
        pretrained model, towards 0: towards the pretrained weights, not towards zero weights."""
        params = [p for p in self.parameters() if p.requires_grad]
        if name == "muon":
            from muon import MuonAdamW
            hidden = [p for n, p in self.named_parameters()
                      if n.startswith("transformer.h.") and p.dim() == 2 and p.requires_grad]
            ids = {id(p) for p in hidden}
            groups = [{"params": hidden, "use_muon": True, "weight_decay": weight_decay,
                       "lr_scale": muon_lr / learning_rate},
                      {"params": [p for p in params if p.dim() >= 2 and id(p) not in ids],
                       "weight_decay": weight_decay},
                      {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
            return MuonAdamW(groups, lr=learning_rate, betas=betas)
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # The fused kernel updates all tensors in one pass. It exists on CUDA and, in torch 2.13,
        # on CPU too, where it measured ~5x faster than the default for a GPT-sized model.
        fused = device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)


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
    """logits (B, V) -> token ids (B, 1). Temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature  # < 1 sharpens the distribution, > 1 flattens it
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
