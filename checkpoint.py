"""Checkpoints: everything needed to continue a run, written atomically, loaded safely.

A checkpoint `ckpt_last.pt` (or `ckpt_best.pt`) is a dict of tensors and plain values:

    model, optimizer, scaler   state dicts (the uncompiled model's weights)
    step, best_val_loss, best_step, bad_evals, tokens, elapsed_s   loop state
    rng                        RNG states as tensors (dropout draws from them)
    config, meta               the resolved config and the tokenizer meta

Beside it, `ckpt_last.json` holds the readable part (everything but tensors).
Loading uses torch.load(weights_only=True): no pickled code ever runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from data import atomic_write_text

CHECKPOINT_VERSION = 1
# Model settings that change the shapes of the weights (dropout and the backend do not).
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "pad_vocab_multiple")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says why and what to do."""


def save_checkpoint(path: str | Path, state: dict) -> None:
    """torch.save to a temporary file, then rename over `path`: a kill never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    readable = {k: v for k, v in state.items() if k not in ("model", "optimizer", "scaler", "rng")}
    atomic_write_text(path.with_suffix(".json"), json.dumps(readable, indent=2) + "\n")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train first (python train.py) "
                              "or pass the path of a ckpt_*.pt file")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated, corrupt, or not a torch file at all
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}); it is corrupt "
                              "or not a checkpoint: use another one, e.g. ckpt_best.pt") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint written by train.py")
    if ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} was written by a newer version of this code; update it")
    return ckpt


def adopt_model_shape(cfg, stored_model: dict, stored_meta: dict | None, meta: dict) -> list[str]:
    """Take the weights' model shape into cfg.model; return what conflicts with the user's choices.

    Shape settings the user left at their defaults are replaced by the stored ones (so
    `--resume` or `init_from` needs no model settings); ones set in a preset or on the
    command line must agree. The tokenizer must be the same as the data's.
    """
    problems = []
    for k in SHAPE_KEYS:
        ours = getattr(cfg.model, k)
        if stored_model[k] == ours:
            continue
        if f"model.{k}" in cfg.explicit or (k == "vocab_size" and ours != 0):
            problems.append(f"model.{k}: {stored_model[k]!r} in the weights, {ours!r} in the config")
        else:
            setattr(cfg.model, k, stored_model[k])
    if stored_meta is not None:
        for k in ("tokenizer", "chars", "encoding"):
            if stored_meta.get(k) != meta.get(k):
                problems.append(f"tokenizer {k}: {short(stored_meta.get(k))} in the weights, "
                                f"{short(meta.get(k))} in the data")
    return problems


def short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "...'"
