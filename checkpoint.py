"""Model weights in and out: train.py's checkpoints, and one loader for every kind of weights.

A checkpoint `ckpt_last.pt` (or `ckpt_best.pt`) is a dict of tensors and plain values:

    model, optimizer, scaler   state dicts (the uncompiled model's weights)
    version, val_loss          the format's version, and the val loss at this step (None: not evaluated)
    step, best_val_loss, best_step, bad_evals, tokens, elapsed_s, last_eval_step, start_val_loss
                               loop state (see train.new_state)
    rng                        RNG states as tensors (dropout draws from them)
    config, meta               the resolved config and the tokenizer meta
    lora_base                  LoRA runs only: {"path", "digest"} of the base weights under the adapters

A LoRA run (lora.py) saves only its adapters as `model` (lora.save = "adapters"; "full" adds the base
weights): the base weights are read again from their path, and their digest must match.
Beside it, `ckpt_last.json` holds the readable part (everything but tensors).

`load_weights(path)` reads a checkpoint file, a run folder (its ckpt_best.pt, else ckpt_last.pt), a
native export or a Hugging Face GPT-2 or Llama folder (ours, or one saved by transformers) into
`Weights`. train.py (resume, init_from), sample.py, eval.py and export.py all read through it
(`load_model` builds the GPT from it); export.py writes the export formats. Nothing here runs
pickled code: checkpoints load with torch.load(weights_only=True), exports are safetensors.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from config import Config, LoraConfig, ModelConfig, apply_implied, validate
from options import apply
from data import meta_problems
from errors import UserError
from files import atomic_file, write_json
from lora import add_adapters, is_adapter, merge
from model import GPT

CHECKPOINT_VERSION = 1
# Model settings that the weights carry: their shapes, and what they compute (the architecture's
# switches). A run starting from weights takes these from them. Dropout and the backend are not here.
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "pad_vocab_multiple", "arch",
              "position", "norm", "mlp", "mlp_hidden", "tie_embeddings", "qk_norm", "rope_theta", "norm_eps",
              "logit_softcap")
NATIVE = "tinygpt-native"  # config.json "format" of a native export
META_FILE = "tokenizer_meta.json"  # not tokenizer.json: transformers reads that name as its own format
# GPT-2 stores these Linear weights as Conv1D, i.e. transposed: (in, out).
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
GPT2_META = {"tokenizer": "bpe", "encoding": "gpt2", "eot_token": 50256, "vocab_size": 50257}


class CheckpointError(UserError):
    """Weights that cannot be used; the message names the file and what to do."""


@dataclass
class Adapters:
    """A LoRA checkpoint's adapters, with the base weights under them (Weights.lora)."""
    config: LoraConfig
    state_dict: dict[str, torch.Tensor]  # the adapted model's: base weights and lora_A / lora_B, unmerged
    base: dict                           # {"path", "digest"} of the base weights, as its checkpoints record


@dataclass
class Weights:
    """Weights and what came with them, whatever file or folder they were read from."""
    model: ModelConfig
    state_dict: dict[str, torch.Tensor]  # fp32, in our names; lm_head.weight is wte when tied; LoRA: merged
    meta: dict | None       # the tokenizer; None for a GPT-2 folder of unknown vocabulary
    config: dict | None     # the training config they were trained with, when stored
    training: dict | None   # the whole checkpoint (optimizer, scaler, rng, loop state); None for exports
    path: Path              # the file or folder read
    format: str             # "checkpoint", "native" or "hf"
    dtype: str = "fp32"     # how they were stored
    step: int | None = None
    val_loss: float | None = None
    lora: Adapters | None = None  # a LoRA checkpoint's adapters, unmerged (train.py resumes from them)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: str | Path, state: dict) -> None:
    """The checkpoint, then its readable JSON; each written atomically (see files.py)."""
    path = Path(path)
    with atomic_file(path) as f:
        torch.save(state, f)
    readable = {k: v for k, v in state.items() if k not in ("model", "optimizer", "scaler", "rng")}
    write_json(path.with_suffix(".json"), readable)


def read_checkpoint(path: Path, device: str | torch.device) -> Weights:
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror}); check its permissions") from None
    except Exception as e:  # truncated, corrupt, or not a torch file at all
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}); it is corrupt "
                              "or not a checkpoint: use another one, e.g. ckpt_best.pt") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path} is not a checkpoint written by train.py")
    if ckpt.get("meta") is not None and meta_problems(ckpt["meta"]):
        raise CheckpointError(f"{path} has a damaged tokenizer meta ({'; '.join(meta_problems(ckpt['meta']))})")
    if ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} was written by a newer version of this code; update it")
    cfg = model_config(ckpt["config"].get("model"), path)
    state, lora = ckpt["model"], None
    if "lora_base" in ckpt:
        lora = read_adapters(ckpt, cfg, path, device)
        state = merged(lora, cfg, device)
    return Weights(cfg, state, ckpt.get("meta"), ckpt["config"], ckpt, path, "checkpoint", "fp32",
                   ckpt.get("step"), ckpt.get("val_loss"), lora)


# ----------------------------------------------------------------------------- LoRA checkpoints

def read_adapters(ckpt: dict, cfg: ModelConfig, path: Path, device: str | torch.device) -> Adapters:
    """A LoRA checkpoint's adapters and the base weights under them: stored in it (lora.save = "full"),
    or read from the base's path and checked against its digest."""
    lora, base, state = model_config(ckpt["config"].get("lora"), path, "lora"), ckpt["lora_base"], ckpt["model"]
    if all(is_adapter(k) for k in state):
        state = base_weights(base, path, device) | state
    check_fits(state, cfg, path, lora)
    return Adapters(lora, state, base)


def base_weights(base: dict, path: Path, device: str | torch.device) -> dict:
    """The base weights of a LoRA checkpoint, refused when they are gone or are not the same any more."""
    where = Path(base["path"])  # as training.init_from gave it: a relative path is from the current folder
    if not where.exists():
        shown = where if where.is_absolute() else f"{where} (from {Path.cwd()})"
        raise CheckpointError(f"{path} holds LoRA adapters for the base weights {where}, which are gone "
                              f"(moved or deleted); put them back at {shown}: the adapters need them")
    weights = load_weights(where, device)
    if digest(weights.state_dict, weights.model) != base["digest"]:
        raise CheckpointError(f"{path} holds LoRA adapters for the base weights {where}, which have changed "
                              "since (their digest differs); put the original weights back there, or train the "
                              "adapters again on the new ones")
    return weights.state_dict


def merged(lora: Adapters, cfg: ModelConfig, device: str | torch.device) -> dict:
    """The weights of a plain GPT that computes what the adapted model computes: W + (alpha / r) B A."""
    with torch.device("meta"):
        model = GPT(cfg)
        add_adapters(model, lora.config)
    model.to_empty(device=device)  # memory, left uninitialised (no random draws): all of it is loaded next
    model.load_state_dict(lora.state_dict)
    merge(model)
    return model.state_dict()


def digest(state: dict, cfg: ModelConfig) -> str:
    """sha256 of weights' names, shapes and values (as fp32): the same for every copy of the same
    weights in any file or format (a native export and its Hugging Face export), different after
    any change. The embedding's padding rows are left out: never used, and an HF export drops them."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().float()
        if name in ("transformer.wte.weight", "lm_head.weight"):
            t = t[:cfg.vocab_size]
        h.update(f"{name} {tuple(t.shape)}\n".encode())
        h.update(t.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def base_reference(start: Weights, resume: bool) -> dict:
    """What a LoRA run's checkpoints record of its base weights: their path and digest. A resumed run
    keeps its own; a new one takes them from the weights it starts from (training.init_from)."""
    if resume:
        return start.lora.base
    return {"path": str(start.path), "digest": digest(start.state_dict, start.model)}


def weights_to_save(state: dict[str, torch.Tensor], lora: LoraConfig, base: dict | None) -> dict:
    """A checkpoint's weights, from the model's state dict: all of them; for a LoRA run (base: its
    reference) the adapters only, or with lora.save = "full" every weight, unmerged so that training
    can resume."""
    if base is None:
        return {"model": state}
    return {"model": state if lora.save == "full" else {k: v for k, v in state.items() if is_adapter(k)},
            "lora_base": base}


# ----------------------------------------------------------------------------- one loader

def find_weights(path: str | Path) -> Path:
    """`path` itself (a checkpoint file or an export folder), or the checkpoint in a run folder:
    ckpt_best.pt, else ckpt_last.pt."""
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"{path} does not exist; pass a checkpoint (ckpt_*.pt), a run folder or an "
                              "export folder")
    if folder.is_file() or is_export(folder):
        return folder
    for name in ("ckpt_best.pt", "ckpt_last.pt"):
        if (folder / name).is_file():
            return folder / name
    runs = sorted({str(p.parent) for p in folder.glob("*/ckpt_*.pt")})
    hint = f" (runs found: {', '.join(runs)})" if runs else ""
    raise CheckpointError(f"no checkpoint in {folder}/: no ckpt_best.pt or ckpt_last.pt; train first, or "
                          f"pass a checkpoint, run folder or export folder{hint}")


def is_export(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> Weights:
    """Weights from a checkpoint file, a run folder, a native export or a Hugging Face GPT-2 or Llama
    folder, checked to fit their model config before anything is built from them."""
    path = find_weights(path)
    weights = read_checkpoint(path, device) if path.is_file() else read_export(path, device)
    check_fits(weights.state_dict, weights.model, path)
    return weights


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Weights]:
    """A GPT in eval mode on `device`, built from any weights load_weights reads, and the Weights.
    The weights must carry their tokenizer: the callers (sample.py, eval.py) turn text into tokens."""
    src = load_weights(path)
    if src.meta is None:
        raise CheckpointError(f"{src.path} has no tokenizer ({META_FILE} is missing), so its tokens cannot be "
                              "turned into text; export it again from its checkpoint, or, for weights from "
                              "elsewhere, fine-tune them on your data first (training.init_from), which adds ours")
    model = GPT(src.model)
    model.load_state_dict(src.state_dict)
    if src.meta["vocab_size"] < src.model.vocab_size:
        # Weights from elsewhere can score more tokens than the tokenizer has (e.g. a Llama's vocabulary
        # fine-tuned on char data): ids it cannot spell are cut off the logits, like padding rows.
        model.config.vocab_size = src.meta["vocab_size"]
    return model.to(device).eval(), src  # eval: no dropout


def model_config(values, where: Path, section: str = "model") -> ModelConfig | LoraConfig:
    """A ModelConfig (or another section's) from stored settings, checked by the command line's rules."""
    cfg, problems = Config(), []
    if not isinstance(values, dict):
        raise CheckpointError(f"{where} has no {section} settings; it was not written by this code")
    apply(cfg, {section: values}, False, str(where), problems, sections=(section,))
    apply_implied(cfg, {section: values}, sections=(section,))
    problems += [f"{where}: {p}" for p in validate(cfg, (section,))] if not problems else []
    if problems:
        raise CheckpointError(f"{'; '.join(problems)}; it is damaged, or written by a newer version of this code")
    return getattr(cfg, section)


def read_export(folder: Path, device: str | torch.device) -> Weights:
    """A native export (our names) or a GPT-2 folder in transformers' layout (ours or anyone's)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        meta_path = folder / META_FILE
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else None
        with safe_open(folder / "model.safetensors", "pt") as f:
            tensors = {k: f.get_tensor(k).to(device, torch.float32) for k in f.keys()}
    except OSError as e:
        raise CheckpointError(f"{folder} cannot be read ({e.strerror}: {e.filename}); check its permissions") from None
    except Exception as e:  # truncated, or not JSON / safetensors at all
        raise CheckpointError(f"{folder} cannot be read ({type(e).__name__}: {e}); export it again") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder}/config.json is not a JSON object; export it again")
    if meta is not None and meta_problems(meta):
        raise CheckpointError(f"{folder}/{META_FILE} is damaged ({'; '.join(meta_problems(meta))}); export it again")
    if config.get("format") == NATIVE:
        cfg = model_config(config.get("model"), folder / "config.json")
        if cfg.tie_embeddings and "transformer.wte.weight" in tensors:
            tensors["lm_head.weight"] = tensors["transformer.wte.weight"]  # tied: stored once
        source = config.get("source") or {}
        return Weights(cfg, tensors, meta, config.get("config"), None, folder, "native",
                       config.get("dtype", "fp32"), source.get("step"), source.get("val_loss"))
    if config.get("model_type") in HF_READERS:
        settings, convert = HF_READERS[config["model_type"]]
        ours = config.get("tinygpt") or {}  # our own settings, in an export of ours
        cfg = model_config(ours.get("model") or settings(config, tensors, folder), folder / "config.json")
        if meta is None and config["model_type"] == "gpt2" and config.get("vocab_size") == GPT2_META["vocab_size"]:
            meta = dict(GPT2_META)  # a GPT-2 BPE model from elsewhere
        dtype = {v: k for k, v in HF_DTYPES.items()}.get(config.get("torch_dtype") or config.get("dtype"), "fp32")
        source = ours.get("source") or {}
        check_counts(tensors, cfg, folder)  # before converting: that pads and loops as config.json says
        return Weights(cfg, convert(tensors, cfg, folder), meta, ours.get("config"), None, folder, "hf", dtype,
                       source.get("step"), source.get("val_loss"))
    raise CheckpointError(f"{folder}/config.json is neither a tinygpt export nor a GPT-2 or Llama config "
                          f"(model_type {config.get('model_type')!r})")


# ----------------------------------------------------------------------------- Hugging Face GPT-2

def hf_model_config(hf: dict, tensors: dict, folder: Path) -> dict:
    """Our model settings for a GPT-2 config.json written by someone else (e.g. the hub's gpt2)."""
    problems = [f"{k} = {hf.get(k)!r} (we support {ok!r})" for k, ok in (
        ("activation_function", "gelu_new"), ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False)) if hf.get(k, ok) != ok]
    if problems:
        raise CheckpointError(f"{folder}: this GPT-2 variant cannot be loaded: {'; '.join(problems)}")
    names = {"n_layer": "n_layer", "n_head": "n_head", "n_embd": "n_embd", "block_size": "n_positions",
             "vocab_size": "vocab_size", "dropout": "resid_pdrop", "attn_dropout": "attn_pdrop",
             "norm_eps": "layer_norm_epsilon", "tie_embeddings": "tie_word_embeddings"}
    return {ours: hf[theirs] for ours, theirs in names.items() if theirs in hf} | {
        "bias": True, "mlp_hidden": hf.get("n_inner") or 0}  # n_inner None: 4 * n_embd


def from_hf(state: dict, cfg: ModelConfig, folder: Path) -> dict:
    """GPT-2's state dict (with or without the "transformer." prefix) -> ours, for `cfg`."""
    out = {}
    for name, w in state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or (name == "lm_head.weight" and cfg.tie_embeddings):
            continue  # old files carry the causal mask as a buffer; a tied lm_head is wte
        name = name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name
        out[name] = w.t() if name.endswith(CONV1D) and w.dim() == 2 else w
    if not cfg.bias:  # exported as zero biases; anything else is a different model
        if any(v.any() for k, v in out.items() if k.endswith(".bias")):
            raise CheckpointError(f"{folder} has non-zero biases but model.bias = false in its config")
        out = {k: v for k, v in out.items() if not k.endswith(".bias")}
    return pad_vocab(out, cfg)


def pad_vocab(state: dict, cfg: ModelConfig) -> dict:
    """Add back the padding rows (never used) that exports leave out, and tie lm_head to wte again."""
    m = cfg.pad_vocab_multiple
    rows = (cfg.vocab_size + m - 1) // m * m
    for name in ("transformer.wte.weight", "lm_head.weight"):
        w = state.get(name)
        if w is not None and w.dim() == 2:
            state[name] = torch.cat([w, w.new_zeros((max(rows - len(w), 0), w.size(1)))])
    if cfg.tie_embeddings and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


# ----------------------------------------------------------------------------- Hugging Face Llama

def llama_names(cfg: ModelConfig) -> dict[str, list[str]]:
    """Our parameter names -> LlamaForCausalLM's. Our c_attn holds q, k and v stacked by rows, and
    c_fc the gate and up projections: each is 3 (or 2) of its matrices. Both use the same rotary
    pairs (channel i with i + hd/2, see model.RotaryEmbedding), so no weight needs reordering."""
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


def llama_model_config(hf: dict, tensors: dict, folder: Path) -> dict:
    """Our model settings for a LlamaForCausalLM config.json written by someone else (e.g. by
    transformers' save_pretrained). Grouped-query attention and rotary scaling are not in model.py."""
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
        raise CheckpointError(f"{folder}: this Llama variant cannot be loaded: {'; '.join(problems)}")
    names = {"n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "n_embd": "hidden_size",
             "block_size": "max_position_embeddings", "vocab_size": "vocab_size", "mlp_hidden": "intermediate_size",
             "norm_eps": "rms_norm_eps", "attn_dropout": "attention_dropout"}
    return {ours: hf[theirs] for ours, theirs in names.items() if theirs in hf} | {
        "arch": "llama", "position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "dropout": 0.0,
        "bias": bool(hf.get("attention_bias")), "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 1e4))),
        # A file without the setting: its weights say (transformers leaves a tied lm_head out).
        "tie_embeddings": hf.get("tie_word_embeddings", "lm_head.weight" not in tensors)}


def from_llama(state: dict, cfg: ModelConfig, folder: Path) -> dict:
    """LlamaForCausalLM's state dict -> ours, for `cfg`."""
    names = llama_names(cfg)
    # A tied lm_head is embed_tokens (some files store it anyway); old files kept rotary tables.
    state = {k: v for k, v in state.items() if not (k == "lm_head.weight" and cfg.tie_embeddings)
             and not k.endswith("rotary_emb.inv_freq")}
    unknown = sorted(set(state) - {t for theirs in names.values() for t in theirs})
    if unknown:
        raise CheckpointError(f"{folder} has weights a Llama with these settings does not have "
                              f"({', '.join(unknown[:3])}); it is not a plain Llama")
    out = {ours: torch.cat([state[t] for t in theirs]) for ours, theirs in names.items()
           if all(t in state for t in theirs)}  # anything missing is named by check_fits
    return pad_vocab(out, cfg)


HF_READERS = {"gpt2": (hf_model_config, from_hf), "llama": (llama_model_config, from_llama)}


# ----------------------------------------------------------------------------- checks

def check_counts(tensors: dict, cfg: ModelConfig, folder: Path) -> None:
    """A Hugging Face folder's layer count and vocabulary, from its config.json, against its tensors
    (their names and the embedding's rows), so that a damaged or hostile config.json builds nothing."""
    layers = {m.group(1) for k in tensors if (m := re.match(r"(?:.*\.)?(?:h|layers)\.(\d+)\.", k))}
    embedding = next((v for k, v in tensors.items() if k.endswith(("wte.weight", "embed_tokens.weight"))), None)
    m = cfg.pad_vocab_multiple
    wrong = [f"model.n_layer = {cfg.n_layer} but the weights have {len(layers)}"] if cfg.n_layer != len(layers) else []
    if embedding is not None and len(embedding) not in (cfg.vocab_size, (cfg.vocab_size + m - 1) // m * m):
        wrong.append(f"model.vocab_size = {cfg.vocab_size} but the weights have {len(embedding)}")
    if wrong:
        raise not_fitting(folder, wrong)


def not_fitting(where: Path, wrong: list[str]) -> CheckpointError:
    return CheckpointError(f"{where}: the weights do not fit their model settings ({'; '.join(wrong[:3])}); "
                           "it is damaged: export or train it again")


def check_fits(state: dict, cfg: ModelConfig, where: Path, lora: LoraConfig | None = None) -> None:
    """Refuse weights that would not load into GPT(cfg) (with `lora`'s adapters), naming what differs.
    The cheap counts come first, so a config that describes an enormous model fails before anything
    is built; then the model is built on the "meta" device (shapes only, no memory)."""
    layers = {int(m.group(1)) for k in state if (m := re.match(r"transformer\.h\.(\d+)\.", k))}
    wte, wpe = state.get("transformer.wte.weight"), state.get("transformer.wpe.weight")
    found = {"n_layer": len(layers), "n_embd": None if wte is None else wte.shape[-1],
             "block_size": None if wpe is None else wpe.shape[0]}
    wrong = [f"model.{k} = {getattr(cfg, k)} but the weights have {v}" for k, v in found.items()
             if v is not None and v != getattr(cfg, k)]
    if not wrong:
        with torch.device("meta"):
            model = GPT(cfg)
            if lora:
                add_adapters(model, lora)
            expected = model.state_dict()
        wrong = [f"{k}: {tuple(state[k].shape) if k in state else 'missing'}, expected {tuple(v.shape)}"
                 for k, v in expected.items() if k not in state or state[k].shape != v.shape]
        wrong += [f"{k}: not a weight of this model" for k in state if k not in expected]
    if wrong:
        raise not_fitting(where, wrong)


def adopt_model_shape(cfg: Config, weights: Weights) -> list[str]:
    """Take the weights' model shape and tokenizer into cfg; return what conflicts with the user's choices.

    Settings the user left at their defaults are replaced by the stored ones (so `--resume` or
    `init_from` needs no model settings); ones set in a preset or on the command line must agree.
    A resumed run also goes on with the same LoRA adapters, or with none.
    """
    stored = [("model", k, getattr(weights.model, k)) for k in SHAPE_KEYS]
    if cfg.training.resume:
        lora = weights.lora.config if weights.lora else LoraConfig(rank=0)
        keys = ("rank", "alpha", "targets") if lora.rank else ("rank",)
        stored += [("lora", k, getattr(lora, k)) for k in keys]
    if weights.meta is not None:
        stored += [("data", "tokenizer", weights.meta["tokenizer"]),
                   ("data", "bpe_encoding", weights.meta.get("encoding", cfg.data.bpe_encoding))]
    # Rotary positions have no table, so a rope model trains and samples with any context you choose.
    free = {"block_size"} if weights.model.position == "rope" else set()
    problems = []
    for section, k, theirs in stored:
        ours = getattr(getattr(cfg, section), k)
        chosen = f"{section}.{k}" in cfg.explicit or (k == "vocab_size" and ours != 0)
        if theirs == ours or (chosen and k in free):
            continue
        if chosen:
            problems.append(f"{section}.{k}: {theirs!r} in the weights, {ours!r} in the config")
        else:
            setattr(getattr(cfg, section), k, theirs)
    return problems
