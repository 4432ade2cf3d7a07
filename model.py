"""A GPT-2 style language model, written to be read.

Shapes in comments use B = batch, T = sequence length, C = n_embd, V = vocab size,
nh = n_head, hd = head_dim = C // nh.

The parameter names follow GPT-2's layout (transformer.wte, transformer.h.0.attn.c_attn, ...),
so exporting to Hugging Face is a rename of the prefix plus a transpose of the Linear weights
(GPT-2 stores them as Conv1D, i.e. (in, out)).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ConfigError, ModelConfig, validate_section

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # older torch: "flex" is then refused with a clear error in GPT.__init__
    BlockMask = create_block_mask = flex_attention = None

FLEX_ALTERNATIVES = 'use model.attention = "sdpa" or "eager" instead (they compute the same thing)'


# ----------------------------------------------------------------------------- attention backends
# All three take q, k, v of shape (B, nh, T, hd) and return (B, nh, T, hd). A token may attend to
# itself and to earlier tokens (causal); with document ids, only to those of its own document.

def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    dropout_p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v, written out. mask: (B, 1, T, T) bool, True = may attend."""
    T = q.size(-2)
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # (T, T) causal
    # Dividing by sqrt(hd) keeps the scores' variance near 1, so softmax does not saturate.
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, T)
    scores = scores.masked_fill(~mask, float("-inf"))  # -inf becomes weight 0 after softmax
    weights = F.softmax(scores, dim=-1)  # each row sums to 1 over the keys it may see
    weights = F.dropout(weights, dropout_p)
    return weights @ v  # (B, nh, T, hd)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   dropout_p: float) -> torch.Tensor:
    """The same math as eager_attention, in PyTorch's fused kernel (flash/memory-efficient)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=mask is None)


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
        return run(q, k, v, block_mask=block_mask)
    except NotImplementedError as err:  # e.g. "FlexAttention does not support backward on CPU"
        raise ConfigError(f'model.attention = "flex" cannot run here ({err}); {FLEX_ALTERNATIVES}, '
                          "or train on a CUDA GPU") from err


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


def document_bool_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """The same rule as a dense boolean mask for eager/sdpa: (B, T) ids -> (B, 1, T, T)."""
    T = doc_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # (T, T)
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T): query doc == key doc
    return (causal & same_doc)[:, None]  # (B, 1, T, T), broadcast over heads


# ----------------------------------------------------------------------------- key/value cache

class KVCache:
    """One layer's keys and values for the tokens seen so far, so that generating a token costs
    one new query instead of recomputing the whole context. Storage is allocated on the first
    append, taking dtype/device from the keys (this also makes it work under autocast)."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0  # tokens stored so far; also the position of the next token
        self.k = self.v = None  # (B, nh, max_len, hd) once allocated

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v of shape (B, nh, T, hd); return all keys and values so far (B, nh, length, hd)."""
        if self.k is None:
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.k = k.new_zeros(shape)
            self.v = v.new_zeros(shape)
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} tokens; {end} do not fit")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


# ----------------------------------------------------------------------------- the network

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.backend = cfg.attention
        self.attn_dropout = cfg.attn_dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | BlockMask | None,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        # Give each head its own hd-wide slice of the channels: (B, T, C) -> (B, nh, T, hd).
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))

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
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's approximation, so its logits match exactly
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm block: normalise, transform, add back. The residual stream x itself is
    never normalised, which keeps gradients flowing straight through deep stacks."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | BlockMask | None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache)  # tokens exchange information
        return x + self.mlp(self.ln_2(x))  # each token is processed on its own


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # The config's own rules, checked again here because a model can be built from any config.
        problems = validate_section(cfg, "model.")
        if cfg.vocab_size == 0:
            problems.append("model.vocab_size = 0 means not set: it is normally taken from the prepared data")
        if cfg.attention == "flex" and flex_attention is None:
            problems.append(f'model.attention = "flex" needs torch.nn.attention.flex_attention, which '
                            f"torch {torch.__version__} does not have; {FLEX_ALTERNATIVES}")
        if problems:
            raise ConfigError(problems)
        self.config = cfg
        # Rounding the table up (e.g. to a multiple of 64) makes the big output matmul faster on GPUs.
        # The extra rows are never looked up and are sliced off the logits.
        m = cfg.pad_vocab_multiple
        self.padded_vocab_size = (cfg.vocab_size + m - 1) // m * m

        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(self.padded_vocab_size, cfg.n_embd),  # token embeddings
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),  # learned position embeddings
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, self.padded_vocab_size, bias=False)
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
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, caches[i] if caches else None)
        return self.transformer.ln_f(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        # Drop the padding rows, so loss and sampling only ever see real tokens.
        return self.lm_head(x)[..., :self.config.vocab_size]  # (B, T, V)

    # ------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None,
                        generator: torch.Generator | None = None,
                        use_cache: bool = True) -> Iterator[torch.Tensor]:
        """Yield each new token, shape (B, 1), as soon as it is sampled. idx: (B, T) prompt.
        Call model.eval() first, or dropout makes the samples noisier.

        The context the model sees is at most block_size tokens (learned position embeddings
        exist only for positions < block_size). With the cache, the context is processed once
        (prefill) and then each step feeds only the newest token. When the context is full, the
        window slides by half a block: it keeps the last block_size // 2 tokens and prefills the
        cache on them once, rather than at every step (sliding by one token would shift every
        position, so each step would cost a full prefill). use_cache=False recomputes the same
        windows from scratch at every step, so both give the same tokens."""
        check_sampling_args(temperature, top_k, top_p)
        block_size = self.config.block_size
        start = max(0, idx.size(1) - block_size)  # first token of the window
        caches = None
        for _ in range(max_new_tokens):
            if idx.size(1) - start > block_size:  # full: keep the last half of the window
                start, caches = idx.size(1) - block_size // 2, None
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
        """Parameter count (the tied wte/lm_head matrix counts once). non_embedding leaves out
        the position embeddings, which are a table lookup rather than compute."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self) -> int:
        """Training FLOPs per token, the standard estimate (Kaplan et al. 2020; PaLM appendix B):
        6 per parameter (2 for the forward multiply-add, 4 for the backward), plus attention's
        q k^T and weights @ v, which use no parameters: each costs 2 * n_embd * T per token and
        layer in the forward, times 3 with the backward, so 12 * n_layer * n_embd * T, counted
        for a full context of T = block_size."""
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
