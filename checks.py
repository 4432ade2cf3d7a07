"""The fields of the files tinygpt reads (checkpoints, train logs; meta.json's are data.meta_problems,
a split's token ids data.load_tokens'), checked before anything is built from them: a damaged or
edited file is named with the field at fault, in one line, instead of a traceback (or, worse, a run
that "resumes" from step -7). Each function returns the problems found, as "FIELD is VALUE, expected
WHAT"; the reader (checkpoint.read_checkpoint, lifecycle.restore) puts the file's name in front.
"""

from __future__ import annotations

import math
import typing

if typing.TYPE_CHECKING:
    import torch

# A checkpoint's loop state (checkpoint.LoopState) and its other plain values: (allowed types, what).
INT, NUMBER = (int,), (int, float)
LOOP_FIELDS = {
    "step": (INT, "an integer >= 0"), "tokens": (INT, "an integer >= 0"), "bad_evals": (INT, "an integer >= 0"),
    "best_step": (INT + (type(None),), "an integer >= 0 or null"),
    "last_eval_step": (INT + (type(None),), "an integer >= 0 or null"),
    "best_val_loss": (NUMBER, "a number >= 0"), "elapsed_s": (NUMBER, "a number >= 0"),
    "start_val_loss": (NUMBER + (type(None),), "a number >= 0 or null"),
    "val_loss": (NUMBER + (type(None),), "a number >= 0 or null"),
    "run_id": ((str,), "a string"), "version": (INT, "an integer >= 0"),
}


def checkpoint_problems(ckpt: dict) -> list[str]:
    """What is wrong with a checkpoint's own fields: its loop state, its weights' dtypes, its RNG state."""
    import torch  # here, not above: plot.py checks train logs with this module and runs without torch

    out = []
    for key, (types, what) in LOOP_FIELDS.items():
        value = ckpt.get(key)
        if key not in ckpt or value is None and type(None) in types:
            continue
        wrong = isinstance(value, bool) or not isinstance(value, types)
        if not wrong and isinstance(value, (int, float)):
            # Counts and losses are never negative; best_val_loss is inf until a first evaluation.
            wrong = math.isnan(value) or (math.isinf(value) and key != "best_val_loss") or value < 0
        if wrong:
            out.append(f"{key} is {value!r}, expected {what}")
    for name, tensor in (ckpt.get("model") or {}).items():
        if not (torch.is_tensor(tensor) and tensor.is_floating_point()):
            out.append(f"weight {name} is {getattr(tensor, 'dtype', type(tensor).__name__)}, expected floating-point "
                       "numbers")
            break
    rng = ckpt.get("rng")
    if rng is not None:
        size = torch.get_rng_state().numel()
        cpu = rng.get("cpu") if isinstance(rng, dict) else None
        if not (torch.is_tensor(cpu) and cpu.dtype == torch.uint8 and cpu.numel() == size):
            out.append(f"rng is not the random generators' state (expected {size} bytes for the CPU's)")
    return out


def optimizer_problems(state, optimizer: torch.optim.Optimizer) -> list[str]:
    """What makes a checkpoint's optimizer state unfit for `optimizer`: another model's, or damaged."""
    import torch

    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not (isinstance(state, dict) and isinstance(state.get("state"), dict)
            and isinstance(state.get("param_groups"), list)):
        return ["optimizer is not an optimizer's state"]
    saved = sum(len(g.get("params", ())) for g in state["param_groups"] if isinstance(g, dict))
    if saved != len(params):
        return [f"optimizer holds the state of {saved} parameters, and this run trains {len(params)} (another "
                "model's, or other settings: lora, optimizer)"]
    for i, values in state["state"].items():
        for key, value in (values.items() if isinstance(values, dict) else ()):
            if not isinstance(i, int) or not 0 <= i < len(params):
                return [f"optimizer has state for parameter {i!r}, which this run does not have"]
            if torch.is_tensor(value) and value.dim() and value.shape != params[i].shape:
                return [f"optimizer's {key} of parameter {i} has shape {tuple(value.shape)}, the parameter "
                        f"{tuple(params[i].shape)} (another model's state)"]
    return []


# train_log.json (monitor.py writes it; plot.py and a resume read it): each record's fields that are read.
# A value that was not a finite number is written as null.
LOG_RECORDS = {"evals": {"step": INT, "train_loss": NUMBER, "val_loss": NUMBER, "lr": NUMBER, "tokens": INT,
                         "val_bpb": NUMBER},
               "train": {"step": INT, "loss": NUMBER, "lr": NUMBER, "tokens": INT, "grad_norm": NUMBER}}
LOG_OPTIONAL = {"val_bpb", "grad_norm"}  # absent from logs written before they existed


def log_problems(log) -> list[str]:
    """What is wrong with a train log's records (the first problem found), as "evals[3] has no val_loss"."""
    if not isinstance(log, dict) or any(k not in log for k in ("version", "run", "evals", "train")):
        return ["it needs the keys version, run, evals, train"]
    for kind, fields in LOG_RECORDS.items():
        if not isinstance(log[kind], list):
            return [f"{kind} is not a list of records"]
        for i, record in enumerate(log[kind]):
            if not isinstance(record, dict):
                return [f"{kind}[{i}] is not a record"]
            for key, types in fields.items():
                value = record.get(key)
                if key not in record and key not in LOG_OPTIONAL:
                    return [f"{kind}[{i}] has no {key}"]
                if value is None and key != "step":
                    continue
                if isinstance(value, bool) or not isinstance(value, types) or (types is INT and value < 0):
                    return [f"{kind}[{i}].{key} is {value!r}, expected "
                            + ("an integer >= 0" if types is INT else "a number or null")]
    return log_header_problems(log)


def log_header_problems(log: dict) -> list[str]:
    """The rest of a train log that plot.py reads: how the run went, its best step, its resumes."""
    run, best, resumes = log["run"], log.get("best"), log.get("resumes", [])
    if not isinstance(run, dict) or not isinstance(run.get("status", ""), str):
        return ["run is not an object with a status"]
    for key in ("tokens_per_step", "early_stop_step"):
        if (v := run.get(key)) is not None and not is_count(v):
            return [f"run.{key} is {v!r}, expected an integer >= 0"]
    if best is not None and not (isinstance(best, dict) and is_count(best.get("step")) and is_number(best.get("val_loss"))):
        return [f"best is {best!r}, expected null or a step and a val_loss"]
    if not (isinstance(resumes, list) and all(isinstance(r, dict) and is_count(r.get("step")) for r in resumes)):
        return ["resumes is not a list of records with a step"]
    training = log.get("config", {}).get("training", {}) if isinstance(log.get("config", {}), dict) else None
    if not isinstance(training, dict) or not is_number(training.get("grad_clip", 0)):
        return ["config.training.grad_clip is not a number"]
    return []


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_number(value) -> bool:
    return isinstance(value, NUMBER) and not isinstance(value, bool)
