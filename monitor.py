"""What a run shows besides its loss: the log train_log.json (plot.py draws it), the gradient norm,
samples at each evaluation, and how long the run will take.

    log = start_log(cfg, out_dir, model, procs, precision, resumed_state=None)
    grads = GradNorms(device); grads.clip(scaler, optimizer, model, clip=1.0, measure=True)
    grads.report()                     # {"grad_norm": ..., "clipped": fraction of the steps clipped}
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from config import Config, ConfigError, TrainingConfig
from data import DataError, start_token, tokenizer_from_meta
from files import write_json
from lora import trainable
from runtime import Processes, format_duration, gathered, is_sharded, whole

SAMPLE_TEMPERATURE = 0.8  # of the samples at each evaluation (training.sample_tokens)


# ----------------------------------------------------------------------------- the log

def start_log(cfg: Config, out_dir: Path, model: torch.nn.Module, procs: Processes, precision: str,
              resumed_state: dict | None) -> dict:
    """The run's log (train_log.json). On resume the old curves continue, trimmed to the checkpoint's
    step, and the resume is recorded (plot.py marks it)."""
    log = {"version": 1, "config": cfg.to_dict(),
           "run": {"tokens_per_step": cfg.tokens_per_step(), "n_params": model.num_params(),
                   "n_trainable": trainable(model)[0],
                   "device": procs.device, "precision": precision, "world_size": procs.world,
                   "status": "running", "stop_reason": None, "early_stop_step": None},
           "evals": [], "train": [], "best": None, "resumes": []}
    if not (resumed_state and procs.master):
        return log
    step, old = resumed_state["step"], read_log(out_dir / "train_log.json")
    if old is None:
        print(f"notice: {out_dir / 'train_log.json'} is missing or damaged; the curves before step {step} are "
              "lost, the log starts again from the checkpoint")
    else:  # what the log holds past the checkpoint's step (a kill came between the two) is dropped
        for kind in ("evals", "train", "resumes"):
            log[kind] = [r for r in old[kind] if r["step"] <= step]
    log["resumes"].append({"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    log["best"] = {"step": resumed_state["best_step"], "val_loss": resumed_state["best_val_loss"]}
    return log


def read_log(path: Path) -> dict | None:
    """A train_log.json's records, or None when it is missing or damaged."""
    try:
        log = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    log = log if isinstance(log, dict) else {}
    records = {kind: log.get(kind, []) for kind in ("evals", "train", "resumes")}
    if not all(isinstance(r, list) and all(isinstance(x, dict) and isinstance(x.get("step"), int) for x in r)
               for r in records.values()):
        return None
    return records


def write_log(out_dir: Path, log: dict) -> None:
    write_json(out_dir / "train_log.json", log, indent=1)


def announce_speed(max_iters: int, step: int, device: str, seconds_per_step: float) -> None:
    """After the first steps: how long the whole run will take, and a hint when that is hours on a CPU."""
    left = (max_iters - step) * seconds_per_step
    hint = ("; on a CPU this preset takes hours: it is sized for a GPU (--device cuda), or try "
            "configs/cpu/small.toml" if device == "cpu" and left > 3600 else "")
    print(f"first steps: {seconds_per_step:.2f} s/step, so about {format_duration(left)} for the "
          f"{max_iters - step} steps left, evaluations not included{hint}", flush=True)


# ----------------------------------------------------------------------------- gradients

class GradNorms:
    """The global gradient norm before clipping, kept on the device (reading it would make the CPU wait
    for the GPU at every step): at each log line, the latest norm and the fraction of the steps since
    the previous log line that were clipped."""

    def __init__(self, device: str):
        self.latest: torch.Tensor | None = None
        self.clipped = torch.zeros((), device=device)  # steps clipped since the last report
        self.steps = 0

    def clip(self, scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, model: torch.nn.Module,
             clip: float, measure: bool) -> None:
        """Clip the gradients to norm `clip` (0: no clipping); the norm is measured whenever clipping, and
        at steps that are logged (`measure`)."""
        self.steps += 1
        if clip <= 0 and not measure:
            return
        scaler.unscale_(optimizer)  # the true gradients, not the loss-scaled ones
        params = [p for p in model.parameters() if p.grad is not None]
        if clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, clip)  # returns the norm before clipping
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self.latest = whole(norm)  # under FSDP, the norm of the sharded gradients is a DTensor
        if clip > 0:
            self.clipped += self.latest > clip

    def report(self) -> dict[str, float]:
        """{"grad_norm": the latest norm, "clipped": fraction of steps clipped since the last report}."""
        out = {"grad_norm": self.latest.item(), "clipped": self.clipped.item() / self.steps}
        self.clipped.zero_()
        self.steps = 0
        return out


# ----------------------------------------------------------------------------- samples

def sample_prompt_ids(training: TrainingConfig, meta: dict) -> list[int]:
    """training.sample_prompt as token ids (the start of a text when it is empty)."""
    tokenizer = tokenizer_from_meta(meta)
    if not training.sample_prompt:
        return [start_token(tokenizer)]
    try:
        return tokenizer.encode(training.sample_prompt)
    except DataError as e:
        raise ConfigError(f"training.sample_prompt has {e}") from None


@torch.no_grad()
def eval_sample(model: torch.nn.Module, meta: dict, training: TrainingConfig, procs: Processes) -> str | None:
    """training.sample_tokens tokens after training.sample_prompt (None when 0), from the same seed at
    every evaluation, so that two samples differ only by the weights. Its generator is its own: the
    training RNG (dropout) does not move, so a run trains the same with or without samples. Rank 0
    samples, or under FSDP every process (each forward gathers weights from all of them)."""
    if training.sample_tokens == 0 or not (procs.master or is_sharded(model)):
        return None
    ids = sample_prompt_ids(training, meta)
    generator = torch.Generator(procs.device).manual_seed(training.seed)
    model.eval()
    with gathered(model):
        out = model.generate(torch.tensor([ids], device=procs.device), training.sample_tokens,  # (1, T + new)
                             SAMPLE_TEMPERATURE, generator=generator)
    model.train()
    return training.sample_prompt + tokenizer_from_meta(meta).decode(out[0, len(ids):].tolist())
