"""LoRA's products by hand (lora.LoRAProduct, FrozenProduct): autograd's gradients, and oneDNN's kernels on an
x86 CPU. Against transformers + PEFT on real model shapes: tests/test_real_models.py."""

import pytest
import torch
import torch.nn as nn

import lora
from config import ARCHS, LoraConfig, ModelConfig
from model import GPT
from tiny_models import TINY


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_the_written_out_backward_passes_give_autograds_gradients(dropout, onednn, monkeypatch):
    """LoRAProduct and FrozenProduct (the products by hand, oneDNN's on an x86 CPU or F.linear's) give the
    loss and gradients of F.linear and addmm under autograd: with biases, a layer stacking three
    projections, layers without adapters between adapted ones (FrozenLinear, as the lm_head), and
    dropout's own masks (the same seed)."""
    monkeypatch.setattr(lora, "ONEDNN", lora.ONEDNN and onednn)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY, arch="llama", **ARCHS["llama"], qkv_bias=True))
    lora.add_adapters(model, LoraConfig(rank=4, dropout=dropout, targets="attn.c_attn, mlp.c_proj"))
    assert type(model.lm_head) is lora.FrozenLinear and type(model.transformer.h[0].mlp.c_fc) is lora.FrozenLinear
    with torch.no_grad():
        for p in lora.adapter_state(model).values():
            p.normal_(0.0, 0.3)
    idx = torch.randint(37, (2, 16))
    runs = []
    for written_out in (True, False):
        monkeypatch.setattr(lora, "by_hand", lambda x, *frozen: written_out)
        torch.manual_seed(1)
        _, loss = model.train()(idx, idx)
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    (loss, grads), (their_loss, their_grads) = runs
    torch.testing.assert_close(loss, their_loss)
    assert grads.keys() == their_grads.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not lora.ONEDNN, reason="oneDNN's products are for x86 CPUs (torch built with oneDNN)")
def test_on_an_x86_cpu_the_frozen_weights_are_multiplied_by_onednn():
    """In a LoRA step in fp32 on the CPU, every product with a frozen weight goes to oneDNN
    (mkldnn._linear_pointwise), none to torch's default matmuls (MKL's)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = GPT(ModelConfig(**TINY, arch="llama", **ARCHS["llama"]))
    lora.add_adapters(model, LoraConfig(rank=4, targets="attn.c_attn"))
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters() if p.dim() == 2 and not p.requires_grad}
    calls = []

    class Products(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if any(t.untyped_storage().data_ptr() in frozen for t in tensors):
                calls.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    idx = torch.randint(37, (2, 16))
    with Products():
        model(idx, idx)[1].backward()
    products = [c for c in calls if c.endswith(("mm", "mm_", "linear", "matmul", "_linear_pointwise"))]
    assert len(products) > 10 and set(products) == {"mkldnn._linear_pointwise"}, calls


def test_autograd_computes_under_autocast_and_for_weights_that_train():
    """The products by hand are for frozen weights outside autocast; merge and remove leave plain nn.Linear
    layers, which compute as any nn.Linear again."""
    model = GPT(ModelConfig(**TINY))
    lora.add_adapters(model, LoraConfig(rank=4, targets="attn.c_attn"))
    layer, x = model.transformer.h[0].attn.c_attn, torch.randn(3, 16)
    assert lora.by_hand(x, layer.weight, layer.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not lora.by_hand(x, layer.weight, layer.bias)
    layer.bias.requires_grad_(True)
    assert not lora.by_hand(x, layer.weight, layer.bias)
    lora.merge(model)
    assert {type(m) for m in model.modules() if isinstance(m, nn.Linear)} == {nn.Linear}
    model.lm_head.weight.requires_grad_(True)  # a weight that trains again gets its gradient
    model(torch.randint(37, (2, 16)), torch.randint(37, (2, 16)))[1].backward()
    assert model.lm_head.weight.grad is not None
