"""Model weights in and out: train.py's checkpoints, and one loader for every kind of weights.

A checkpoint `ckpt_last.pt` (or `ckpt_best.pt`) is a dict of tensors and plain values:

    model, optimizer, scaler   state dicts (the uncompiled, unwrapped model's weights)
    version, val_loss          the format's version, and the val loss at this step (None: not evaluated)
    step, best_val_loss, ...   the loop state (LoopState's fields)
    rng                        RNG states as tensors (dropout draws from them)
    config, meta               the resolved config and the tokenizer meta
    lora_base                  LoRA runs only: {"path", "digest"} of the base weights under the adapters

A LoRA run (lora.py) saves only its adapters as `model` (lora.save = "adapters"; "full" adds the base
weights): the base weights are read again from their path, and their digest must match. Beside it,
`ckpt_last.json` holds the readable part (everything but tensors).

`load_weights(path)` reads a checkpoint, a run folder (its ckpt_best.pt, else ckpt_last.pt), a native export, a
Hugging Face folder (ours or transformers': hf.py) or a GGUF file into `Weights`, for every script (`load_model`
builds the GPT). Nothing here runs pickled code: torch.load(weights_only=True), and safetensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

import gguf_format
import hf
from checks import checkpoint_problems, export_problems, shard_index_problems
from config import Config, LoraConfig, ModelConfig, apply_implied, validate
from data import meta_problems
from errors import UserError, out_of_memory
from files import atomic_file, write_json
from lora import add_adapters, is_adapter, merge
from model import GPT
from options import apply
from tokenizer import hf_tokenizer_meta

CHECKPOINT_VERSION = 1
# Model settings that the weights carry: their shapes, and what they compute (the architecture's
# switches). A run starting from weights takes these from them. Dropout and the backend are not here.
SHAPE_KEYS = ("n_layer", "n_head", "n_kv_head", "head_dim", "n_embd", "block_size", "bias", "qkv_bias", "vocab_size",
              "pad_vocab_multiple", "arch", "position", "norm", "mlp", "mlp_hidden", "tie_embeddings", "qk_norm",
              "rope_theta", "rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
              "rope_original_context", "norm_eps", "logit_softcap")
NATIVE = "tinygpt-native"  # config.json "format" of a native export
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")  # one file, or the index of its shards
DTYPE_NAMES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}  # safetensors' names -> ours
READ = "a checkpoint (ckpt_*.pt), a run folder, an export or Hugging Face folder, or a GGUF file"  # load_weights
META_FILE = "tokenizer_meta.json"  # not tokenizer.json: transformers reads that name as its own format


class CheckpointError(UserError):
    """Weights that cannot be used; the message names the file and what to do."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint that cannot be read, or whose fields are damaged: a resume tries the next newest one."""


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

    def to_start_from(self, resume: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(weights, adapters) for a run to start from: a resumed LoRA run gets its base weights and
        its own adapters back; any other run starts from the weights as they compute (a LoRA
        checkpoint's merged), with no adapters (a new LoRA run makes fresh ones)."""
        if not (resume and self.lora):
            return self.state_dict, {}
        state = self.lora.state_dict
        return {k: v for k, v in state.items() if not is_adapter(k)}, {k: v for k, v in state.items() if is_adapter(k)}


@dataclass
class LoopState:
    """Where the training loop is, saved in every checkpoint beside the weights and the optimizer."""
    step: int = 0                       # optimizer steps done
    best_val_loss: float = math.inf
    best_step: int | None = None        # the step of best_val_loss (ckpt_best.pt)
    bad_evals: int = 0                  # evaluations in a row without improvement (early stopping)
    tokens: int = 0                     # tokens trained on so far, all processes together
    elapsed_s: float = 0.0              # wall time so far, across resumes
    last_eval_step: int | None = None   # a resumed step was evaluated before it was saved: not again
    start_val_loss: float | None = None  # the val loss at the run's first evaluation
    run_id: str = dataclasses.field(default_factory=lambda: os.urandom(6).hex())  # pruning deletes only its own


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
        if out_of_memory(e):
            raise
        raise DamagedCheckpoint(f"checkpoint {path} cannot be read ({type(e).__name__}); it is damaged, or not a "
                                "checkpoint (a ckpt_*.json is the readable record beside one): use another, e.g. "
                                "ckpt_best.pt") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("config"), dict):
        raise DamagedCheckpoint(f"{path} is not a checkpoint written by train.py")
    if ckpt.get("meta") is not None and (problems := meta_problems(ckpt["meta"])):
        raise CheckpointError(f"{path} has a damaged tokenizer meta ({'; '.join(problems)})")
    if problems := checkpoint_problems(ckpt):
        raise DamagedCheckpoint(f"{path} is damaged or was edited: {'; '.join(problems)}; use another checkpoint "
                                "(a resume tries the run's older ones by itself)")
    if ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} was written by a newer version of this code; update it")
    cfg = model_config(ckpt["config"].get("model"), path)
    state, lora = ckpt["model"], None
    if "lora_base" in ckpt:
        lora = read_adapters(ckpt, cfg, path, device)
        state = merged(lora, cfg, device)
    return Weights(cfg, state, ckpt.get("meta"), ckpt["config"], ckpt, path, "checkpoint", "fp32",
                   ckpt.get("step"), ckpt.get("val_loss"), lora)


# A numbered checkpoint, ckpt_000500.pt, is a ckpt_last.pt kept (training.save_interval, keep_last).
NUMBERED = re.compile(r"ckpt_(\d{6,})\.pt")


def numbered_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"ckpt_{step:06d}.pt"


def run_checkpoints(folder: str | Path) -> list[Path]:
    """The checkpoints of the run in `folder`, newest first: ckpt_last.pt, then the numbered ones (with
    the readable JSON that train.py writes beside them) and ckpt_best.pt, by step (what a resume tries)."""
    folder = Path(folder)
    found = [p for p in folder.glob("ckpt_*.pt") if p.name == "ckpt_best.pt" or NUMBERED.fullmatch(p.name)
             and p.with_suffix(".json").is_file()]
    last = [folder / "ckpt_last.pt"] if (folder / "ckpt_last.pt").is_file() else []
    return last + sorted(found, key=lambda p: stored(p, "step", -1), reverse=True)


def stored(path: Path, key: str, default=None):
    """A value from a checkpoint's readable JSON (ckpt_last.json beside ckpt_last.pt), without loading it."""
    try:
        readable = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, or not JSON
        return default
    value = readable.get(key, default) if isinstance(readable, dict) else default
    return value if type(value) is type(default) or default is None else default


def prune_numbered(folder: Path, keep: int, step: int, run_id: str) -> None:
    """Delete this run's numbered checkpoints beyond the newest `keep` up to `step`. Only
    files whose JSON names this run go: never another run's, nor any file train.py did not write."""
    steps = {p: int(m.group(1)) for p in folder.glob("ckpt_*.pt") if (m := NUMBERED.fullmatch(p.name))}
    own = sorted((p for p, s in steps.items() if s <= step and stored(p, "run_id") == run_id), key=steps.get)
    for old in own[:-keep]:
        old.unlink()
        old.with_suffix(".json").unlink(missing_ok=True)


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
    where = Path(base["path"])  # absolute (older checkpoints: as init_from gave it, from the current folder)
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
    return {"path": str(start.path.resolve()), "digest": digest(start.state_dict, start.model)}  # from any folder


def weights_to_save(state: dict[str, torch.Tensor], lora: LoraConfig, base: dict | None) -> dict:
    """A checkpoint's weights, from the model's state dict: all of them; for a LoRA run (base: its
    reference) the adapters only, or with lora.save = "full" every weight, unmerged so that training
    can resume."""
    if base is None:
        return {"model": state}
    return {"model": state if lora.save == "full" else {k: v for k, v in state.items() if is_adapter(k)},
            "lora_base": base}


# ----------------------------------------------------------------------------- one loader

def find_weights(path: str | Path, setting: str = "") -> Path:
    """`path` itself, or a run folder's ckpt_best.pt, else ckpt_last.pt. `setting`: the field that gave it."""
    folder = Path(path)
    if not folder.exists():
        named = f"{setting} = {str(path)!r}" if setting else str(path)
        raise CheckpointError(f"{named} does not exist; give {READ}" + (setting and " (a preset says how to make it)"))
    if folder.is_file() or is_export(folder):
        return folder
    if best := best_checkpoint(folder):
        return best
    runs = sorted({str(p.parent) for p in folder.glob("*/ckpt_*.pt")})
    hint = f" (runs found: {', '.join(runs)})" if runs else ""
    if any((folder / name).is_file() for name in ("config.json", *WEIGHT_FILES)):  # a model folder cut short
        hint = " (a model folder needs both config.json and model.safetensors, or its index: copy it again)"
    raise CheckpointError(f"no checkpoint in {folder}/: no ckpt_best.pt or ckpt_last.pt; train first, or give {READ}"
                          f"{hint}")


def best_checkpoint(folder: Path) -> Path | None:
    """A run folder's ckpt_best.pt, else its ckpt_last.pt, else None."""
    return next((folder / name for name in ("ckpt_best.pt", "ckpt_last.pt") if (folder / name).is_file()), None)


def is_export(folder: Path) -> bool:
    """A folder of safetensors weights (ours, or a Hugging Face model's, whole or in shards)."""
    return (folder / "config.json").is_file() and any((folder / name).is_file() for name in WEIGHT_FILES)


class SafetensorsFolder:
    """A folder's safetensors weights, one model.safetensors or shards named by model.safetensors.index.json,
    memory-mapped: `shapes` costs no reading, and get(name) copies one tensor out, as fp32 on `device` (an fp32
    view of the file would keep its pages resident beside the model). Its own dtype, bf16 say, is `dtype`."""

    def __init__(self, folder: Path, device: str | torch.device):
        self.device, index = device, folder / WEIGHT_FILES[1]
        sharded = index.is_file()
        index_json = json.loads(index.read_text(encoding="utf-8")) if sharded else None
        if sharded and (problems := shard_index_problems(index_json)):
            raise CheckpointError(f"{index}: {'; '.join(problems)}; download it again")
        weight_map = index_json["weight_map"] if sharded else None
        files = sorted(set(weight_map.values())) if weight_map else [WEIGHT_FILES[0]]
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(f"{index} names {', '.join(missing[:3])}, which {'is' if len(missing) == 1 else 'are'} "
                                  "not in the folder; download the missing shards")
        self.files = {name: safe_open(folder / name, "pt") for name in files}
        self.where = weight_map or {k: files[0] for k in self.files[files[0]].keys()}
        self.shapes = {k: tuple(self.files[f].get_slice(k).get_shape()) for k, f in self.where.items()}
        first = next(iter(self.where), None)
        self.dtype = str(self.files[self.where[first]].get_slice(first).get_dtype()) if first else "F32"

    def get(self, name: str) -> torch.Tensor:
        return self.files[self.where[name]].get_tensor(name).to(self.device, torch.float32, copy=True)


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> Weights:
    """Weights from a checkpoint file, a run folder, a native export, a Hugging Face folder or a GGUF
    file, checked to fit their model config before anything is built from them."""
    path = find_weights(path)
    if gguf_format.read_as_gguf(path):
        weights = read_gguf(path, device)
    else:
        weights = read_checkpoint(path, device) if path.is_file() else read_export(path, device)
    check_fits(weights.state_dict, weights.model, path)
    check_finite(weights.state_dict, path)
    return weights


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Weights]:
    """A GPT in eval mode on `device` (on a CPU, in GPT.decode_layout), built from any weights load_weights
    reads, and the Weights. They must carry their tokenizer: the callers (sample.py, eval.py) turn text into tokens."""
    src = load_weights(path)
    if src.meta is None:
        raise CheckpointError(f"{src.path} has no tokenizer (neither tokenizer.json nor {META_FILE}), so its tokens "
                              "cannot be turned into text; put the model's tokenizer.json beside its weights, "
                              "fine-tune it on your data first (training.init_from: that adds one), or export it again")
    model = GPT.from_state_dict(src.model, src.state_dict)
    if src.meta["vocab_size"] < src.model.vocab_size:
        # Weights from elsewhere can score more tokens than the tokenizer has (e.g. a Llama's vocabulary
        # fine-tuned on char data): ids it cannot spell are cut off the logits, like padding rows.
        model.config.vocab_size = src.meta["vocab_size"]
    return model.to(device).eval().decode_layout(), src  # eval: no dropout


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
    """A native export (our names) or a Hugging Face folder (ours or anyone's), with its tokenizer:
    our tokenizer_meta.json, else the folder's tokenizer.json (tokenizer.hf_tokenizer_meta)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        meta_path = folder / META_FILE
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else hf_tokenizer_meta(folder)
        weights = SafetensorsFolder(folder, device)
    except OSError as e:
        raise CheckpointError(f"{folder} cannot be read ({e.strerror}: {e.filename}); check its permissions") from None
    except (ValueError, SafetensorError) as e:  # truncated, or not JSON / safetensors at all
        raise CheckpointError(f"{folder} cannot be read ({type(e).__name__}: {e}); export it again") from None
    if problems := export_problems(config, NATIVE):
        raise CheckpointError(f"{folder}/config.json is damaged ({'; '.join(problems)}); export it again")
    if meta is not None and (problems := meta_problems(meta)):
        raise CheckpointError(f"{folder}/{META_FILE} is damaged ({'; '.join(problems)}); export it again")
    if config.get("format") == NATIVE:
        cfg = model_config(config.get("model"), folder / "config.json")
        tensors = {k: weights.get(k) for k in weights.shapes}
        if cfg.tie_embeddings and "transformer.wte.weight" in tensors:
            tensors["lm_head.weight"] = tensors["transformer.wte.weight"]  # tied: stored once
        source = config.get("source") or {}
        return Weights(cfg, tensors, meta, config.get("config"), None, folder, "native",
                       config.get("dtype", "fp32"), source.get("step"), source.get("val_loss"))
    weights_of = from_hf_layout(config, weights.shapes, weights.get, meta, folder)
    return dataclasses.replace(weights_of, dtype=DTYPE_NAMES.get(weights.dtype, "fp32"))


def read_gguf(path: Path, device: str | torch.device) -> Weights:
    """A GGUF file (llama.cpp's), read as a Hugging Face folder (gguf_format.read_gguf)."""
    try:
        config, shapes, get, meta = gguf_format.read_gguf(path, device)
    except UserError as e:  # gguf_format's, or tokenizer.py's for its tokenizer
        raise CheckpointError(e.problems) from None
    return dataclasses.replace(from_hf_layout(config, shapes, get, meta, path), format="gguf")


def from_hf_layout(config: dict, shapes: dict, get, meta: dict | None, where: Path) -> Weights:
    """Weights in Hugging Face's names and config.json (get(name): one tensor, fp32) -> ours, through hf.py."""
    ours = config.get("tinygpt") or {}  # our own settings, in an export of ours
    try:
        config_file = where / "config.json" if where.is_dir() else where
        settings = hf.read_config(config, shapes, config_file)  # refuses a model_type we do not read
        cfg = model_config(ours.get("model") or settings, config_file)
        wrong = hf.check_counts(shapes, cfg)  # before converting: that pads and loops as it says
        if wrong:
            raise not_fitting(where, wrong)
        state = hf.from_hf(get, shapes, cfg, config["model_type"], where)
    except hf.FormatError as e:
        raise CheckpointError(e.problems) from None
    if meta is None and config["model_type"] == "gpt2" and config.get("vocab_size") == hf.GPT2_META["vocab_size"]:
        meta = dict(hf.GPT2_META)  # a GPT-2 BPE model from elsewhere
    if meta is not None and meta["vocab_size"] > cfg.vocab_size:
        raise CheckpointError(f"{where}: its tokenizer has {meta['vocab_size']:,} tokens, more than the model's "
                              f"{cfg.vocab_size:,} embedding rows; the tokenizer belongs to another model")
    source = ours.get("source") or {}
    return Weights(cfg, state, meta, ours.get("config"), None, where, "hf", "fp32", source.get("step"),
                   source.get("val_loss"))


# ----------------------------------------------------------------------------- checks

def not_fitting(where: Path, wrong: list[str]) -> CheckpointError:
    return CheckpointError(f"{where}: the weights do not fit their model settings ({'; '.join(wrong[:3])}); "
                           "it is damaged: export or train it again")


def check_finite(state: dict[str, torch.Tensor], where: Path) -> None:
    """Refuse NaN or inf weights when they are read: a model built on them computes NaN, and a run
    started from them would seem to diverge at once, for no fault of its learning rate."""
    bad = {k: int((~torch.isfinite(t)).sum()) for k, t in state.items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())}
    if bad:
        first = next(iter(bad))
        raise CheckpointError(f"{where} holds weights that are not finite numbers ({sum(bad.values()):,} NaN or inf "
                              f"values in {len(bad)} tensors, the first {first}): they come from a run that "
                              "diverged or a damaged file; use other weights, e.g. an earlier checkpoint")


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
    if cfg.training.resuming:
        lora = weights.lora.config if weights.lora else LoraConfig(rank=0)
        keys = ("rank", "alpha", "targets") if lora.rank else ("rank",)
        stored += [("lora", k, getattr(lora, k)) for k in keys]
    if weights.meta is not None:
        stored += [("data", "tokenizer", "train-bpe" if "learned_vocab" in weights.meta else weights.meta["tokenizer"]),
                   ("data", "bpe_encoding", weights.meta.get("encoding", cfg.data.bpe_encoding))]
    problems = []
    for section, k, theirs in stored:
        ours = getattr(getattr(cfg, section), k)
        chosen = f"{section}.{k}" in cfg.explicit or (k == "vocab_size" and ours != 0)
        if k == "block_size" and weights.model.position == "rope" and not cfg.training.resuming:
            # Rotary positions have no table: a new run trains with the context its settings give (the
            # default, bounded by the weights'), not a folder's maximum (8,192 for SmolLM2) that would
            # not fit in memory; it may be shorter than the weights', never longer than they learned.
            if chosen and ours > theirs:
                problems.append(f"model.block_size = {ours} is longer than the {theirs} tokens the weights learned "
                                f"(rotary positions beyond are untrained); use at most {theirs}")
            cfg.model.block_size = ours if chosen else min(ours, theirs)
        elif theirs == ours:
            continue
        elif chosen:
            fix = ("; the model reads text with its own tokenizer: drop data.tokenizer, and train.py prepares "
                   "the data with it" if section == "data" else "")
            problems.append(f"{section}.{k}: {theirs!r} in the weights, {ours!r} in the config{fix}")
        else:
            setattr(getattr(cfg, section), k, theirs)
    return problems
