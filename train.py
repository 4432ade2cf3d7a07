"""Train a GPT on prepared text.

    python train.py --config configs/cpu/small.toml                  # a few minutes on a CPU
    python train.py --config configs/base/base.toml --device cuda    # the classic GPU run
    python train.py --config configs/cpu/small.toml --resume         # continue from ckpt_last.pt
    torchrun --nproc_per_node=4 train.py --config configs/base/base.toml
    python train.py --help                                           # every setting, with its doc

Reading order: main(cfg) calls setup() (processes and device, the starting weights, the data, the
model and optimizer, the log), then train_loop(), then summarize(). Each optimizer step
accumulates gradients over grad_accum_steps micro-batches; every eval_interval steps (and after
the last step) the loop evaluates, writes ckpt_last.pt, ckpt_best.pt on improvement, and
train_log.json, and checks early stopping.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import prepare
from checkpoint import CheckpointError, Weights, adopt_model_shape, load_weights, save_checkpoint
from config import Config, ConfigError, TrainingConfig, parse, to_toml
from data import check_split_lengths, document_ids, get_batch, load_tokens
from errors import UserError, command
from files import atomic_write_text
from model import GPT
from runtime import (Processes, autocast, end_processes, peak_flops, pick_device, pick_precision, rng_state,
                     set_rng_state, start_processes)


class TrainError(UserError):
    """A problem that stops training; the message says what to do."""


@dataclass
class Run:
    """What the loop works with, made by setup()."""
    model: torch.nn.Module       # what is called: compiled and/or wrapped in DDP
    raw_model: GPT               # the plain model, whose weights checkpoints store
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # loss scaling for fp16; a no-op otherwise
    splits: dict[str, np.ndarray]
    meta: dict                   # the data's tokenizer meta
    state: dict                  # loop state, saved in checkpoints (see new_state)
    log: dict                    # train_log.json
    procs: Processes
    precision: str
    out_dir: Path
    resumed_step: int | None  # a resumed run's first step, evaluated before it was saved


# ----------------------------------------------------------------------------- set-up

def main(cfg: Config) -> dict:
    """Train as `cfg` says; returns a summary dict (also printed at the end)."""
    procs = start_processes(pick_device(cfg.training.device))
    finished = False
    try:
        run = setup(cfg, procs)
        train_loop(cfg, run)
        finished = True
        return summarize(cfg, run)
    finally:
        end_processes(procs, finished)


def setup(cfg: Config, procs: Processes) -> Run:
    training, device = cfg.training, procs.device
    device_type = torch.device(device).type
    precision = pick_precision(training.precision, device_type)
    if training.grad_accum_steps % procs.world:
        raise ConfigError(f"training.grad_accum_steps = {training.grad_accum_steps} must be divisible by "
                          f"the number of processes ({procs.world})")
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls

    start = load_start(training, device)
    if start:
        problems = adopt_model_shape(cfg, start)
        if problems:
            raise CheckpointError(f"{start.path} does not match this run: " + "; ".join(problems))
    # Data: prepared on first use. Batches are drawn by key, so no data state needs saving.
    chars = start.meta["chars"] if start and start.meta and start.meta["tokenizer"] == "char" else None
    data_dir, meta = prepare_data(cfg, procs, chars)
    splits = {s: load_tokens(data_dir, s, meta) for s in ("train", "val")}
    if cfg.data.doc_mask and meta.get("eot_token") is None:
        raise ConfigError("data.doc_mask = true needs bpe data with end-of-text tokens (data.tokenizer = bpe)")
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = meta["vocab_size"]
    elif cfg.model.vocab_size < meta["vocab_size"]:
        raise ConfigError(f"model.vocab_size = {cfg.model.vocab_size} is smaller than the data's vocabulary "
                          f"({meta['vocab_size']}); use 0 to take it from the data")
    check_split_lengths(splits, cfg.model.block_size, data_dir)

    torch.manual_seed(training.seed)
    raw_model = GPT(cfg.model).to(device)
    optimizer = raw_model.configure_optimizer(training.weight_decay, training.learning_rate,
                                              (training.beta1, training.beta2), device_type,
                                              training.optimizer, training.muon_lr)
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "fp16")
    state = restore(start, training.resume, raw_model, optimizer, scaler, device) if start else new_state()
    if start and procs.master:
        print(f"{'resuming' if training.resume else 'initialised'} from {start.path} at step {state['step']}")
    model = torch.compile(raw_model) if training.compile else raw_model
    if procs.world > 1:
        model = DDP(model, device_ids=[torch.device(device).index] if device_type == "cuda" else None)

    out_dir = Path(training.out_dir)
    log = start_log(cfg, out_dir, raw_model, procs, precision, state if training.resume else None)
    if procs.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.toml", to_toml(cfg))
        print(to_toml(cfg))
        print(f"model: {raw_model.num_params() / 1e6:.2f}M parameters | data: {data_dir} "
              f"({meta['tokenizer']}, vocab {meta['vocab_size']:,}) | device: {device}, {precision}"
              + (f", {procs.world} processes" if procs.world > 1 else ""))
        print(f"effective batch: {training.batch_size} x {training.grad_accum_steps} accumulation = "
              f"{training.batch_size * training.grad_accum_steps} sequences = {tokens_per_step(cfg):,} "
              "tokens per step")
    return Run(model, raw_model, optimizer, scaler, splits, meta, state, log, procs, precision, out_dir,
               state["step"] if training.resume else None)


def load_start(training: TrainingConfig, device: str) -> Weights | None:
    """The weights to start from: the run's own ckpt_last.pt (resume), init_from's, or None (random)."""
    if training.resume:
        path = Path(training.out_dir) / "ckpt_last.pt"
        if not path.is_file():
            raise CheckpointError(f"training.resume: {path} does not exist; train without --resume first, or "
                                  "set training.out_dir to the run to continue")
        return load_weights(path, device)
    return load_weights(training.init_from, device) if training.init_from else None


def prepare_data(cfg: Config, procs: Processes, chars: str | None) -> tuple[Path, dict]:
    """The prepared-data folder and its meta, made by prepare.py when missing or made otherwise.
    `chars`: a char model's characters, so that it reads a new text with its own token ids."""
    if procs.master:
        # If this fails, the other ranks wait at the barrier below until torchrun ends the job.
        folder, meta = prepare.ensure_prepared(cfg.data, chars)
    if procs.world > 1:
        dist.barrier()  # the other ranks wait until rank 0 has prepared the data
    if not procs.master:
        folder, meta = prepare.ensure_prepared(cfg.data, chars)  # now only reads what rank 0 made
    return folder, meta


def new_state() -> dict:
    """The loop state that a checkpoint carries besides the weights and the optimizer."""
    return {"step": 0, "best_val_loss": math.inf, "best_step": None, "bad_evals": 0, "tokens": 0,
            "elapsed_s": 0.0}


def restore(start: Weights, resume: bool, model: GPT, optimizer, scaler, device: str) -> dict:
    """Load the starting weights; on resume also the optimizer, scaler, RNG and loop state."""
    model.load_state_dict(start.state_dict)
    if not resume:
        return new_state()
    ckpt = start.training
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"], device)
    return {k: ckpt[k] for k in new_state()}


def start_log(cfg: Config, out_dir: Path, model: GPT, procs: Processes, precision: str,
              resumed_state: dict | None) -> dict:
    """The run's log (train_log.json). On resume the old curves continue, trimmed to the checkpoint's step."""
    log = {"version": 1, "config": cfg.to_dict(),
           "run": {"tokens_per_step": tokens_per_step(cfg), "n_params": model.num_params(),
                   "device": procs.device, "precision": precision, "world_size": procs.world,
                   "status": "running", "stop_reason": None, "early_stop_step": None},
           "evals": [], "train": [], "best": None}
    old_log = out_dir / "train_log.json"
    if resumed_state and procs.master and old_log.exists():
        old, step = json.loads(old_log.read_text()), resumed_state["step"]
        log["evals"] = [r for r in old["evals"] if r["step"] <= step]
        log["train"] = [r for r in old["train"] if r["step"] <= step]
        log["best"] = {"step": resumed_state["best_step"], "val_loss": resumed_state["best_val_loss"]}
    return log


def tokens_per_step(cfg: Config) -> int:
    return cfg.training.batch_size * cfg.training.grad_accum_steps * cfg.model.block_size


# ----------------------------------------------------------------------------- the loop

def train_loop(cfg: Config, run: Run) -> None:
    training, state, procs = cfg.training, run.state, run.procs
    device, master = procs.device, procs.master
    device_type = torch.device(device).type
    accum = training.grad_accum_steps // procs.world  # micro-steps per process
    eot = run.meta.get("eot_token")
    peak = peak_flops(device)
    step = state["step"]  # optimizer steps done so far
    start_time = time.time() - state["elapsed_s"]  # elapsed_s carries on across resumes
    interval_start = time.time()  # start of the current log interval (evaluations left out)
    ms_per_step = None
    # The loop passes max_iters + 1 times: the last pass (step == max_iters) makes no update, it
    # only evaluates and saves the final weights. A resumed run has evaluated its first step already.
    while True:
        last_step = step == training.max_iters
        stop_reason = None

        if (step % training.eval_interval == 0 or last_step) and step != run.resumed_step:
            eval_start = time.time()
            losses = evaluate(run.model, run.splits, cfg, device, run.precision, procs, eot)
            improved = losses["val"] < state["best_val_loss"] - training.early_stopping_min_delta
            if improved:
                state.update(best_val_loss=losses["val"], best_step=step, bad_evals=0)
            else:
                state["bad_evals"] += 1
            if training.early_stopping and state["bad_evals"] >= training.early_stopping_patience:
                stop_reason = (f"early stopping: val loss has not improved by {training.early_stopping_min_delta} "
                               f"for {state['bad_evals']} evaluations (best {state['best_val_loss']:.4f} "
                               f"at step {state['best_step']})")
            state["elapsed_s"] = time.time() - start_time
            if master:
                save(cfg, run, losses, improved, stop_reason)
            interval_start += time.time() - eval_start  # keep evaluation time out of ms/step
        if last_step or stop_reason:
            break

        # One optimizer step: accumulate gradients over micro-batches, then update.
        lr = get_lr(step, training)
        for group in run.optimizer.param_groups:
            # lr_scale: a group's peak rate relative to learning_rate (Muon's matrices have their own).
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            x, y = get_batch(run.splits["train"], cfg.model.block_size, training.batch_size,
                             ("train", training.seed, step), device, part=procs.rank * accum + micro,
                             parts=training.grad_accum_steps)
            # Under DDP, gradients are averaged across processes only on the last micro-step.
            sync = micro == accum - 1 or procs.world == 1
            with (contextlib.nullcontext() if sync else run.model.no_sync()), autocast(device_type, run.precision):
                _, loss = run.model(x, y, document_ids(x, eot) if cfg.data.doc_mask else None)
            # Each micro-batch's loss is scaled by 1/accum, so the summed gradients are
            # the gradient of the mean loss over the whole effective batch.
            run.scaler.scale(loss / accum).backward()
            loss_sum += loss.detach().float() / accum
        if procs.world > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        loss_value = loss_sum.item()
        if not math.isfinite(loss_value):
            if master:
                run.log["run"].update(status="diverged", stop_reason=f"non-finite loss at step {step}")
                write_log(run.out_dir, run.log)
            raise TrainError(f"the loss became {loss_value} at step {step}; ckpt_last.pt holds the last "
                             "good state. Lower training.learning_rate or use bf16 instead of fp16")
        if training.grad_clip > 0:
            run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the loss-scaled ones
            torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), training.grad_clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        step += 1
        state.update(step=step, tokens=state["tokens"] + tokens_per_step(cfg))

        if step % training.log_interval == 0 and master:
            if device_type == "cuda":
                torch.cuda.synchronize()
            dt_ms = (time.time() - interval_start) * 1000 / training.log_interval
            interval_start = time.time()
            ms_per_step = dt_ms if ms_per_step is None else 0.9 * ms_per_step + 0.1 * dt_ms
            tok_s = tokens_per_step(cfg) * 1000 / dt_ms
            mfu = f" | mfu {100 * run.raw_model.estimate_mfu(tok_s, peak * procs.world):.1f}%" if peak else ""
            eta = format_duration((training.max_iters - step) * ms_per_step / 1000)
            print(f"step {step}/{training.max_iters} | loss {loss_value:.4f} | lr {lr:.2e} | {dt_ms:.1f} ms/step "
                  f"| {tok_s:,.0f} tok/s{mfu} | eta {eta}")
            run.log["train"].append({"step": step, "loss": loss_value, "lr": lr, "ms_per_step": round(dt_ms, 2),
                                     "tokens_per_s": round(tok_s), "tokens": state["tokens"]})


def get_lr(step: int, training: TrainingConfig) -> float:
    """Learning rate from the step alone: linear warmup, then the schedule. cosine and linear decay
    to min_lr over the rest of the run; wsd (warmup-stable-decay) holds the peak and decays linearly
    over the last part only, so a run can be continued from before its decay."""
    t = training
    warmup = t.warmup_iters or round(t.warmup_frac * t.max_iters)  # steps, or a fraction of the run
    if step < warmup:
        return t.learning_rate * (step + 1) / warmup
    decay_start = warmup  # cosine and linear decay from the end of the warmup
    if t.lr_schedule == "wsd":
        decay_start = max(warmup, t.max_iters - (t.decay_iters or round(t.decay_frac * t.max_iters)))
    if t.lr_schedule == "constant" or step < decay_start or t.max_iters <= decay_start:
        return t.learning_rate
    progress = min(1.0, (step - decay_start) / (t.max_iters - decay_start))
    if t.lr_schedule == "cosine":
        return t.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (t.learning_rate - t.min_lr)
    return t.learning_rate - progress * (t.learning_rate - t.min_lr)  # linear, and wsd's decay


@torch.no_grad()
def evaluate(model, splits: dict, cfg: Config, device: str, precision: str, procs: Processes,
             eot: int | None) -> dict[str, float]:
    """Mean loss over eval_iters batches per split; the same batches every time, shared among ranks."""
    model.eval()
    out = {}
    for split, tokens in splits.items():
        total = torch.zeros((), device=device)
        for k in range(procs.rank, cfg.training.eval_iters, procs.world):
            x, y = get_batch(tokens, cfg.model.block_size, cfg.training.batch_size,
                             ("eval", split, cfg.training.seed, k), device)
            with autocast(torch.device(device).type, precision):
                _, loss = model(x, y, document_ids(x, eot) if cfg.data.doc_mask else None)
            total += loss.float()
        if procs.world > 1:
            dist.all_reduce(total)
        out[split] = total.item() / cfg.training.eval_iters
    model.train()
    return out


def save(cfg: Config, run: Run, losses: dict, improved: bool, stop_reason: str | None) -> None:
    """Log the evaluation, then write ckpt_last.pt (and ckpt_best.pt on improvement). The log goes
    first: a kill in between leaves a log ahead of the checkpoint, which resuming trims back."""
    state, step, training = run.state, run.state["step"], cfg.training
    run.log["evals"].append({"step": step, "train_loss": losses["train"], "val_loss": losses["val"],
                             "lr": get_lr(min(step, training.max_iters - 1), training),
                             "tokens": state["tokens"], "elapsed_s": round(state["elapsed_s"], 2)})
    run.log["best"] = {"step": state["best_step"], "val_loss": state["best_val_loss"]}
    if stop_reason:
        run.log["run"].update(status="early_stopped", stop_reason=stop_reason, early_stop_step=step)
    write_log(run.out_dir, run.log)
    ckpt = {"version": 1, "model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(), **state, "val_loss": losses["val"],
            "rng": rng_state(run.procs.device), "config": cfg.to_dict(), "meta": run.meta}
    save_checkpoint(run.out_dir / "ckpt_last.pt", ckpt)
    if improved and training.save_best:
        save_checkpoint(run.out_dir / "ckpt_best.pt", ckpt)
    print(f"eval step {step}: train {losses['train']:.4f}, val {losses['val']:.4f}"
          + (" (best" + (", saved ckpt_best.pt)" if training.save_best else ")") if improved else ""))


def write_log(out_dir: Path, log: dict) -> None:
    atomic_write_text(out_dir / "train_log.json", json.dumps(log, indent=1) + "\n")


def format_duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ----------------------------------------------------------------------------- the end

def summarize(cfg: Config, run: Run) -> dict:
    """Mark the log finished and print what the run did and what to do next."""
    state, out_dir = run.state, run.out_dir
    wall = state["elapsed_s"]  # set at the last evaluation, which is the end of the loop
    if run.procs.master:
        if run.log["run"]["status"] == "running":
            run.log["run"].update(status="finished", stop_reason=f"reached max_iters = {cfg.training.max_iters}")
        write_log(out_dir, run.log)
        print(f"\ndone: {run.log['run']['stop_reason']}\n"
              f"  {state['step']} steps, {state['tokens']:,} tokens, {format_duration(wall)} wall time\n"
              f"  best val loss {state['best_val_loss']:.4f} at step {state['best_step']}\n"
              f"  checkpoints: {out_dir}/ckpt_best.pt, {out_dir}/ckpt_last.pt; log: {out_dir}/train_log.json\n"
              f"next:\n  python sample.py --ckpt {out_dir}/ckpt_best.pt\n"
              f"  python plot.py {out_dir}/train_log.json")
    return {"step": state["step"], "tokens": state["tokens"], "best_val_loss": state["best_val_loss"],
            "best_step": state["best_step"], "status": run.log["run"]["status"], "out_dir": str(out_dir),
            "wall_s": wall}


@command
def cli(argv: list[str] | None = None) -> int:
    main(parse(argv, about=__doc__)[1])
    return 0


if __name__ == "__main__":
    sys.exit(cli())
