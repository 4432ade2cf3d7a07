"""Hugging Face formats: the folders transformers reads and writes (config.json, model.safetensors),
to and from our model settings and parameter names, one entry per architecture in ARCHITECTURES.

    settings = read_config(config_json, tensors, folder)  # their config.json -> our model settings
    state = from_hf(tensors, cfg, folder)                 # their tensors -> ours (checkpoint.load_weights)
    tensors = to_hf(state, cfg)                           # ours -> theirs (export.py --format hf)
    config_json = write_config(cfg, eot_token, "fp32")    # our settings -> their config.json

An entry says how config.json's keys map to ModelConfig's fields, which of our parameters is which of
theirs (one of ours may stack several of theirs by rows), and what its transformers class cannot hold.
Reading and writing use the same entry, so they cannot disagree; adding an architecture is adding one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from config import ARCHS, ModelConfig
from errors import UserError
from model import mlp_hidden

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # our names -> config.json's
GPT2_META = {"tokenizer": "bpe", "encoding": "gpt2", "eot_token": 50256, "vocab_size": 50257}  # the hub's GPT-2
EOT_TEXT = "<|endoftext|>"


class FormatError(UserError):
    """A Hugging Face folder we cannot read, or a model its class cannot hold; the message says why."""


@dataclass(frozen=True)
class Architecture:
    """How one transformers architecture maps to ours."""
    model_type: str                       # config.json's "model_type"
    hf_class: str                         # the transformers class that loads it
    config_names: dict[str, str]          # our ModelConfig field -> its config.json key, for plain copies
    read_extra: Callable[[dict, dict, Path], dict]  # (config.json, tensors, folder) -> the other settings
    write_extra: Callable[[ModelConfig], dict]      # our settings -> the other config.json keys
    names: Callable[[ModelConfig], dict[str, list[str]]]  # our parameter -> theirs, stacked by rows
    fixed: dict = field(default_factory=dict)  # model settings its class has no other value for
    transposed: tuple[str, ...] = ()      # our parameters it stores transposed (GPT-2's Conv1D: (in, out))
    always_biased: bool = False           # its class always has biases: ours without are written as zeros
    ignored: tuple[str, ...] = ()         # tensors in its files that are not weights (old buffers)
    prefix: str = ""                      # a prefix of the names that some of its files leave out


# ----------------------------------------------------------------------------- GPT-2

def gpt2_read(hf: dict, tensors: dict, folder: Path) -> dict:
    problems = [f"{k} = {hf.get(k)!r} (we support {ok!r})" for k, ok in (
        ("activation_function", "gelu_new"), ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False)) if hf.get(k, ok) != ok]
    if problems:
        raise FormatError(f"{folder}: this GPT-2 variant cannot be loaded: {'; '.join(problems)}")
    return {"bias": True, "mlp_hidden": hf.get("n_inner") or 0}  # n_inner None: 4 * n_embd


def gpt2_write(cfg: ModelConfig) -> dict:
    return {"n_ctx": cfg.block_size, "n_inner": cfg.mlp_hidden or None, "activation_function": "gelu_new",
            "embd_pdrop": cfg.dropout}


def gpt2_names(cfg: ModelConfig) -> dict[str, list[str]]:
    """GPT-2's names are ours: we kept its layout (model.py)."""
    kinds = ("weight", "bias") if cfg.bias else ("weight",)
    names = ["transformer.wte.weight", *(f"transformer.ln_f.{k}" for k in kinds)]
    names += ["transformer.wpe.weight"] if cfg.position == "learned" else []
    names += [] if cfg.tie_embeddings else ["lm_head.weight"]
    for i in range(cfg.n_layer):
        names += [f"transformer.h.{i}.{layer}.{k}" for layer in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2",
                                                                 "mlp.c_fc", "mlp.c_proj") for k in kinds]
    return {name: [name] for name in names}


# ----------------------------------------------------------------------------- Llama

def llama_read(hf: dict, tensors: dict, folder: Path) -> dict:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers >= 5, or 4
    heads, kv_heads = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
    head_dim, rope_type = hf.get("head_dim"), rope.get("rope_type", rope.get("type", "default"))
    problems = [f"{k} = {v!r} ({why})" for k, v, bad, why in (
        ("num_key_value_heads", kv_heads, kv_heads not in (None, heads), "grouped-query attention"),
        ("hidden_act", hf.get("hidden_act"), hf.get("hidden_act", "silu") != "silu", "we support 'silu'"),
        ("rope_type", rope_type, rope_type != "default", "scaled rotary embeddings"),
        ("head_dim", head_dim, head_dim not in (None, hf.get("hidden_size", 0) // (heads or 1)),
         "we support hidden_size / num_attention_heads"),
        ("mlp_bias", hf.get("mlp_bias"), bool(hf.get("mlp_bias")) != bool(hf.get("attention_bias")),
         "we support biases everywhere or nowhere: attention_bias = mlp_bias")) if bad]
    if problems:
        raise FormatError(f"{folder}: this Llama variant cannot be loaded: {'; '.join(problems)}")
    return {"arch": "llama", **ARCHS["llama"], "dropout": 0.0, "bias": bool(hf.get("attention_bias")),
            "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 1e4))),
            # A file without the setting: its weights say (transformers leaves a tied lm_head out).
            "tie_embeddings": hf.get("tie_word_embeddings", "lm_head.weight" not in tensors)}


def llama_write(cfg: ModelConfig) -> dict:
    return {"intermediate_size": mlp_hidden(cfg), "num_key_value_heads": cfg.n_head,
            "head_dim": cfg.head_size(), "hidden_act": "silu",
            # rope_parameters: transformers >= 5; rope_theta: earlier versions
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "rope_theta": cfg.rope_theta, "attention_bias": cfg.bias, "mlp_bias": cfg.bias}


def llama_names(cfg: ModelConfig) -> dict[str, list[str]]:
    """Our c_attn holds q, k and v stacked by rows, and c_fc the gate and up projections: each is 3
    (or 2) of LlamaForCausalLM's matrices. Both use the same rotary pairs (channel i with i + hd/2,
    see model.RotaryEmbedding), so no weight needs reordering."""
    names = {"transformer.wte.weight": ["model.embed_tokens.weight"], "transformer.ln_f.weight": ["model.norm.weight"]}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = ["lm_head.weight"]
    for i in range(cfg.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        names[ours + "ln_1.weight"] = [theirs + "input_layernorm.weight"]
        names[ours + "ln_2.weight"] = [theirs + "post_attention_layernorm.weight"]
        for kind in ("weight", "bias") if cfg.bias else ("weight",):  # bias: attention_bias and mlp_bias
            names[f"{ours}attn.c_attn.{kind}"] = [f"{theirs}self_attn.{p}_proj.{kind}" for p in "qkv"]
            names[f"{ours}attn.c_proj.{kind}"] = [f"{theirs}self_attn.o_proj.{kind}"]
            names[f"{ours}mlp.c_fc.{kind}"] = [f"{theirs}mlp.{p}_proj.{kind}" for p in ("gate", "up")]
            names[f"{ours}mlp.c_proj.{kind}"] = [f"{theirs}mlp.down_proj.{kind}"]
    return names


# ----------------------------------------------------------------------------- the table

ARCHITECTURES = {
    "gpt2": Architecture(
        "gpt2", "GPT2LMHeadModel",
        {"n_layer": "n_layer", "n_head": "n_head", "n_embd": "n_embd", "block_size": "n_positions",
         "dropout": "resid_pdrop", "attn_dropout": "attn_pdrop", "norm_eps": "layer_norm_epsilon"},
        gpt2_read, gpt2_write, gpt2_names, fixed=ARCHS["gpt2"] | {"qk_norm": False, "logit_softcap": 0.0},
        transposed=("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"),
        always_biased=True, ignored=(".attn.bias", ".attn.masked_bias"),  # old files keep the causal mask
        prefix="transformer."),  # the hub's GPT-2 files: h.0.attn..., wte.weight
    "llama": Architecture(
        "llama", "LlamaForCausalLM",
        {"n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "n_embd": "hidden_size",
         "block_size": "max_position_embeddings", "mlp_hidden": "intermediate_size", "norm_eps": "rms_norm_eps",
         "attn_dropout": "attention_dropout"},
        llama_read, llama_write, llama_names, fixed=ARCHS["llama"] | {"qk_norm": False, "logit_softcap": 0.0},
        ignored=("rotary_emb.inv_freq",)),  # old files keep the rotary table
}
COMMON = {"vocab_size": "vocab_size", "tie_embeddings": "tie_word_embeddings"}  # the same key in every entry


def architecture_of(cfg: ModelConfig) -> Architecture:
    """The entry a model exports as: the one for its model.arch."""
    return ARCHITECTURES[cfg.arch]


# ----------------------------------------------------------------------------- reading

def read_config(hf: dict, tensors: dict, folder: Path) -> dict:
    """Our model settings from a config.json that transformers wrote (or anyone else)."""
    arch = ARCHITECTURES[hf["model_type"]]
    names = arch.config_names | COMMON
    return {ours: hf[theirs] for ours, theirs in names.items() if theirs in hf} | arch.read_extra(hf, tensors, folder)


def from_hf(tensors: dict, cfg: ModelConfig, folder: Path) -> dict:
    """Their state dict -> ours, for `cfg` (a tied lm_head is wte; the vocabulary padded again)."""
    arch = architecture_of(cfg)
    tensors = {k if k.startswith((arch.prefix, "lm_head.")) else arch.prefix + k: v
               for k, v in tensors.items() if not k.endswith(arch.ignored)
               and not (k == "lm_head.weight" and cfg.tie_embeddings)}  # some files store a tied lm_head anyway
    if arch.always_biased and not cfg.bias:  # our export of a model without biases: zeros, nothing else
        biases = {k for k in tensors if k.endswith(".bias")}
        if any(tensors[k].any() for k in biases):
            raise FormatError(f"{folder} has non-zero biases but model.bias = false in its config")
        tensors = {k: v for k, v in tensors.items() if k not in biases}
    names = arch.names(cfg)
    unknown = sorted(set(tensors) - {t for theirs in names.values() for t in theirs})
    if unknown:
        raise FormatError(f"{folder} has weights that a {arch.hf_class} with these settings does not have "
                          f"({', '.join(unknown[:3])}); it is another variant of the model")
    out = {}
    for ours, theirs in names.items():
        if all(t in tensors for t in theirs):  # anything missing is named by checkpoint.check_fits
            parts = [tensors[t].t() if ours.endswith(arch.transposed) and tensors[t].dim() == 2 else tensors[t]
                     for t in theirs]
            out[ours] = torch.cat(parts)
    return pad_vocab(out, cfg)


def pad_vocab(state: dict, cfg: ModelConfig) -> dict:
    """Add back the padding rows (never used) that exports leave out, and tie lm_head to wte again."""
    for name in ("transformer.wte.weight", "lm_head.weight"):
        w = state.get(name)
        if w is not None and w.dim() == 2:
            state[name] = torch.cat([w, w.new_zeros((max(cfg.padded_vocab_size() - len(w), 0), w.size(1)))])
    if cfg.tie_embeddings and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def check_counts(tensors: dict, cfg: ModelConfig, folder: Path) -> list[str]:
    """A folder's layer count and vocabulary from its config.json, against its tensors (their names and
    the embedding's rows): what disagrees, before anything is built from a damaged or hostile config."""
    layers = {m.group(1) for k in tensors if (m := re.match(r"(?:.*\.)?(?:h|layers)\.(\d+)\.", k))}
    embedding = next((v for k, v in tensors.items() if k.endswith(("wte.weight", "embed_tokens.weight"))), None)
    wrong = [f"model.n_layer = {cfg.n_layer} but the weights have {len(layers)}"] if cfg.n_layer != len(layers) else []
    if embedding is not None and len(embedding) not in (cfg.vocab_size, cfg.padded_vocab_size()):
        wrong.append(f"model.vocab_size = {cfg.vocab_size} but the weights have {len(embedding)}")
    return wrong


# ----------------------------------------------------------------------------- writing

def check_exportable(cfg: ModelConfig) -> None:
    """Refuse a model that its architecture's transformers class cannot hold, naming each setting."""
    arch = architecture_of(cfg)
    wrong = [f"model.{k} = {json.dumps(getattr(cfg, k))}" for k, v in arch.fixed.items()
             if k != "bias" and getattr(cfg, k) != v]  # with biases or without, both export
    if wrong:
        raise FormatError(f"--format hf: transformers' {arch.hf_class} (model.arch = {json.dumps(cfg.arch)}) has "
                          f"no {', '.join(wrong)}; export with --format native, which keeps every setting")


def to_hf(state: dict, cfg: ModelConfig) -> dict:
    """Our state dict -> theirs, without the vocabulary's padding rows; a tied lm_head stored once."""
    arch = architecture_of(cfg)
    state = {k: v[:cfg.vocab_size] if k in ("transformer.wte.weight", "lm_head.weight") else v
             for k, v in state.items() if not (k == "lm_head.weight" and cfg.tie_embeddings)}
    if arch.always_biased and not cfg.bias:  # no biases is the same model as zero biases: exact
        for name in [k for k in state if k.endswith(".weight") and (k.startswith("transformer.h.")
                                                                     or k == "transformer.ln_f.weight")]:
            state[name.removesuffix("weight") + "bias"] = state[name].new_zeros(state[name].shape[0])
        cfg = replace(cfg, bias=True)
    out = {}
    for ours, theirs in arch.names(cfg).items():
        for name, part in zip(theirs, state[ours].chunk(len(theirs))):
            out[name] = part.t() if ours.endswith(arch.transposed) else part
    return out


def write_config(cfg: ModelConfig, eot_token: int | None, dtype: str) -> dict:
    """Their config.json for our settings (export.py adds ours under "tinygpt")."""
    arch = architecture_of(cfg)
    names = arch.config_names | COMMON
    return {"model_type": arch.model_type, "architectures": [arch.hf_class],
            **{theirs: getattr(cfg, ours) for ours, theirs in names.items()}, **arch.write_extra(cfg),
            "bos_token_id": eot_token, "eos_token_id": eot_token, "torch_dtype": DTYPES[dtype]}


# ----------------------------------------------------------------------------- GPT-2's tokenizer files

def byte_to_char() -> dict[int, str]:
    """GPT-2's vocab.json/merges.txt spell every byte as a visible character: printable Latin-1
    bytes stand for themselves, the others (space, control bytes...) move to chr(256) and up."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(moved)}


def gpt2_tokenizer_files(enc) -> tuple[dict[str, int], list[str]]:
    """vocab.json and merges.txt from tiktoken's ranks. Token rank r was made by one merge of two
    tokens of lower rank; replaying BPE on its bytes with only those merges finds the pair."""
    ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i != enc.eot_token}
    char = byte_to_char()

    def spell(token: bytes) -> str:
        return "".join(char[b] for b in token)

    merges = [" ".join(map(spell, merge_of(token, rank, ranks)))
              for token, rank in sorted(ranks.items(), key=lambda item: item[1]) if len(token) > 1]
    return {spell(b): r for b, r in ranks.items()} | {EOT_TEXT: enc.eot_token}, merges


def merge_of(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two tokens whose merge made `token`: BPE on its bytes, using only lower ranks."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, i = min((ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
        if best >= rank:
            raise FormatError(f"token {token!r} is not the result of one merge; cannot write merges.txt")
        parts[i:i + 2] = [parts[i] + parts[i + 1]]  # merge the lowest-ranked adjacent pair
    return parts[0], parts[1]
