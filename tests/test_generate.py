"""Tests for generate.py and the model's generation path (KV cache, decode layout): tiny models on CPU."""

import pytest
import torch

import attention
import generate as generate_module
import model as model_module
from config import ConfigError
from generate import generate, generate_stream
from model import GPT
from tiny_models import ARCH_VARIANTS, BACKENDS, batch, tiny
from tiny_models import one_thread  # noqa: F401 (this module's autouse fixture)


@ARCH_VARIANTS
@pytest.mark.parametrize("backend", BACKENDS)  # the cached path uses sdpa whatever the backend
@pytest.mark.parametrize("prompt_len", [3, 20])  # 20 > block_size: the prompt itself is cropped
def test_kv_cache_greedy_equals_no_cache(prompt_len, backend, variant):
    m = tiny(attention=backend, **variant).eval()
    prompt = torch.randint(0, 37, (2, prompt_len), generator=torch.Generator().manual_seed(3))
    n_new = 30  # runs well past block_size = 16, through the crop-and-re-prefill path
    cached = generate(m, prompt, n_new, temperature=0)
    uncached = generate(m, prompt, n_new, temperature=0, use_cache=False)
    assert cached.shape == (2, prompt_len + n_new)
    assert torch.equal(cached[:, :prompt_len], prompt)
    assert torch.equal(cached, uncached)


@ARCH_VARIANTS
def test_kv_cache_logits_match_full_forward(variant):
    """Positions continue past the prompt: tokens 6..9 fed one at a time get positions 6..9 (the
    learned table's rows, or rotary angles), exactly as in one forward over all ten."""
    m = tiny(**variant).eval()
    idx, _ = batch(B=2, T=10)
    caches = [attention.KVCache(16) for _ in range(2)]
    with torch.no_grad():
        full, _ = m(idx)
        prefill = m(idx[:, :6], caches=caches)[0]
        steps = [m(idx[:, t:t + 1], caches=caches)[0] for t in range(6, 10)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, atol=1e-5, rtol=1e-5)


@ARCH_VARIANTS
def test_decode_layout_keeps_the_matrices_and_their_results(variant, monkeypatch):
    """decode_layout stores each Linear weight transposed in memory: the same (out, in) matrices to
    every reader, a tied lm_head still wte, and the same logits and greedy tokens as before (one
    sequence, so its decode steps are split over two threads)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    m = tiny(**variant).eval()
    idx, _ = batch(B=2, T=10)
    state = {name: t.clone() for name, t in m.state_dict().items()}
    with torch.no_grad():
        before = m(idx)[0]
    tokens = generate(m, idx[:1, :3], 20, temperature=0)
    assert m.decode_layout() is m
    for name, t in m.state_dict().items():
        assert torch.equal(t, state[name]), name
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    assert all(type(mod) is model_module.DecodeLinear for mod in linears)
    assert all(mod.weight.stride() == (1, mod.weight.size(0)) for mod in linears)  # (out, in) read column by column
    assert (m.lm_head.weight is m.transformer.wte.weight) == m.config.tie_embeddings
    with torch.no_grad():
        torch.testing.assert_close(m(idx)[0], before, atol=1e-5, rtol=1e-5)
    assert torch.equal(generate(m, idx[:1, :3], 20, temperature=0), tokens)


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_decode_linear_splits_one_row_over_the_threads(threads, bias, monkeypatch):
    """After decode_layout, a one-row product is cut into one block of input channels per thread (one bmm
    over `threads` blocks) and gives what F.linear gives; more rows, one thread, or a width the threads
    do not divide (20 by 3) go to F.linear as they are."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    batch_sizes, real_bmm = [], torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: batch_sizes.append(a.size(0)) or real_bmm(a, b))
    for in_features in (24, 20):
        layer = torch.nn.Linear(in_features, 40, bias=bias)
        w, b = layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone()
        GPT.decode_layout(torch.nn.Sequential(layer))
        assert type(layer) is model_module.DecodeLinear
        for x in (torch.randn(1, 1, in_features), torch.randn(1, in_features), torch.randn(2, 3, in_features)):
            batch_sizes.clear()
            with torch.no_grad():
                torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5)
            split = x.numel() == in_features and threads > 1 and in_features % threads == 0
            assert batch_sizes == ([threads] if split else [])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts as for F.linear
            x = torch.randn(1, in_features)
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, b), atol=0, rtol=0)
        assert batch_sizes == ([threads] if split else [])  # no new bmm


def test_generate_stream_yields_each_token():
    m = tiny().eval()
    prompt, _ = batch(B=2, T=4)
    new = list(generate_stream(m, prompt, 5, temperature=0))
    assert len(new) == 5 and all(t.shape == (2, 1) for t in new)
    assert torch.equal(torch.cat([prompt, *new], dim=1), generate(m, prompt, 5, temperature=0))


def sample(m, seed, **kw):
    prompt = torch.zeros(1, 1, dtype=torch.long)
    return generate(m, prompt, 30, generator=torch.Generator().manual_seed(seed), **kw)


def test_seeded_sampling_is_reproducible():
    m = tiny().eval()
    assert torch.equal(sample(m, 42), sample(m, 42))
    assert not torch.equal(sample(m, 42), sample(m, 43))


def test_top_k_1_and_tiny_top_p_are_greedy():
    m = tiny().eval()
    greedy = sample(m, 0, temperature=0)
    assert not torch.equal(sample(m, 0), greedy)  # plain sampling differs, so the test can fail
    assert torch.equal(sample(m, 0, top_k=1), greedy)
    assert torch.equal(sample(m, 0, top_p=1e-6), greedy)


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = generate_module.top_p_filter(logits, 0.75).isfinite()
    assert kept.tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("kw", [dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_arguments(kw):
    with pytest.raises(ConfigError):
        generate(tiny(), torch.zeros(1, 1, dtype=torch.long), 1, **kw)
