"""Train a GPT on prepared text.

    python train.py --config configs/cpu/small.toml                  # a few minutes on a CPU
    python train.py --config configs/base/base.toml --device cuda    # the classic GPU run
    python train.py --config configs/cpu/small.toml --resume         # continue from ckpt_last.pt
    torchrun --nproc_per_node=4 train.py --config configs/base/base.toml
    torchrun --nproc_per_node=4 train.py --config configs/base/base.toml --training.parallel fsdp   # sharded
    python train.py --help                                           # every setting, with its doc

Reading order: main(cfg) calls setup() (processes and device, the starting weights, the data, the
model and optimizer, the log), then train_loop(), then summarize(). Each optimizer step
accumulates gradients over grad_accum_steps micro-batches; every eval_interval steps (and after
the last step) the loop evaluates, logs to train_log.json, writes ckpt_last.pt (not at a fresh
run's step 0) and ckpt_best.pt on improvement, and checks early stopping. Ctrl-C or SIGTERM saves
the step in progress (see stop). What the run prints and logs besides the loss is in monitor.py.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import prepare
from attention import flex_cannot_train
from checkpoint import (CheckpointError, Weights, adopt_model_shape, base_reference, find_weights, load_weights,
                        save_checkpoint, weights_to_save)
from config import Config, ConfigError, TrainingConfig
from data import check_split_lengths, document_ids, get_batch, load_tokens, split_bits_per_byte
from errors import UserError, command
from files import atomic_write_text, lock, make_folder
from lora import add_adapters, adapter_state, trainable
from model import GPT
from monitor import GradNorms, announce_speed, eval_sample, sample_prompt_ids, start_log, write_log
from options import config_changes, parse, resume_command, to_toml
from runtime import (Processes, ProfileWindow, Stopped, StopSignals, all_finite, autocast, end_processes,
                     format_duration, full_state, load_optimizer_state, parallel_problems, peak_flops, pick_device,
                     pick_precision, rng_state, set_rng_state, shard, start_processes)

ESTIMATE_EVAL_ABOVE_S = 10  # a first evaluation expected to take longer says how long, before it ends


class TrainError(UserError):
    """A problem that stops training; the message says what to do."""


@dataclass
class Run:
    """What the loop works with, made by setup()."""
    model: torch.nn.Module       # what is called: compiled and/or wrapped in DDP
    raw_model: GPT               # the model itself (sharded in place under FSDP), whose weights checkpoints store
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # loss scaling for fp16; a no-op otherwise
    splits: dict[str, np.ndarray]
    meta: dict                   # the data's tokenizer meta
    state: dict                  # loop state, saved in checkpoints (see new_state)
    log: dict                    # train_log.json
    procs: Processes
    precision: str
    out_dir: Path
    saved_step: int | None       # the step ckpt_last.pt holds, once there is one
    lora_base: dict | None = None  # a LoRA run's base weights: {"path", "digest"}, saved in its checkpoints


# ----------------------------------------------------------------------------- set-up

def main(cfg: Config) -> dict:
    """Train as `cfg` says; returns a summary dict (also printed at the end)."""
    procs = start_processes(pick_device(cfg.training.device))
    finished = False
    try:
        # One run per out_dir at a time: the lock is held until this process ends, however it ends.
        with lock(make_folder(cfg.training.out_dir, "training.out_dir") / ".lock",
                  f"training.out_dir = {cfg.training.out_dir!r}") if procs.master else contextlib.nullcontext():
            run = setup(cfg, procs)
            if run.state["step"] >= cfg.training.max_iters:
                return nothing_to_do(cfg, run)
            with StopSignals(procs) as signals:
                train_loop(cfg, run, signals)
            finished = True
            return summarize(cfg, run)
    finally:
        end_processes(procs, finished)


def setup(cfg: Config, procs: Processes) -> Run:
    training, device = cfg.training, procs.device
    device_type = torch.device(device).type
    precision = pick_precision(training.precision, device_type, procs.master)
    problems = parallel_problems(training, procs)
    if problems:
        raise ConfigError(problems)
    out_dir = Path(training.out_dir)
    if not training.resume and not training.overwrite and (out_dir / "ckpt_last.pt").exists():
        raise TrainError(f"training.out_dir = {str(out_dir)!r} holds a run already (its ckpt_last.pt); continue "
                         "it with --resume, replace it with --training.overwrite, or choose another "
                         "training.out_dir")
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    elif cfg.model.attention == "flex" and (why := flex_cannot_train(device)):
        raise ConfigError(why)

    start = load_start(training, device, procs)
    if start:
        problems = adopt_model_shape(cfg, start)
        if problems:
            raise CheckpointError(f"{start.path} does not match this run: " + "; ".join(problems))
    # Data: prepared on first use. Batches are drawn by key, so no data state needs saving.
    data_dir, meta = prepare_data(cfg, procs, start)
    splits = {s: load_tokens(data_dir, s, meta) for s in ("train", "val")}
    if cfg.data.doc_mask and meta.get("eot_token") is None:
        raise ConfigError("data.doc_mask = true needs bpe data with end-of-text tokens (data.tokenizer = bpe)")
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = meta["vocab_size"]
    elif cfg.model.vocab_size < meta["vocab_size"]:
        raise ConfigError(f"model.vocab_size = {cfg.model.vocab_size} is smaller than the data's vocabulary "
                          f"({meta['vocab_size']}); use 0 to take it from the data")
    check_split_lengths(splits, cfg.model.block_size, data_dir)
    if training.sample_tokens:
        sample_prompt_ids(training, meta)  # a prompt the tokenizer cannot read fails now, not at the first eval

    torch.manual_seed(training.seed)
    raw_model = GPT(cfg.model).to(device)
    raw_model.activation_checkpointing = training.activation_checkpointing
    lora_base = base_reference(start, training.resume) if cfg.lora.rank else None
    if cfg.lora.rank:  # freeze the model and add adapters, before the optimizer: only they train
        add_adapters(raw_model, cfg.lora)
    if start:  # into the whole model: sharding keeps each process's part of them
        load_start_weights(start, training.resume, raw_model)
    if training.parallel == "fsdp":
        shard(raw_model, procs, precision)  # before the optimizer, which keeps state for the shards it is given
    optimizer = raw_model.configure_optimizer(training.weight_decay, training.learning_rate,
                                              (training.beta1, training.beta2), device_type,
                                              training.optimizer, training.muon_lr)
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "fp16")
    state = restore(start, training.resume, raw_model, optimizer, scaler, device) if start else new_state()
    model = torch.compile(raw_model) if training.compile else raw_model
    if procs.world > 1 and training.parallel == "ddp":
        model = DDP(model, device_ids=[torch.device(device).index] if device_type == "cuda" else None)

    log = start_log(cfg, out_dir, raw_model, procs, precision, state if training.resume else None)
    if procs.master:
        if training.overwrite:  # the replaced run goes as a whole, now that this one has started
            for old in ("ckpt_last.pt", "ckpt_last.json", "ckpt_best.pt", "ckpt_best.json", "train_log.json"):
                (out_dir / old).unlink(missing_ok=True)
        atomic_write_text(out_dir / "config.toml", to_toml(cfg))
        print(f"settings: {cfg.preset or 'defaults'}" + (" + command line" if cfg.overrides else "")
              + f"; all of them in {out_dir / 'config.toml'}\n" + config_changes(cfg))
        if start:
            print(f"{'resuming' if training.resume else 'initialised'} from {start.path} at step {state['step']}")
        print(f"model: {raw_model.num_params() / 1e6:.2f}M parameters | data: {data_dir} "
              f"({meta['tokenizer']}, vocab {meta['vocab_size']:,}) | device: {device}, {precision}"
              + (f", {procs.world} processes ({training.parallel})" if procs.world > 1 else ""))
        if cfg.lora.rank:
            n, total = trainable(raw_model)
            print(f"lora: rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g}, targets {cfg.lora.targets} | trainable: "
                  f"{n:,} of {total:,} parameters ({100 * n / total:.2f}%) | base: {lora_base['path']}")
        print(f"effective batch: {training.batch_size} x {training.grad_accum_steps} accumulation = "
              f"{training.batch_size * training.grad_accum_steps} sequences = {cfg.tokens_per_step():,} "
              "tokens per step")
    return Run(model, raw_model, optimizer, scaler, splits, meta, state, log, procs, precision, out_dir,
               state["step"] if training.resume else None, lora_base)


def load_start(training: TrainingConfig, device: str, procs: Processes) -> Weights | None:
    """The weights to start from: the run's own ckpt_last.pt (resume), init_from's, or None (random)."""
    path = Path(training.out_dir) / "ckpt_last.pt" if training.resume else training.init_from
    if not path:
        return None
    if training.resume and not path.is_file():
        raise CheckpointError(f"training.resume: {path} does not exist; train without --resume first, or "
                              "set training.out_dir to the run to continue")
    found = find_weights(path)  # a run folder's checkpoint, or an export's folder
    size = (found / "model.safetensors" if found.is_dir() else found).stat().st_size
    if procs.master and size > 100e6:
        print(f"loading {found} ({size / 1e9:.1f} GB)...", flush=True)
    start = load_weights(found, device)
    if training.resume and training.init_from:
        # --resume continues from the run's own checkpoint. The init_from it started from (a preset's,
        # say) may stay in the settings; another one is a contradiction, not something to choose for you.
        began = ((start.config or {}).get("training") or {}).get("init_from", "")
        if training.init_from != began:
            raise ConfigError(f"training.init_from = {training.init_from!r}, but the run in training.out_dir "
                              f"started from {began or 'random weights'!r}: --resume continues it from its own "
                              "checkpoint; drop training.init_from, or train a new run into another out_dir")
    return start


def prepare_data(cfg: Config, procs: Processes, start: Weights | None) -> tuple[Path, dict]:
    """The prepared-data folder and its meta, made by prepare.py when missing or made otherwise.
    A char model reads a new text with its own characters (its token ids), and the tokenizer
    settings taken from the starting weights count as chosen: a folder of another one is refused."""
    chars = start.meta["chars"] if start and start.meta and start.meta["tokenizer"] == "char" else None
    chosen = cfg.explicit | ({"data.tokenizer", "data.bpe_encoding"} if start and start.meta else set())
    if procs.master:
        # If this fails, the other ranks wait at the barrier below until torchrun ends the job.
        folder, meta = prepare.ensure_prepared(cfg.data, chars, cfg.model.block_size + 1, chosen)
    if procs.world > 1:
        dist.barrier()  # the other ranks wait until rank 0 has prepared the data
    if not procs.master:
        folder, meta = prepare.ensure_prepared(cfg.data, chars, explicit=chosen)  # reads what rank 0 made
    return folder, meta


def new_state() -> dict:
    """The loop state that a checkpoint carries besides the weights and the optimizer."""
    return {"step": 0, "best_val_loss": math.inf, "best_step": None, "bad_evals": 0, "tokens": 0,
            "elapsed_s": 0.0, "last_eval_step": None, "start_val_loss": None}


def load_start_weights(start: Weights, resume: bool, model: GPT) -> None:
    """The starting weights. A new LoRA run keeps its fresh adapters (B = 0) on the starting weights;
    a resumed one gets its own back."""
    weights = start.lora.state_dict if resume and start.lora else start.state_dict
    model.load_state_dict(adapter_state(model) | weights)


def restore(start: Weights, resume: bool, model: GPT, optimizer, scaler, device: str) -> dict:
    """The loop state to start from; on resume also the optimizer, scaler and RNG states (the weights
    are in the model already, see load_start_weights)."""
    if not resume:
        return new_state()
    ckpt = start.training
    missing = [k for k in ("optimizer", "scaler", "rng", "step", "best_val_loss", "tokens") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{start.path} cannot be resumed: it has no {', '.join(missing)}; start a new run "
                              "from its weights with training.init_from instead")
    load_optimizer_state(model, optimizer, ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"], device)
    # Checkpoints written before these keys existed were all written right after an evaluation.
    return new_state() | {"last_eval_step": ckpt["step"]} | {k: ckpt[k] for k in new_state() if k in ckpt}


# ----------------------------------------------------------------------------- the loop

def train_loop(cfg: Config, run: Run, signals: StopSignals) -> None:
    training, state, procs = cfg.training, run.state, run.procs
    device, master = procs.device, procs.master
    device_type = torch.device(device).type
    accum = training.grad_accum_steps // procs.world  # micro-steps per process
    eot = run.meta.get("eot_token")
    peak = peak_flops(device)
    step = first_step = state["step"]  # optimizer steps done so far
    start_time = time.time() - state["elapsed_s"]  # elapsed_s carries on across resumes
    interval_start = time.time()  # start of the current log interval (evaluations left out)
    grads = GradNorms(device)
    window = ProfileWindow(training.profile_start_step, training.profile_end_step,
                           training.profile_dir or run.out_dir / "profile", device, master)
    # The loop passes max_iters + 1 times: the last pass (step == max_iters) makes no update, it
    # only evaluates and saves the final weights.
    while True:
        last_step = step >= training.max_iters
        stop_reason = None
        if signum := signals.requested():  # Ctrl-C or SIGTERM: save this step and end the run
            stop(cfg, run, signum)

        # A resumed run's step was evaluated before it was saved: last_eval_step says so.
        if (step % training.eval_interval == 0 or last_step) and state["last_eval_step"] != step:
            eval_start = time.time()
            if master:
                print(f"eval step {step}: ", end="", flush=True)  # the rest once it is done: it can take a while
            losses = evaluate(run.model, run.splits, cfg, device, run.precision, procs, eot,
                              estimate=master and step == first_step)
            if not all(map(math.isfinite, losses.values())):
                raise diverged(run, step, f"the val loss became {losses['val']} (train {losses['train']})")
            improved = losses["val"] < state["best_val_loss"] - training.early_stopping_min_delta
            if improved:
                state.update(best_val_loss=losses["val"], best_step=step, bad_evals=0)
            else:
                state["bad_evals"] += 1
            if training.early_stopping and state["bad_evals"] >= training.early_stopping_patience:
                stop_reason = (f"early stopping: val loss has not improved by {training.early_stopping_min_delta} "
                               f"for {state['bad_evals']} evaluations (best {state['best_val_loss']:.4f} "
                               f"at step {state['best_step']})")
            state.update(elapsed_s=time.time() - start_time, last_eval_step=step)
            if state["start_val_loss"] is None:
                state["start_val_loss"] = losses["val"]
            save(cfg, run, losses, improved, stop_reason)  # every process: see save
            interval_start += time.time() - eval_start  # keep evaluation time out of ms/step
        if last_step or stop_reason:
            break

        # One optimizer step: accumulate gradients over micro-batches, then update.
        window.before_step(step)
        lr = get_lr(step, training)
        for group in run.optimizer.param_groups:
            # lr_scale: a group's peak rate relative to learning_rate (Muon's matrices have their own).
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            x, y = get_batch(run.splits["train"], cfg.model.block_size, training.batch_size,
                             ("train", training.seed, step), device, part=procs.rank * accum + micro,
                             parts=training.grad_accum_steps)
            # Under DDP, gradients are averaged across processes only on the last micro-step. FSDP sums
            # and splits them at every micro-step instead, so that each process only ever holds its part
            # of them (skipping that, with set_requires_gradient_sync(False), would hold whole gradients).
            sync = micro == accum - 1 or not isinstance(run.model, DDP)
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
            raise diverged(run, step, f"the loss became {loss_value}")
        grads.clip(run.scaler, run.optimizer, run.raw_model, training.grad_clip,
                   measure=(step + 1) % training.log_interval == 0)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        step += 1
        state.update(step=step, tokens=state["tokens"] + cfg.tokens_per_step(), elapsed_s=time.time() - start_time)
        window.after_step(step)

        if master and step == first_step + 2 and training.log_interval > 2:
            announce_speed(training.max_iters, step, device, (time.time() - interval_start) / 2)  # before the first log
        if master and step % training.log_interval == 0:
            if device_type == "cuda":
                torch.cuda.synchronize()
            # A resumed run's first interval may be short: it starts where the checkpoint was.
            dt_ms = (time.time() - interval_start) * 1000 / min(training.log_interval, step - first_step)
            interval_start = time.time()
            tok_s = cfg.tokens_per_step() * 1000 / dt_ms
            mfu = f" | mfu {100 * run.raw_model.estimate_mfu(tok_s, peak * procs.world):.1f}%" if peak else ""
            eta = format_duration((training.max_iters - step) * dt_ms / 1000)  # at this interval's speed
            norms = grads.report()
            print(f"step {step}/{training.max_iters} | loss {loss_value:.4f} | lr {lr:.2e} | grad norm "
                  f"{norms['grad_norm']:.3f} (clipped {norms['clipped']:.0%}) | {dt_ms:.1f} ms/step "
                  f"| {tok_s:,.0f} tok/s{mfu} | eta {eta}")
            run.log["train"].append({"step": step, "loss": loss_value, "lr": lr, "ms_per_step": round(dt_ms, 2),
                                     "tokens_per_s": round(tok_s), "tokens": state["tokens"], **norms})


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
             eot: int | None, estimate: bool = False) -> dict[str, float]:
    """Mean loss over eval_iters batches per split; the same batches every time, shared among ranks.
    `estimate`: when the evaluation will take a while (a big preset on a CPU), say how long, from the
    first batch, so that a first evaluation of minutes is not a silent one."""
    model.eval()
    out, n, start = {}, cfg.training.eval_iters, time.time()
    for split, tokens in splits.items():
        total = torch.zeros((), device=device)
        # Every process runs as many batches (under FSDP each forward gathers weights from all of them):
        # when they do not divide evenly, the ones past eval_iters run but do not count.
        for k in range(procs.rank, math.ceil(n / procs.world) * procs.world, procs.world):
            x, y = get_batch(tokens, cfg.model.block_size, cfg.training.batch_size,
                             ("eval", split, cfg.training.seed, k), device)
            with autocast(torch.device(device).type, precision):
                _, loss = model(x, y, document_ids(x, eot) if cfg.data.doc_mask else None)
            if k < n:
                total += loss.float()
            if estimate and k == procs.rank:  # the first batch: every batch takes about as long
                loss.item()  # on a GPU, wait for it to finish
                seconds = (time.time() - start) * math.ceil(n / procs.world) * len(splits)
                if seconds > ESTIMATE_EVAL_ABOVE_S:
                    print(f"(about {format_duration(seconds)}) ", end="", flush=True)
                estimate = False
        if procs.world > 1:
            dist.all_reduce(total)
        out[split] = total.item() / n
    model.train()
    return out


def save(cfg: Config, run: Run, losses: dict | None, improved: bool = False, stop_reason: str | None = None) -> None:
    """Log the evaluation (if any), then write ckpt_last.pt (and ckpt_best.pt on improvement). The log
    goes first: a kill in between leaves a log ahead of the checkpoint, which resuming trims back.
    A fresh run's step 0 is logged, not saved: its weights are the seed's or init_from's, and a run
    that fails at its start leaves no checkpoint behind. Every process calls it: under FSDP each
    holds a part of the weights, and all of them take part in gathering them (and in sampling);
    rank 0 alone writes."""
    state, step, training = run.state, run.state["step"], cfg.training
    sample = eval_sample(run.raw_model, run.meta, training, run.procs) if losses is not None else None
    saved = step > 0 and step != run.saved_step
    weights, optimizer = full_state(run.raw_model, run.optimizer) if saved else ({}, {})
    if not run.procs.master:
        run.saved_step = step if saved else run.saved_step  # as on rank 0: they must agree on what to gather
        return
    if losses is not None:
        val_bpb = split_bits_per_byte(run.meta, "val", losses["val"])
        run.log["evals"].append({"step": step, "train_loss": losses["train"], "val_loss": losses["val"],
                                 "val_bpb": val_bpb, "lr": get_lr(min(step, training.max_iters - 1), training),
                                 "tokens": state["tokens"], "elapsed_s": round(state["elapsed_s"], 2),
                                 **({"sample": sample} if sample is not None else {})})
        run.log["best"] = {"step": state["best_step"], "val_loss": state["best_val_loss"]}
    if stop_reason:
        run.log["run"].update(status="early_stopped", stop_reason=stop_reason, early_stop_step=step)
    write_log(run.out_dir, run.log)
    if saved:
        ckpt = {"version": 1, **weights_to_save(weights, cfg.lora, run.lora_base), "optimizer": optimizer,
                "scaler": run.scaler.state_dict(), **state, "val_loss": losses and losses["val"],
                "rng": rng_state(run.procs.device), "config": cfg.to_dict(), "meta": run.meta}
        save_checkpoint(run.out_dir / "ckpt_last.pt", ckpt)
        run.saved_step = step
        if improved and training.save_best:
            save_checkpoint(run.out_dir / "ckpt_best.pt", ckpt)
    if losses is not None:
        print(f"train {losses['train']:.4f}, val {losses['val']:.4f}"
              + (f" = {val_bpb:.4f} bits/byte" if val_bpb is not None else "")
              + (" (best" + (", saved ckpt_best.pt)" if saved and training.save_best else ")") if improved else ""))
        if sample is not None:
            print(f"sample at step {step}:\n{sample}\n")


def stop(cfg: Config, run: Run, signum: int) -> None:
    """Save the current step and end the run with exit status 128 + signal: weights that are not finite
    numbers are refused as a divergence instead, and before step 1 there is nothing to save."""
    if not all_finite(run.raw_model, run.procs):  # the last update came after the last loss was checked
        raise diverged(run, run.state["step"], "the weights became non-finite numbers")
    save(cfg, run, None)  # every process: see save
    if run.procs.master:
        run.log["run"].update(status="stopped", stop_reason=f"{signal.Signals(signum).name} at step {run.state['step']}")
        write_log(run.out_dir, run.log)
        launcher = "python" if run.procs.world == 1 else "torchrun [your torchrun options]"
        if run.saved_step is None:  # a resume would find no checkpoint: the way on is the same command again
            print(f"stopped at step {run.state['step']}: nothing was saved (it was the first step); start it again "
                  f"with:\n  {launcher} train.py {shlex.join(cfg.argv)}")
        else:
            print(f"stopped at step {run.state['step']}: ckpt_last.pt holds step {run.saved_step}; continue "
                  f"with:\n  {resume_command(cfg, launcher)}")
    if run.procs.world > 1:
        dist.barrier()  # torchrun ends every process once one has ended: not before rank 0 has written
    raise Stopped(128 + signum)


def diverged(run: Run, step: int, what: str) -> TrainError:
    """The error for a loss that is no longer a finite number, saying truly which step is safe."""
    if run.procs.master:
        run.log["run"].update(status="diverged", stop_reason=f"{what} at step {step}")
        write_log(run.out_dir, run.log)  # nulls where the values were not finite numbers
    safe = (f"ckpt_last.pt holds step {run.saved_step}, the last finite state: resume from it with a lower "
            "training.learning_rate" if run.saved_step is not None else
            "no checkpoint was written: start again with a lower training.learning_rate")
    return TrainError(f"{what} at step {step}: training diverged; {safe} (or bf16 instead of fp16)")


# ----------------------------------------------------------------------------- the end

def nothing_to_do(cfg: Config, run: Run) -> dict:
    if run.procs.master:
        print(f"nothing to do: {run.out_dir / 'ckpt_last.pt'} is at step {run.state['step']} and "
              f"training.max_iters is {cfg.training.max_iters}; raise --max-iters to train further")
    return summary_of(run, "nothing_to_do")


def summarize(cfg: Config, run: Run) -> dict:
    """Mark the log finished and print what the run did and what to do next."""
    state, out_dir = run.state, run.out_dir
    if run.procs.master:
        if run.log["run"]["status"] == "running":
            run.log["run"].update(status="finished", stop_reason=f"reached max_iters = {cfg.training.max_iters}")
        write_log(out_dir, run.log)
        start, best = state["start_val_loss"], state["best_val_loss"]
        if state["best_step"] == 0 and state["step"] > 0:
            start_weights = cfg.training.init_from or f"random (training.seed = {cfg.training.seed})"
            best_line = (f"no evaluation improved on step 0 (val {best:.4f}), so there is no ckpt_best.pt; "
                         f"step 0's weights are {start_weights}")
        else:
            best_line = f"best val loss {best:.4f} at step {state['best_step']}" + \
                (f" ({best - start:+.4f} from {start:.4f} at the start)" if start is not None else "")
        best_file = out_dir / ("ckpt_best.pt" if (out_dir / "ckpt_best.pt").exists() else "ckpt_last.pt")
        print(f"\ndone: {run.log['run']['stop_reason']}\n"
              f"  {state['step']} steps, {state['tokens']:,} tokens, {format_duration(state['elapsed_s'])} wall time\n"
              f"  {best_line}\n"
              f"  checkpoints: {', '.join(str(p) for p in sorted(out_dir.glob('ckpt_*.pt')))}; "
              f"log: {out_dir}/train_log.json\n"
              f"next:\n  python sample.py --ckpt {best_file}\n"
              f"  python plot.py {out_dir}/train_log.json")
    return summary_of(run, run.log["run"]["status"])


def summary_of(run: Run, status: str) -> dict:
    state = run.state
    return {"step": state["step"], "tokens": state["tokens"], "best_val_loss": state["best_val_loss"],
            "best_step": state["best_step"], "start_val_loss": state["start_val_loss"], "status": status,
            "out_dir": str(run.out_dir), "wall_s": state["elapsed_s"]}


def terminated_outside_the_loop(signum: int, frame) -> None:
    """SIGTERM while no step is in progress (preparing data, loading weights, the summary): end now,
    saying so. Inside the loop, StopSignals takes over: it finishes the step and saves it."""
    if os.environ.get("RANK", "0") == "0":
        print(f"\n{signal.Signals(signum).name}: stopped outside the training loop; no step was saved by it",
              file=sys.stderr)
    raise Stopped(128 + signum)


@command
def cli(argv: list[str] | None = None) -> int:
    """Exit status: 0 done (or nothing left to do), 2 a mistake to fix, 130 Ctrl-C, 143 SIGTERM
    (both after saving the current step, when there is one), 1 a bug (with its traceback)."""
    previous = signal.signal(signal.SIGTERM, terminated_outside_the_loop)
    try:
        main(parse(argv, about=__doc__)[1])
    except Stopped as e:
        return e.code
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
