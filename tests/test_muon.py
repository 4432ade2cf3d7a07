"""muon.py: orthogonalization, the AdamW half against torch's AdamW, and training with it."""

import torch

from config import ModelConfig, TrainingConfig
from model import GPT
from muon import MuonAdamW, make_optimizer, orthogonalize


def test_orthogonalize_approximates_u_v_transpose():
    torch.manual_seed(0)
    for shape in ((64, 32), (32, 64), (48, 48)):
        g = torch.randn(shape)
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        o = orthogonalize(g)
        assert o.shape == g.shape
        sv = torch.linalg.svdvals(o)
        assert sv.min() > 0.5 and sv.max() < 1.3  # every direction gets a similar step
        cos = (o * (u @ vh)).sum() / (o.norm() * (u @ vh).norm())
        assert cos > 0.95


def test_adamw_half_matches_torch_adamw():
    torch.manual_seed(0)
    w1 = torch.randn(10, 5, requires_grad=True)
    w2 = w1.detach().clone().requires_grad_(True)
    ours = MuonAdamW([{"params": [w1], "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.99))
    ref = torch.optim.AdamW([w2], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    for step in range(5):
        g = torch.randn(10, 5)
        for w, opt in ((w1, ours), (w2, ref)):
            w.grad = g.clone()
            opt.step()
    torch.testing.assert_close(w1, w2, atol=1e-6, rtol=1e-5)


def test_muon_groups_and_a_training_run():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=20, dropout=0.0))
    opt = make_optimizer(model, TrainingConfig(weight_decay=0.0, learning_rate=1e-2, optimizer="muon", muon_lr=0.05),
                         "cpu")
    muon_params = {id(p) for g in opt.param_groups if g.get("use_muon") for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon_params}
    assert names == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert [g["lr_scale"] for g in opt.param_groups if g.get("use_muon")] == [5.0]
    x = torch.randint(20, (8, 16))
    losses = []
    for _ in range(30):
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
