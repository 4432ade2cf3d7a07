"""Tests for model.py: tiny models on CPU, each test well under a few seconds."""

import math

import pytest
import torch

import attention
import model as model_module
from config import ConfigError, ModelConfig, TrainingConfig
from model import GPT
from monitor import estimate_mfu, flops_per_token
from muon import make_optimizer
from runtime import checkpoint_activations
from tiny_models import ARCH_VARIANTS, BACKENDS, EVERY_SWITCH, LLAMA, TINY, batch, tiny
from tiny_models import one_thread  # noqa: F401 (this module's autouse fixture)

# Uncompiled flex_attention warns that it is unfused (slow); expected on CPU, irrelevant here.
pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")


def same_weights(backends, **overrides) -> dict:
    """One model per backend, all with the weights of the first."""
    models = {b: tiny(attention=b, **overrides) for b in backends}
    state = models[backends[0]].state_dict()
    for m in models.values():
        m.load_state_dict(state)
    return models


# Three documents packed into one row; the second row is one document of its own.
DOC_IDS = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [7] * 16, [3] * 9 + [4] * 7])


# ----------------------------------------------------------------------------- layout

def test_parameter_names_follow_gpt2_layout():
    expected = {"transformer.wte.weight", "transformer.wpe.weight",
                "transformer.ln_f.weight", "transformer.ln_f.bias"}
    for i in range(2):
        for sub in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            expected |= {f"transformer.h.{i}.{sub}.weight", f"transformer.h.{i}.{sub}.bias"}
    m = tiny()
    # lm_head.weight is the tied wte matrix: named once in parameters, present in the state_dict.
    assert {n for n, _ in m.named_parameters()} == expected
    assert set(m.state_dict()) == expected | {"lm_head.weight"}
    assert m.transformer.h[0].attn.c_attn.weight.shape == (3 * 16, 16)  # q, k, v stacked
    no_bias = {n for n, _ in tiny(bias=False).named_parameters()}
    assert no_bias == {n for n in expected if not n.endswith(".bias")}


def test_weights_are_tied():
    m = tiny()
    assert m.lm_head.weight is m.transformer.wte.weight
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()
    before = m.lm_head.weight.detach().clone()
    idx, targets = batch()
    _, loss = m(idx, targets)
    loss.backward()
    torch.optim.SGD(m.parameters(), lr=1.0).step()
    assert not torch.equal(m.lm_head.weight, before)
    assert torch.equal(m.lm_head.weight, m.transformer.wte.weight)


def test_initialisation_scales():
    m = tiny(n_layer=8, n_embd=64, n_head=4)
    assert m.transformer.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * 8)
    for name in ("attn", "mlp"):
        proj = getattr(m.transformer.h[3], name).c_proj.weight
        assert proj.std().item() == pytest.approx(residual_std, rel=0.05)
    assert torch.count_nonzero(m.transformer.h[0].mlp.c_fc.bias) == 0


def test_matches_huggingface_gpt2_logits():
    transformers = pytest.importorskip("transformers")
    m = tiny().eval()
    hf_cfg = transformers.GPT2Config(vocab_size=37, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     activation_function="gelu_new", layer_norm_epsilon=1e-5)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # weights far larger than at init, so activations reach GELU's curved part
        for p in m.parameters():
            p.normal_(0.0, 0.5)
    # The export is a rename (the GPT-2 layout already) plus a transpose of Linear weights,
    # because Hugging Face's GPT-2 stores them as Conv1D (in, out).
    converted = {k: (v.t() if k.endswith("weight") and any(s in k for s in ("c_attn", "c_proj", "c_fc"))
                     else v)
                 for k, v in m.state_dict().items()}
    missing, unexpected = hf.load_state_dict(converted, strict=False)
    assert not unexpected and all(".attn.bias" in k or "masked_bias" in k for k in missing)
    idx, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(m(idx)[0], hf(idx).logits, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- attention backends

@ARCH_VARIANTS
@pytest.mark.parametrize("use_docs", [False, True])
def test_backends_agree_on_forward(use_docs, variant):
    models = same_weights(BACKENDS, **variant)
    idx, targets = batch()
    doc_ids = DOC_IDS if use_docs else None
    with torch.no_grad():  # flex has no backward on CPU; its gradients are tested on CUDA below
        outs = {b: m(idx, targets, doc_ids=doc_ids) for b, m in models.items()}
    for b in ("sdpa", "flex"):
        torch.testing.assert_close(outs[b][0], outs["eager"][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outs[b][1], outs["eager"][1], atol=1e-5, rtol=1e-5)


def grads_of(m: GPT, idx, targets, doc_ids) -> dict:
    m.zero_grad()
    _, loss = m(idx, targets, doc_ids=doc_ids)
    loss.backward()
    return {n: p.grad.clone() for n, p in m.named_parameters()}


def assert_same_grads(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("autocast", [False, True])
def test_sdpa_on_a_cpu_computes_in_fp32(autocast):
    """sdpa_attention's bf16 inputs on a CPU go through the fp32 kernel (faster there, and more exact),
    under autocast too: the fp32 kernel's result rounded to bf16; the gradients reach the inputs."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)  # grouped-query
    q, k, v = (t.bfloat16().requires_grad_() for t in (q, k, v))
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True,
                                                                enable_gqa=True).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = attention.sdpa_attention(q, k, v, None, 0.0)
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)
    y.float().sum().backward()
    assert all(t.grad.dtype == torch.bfloat16 and t.grad.abs().sum() > 0 for t in (q, k, v))


@ARCH_VARIANTS
@pytest.mark.parametrize("use_docs", [False, True])
def test_eager_and_sdpa_agree_on_gradients(use_docs, variant):
    models = same_weights(("eager", "sdpa"), **variant)
    idx, targets = batch()
    doc_ids = DOC_IDS if use_docs else None
    assert_same_grads(*(grads_of(m, idx, targets, doc_ids) for m in models.values()))


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: FlexAttention has no backward pass on CPU in torch 2.13")
@ARCH_VARIANTS
@pytest.mark.parametrize("use_docs", [False, True])
def test_flex_gradients_match_sdpa_on_cuda(use_docs, variant):
    models = {b: m.cuda() for b, m in same_weights(("sdpa", "flex"), **variant).items()}
    idx, targets = (t.cuda() for t in batch())
    doc_ids = DOC_IDS.cuda() if use_docs else None
    assert_same_grads(*(grads_of(m, idx, targets, doc_ids) for m in models.values()))


@ARCH_VARIANTS
@pytest.mark.parametrize("backend", BACKENDS)
def test_document_mask_isolates_documents(backend, variant):
    m = tiny(attention=backend, **variant)
    idx, _ = batch()
    changed = idx.clone()
    changed[0, :5] = (changed[0, :5] + 1) % 37  # edit document 0 of row 0 only
    with torch.no_grad():
        before, _ = m(idx, doc_ids=DOC_IDS)
        after, _ = m(changed, doc_ids=DOC_IDS)
        plain_before, _ = m(idx)
        plain_after, _ = m(changed)
    torch.testing.assert_close(after[0, 5:], before[0, 5:], atol=1e-6, rtol=0)  # later docs unaffected
    assert not torch.allclose(after[0, :5], before[0, :5])
    assert not torch.allclose(plain_after[0, 5:], plain_before[0, 5:])  # without doc_ids they are


def test_flex_training_on_cpu_fails_loudly_or_matches():
    models = same_weights(("sdpa", "flex"))
    idx, targets = batch()
    try:
        flex_grads = grads_of(models["flex"], idx, targets, None)
    except ConfigError as err:  # torch 2.13: no flex backward on CPU
        assert 'model.attention = "sdpa" or "eager"' in str(err)
    else:  # a future torch may support it; then it must be right, not silently different
        assert_same_grads(flex_grads, grads_of(models["sdpa"], idx, targets, None))


def test_flex_unavailable_names_the_alternatives(monkeypatch):
    monkeypatch.setattr(attention, "flex_attention", None)
    with pytest.raises(ConfigError, match='model.attention = "sdpa" or "eager"'):
        tiny(attention="flex")


# ----------------------------------------------------------------------------- training behaviour

def test_initial_loss_is_near_uniform():
    m = tiny(vocab_size=65, n_embd=32, n_layer=2)
    idx, targets = batch(B=8, T=16, V=65)
    _, loss = m(idx, targets)
    assert abs(loss.item() - math.log(65)) < 0.15


def test_adamw_overfits_one_batch():
    m = tiny()
    idx, targets = batch(B=4, T=16)
    opt = make_optimizer(m, TrainingConfig(weight_decay=0.1, learning_rate=1e-2, beta2=0.99), "cpu")
    first = None
    for _ in range(40):
        _, loss = m(idx, targets)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m(idx, targets)[1].item() < 0.3 * first


def test_ignore_index_targets_are_skipped():
    m = tiny()
    idx, targets = batch()
    masked = targets.clone()
    masked[:, 8:] = -1
    _, loss = m(idx, masked)
    logits, _ = m(idx)
    expected = torch.nn.functional.cross_entropy(logits[:, :8].flatten(0, 1), targets[:, :8].flatten())
    torch.testing.assert_close(loss, expected)


def test_optimizer_decays_matrices_only():
    m = tiny()
    opt = make_optimizer(m, TrainingConfig(weight_decay=0.1, learning_rate=1e-3, beta2=0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_parameter_and_flop_counts():
    m = tiny()
    C, L, V, T = 16, 2, 37, 16
    per_block = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    expected = V * C + T * C + L * per_block + 2 * C  # wte counted once, lm_head is tied
    assert m.num_params() == expected
    assert m.num_params(non_embedding=True) == expected - T * C
    assert flops_per_token(m) == 6 * (expected - T * C) + 12 * L * C * T
    assert estimate_mfu(m, 1000.0, 1e9) == pytest.approx(flops_per_token(m) * 1000.0 / 1e9)


def count_weights(C, L, V, T, nh, H, *, position="learned", norm="layernorm", mlp="gelu", bias=True,
                  tie_embeddings=True, qk_norm=False, **_) -> tuple[int, int]:
    """(all parameters, non-embedding parameters), counted from the architecture on paper."""
    norm_size = 2 * C if norm == "layernorm" and bias else C  # LayerNorm has a bias; RMSNorm never
    mlp_in = 2 * H if mlp == "swiglu" else H  # swiglu: gate and up
    attention = 3 * C * C + C * C + (3 * C + C if bias else 0) + (2 * (C // nh) if qk_norm else 0)
    per_block = 2 * norm_size + attention + C * mlp_in + H * C + ((mlp_in + C) if bias else 0)
    lookups = (T * C if position == "learned" else 0) + (0 if tie_embeddings else V * C)
    total = V * C + (0 if tie_embeddings else V * C) + (T * C if position == "learned" else 0) + \
        L * per_block + norm_size
    return total, total - lookups


COMBINATIONS = [{}, dict(bias=False), LLAMA, LLAMA | dict(tie_embeddings=False), EVERY_SWITCH,
                dict(mlp="swiglu", qk_norm=True, n_embd=24, n_head=3), LLAMA | dict(bias=True, mlp_hidden=20),
                dict(position="rope", mlp="relu2", tie_embeddings=False)]


@pytest.mark.parametrize("overrides", COMBINATIONS)
def test_parameter_and_flop_counts_for_every_combination(overrides):
    """num_params against a count on paper, and flops_per_token against the matrix multiplications
    that torch's own FLOP counter sees in a forward and backward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    m = tiny(attention="eager", **overrides)  # eager: attention is plain matmuls, which the counter sees
    cfg = m.config
    H = model_module.mlp_hidden(cfg)
    # swiglu: 8/3 * C rounded up to a multiple of 8 (42.7 -> 48; 64 is one already)
    expected_width = {("swiglu", 16): 48, ("swiglu", 24): 64}.get((cfg.mlp, cfg.n_embd), 4 * cfg.n_embd)
    assert H == (cfg.mlp_hidden or expected_width)
    total, non_embedding = count_weights(cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.block_size, cfg.n_head, H,
                                         **vars(cfg))
    assert m.num_params() == total and m.num_params(non_embedding=True) == non_embedding
    idx, targets = batch(B=2, T=cfg.block_size)
    with FlopCounterMode(display=False) as counter:
        m(idx, targets)[1].backward()
    C, L, T = cfg.n_embd, cfg.n_layer, cfg.block_size
    matrices = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    assert counter.get_total_flops() == 2 * T * (6 * matrices + 12 * L * C * T)  # B * T tokens
    # The estimate also counts 6 FLOPs per bias and norm gain (element-wise, not matmuls).
    small = sum(p.numel() for n, p in m.named_parameters() if p.dim() == 1)
    assert flops_per_token(m) == 6 * (matrices + small) + 12 * L * C * T


def test_llama_layout():
    m = tiny(**LLAMA)
    names = {n for n, _ in m.named_parameters()}
    assert not any(n.endswith(".bias") for n in names) and "transformer.wpe.weight" not in names
    assert m.transformer.h[0].ln_1.weight.shape == (16,) and isinstance(m.transformer.ln_f, model_module.RMSNorm)
    assert m.transformer.h[0].mlp.c_fc.weight.shape == (2 * 48, 16)  # gate and up, 8/3 * 16 rounded up to 48
    assert m.rotary.cos.shape == (16, 4) and not any("rotary" in k for k in m.state_dict())  # not stored
    assert m.lm_head.weight is m.transformer.wte.weight
    untied = tiny(**LLAMA, tie_embeddings=False, qk_norm=True)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert "lm_head.weight" in {n for n, _ in untied.named_parameters()}
    assert untied.transformer.h[1].attn.q_norm.weight.shape == (8,)  # one gain per channel of a head


def test_rotary_scores_depend_on_distance_only():
    """What rope is for: q . k after rotation depends on how far apart two positions are, not where."""
    rotary = model_module.RotaryEmbedding(ModelConfig(n_head=1, n_embd=8, block_size=32, position="rope"))
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(pq, pk):
        qr = model_module.apply_rotary(q, *rotary(torch.tensor([pq])))
        kr = model_module.apply_rotary(k, *rotary(torch.tensor([pk])))
        return (qr * kr).sum().item()
    assert score(5, 2) == pytest.approx(score(20, 17), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)
    assert torch.equal(model_module.apply_rotary(q, *rotary(torch.tensor([0]))), q)  # position 0: no turn


def test_soft_cap_bounds_the_logits_and_keeps_their_order():
    plain, capped = tiny(), tiny(logit_softcap=2.0)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0.0, 0.5)  # large logits
        capped.load_state_dict(plain.state_dict())
        idx, _ = batch()
        a, b = plain(idx)[0], capped(idx)[0]
    assert a.abs().max() > 2 and b.abs().max() < 2
    assert torch.equal(a.argsort(-1), b.argsort(-1))


def test_padded_vocab():
    m = tiny(vocab_size=37, pad_vocab_multiple=8)
    assert m.config.padded_vocab_size() == 40 and m.transformer.wte.weight.shape == (40, 16)
    idx, targets = batch()
    logits, loss = m(idx, targets)
    assert logits.shape == (3, 16, 37) and torch.isfinite(loss)
    other = GPT(ModelConfig(**{**TINY, "pad_vocab_multiple": 8}))
    other.load_state_dict(m.state_dict())
    assert other.lm_head.weight is other.transformer.wte.weight  # loading keeps the tie
    with torch.no_grad():
        torch.testing.assert_close(other(idx)[0], logits.detach())
    assert tiny(vocab_size=40, pad_vocab_multiple=8).transformer.wte.weight.shape == (40, 16)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("overrides, fragments", [
    (dict(n_embd=30, n_head=4), ["model.n_embd", "model.n_head"]),
    (dict(attention="foo"), ["model.attention = 'foo'", "eager, sdpa, flex"]),
    (dict(vocab_size=0), ["model.vocab_size"]),
    (dict(n_layer=0), ["model.n_layer"]),
    (dict(block_size=-1, attention="bar"), ["model.block_size", "model.attention", "\n"]),
    (dict(LLAMA, n_embd=20, n_head=4), ['model.position = "rope" needs an even head size', "model.n_embd",
                                        "model.n_head", "= 20 / 4 = 5"]),
    (dict(LLAMA, n_embd=15, n_head=3, rope_theta=0.0, mlp="swish"),
     ["even head size", "model.rope_theta = 0.0 must be greater than 0", "model.mlp = 'swish' is not one of"]),
])
def test_bad_config_is_refused(overrides, fragments):
    """A config that cannot build a model is a user's mistake: the project's error, naming the fields."""
    with pytest.raises(ConfigError) as info:
        tiny(**overrides)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_bad_input_is_refused():
    m = tiny()
    with pytest.raises(ValueError, match=r"T=17 exceeds model.block_size=16"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token id 37 is outside the vocabulary \[0, 37\).*model.vocab_size"):
        m(torch.tensor([[1, 37]]))
    with pytest.raises(ValueError, match=r"token id -2 is outside"):
        m(torch.tensor([[-2, 3]]))
    with pytest.raises(ValueError, match="doc_ids"):
        m(torch.zeros(1, 4, dtype=torch.long), doc_ids=torch.zeros(1, 5, dtype=torch.long))


# ----------------------------------------------------------------------------- activation checkpointing

@ARCH_VARIANTS
def test_activation_checkpointing_gives_the_same_loss_and_gradients(variant):
    """Recomputing each block in the backward pass changes no number, with dropout on: the replay draws
    the masks the forward drew (torch.utils.checkpoint restores the RNG state for it). And the blocks
    do run twice with it: once in the forward pass, once in the backward."""
    x, y = batch()

    def loss_and_grads(checkpointing: bool, seed: int = 5) -> tuple[torch.Tensor, dict, int]:
        model = tiny(dropout=0.2, attn_dropout=0.1, **variant)  # the same weights each time
        if checkpointing:
            checkpoint_activations(model)
        calls = []
        for block in model.transformer.h:  # what a block calls runs again when the backward pass replays it
            block.attn.register_forward_pre_hook(lambda *_: calls.append(1))
        torch.manual_seed(seed)  # the dropout masks
        _, loss = model(x, y)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls)

    (loss, grads, calls), (loss_ac, grads_ac, calls_ac) = loss_and_grads(False), loss_and_grads(True)
    assert (calls, calls_ac) == (TINY["n_layer"], 2 * TINY["n_layer"])
    # The same operations on the same numbers, in the same order: equal up to float rounding at most.
    assert torch.allclose(loss, loss_ac, rtol=1e-6, atol=0)
    for name in grads:
        assert torch.allclose(grads[name], grads_ac[name], rtol=1e-5, atol=1e-7), name
    other_masks = loss_and_grads(True, seed=6)[1]  # dropout does change the result
    assert not all(torch.allclose(grads[n], other_masks[n], rtol=1e-3, atol=1e-6) for n in grads)
