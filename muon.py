"""The optimizers: AdamW with its parameter groups, or Muon for the hidden weight matrices and AdamW
for everything else, in one optimizer.

    optimizer = make_optimizer(model, cfg.training, "cpu")   # training.optimizer: adamw or muon

Muon ("MomentUm Orthogonalized by Newton-Schulz") keeps SGD momentum for each matrix,
then replaces the update by the nearest semi-orthogonal matrix: the U V^T of its SVD,
approximated with a few Newton-Schulz iterations. Every direction of the update then
moves by the same amount, instead of a few dominant directions taking most of the
step, which lets small models learn in fewer steps. Embeddings, the output head (tied
to the embedding here), biases and norm gains keep AdamW, as Muon is meant for the
matrices inside the blocks.

    python train.py --config configs/cpu/speedrun.toml     # uses training.optimizer = "muon"
"""

from __future__ import annotations

import math

import torch

from config import TrainingConfig


def make_optimizer(model: torch.nn.Module, t: TrainingConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices and embeddings (dim >= 2) only: decaying biases and
    norm gains towards 0 would fight their job of shifting and scaling activations.
    t.optimizer = "muon": the matrices inside the blocks get Muon instead.
    A group's "lr_scale" is its learning rate relative to the schedule's (train.py sets each step's).
    Frozen weights (requires_grad False) are left out. With LoRA (lora.py) that leaves only the
    adapters' A and B: matrices, so they are decayed, which pulls B A, the change made to the
    pretrained model, towards 0: towards the pretrained weights, not towards zero weights."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    matrices = [p for _, p in params if p.dim() >= 2]
    others = {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0}
    betas = (t.beta1, t.beta2)
    if t.optimizer == "muon":
        hidden = [p for n, p in params if n.startswith("transformer.h.") and p.dim() == 2]
        ids = {id(p) for p in hidden}
        groups = [{"params": hidden, "use_muon": True, "weight_decay": t.weight_decay,
                   "lr_scale": t.muon_lr / t.learning_rate},
                  {"params": [p for p in matrices if id(p) not in ids], "weight_decay": t.weight_decay}, others]
        return MuonAdamW(groups, lr=t.learning_rate, betas=betas)
    groups = [{"params": matrices, "weight_decay": t.weight_decay}, others]
    # The fused kernel updates all tensors in one pass; it exists on CUDA and, in torch 2.13, on CPU.
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """An approximation of U V^T, where g = U S V^T, by a quintic Newton-Schulz iteration.

    Each iteration maps every singular value s of x to a*s + b*s^3 + c*s^5, which pushes
    all of them (after scaling g so they are at most 1) towards 1, while U and V stay.
    These coefficients trade exactness for speed: the values land near 1, not on it.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + 1e-7)  # singular values now at most 1
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T  # iterate on the wide orientation: x @ x.T is then the smaller product
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class MuonAdamW(torch.optim.Optimizer):
    """Param groups with use_muon=True get Muon, the others AdamW (decoupled weight decay)."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.99),
                 momentum: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.0):
        defaults = dict(lr=lr, betas=betas, momentum=momentum, eps=eps, weight_decay=weight_decay,
                        use_muon=False)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["use_muon"]:
                    self._muon_update(p, group)
                else:
                    self._adamw_update(p, group)

    def _muon_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(p.grad)
        update = p.grad.add(buf, alpha=group["momentum"])  # Nesterov: look one step ahead
        # Scale so that a (rows, cols) matrix's update has a size independent of its shape.
        update = orthogonalize(update) * math.sqrt(max(1.0, p.size(0) / p.size(1)))
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update, alpha=-group["lr"])

    def _adamw_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros(())
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = state["step"].item()
        state["exp_avg"].lerp_(p.grad, 1 - beta1)                       # running mean of g
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)  # of g^2
        denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** t))
