"""LoRA: fine-tune a pretrained model by training a small low-rank update of its linear layers.

A linear layer computes y = W x + b, with W of shape (out, in). LoRA (Hu et al. 2021) freezes W and
learns two small matrices A (r, in) and B (out, r), with r much smaller than in and out:

    y = W x + b + (alpha / r) * B A x

The update B A has rank at most r and costs r * (in + out) parameters instead of in * out.
- B starts at zero, so B A = 0: at step 0 the model is exactly the pretrained one, and training
  moves it only as far as the data asks. A starts random: the gradient of B is (alpha / r) dy (A x)^T,
  which needs A != 0 (with both at zero, neither would ever get a gradient).
- alpha / r keeps the update's size about the same when r changes, so a learning rate found for one
  rank carries over to another.
- Only A and B have requires_grad: only they get gradients and optimizer state (AdamW keeps two
  numbers per trained parameter), which is where the memory goes, and checkpoints hold only them
  (unless lora.save = "full").
- Outside autocast, the layers' backward passes are written out (LoRAProduct, FrozenProduct): the
  frozen weights' products on the faster kernels (oneDNN's on an x86 CPU), the thin ones in the faster
  layouts.

A layer of ours that stacks several projections of the Hugging Face model (Llama's q, k and v are
our c_attn) gets one adapter per projection, as PEFT gives theirs (hf.lora_parts): its A holds their
A matrices stacked, its B their B matrices, so that PEFT loads them onto the original model.

    add_adapters(model, cfg.lora)  # wrap the chosen linear layers of every block; freeze the rest
    store_base_in(model, torch.bfloat16)  # optional: the frozen weights as autocast uses them
    merge(model)                   # W <- W + (alpha / r) B A: plain nn.Linear again, no extra cost
    remove(model)                  # drop the adapters: the base model again
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx

from config import ConfigError, LoraConfig
from hf import lora_parts
from options import suggest


class LoRALinear(nn.Module):
    """A frozen linear layer plus its trainable low-rank update.

    It takes over the wrapped layer's own `weight` and `bias` Parameters, so their names in the
    state dict stay what they were (attn.c_attn.weight); the adapters add attn.c_attn.lora_A and
    attn.c_attn.lora_B. `parts`: the output rows of each projection the layer stacks (P of them;
    one, the whole layer, by default); each has its own A (r, in) and B (rows, r)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, parts: list[int] | None = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # (out, in), (out,) or None
        self.rank, self.parts = rank, parts or [self.out_features]
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(len(self.parts) * rank, self.in_features, **like))  # (P r, in)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as in PEFT
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **like))  # (out, r): B A = 0
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            # A base kept in bf16 by store_base_in, outside autocast (a run's samples and task answers):
            # computed as in the run's steps, under autocast, rather than casting the weights at every call.
            with torch.autocast(x.device.type, dtype=self.weight.dtype):
                return self.forward(x).to(x.dtype)
        dropped = self.dropout(x)
        flat = x.flatten(0, -2)  # (M, in), M = B T
        if by_hand(x, self.weight, self.bias):
            y = LoRAProduct.apply(flat, None if dropped is x else dropped.flatten(0, -2), self.weight, self.bias,
                                  self.lora_A, self.scaled_B())
        else:
            # (M, in) -> (M, P r) -> (M, out): thin matmuls, never the (out, in) matrix B A. addmm adds
            # h (scale B)^T to the frozen layer's output inside the one matmul.
            h = F.linear(dropped.flatten(0, -2), self.lora_A)
            y = torch.addmm(F.linear(flat, self.weight, self.bias), h, self.scaled_B().t())
        return y.view(*x.shape[:-1], self.out_features)

    def scaled_B(self) -> torch.Tensor:
        """(alpha / r) B as one (out, P r) matrix: projection i's rows hold its B_i in its r columns and zeros
        elsewhere (block-diagonal), so that each projection sees only its own A_i x, in one contiguous matmul."""
        blocks = self.lora_B.split(self.parts)  # (rows_i, r) each
        return self.scale * (blocks[0] if len(blocks) == 1 else torch.block_diag(*blocks))

    def delta(self) -> torch.Tensor:
        """The update as a matrix, (alpha / r) B A (out, in): each projection's B_i A_i, stacked."""
        return self.scaled_B() @ self.lora_A


class FrozenLinear(nn.Linear):
    """An nn.Linear of a LoRA model that gets no adapters (the lm_head, the blocks' untargeted layers:
    add_adapters makes them these; merge and remove make them nn.Linear again): its product by hand, as
    LoRALinear's, while its weights are frozen."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not by_hand(x, self.weight, self.bias):
            return super().forward(x)
        return FrozenProduct.apply(x.flatten(0, -2), self.weight, self.bias).view(*x.shape[:-1], self.out_features)


def by_hand(x: torch.Tensor, *frozen: torch.Tensor | None) -> bool:
    """Whether the products below run, not autograd's own: for frozen weights (they compute no gradient
    for them), not under autocast (it casts each product's inputs) nor in torch.compile (it writes its own
    kernels)."""
    return (not any(p is not None and p.requires_grad for p in frozen)
            and not torch.is_autocast_enabled(x.device.type) and not torch.compiler.is_compiling())


# On an x86 CPU, torch's fp32 matmuls go to MKL. oneDNN, which torch also ships (its bf16 matmuls go there), did
# the products of a LoRA step faster, in fp32 too, on the AVX-512 CPU measured (docs/benchmarks.md, "Against
# transformers and PEFT"). torch.backends.mkldnn.flags(enabled=False) turns it off.
ONEDNN = torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b: x (..., in), W (out, in) or a transposed view of an (in, out) matrix. No autograd."""
    if ONEDNN and torch.backends.mkldnn.enabled and x.device.type == "cpu" and \
            x.dtype == weight.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class FrozenProduct(torch.autograd.Function):
    """y = x W^T + b with W and b frozen: the backward pass computes only x's gradient, gy W."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx: FunctionCtx, gy: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        assert not any(ctx.needs_input_grad[1:]), "by_hand sends only frozen weights here"
        (weight,) = ctx.saved_tensors
        return linear(gy, weight.t()), None, None


class LoRAProduct(torch.autograd.Function):
    """y = x W^T + b + (d(x) A^T) S^T: a LoRALinear's output, x (M, in), with W and b frozen, A (P r, in) and
    S (out, P r), the scaled B, trained; d(x) is dropout's x (`dropped`), or x itself (`dropped` None). Its
    backward pass is written out rather than left to autograd, whose layouts for the products of these thin
    matrices (P r columns) were the slower ones on a CPU, and which adds x's two gradients in a separate pass."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, dropped: torch.Tensor | None, weight: torch.Tensor,
                bias: torch.Tensor | None, A: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        xa = x if dropped is None else dropped
        h = linear(xa, A)  # (M, P r)
        y = linear(x, weight, bias).addmm_(h, S.t())  # (M, out): += h S^T in place, no copy of y
        ctx.save_for_backward(xa, weight, A, S, h)
        ctx.dropout = dropped is not None
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # gy (M, out)
        assert not any(ctx.needs_input_grad[2:4]), "by_hand sends only frozen weights here"
        xa, weight, A, S, h = ctx.saved_tensors
        gh = linear(gy, S.t())  # (M, P r) = gy S
        # The adapters' gradients as (P r) rows by the big matrix's columns, (h^T gy)^T and gh^T d(x), with h^T
        # and gh^T made contiguous first (P r rows, cheap): of the layouts timed, the fastest for these thin products.
        gS = linear(h.t().contiguous(), gy.t()).t()  # (out, P r) = gy^T h
        gA = linear(gh.t().contiguous(), xa.t())  # (P r, in) = gh^T d(x)
        gx = g_dropped = None
        if ctx.needs_input_grad[0]:
            gx = linear(gy, weight.t())  # (M, in) = gy W
            if ctx.dropout:
                g_dropped = gh.mm(A)  # dropout's backward pass takes it on
            else:
                gx.addmm_(gh, A)  # x's gradient through the adapters, added inside the matmul
        return gx, g_dropped, None, None, gA, gS


def linear_layers(block: nn.Module) -> dict[str, nn.Linear]:
    """A block's linear layers by name ("attn.c_attn", "mlp.c_fc", ...): what lora.targets names."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def target_problems(cfg: LoraConfig, block: nn.Module, parts: dict[str, list[int]]) -> list[str]:
    """What is wrong with lora.targets and lora.rank for the model's blocks (one of them is `block`)."""
    layers = linear_layers(block)
    names = list(layers) if cfg.targets == "all" else cfg.target_list()
    problems = [f"lora.targets: {name} is not a linear layer of a block{suggest(name, list(layers))}; "
                f"they are: {', '.join(layers)} (or all)" for name in names if name not in layers]
    # B A has rank at most min(in, out): a larger r only adds parameters.
    narrow = {n: min(layers[n].in_features, *parts.get(n, [layers[n].out_features])) for n in names if n in layers}
    narrow = {n: width for n, width in narrow.items() if cfg.rank > width}
    if narrow:
        widths = ", ".join(f"{n} ({w})" for n, w in narrow.items())
        problems.append(f"lora.rank = {cfg.rank} is larger than the width of {widths}; use at most "
                        f"{min(narrow.values())}")
    return problems


def add_adapters(model: nn.Module, cfg: LoraConfig) -> None:
    """Freeze every weight of `model` (a GPT) and wrap the target layers of each block in a LoRALinear,
    with one adapter per projection the Hugging Face model has in it (hf.lora_parts); the other linear
    layers (the lm_head too) become FrozenLinear."""
    blocks, parts = model.transformer.h, lora_parts(model.config)
    problems = target_problems(cfg, blocks[0], parts)
    if problems:
        raise ConfigError(problems)
    for p in model.parameters():
        p.requires_grad_(False)  # embeddings, norms and biases too: only the adapters train
    names = list(linear_layers(blocks[0])) if cfg.targets == "all" else cfg.target_list()
    for block in blocks:
        for name in names:
            parent, _, attr = name.rpartition(".")
            owner = block.get_submodule(parent)
            setattr(owner, attr, LoRALinear(getattr(owner, attr), cfg.rank, cfg.alpha, cfg.dropout, parts.get(name)))
    for module in model.modules():
        if type(module) is nn.Linear:  # the lm_head, the layers without adapters
            module.__class__ = FrozenLinear


@torch.no_grad()
def store_base_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Keep the adapted layers' frozen weights in `dtype`, autocast's (bf16, fp16), instead of fp32. autocast
    would cast them at every use anyway, and keep the copies for the backward pass: stored that way, they
    take half the memory and no casting. The forward pass sees the same numbers; the adapters, embeddings
    and norms stay in fp32. For training only (merge and remove expect an fp32 base), and not where the
    base is saved (lora.save = "full": the fp32 it was read as) or sharded (FSDP: one dtype per shard)."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.weight.data = module.weight.data.to(dtype)


def plain_linear(layer: LoRALinear) -> nn.Linear:
    """An nn.Linear holding `layer`'s own weight and bias Parameters (built on "meta": no memory)."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight, linear.bias = layer.weight, layer.bias
    return linear


def replace_adapted(model: nn.Module, make: Callable[[LoRALinear], nn.Module]) -> None:
    """Replace every LoRALinear in `model` by make(that layer), and make each FrozenLinear an nn.Linear again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, make(module))
        elif type(module) is FrozenLinear:
            module.__class__ = nn.Linear


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Write W + (alpha / r) B A into each adapted layer's weight and drop its adapters: the same
    function (up to rounding) as plain linear layers, which export and sampling need."""
    def merged(layer: LoRALinear) -> nn.Linear:
        layer.weight += layer.delta()  # (out, in)
        return plain_linear(layer)
    replace_adapted(model, merged)


def remove(model: nn.Module) -> None:
    """Drop the adapters, keeping the base weights as they are."""
    replace_adapted(model, plain_linear)


def is_adapter(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by state-dict name; empty for a model without adapters."""
    return {name: t for name, t in model.state_dict().items() if is_adapter(name)}


@torch.no_grad()
def load_adapters(model: nn.Module, adapters: dict[str, torch.Tensor]) -> None:
    """Put a resumed run's adapters back into a model that has fresh ones (nothing to do for a new run)."""
    if not adapters:
        return
    own = adapter_state(model)
    assert set(adapters) == set(own), "the checkpoint's adapters were checked against these (check_fits)"
    for name, tensor in adapters.items():
        own[name].copy_(tensor)


def trainable(model: nn.Module) -> tuple[int, int]:
    """(parameters that train, all parameters): with LoRA, the adapters out of the whole model."""
    params = list(model.parameters())  # the tied wte / lm_head matrix once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
