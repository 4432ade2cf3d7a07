"""Hugging Face formats: the folders transformers reads and writes (config.json, model.safetensors),
to and from our model settings and parameter names, one entry per architecture in ARCHITECTURES.

    settings = read_config(config_json, shapes, where)      # their config.json -> our model settings
    state = from_hf(get, shapes, cfg, folder)               # their tensors -> ours (checkpoint.load_weights)
    tensors = to_hf(state, cfg)                             # ours -> theirs (export.py --format hf)
    config_json = write_config(cfg, eot_token, "fp32")      # our settings -> their config.json

An entry says how config.json's keys map to ModelConfig's fields, which of our parameters is which of
theirs (our c_attn stacks their q, k and v projections by rows), and what its transformers class
cannot hold. Reading and writing use the same entry, so they cannot disagree; adding an architecture is
adding one. Llama, Qwen2 and Qwen3 share one layout (llama_names): Qwen2 adds biases to q, k and v
(model.qkv_bias), Qwen3 an RMSNorm on each head's queries and keys (model.qk_norm).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from checks import hf_config_problems
from config import ARCHS, ModelConfig
from tokenizer import EOT_TEXT
from errors import UserError
from model import mlp_hidden

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # our names -> config.json's
GPT2_META = {"tokenizer": "bpe", "encoding": "gpt2", "eot_token": 50256, "vocab_size": 50257}  # the hub's GPT-2
# Architectures we know and cannot run, and why, so that the refusal says so.
UNSUPPORTED = {"mixtral": "mixture of experts", "qwen2_moe": "mixture of experts", "qwen3_moe": "mixture of experts",
               "mistral": "sliding-window attention", "gemma": "Gemma's own layout", "gemma2": "Gemma's own layout",
               "gemma3": "Gemma's own layout", "phi": "Phi's own layout", "phi3": "Phi's own layout"}
Names = dict[str, list[tuple[str, int | None]]]  # our parameter -> [(their name, rows of ours it takes)]


class FormatError(UserError):
    """A Hugging Face folder we cannot read, or a model its class cannot hold; the message says why."""


@dataclass(frozen=True)
class Architecture:
    """How one transformers architecture maps to ours."""
    model_type: str                       # config.json's "model_type"
    hf_class: str                         # the transformers class that loads it
    config_names: dict[str, str]          # our ModelConfig field -> its config.json key, for plain copies
    read_extra: Callable[[dict, dict, Path], dict]  # (config.json, tensor shapes, its path) -> the other settings
    write_extra: Callable[[ModelConfig], dict]      # our settings -> the other config.json keys
    names: Callable[[ModelConfig], Names]  # our parameter -> theirs, stacked by rows
    fixed: dict = field(default_factory=dict)  # model settings its class has no other value for
    transposed: tuple[str, ...] = ()      # our parameters it stores transposed (GPT-2's Conv1D: (in, out))
    always_biased: bool = False           # its class always has biases: ours without are written as zeros
    ignored: tuple[str, ...] = ()         # tensors in its files that are not weights (old buffers)
    prefix: str = ""                      # a prefix of the names that some of its files leave out
    required: tuple[str, ...] = ()        # config.json keys without which its shapes are unknown
    defaults: dict = field(default_factory=dict)  # its transformers class's values for keys left out


def whole(*names: str) -> Names:
    """Parameters with the same name on both sides, not split."""
    return {name: [(name, None)] for name in names}


# ----------------------------------------------------------------------------- GPT-2

def gpt2_read(hf: dict, shapes: dict, where: Path) -> dict:
    problems = [f"{k} = {hf.get(k)!r} (we support {ok!r})" for k, ok in (
        ("activation_function", "gelu_new"), ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False)) if hf.get(k, ok) != ok]
    if problems:
        raise FormatError(f"{where}: this GPT-2 variant cannot be loaded: {'; '.join(problems)}")
    return {"bias": True, "mlp_hidden": hf.get("n_inner") or 0}  # n_inner None: 4 * n_embd


def gpt2_write(cfg: ModelConfig) -> dict:
    return {"n_ctx": cfg.block_size, "n_inner": cfg.mlp_hidden or None, "activation_function": "gelu_new",
            "embd_pdrop": cfg.dropout}


def gpt2_names(cfg: ModelConfig) -> Names:
    """GPT-2's names are ours: we kept its layout (model.py)."""
    kinds = ("weight", "bias") if cfg.bias else ("weight",)
    names = ["transformer.wte.weight", *(f"transformer.ln_f.{k}" for k in kinds)]
    names += ["transformer.wpe.weight"] if cfg.position == "learned" else []
    names += [] if cfg.tie_embeddings else ["lm_head.weight"]
    for i in range(cfg.n_layer):
        names += [f"transformer.h.{i}.{layer}.{k}" for layer in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2",
                                                                 "mlp.c_fc", "mlp.c_proj") for k in kinds]
    return whole(*names)


# ----------------------------------------------------------------------------- Llama, Qwen2, Qwen3

def llama_read(hf: dict, shapes: dict, where: Path) -> dict:
    """Our settings for a config.json of the Llama family (llama, qwen2, qwen3): what they share."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers >= 5, or 4
    rope = {k: v for k, v in rope.items() if v is not None}  # null: left out
    heads, kv_heads = hf.get("num_attention_heads"), hf.get("num_key_value_heads") or hf.get("num_attention_heads")
    hidden, head_dim = hf.get("hidden_size"), hf.get("head_dim")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    sliding = hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or [])
    problems = [f"{k} = {v!r} ({why})" for k, v, bad, why in (
        ("num_key_value_heads", kv_heads, isinstance(heads, int) and isinstance(kv_heads, int) and kv_heads > 0
         and heads % kv_heads != 0, "it must divide num_attention_heads"),
        ("hidden_act", hf.get("hidden_act"), hf.get("hidden_act", "silu") != "silu", "we support 'silu'"),
        ("rope_type", rope_type, rope_type not in ("default", "linear", "llama3"),
         "we support default, linear and llama3"),
        ("partial_rotary_factor", rope.get("partial_rotary_factor"), rope.get("partial_rotary_factor", 1) != 1,
         "we rotate whole heads"),
        ("use_sliding_window", True, sliding, "sliding-window attention is not supported"),
        ("mlp_bias", hf.get("mlp_bias"), bool(hf.get("mlp_bias")) != bool(hf.get("attention_bias")),
         "we support biases everywhere or nowhere: attention_bias = mlp_bias")) if bad]
    needs = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}.get(rope_type, ())
    problems += [f"rope_parameters has no {k} (rope_type {rope_type!r} needs it)" for k in needs if k not in rope]
    if problems:
        raise FormatError(f"{where}: this {hf['model_type']} model cannot be loaded: {'; '.join(problems)}")
    settings = {"arch": "llama", **ARCHS["llama"], "dropout": 0.0, "bias": bool(hf.get("attention_bias")),
                "mlp_hidden": hf.get("intermediate_size", 0),
                "n_kv_head": 0 if kv_heads == heads else kv_heads,
                "head_dim": 0 if head_dim in (None, hidden // (heads or 1)) else head_dim,
                "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 1e4))),
                # A file without the setting: its weights say (transformers leaves a tied lm_head out).
                "tie_embeddings": hf.get("tie_word_embeddings", "lm_head.weight" not in shapes)}
    if rope_type != "default":
        settings |= {"rope_scaling": rope_type, "rope_factor": float(rope["factor"])}
    if rope_type == "llama3":
        settings |= {"rope_low_freq_factor": float(rope["low_freq_factor"]),
                     "rope_high_freq_factor": float(rope["high_freq_factor"]),
                     "rope_original_context": rope.get("original_max_position_embeddings",
                                                        hf["max_position_embeddings"])}
    return settings


def qwen2_read(hf: dict, shapes: dict, where: Path) -> dict:
    return llama_read(hf, shapes, where) | {"bias": False, "qkv_bias": True}  # biases on q, k, v alone


def qwen3_read(hf: dict, shapes: dict, where: Path) -> dict:
    if hf.get("attention_bias"):
        raise FormatError(f"{where}: this qwen3 model cannot be loaded: attention_bias = true (biases on the "
                          "attention's four projections and not the MLP's, which model.bias cannot say)")
    return llama_read(hf, shapes, where) | {"qk_norm": True}


def llama_write(cfg: ModelConfig) -> dict:
    rope = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling != "none":
        rope["factor"] = cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        rope |= {"low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                 "original_max_position_embeddings": cfg.rope_original_context}
    # rope_parameters: transformers >= 5; rope_theta and rope_scaling: earlier versions
    return {"intermediate_size": mlp_hidden(cfg), "num_key_value_heads": cfg.kv_heads(), "head_dim": cfg.head_size(),
            "hidden_act": "silu", "rope_parameters": rope, "rope_theta": cfg.rope_theta,
            **({"rope_scaling": rope} if cfg.rope_scaling != "none" else {}),
            "attention_bias": cfg.bias, "mlp_bias": cfg.bias}


def qwen2_write(cfg: ModelConfig) -> dict:
    return llama_write(cfg) | {"use_sliding_window": False}


def llama_names(cfg: ModelConfig) -> Names:
    """Our c_attn holds q, k and v stacked by rows (k and v have n_kv_head heads), and c_fc the gate and up
    projections: each is 3 (or 2) of their matrices. Both use the same rotary pairs (channel i with
    i + hd/2, see model.RotaryEmbedding), so no weight needs reordering."""
    q, kv, hidden = cfg.n_head * cfg.head_size(), cfg.kv_heads() * cfg.head_size(), mlp_hidden(cfg)
    names = {"transformer.wte.weight": [("model.embed_tokens.weight", None)],
             "transformer.ln_f.weight": [("model.norm.weight", None)]}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = [("lm_head.weight", None)]
    for i in range(cfg.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        names[ours + "ln_1.weight"] = [(theirs + "input_layernorm.weight", None)]
        names[ours + "ln_2.weight"] = [(theirs + "post_attention_layernorm.weight", None)]
        if cfg.qk_norm:
            for x in "qk":
                names[f"{ours}attn.{x}_norm.weight"] = [(f"{theirs}self_attn.{x}_norm.weight", None)]
        for kind in ("weight", "bias") if cfg.bias or cfg.qkv_bias else ("weight",):
            names[f"{ours}attn.c_attn.{kind}"] = [(f"{theirs}self_attn.{p}_proj.{kind}", rows)
                                                  for p, rows in (("q", q), ("k", kv), ("v", kv))]
        for kind in ("weight", "bias") if cfg.bias else ("weight",):  # bias: attention_bias and mlp_bias
            names[f"{ours}attn.c_proj.{kind}"] = [(f"{theirs}self_attn.o_proj.{kind}", None)]
            names[f"{ours}mlp.c_fc.{kind}"] = [(f"{theirs}mlp.{p}_proj.{kind}", hidden) for p in ("gate", "up")]
            names[f"{ours}mlp.c_proj.{kind}"] = [(f"{theirs}mlp.down_proj.{kind}", None)]
    return names


# ----------------------------------------------------------------------------- the table

LLAMA_REQUIRED = ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size", "vocab_size")
LLAMA_DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048}  # transformers' LlamaConfig
QWEN_DEFAULTS = LLAMA_DEFAULTS | {"max_position_embeddings": 32768}
LLAMA_CONFIG = {"n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "n_embd": "hidden_size",
                "block_size": "max_position_embeddings", "norm_eps": "rms_norm_eps", "attn_dropout": "attention_dropout"}
LLAMA_FIXED = {k: v for k, v in ARCHS["llama"].items() if k != "bias"} | {"logit_softcap": 0.0}
ARCHITECTURES = {
    "gpt2": Architecture(
        "gpt2", "GPT2LMHeadModel",
        {"n_layer": "n_layer", "n_head": "n_head", "n_embd": "n_embd", "block_size": "n_positions",
         "dropout": "resid_pdrop", "attn_dropout": "attn_pdrop", "norm_eps": "layer_norm_epsilon"},
        gpt2_read, gpt2_write, gpt2_names,
        fixed={k: v for k, v in ARCHS["gpt2"].items() if k != "bias"} | {
            "qk_norm": False, "logit_softcap": 0.0, "n_kv_head": 0, "head_dim": 0, "qkv_bias": False},
        transposed=("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"),
        always_biased=True, ignored=(".attn.bias", ".attn.masked_bias"),  # old files keep the causal mask
        prefix="transformer.",  # the hub's GPT-2 files: h.0.attn..., wte.weight
        required=("n_layer", "n_head", "n_embd", "vocab_size"), defaults={"layer_norm_epsilon": 1e-5, "n_positions": 1024}),
    "llama": Architecture("llama", "LlamaForCausalLM", LLAMA_CONFIG, llama_read, llama_write, llama_names,
                          fixed=LLAMA_FIXED | {"qk_norm": False, "qkv_bias": False},
                          ignored=("rotary_emb.inv_freq",),  # old files keep the rotary table
                          required=LLAMA_REQUIRED, defaults=LLAMA_DEFAULTS),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM", LLAMA_CONFIG, qwen2_read, qwen2_write, llama_names,
                          fixed=LLAMA_FIXED | {"qk_norm": False, "bias": False, "qkv_bias": True},
                          required=LLAMA_REQUIRED, defaults=QWEN_DEFAULTS),
    "qwen3": Architecture("qwen3", "Qwen3ForCausalLM", LLAMA_CONFIG, qwen3_read, llama_write, llama_names,
                          fixed=LLAMA_FIXED | {"qk_norm": True, "bias": False, "qkv_bias": False},
                          required=LLAMA_REQUIRED, defaults=QWEN_DEFAULTS | {"head_dim": 128}),
}
COMMON = {"vocab_size": "vocab_size", "tie_embeddings": "tie_word_embeddings"}  # the same key in every entry


def architecture_of(cfg: ModelConfig) -> Architecture:
    """The entry a model exports as: GPT-2's for model.arch = gpt2; for the Llama family, Qwen3's with
    qk_norm, Qwen2's with q/k/v biases alone, else Llama's."""
    if cfg.arch == "gpt2":
        return ARCHITECTURES["gpt2"]
    if cfg.qk_norm:
        return ARCHITECTURES["qwen3"]
    return ARCHITECTURES["qwen2" if cfg.qkv_bias and not cfg.bias else "llama"]


def lora_parts(cfg: ModelConfig) -> dict[str, list[int]]:
    """The output rows of each of their projections in each of our layers that stacks several (our
    c_attn: their q, k, v), so that LoRA gives each its own adapter, as PEFT does on their model."""
    names = architecture_of(cfg).names(cfg)
    return {ours.split(".", 3)[3].removesuffix(".weight"): [rows for _, rows in theirs]
            for ours, theirs in names.items() if ours.startswith("transformer.h.0.") and len(theirs) > 1
            and ours.endswith(".weight")}


def module_names(cfg: ModelConfig, layer: str) -> list[str]:
    """Their module names for one of our layers, e.g. "transformer.h.0.attn.c_attn" -> the three of
    "model.layers.0.self_attn.{q,k,v}_proj" (PEFT names adapters by them)."""
    return [theirs.removesuffix(".weight") for theirs, _ in architecture_of(cfg).names(cfg)[layer + ".weight"]]


# ----------------------------------------------------------------------------- reading

def read_config(hf: dict, shapes: dict, where: Path) -> dict:
    """Our model settings from a config.json (at `where`) that transformers wrote, or anyone else: its
    keys checked first (checks.hf_config_problems), those left out or null taken as its transformers
    class takes them. `shapes`: the tensors' names and shapes, for what the config leaves out."""
    model_type = hf.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        why = f" ({UNSUPPORTED[model_type]})" if isinstance(model_type, str) and model_type in UNSUPPORTED else ""
        raise FormatError(f"{where}: model_type {model_type!r}{why} cannot be read; we read "
                          f"{', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[model_type]
    problems = hf_config_problems(hf, arch.required)
    if problems:
        raise FormatError(f"{where}: {'; '.join(problems)}; it is damaged or not a {arch.hf_class}'s")
    hf = arch.defaults | {k: v for k, v in hf.items() if v is not None}
    names = arch.config_names | COMMON
    return {ours: hf[theirs] for ours, theirs in names.items() if theirs in hf} | arch.read_extra(hf, shapes, where)


def their_names(shapes: dict, arch: Architecture, cfg: ModelConfig) -> dict[str, str]:
    """{the name as the files spell it: the name as our table spells it}, without what is not a weight."""
    return {k: k if k.startswith((arch.prefix, "lm_head.")) else arch.prefix + k for k in shapes
            if not k.endswith(arch.ignored) and not (k == "lm_head.weight" and cfg.tie_embeddings)}


def from_hf(get: Callable[[str], torch.Tensor], shapes: dict, cfg: ModelConfig, model_type: str, folder: Path) -> dict:
    """Their tensors (of config.json's `model_type`) -> our state dict, for `cfg`: one of ours at a time,
    each read (get(their name), in fp32) only when it is built, so that memory holds the result and one
    layer's parts, not two copies of the model. A tied lm_head is wte; the vocabulary is padded again."""
    arch, spelled = ARCHITECTURES[model_type], their_names(shapes, ARCHITECTURES[model_type], cfg)
    by_table = {ours: spelling for spelling, ours in spelled.items()}
    biases = {k for k in by_table if k.endswith(".bias")}
    if arch.always_biased and not cfg.bias:  # our export of a model without biases: zeros, nothing else
        if any(get(by_table[k]).any() for k in biases):
            raise FormatError(f"{folder} has non-zero biases but model.bias = false in its config")
        by_table = {k: v for k, v in by_table.items() if k not in biases}
    names = arch.names(cfg)
    unknown = sorted(set(by_table) - {t for theirs in names.values() for t, _ in theirs})
    if unknown:
        raise FormatError(f"{folder} has weights that a {arch.hf_class} with these settings does not have "
                          f"({', '.join(unknown[:3])}); it is another variant of the model")
    out = {}
    for ours, theirs in names.items():
        if all(t in by_table for t, _ in theirs):  # anything missing is named by checkpoint.check_fits
            parts = [get(by_table[t]) for t, _ in theirs]
            if ours.endswith(arch.transposed):
                parts = [p.t() for p in parts]
            out[ours] = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
    return pad_vocab(out, cfg)


def pad_vocab(state: dict, cfg: ModelConfig) -> dict:
    """Add back the padding rows (never used) that exports leave out, and tie lm_head to wte again."""
    for name in ("transformer.wte.weight", "lm_head.weight"):
        w = state.get(name)
        if w is not None and w.dim() == 2 and len(w) < cfg.padded_vocab_size():
            state[name] = torch.cat([w, w.new_zeros((cfg.padded_vocab_size() - len(w), w.size(1)))])
    if cfg.tie_embeddings and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def check_counts(shapes: dict, cfg: ModelConfig) -> list[str]:
    """A folder's layer count and vocabulary from its config.json, against its tensors (their names and
    the embedding's rows): what disagrees, before anything is built from a damaged or hostile config."""
    layers = {m.group(1) for k in shapes if (m := re.match(r"(?:.*\.)?(?:h|layers)\.(\d+)\.", k))}
    embedding = next((v for k, v in shapes.items() if k.endswith(("wte.weight", "embed_tokens.weight"))), None)
    wrong = [f"model.n_layer = {cfg.n_layer} but the weights have {len(layers)}"] if cfg.n_layer != len(layers) else []
    if embedding is not None and embedding[0] not in (cfg.vocab_size, cfg.padded_vocab_size()):
        wrong.append(f"model.vocab_size = {cfg.vocab_size} but the weights have {embedding[0]}")
    return wrong


# ----------------------------------------------------------------------------- writing

def check_exportable(cfg: ModelConfig) -> None:
    """Refuse a model that its architecture's transformers class cannot hold, naming each setting."""
    arch = architecture_of(cfg)
    wrong = [f"model.{k} = {json.dumps(getattr(cfg, k))}" for k, v in arch.fixed.items() if getattr(cfg, k) != v]
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
    out, names = {}, arch.names(cfg)
    assert set(names) == set(state), "the table names every weight of the model"
    for ours, theirs in names.items():
        rows = [r or len(state[ours]) for _, r in theirs]
        for (name, _), part in zip(theirs, state[ours].split(rows)):
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
