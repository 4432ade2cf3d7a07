"""Tiny models for the model and generation tests: a config, the Llama and every-switch variants, a batch."""

import pytest
import torch

from config import ARCHS, ModelConfig
from model import GPT


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: extra threads only add overhead, and they spin badly when other
    processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, dropout=0.0, vocab_size=37)
BACKENDS = ("eager", "sdpa", "flex")
# What model.arch = "llama" sets (config.ARCHS), and a model with every optional switch on top.
LLAMA = dict(arch="llama", **ARCHS["llama"])
EVERY_SWITCH = LLAMA | dict(qk_norm=True, logit_softcap=5.0, tie_embeddings=False, mlp="relu2")
ARCH_VARIANTS = pytest.mark.parametrize("variant", [{}, LLAMA, EVERY_SWITCH], ids=["gpt2", "llama", "switches"])


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**TINY, **overrides}))


def batch(B=3, T=16, V=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
