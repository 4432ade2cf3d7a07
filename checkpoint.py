"""Model weights in and out: train.py's checkpoints, and one loader for every kind of weights.

A checkpoint `ckpt_last.pt` (or `ckpt_best.pt`) is a dict of tensors and plain values:

    model, optimizer, scaler   state dicts (the uncompiled, unwrapped model's weights)
    version, val_loss          the format's version, and the val loss at this step (None: not evaluated)
    step, best_val_loss, ...   the loop state (LoopState's fields)
    rng                        RNG states as tensors (dropout draws from them)
    config, meta               the resolved config and the tokenizer meta
    lora_base                  LoRA runs only: {"path", "digest"} of the base weights under the adapters

A LoRA run (lora.py) saves only its adapters as `model` (lora.save = "adapters"; "full" adds the base
weights): the base weights are read again from their path, and their digest must match.
Beside it, `ckpt_last.json` holds the readable part (everything but tensors).

`load_weights(path)` reads a checkpoint file, a run folder (its ckpt_best.pt, else ckpt_last.pt), a
native export or a Hugging Face folder (ours, or one saved by transformers: hf.py converts it) into
`Weights`. train.py (resume, init_from: `load_start`, `restore`), sample.py, eval.py and export.py
all read through it (`load_model` builds the GPT from it). Nothing here runs pickled code:
checkpoints load with torch.load(weights_only=True), exports are safetensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

import hf
from config import Config, ConfigError, LoraConfig, ModelConfig, TrainingConfig, apply_implied, validate
from data import meta_problems
from errors import UserError
from files import atomic_file, write_json
from lora import add_adapters, is_adapter, merge
from model import GPT
from options import apply
from runtime import Process, load_optimizer_state, set_rng_state

CHECKPOINT_VERSION = 1
# Model settings that the weights carry: their shapes, and what they compute (the architecture's
# switches). A run starting from weights takes these from them. Dropout and the backend are not here.
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "pad_vocab_multiple", "arch",
              "position", "norm", "mlp", "mlp_hidden", "tie_embeddings", "qk_norm", "rope_theta", "norm_eps",
              "logit_softcap")
NATIVE = "tinygpt-native"  # config.json "format" of a native export
META_FILE = "tokenizer_meta.json"  # not tokenizer.json: transformers reads that name as its own format


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
    if best := best_checkpoint(folder):
        return best
    runs = sorted({str(p.parent) for p in folder.glob("*/ckpt_*.pt")})
    hint = f" (runs found: {', '.join(runs)})" if runs else ""
    raise CheckpointError(f"no checkpoint in {folder}/: no ckpt_best.pt or ckpt_last.pt; train first, or "
                          f"pass a checkpoint, run folder or export folder{hint}")


def best_checkpoint(folder: Path) -> Path | None:
    """A run folder's ckpt_best.pt, else its ckpt_last.pt, else None."""
    return next((folder / name for name in ("ckpt_best.pt", "ckpt_last.pt") if (folder / name).is_file()), None)


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
    if config.get("model_type") in hf.ARCHITECTURES:
        ours = config.get("tinygpt") or {}  # our own settings, in an export of ours
        try:
            cfg = model_config(ours.get("model") or hf.read_config(config, tensors, folder), folder / "config.json")
            wrong = hf.check_counts(tensors, cfg, folder)  # before converting: that pads and loops as it says
            if wrong:
                raise not_fitting(folder, wrong)
            state = hf.from_hf(tensors, cfg, folder)
        except hf.FormatError as e:
            raise CheckpointError(e.problems) from None
        if meta is None and config["model_type"] == "gpt2" and config.get("vocab_size") == hf.GPT2_META["vocab_size"]:
            meta = dict(hf.GPT2_META)  # a GPT-2 BPE model from elsewhere
        dtype = {v: k for k, v in hf.DTYPES.items()}.get(config.get("torch_dtype") or config.get("dtype"), "fp32")
        source = ours.get("source") or {}
        return Weights(cfg, state, meta, ours.get("config"), None, folder, "hf", dtype,
                       source.get("step"), source.get("val_loss"))
    raise CheckpointError(f"{folder}/config.json is neither a tinygpt export nor a Hugging Face config we read "
                          f"(model_type {config.get('model_type')!r}; we read {', '.join(hf.ARCHITECTURES)})")


# ----------------------------------------------------------------------------- checks

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


# ----------------------------------------------------------------------------- starting a run

def load_start(cfg: Config, proc: Process) -> Weights | None:
    """The weights a run starts from: its own ckpt_last.pt (training.resume), training.init_from's, or
    None (random weights). Their model shape and tokenizer settings go into cfg (adopt_model_shape)."""
    training = cfg.training
    path = Path(training.out_dir) / "ckpt_last.pt" if training.resume else training.init_from
    if not path:
        return None
    if training.resume and not path.is_file():
        raise CheckpointError(f"training.resume: {path} does not exist; train without --resume first, or "
                              "set training.out_dir to the run to continue")
    found = find_weights(path)  # a run folder's checkpoint, or an export's folder
    size = (found / "model.safetensors" if found.is_dir() else found).stat().st_size
    if proc.is_main and size > 100e6:
        print(f"loading {found} ({size / 1e9:.1f} GB)...", flush=True)
    start = load_weights(found, proc.device)
    if training.resume and training.init_from:
        # --resume continues from the run's own checkpoint. The init_from it started from (a preset's,
        # say) may stay in the settings; another one is a contradiction, not something to choose for you.
        began = ((start.config or {}).get("training") or {}).get("init_from", "")
        if training.init_from != began:
            raise ConfigError(f"training.init_from = {training.init_from!r}, but the run in training.out_dir "
                              f"started from {began or 'random weights'!r}: --resume continues it from its own "
                              "checkpoint; drop training.init_from, or train a new run into another out_dir")
    problems = adopt_model_shape(cfg, start)
    if problems:
        raise CheckpointError(f"{start.path} does not match this run: " + "; ".join(problems))
    return start


def restore(start: Weights | None, training: TrainingConfig, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, device: str) -> LoopState:
    """The loop state to start from: a new one, or on resume the checkpoint's, with the optimizer's,
    the scaler's and the RNG's states put back (the weights are in the model already)."""
    if not (start and training.resume):
        return LoopState()
    ckpt = start.training
    missing = [k for k in ("optimizer", "scaler", "rng", "step", "best_val_loss", "tokens") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{start.path} cannot be resumed: it has no {', '.join(missing)}; start a new run "
                              "from its weights with training.init_from instead")
    load_optimizer_state(model, optimizer, ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"], device)
    # Checkpoints written before last_eval_step existed were all written right after an evaluation.
    saved = {"last_eval_step": ckpt["step"]} | {f.name: ckpt[f.name] for f in dataclasses.fields(LoopState)
                                                if f.name in ckpt}
    return LoopState(**saved)
