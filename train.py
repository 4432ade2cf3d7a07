"""Train a GPT on prepared text.

    python train.py --config configs/cpu/small.toml                  # a few minutes on a CPU
    python train.py --config configs/base/base.toml --device cuda    # the classic GPU run
    python train.py --config configs/cpu/small.toml                  # again: continues it (or says it is done)
    torchrun --nproc_per_node=4 train.py --config configs/base/base.toml
    torchrun --nproc_per_node=4 train.py --config configs/base/base.toml --training.parallel fsdp   # sharded
    python train.py --help                                           # every setting, with its doc

How to read it: main() is the recipe, top to bottom. train_step() is one optimizer step, all of it:
the micro-batches, the forward pass (model.py), the backward pass, the gradients shared among the
processes, clipping, the update. train_loop() runs the steps and evaluates every eval_interval steps;
after_evaluation() keeps the best checkpoint and decides early stopping. What surrounds the loop
(stops, divergence, the summary, exit codes) is in lifecycle.py; what a run prints, in monitor.py.
"""

from __future__ import annotations

# Before torch, which takes seconds to load: a Ctrl-C meanwhile ends in one line (errors.py).
from errors import command

import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import lifecycle
import monitor
import prepare
from checkpoint import (CHECKPOINT_VERSION, Weights, base_reference, numbered_path, prune_numbered, save_checkpoint,
                        weights_to_save)
from config import Config, ConfigError, TrainingConfig
from data import Data, check_split_lengths, load_mask, load_starts, load_tokens
from lifecycle import Run
from lora import add_adapters, load_adapters, store_base_in
from model import GPT
from muon import make_optimizer
from options import parse
from tasks import MAX_NEW_TOKENS, load_task
from runtime import (Process, ProfileWindow, StopSignals, all_finite, all_reduce, autocast, autocast_dtype,
                     checkpoint_activations, full_state, pick_device, pick_precision, rng_state, set_rng_state, shard,
                     start_process, whole)


def main(cfg: Config) -> dict:
    """Train as `cfg` says; returns the run's summary (printed at the end too)."""
    proc = start_process(pick_device(cfg.training.device), cfg.training.threads)
    with lifecycle.held(cfg, proc):  # this run alone writes into its out_dir
        lifecycle.check_run(cfg, proc)
        start = lifecycle.load_start(cfg, proc)  # resume: the run's newest checkpoint; init_from: those weights
        weights, adapters = start.to_start_from(cfg.training.resuming) if start else ({}, {})
        data = build_data(cfg, proc, start)      # the token splits, prepared on first use
        model = build_model(cfg, proc, weights)  # the GPT with its starting weights
        run = build_run(cfg, proc, start, data, model, adapters)  # its wrappers, optimizer and loop state
        lifecycle.check_memory(run)              # before the first step: refuse what will not fit
        lifecycle.begin(run, start)              # replace an overwritten run, write config.toml, say what it is
        if lifecycle.finished(run):
            return lifecycle.nothing_to_do(run)
        with StopSignals(proc) as signals:      # Ctrl-C and SIGTERM stop the run between two steps
            train_loop(run, signals)
        return lifecycle.summarize(run)


# ----------------------------------------------------------------------------- one step

def train_step(run: Run, lr: float, signals: StopSignals) -> tuple[float, torch.Tensor] | None:
    """One optimizer step: the gradients of grad_accum_steps micro-batches, summed, clipped, applied.
    Returns the step's mean loss and the gradient norm before clipping (left on the device), or None
    when Ctrl-C or SIGTERM came between two micro-batches: the step is dropped, nothing applied."""
    cfg, proc, t = run.cfg, run.proc, run.cfg.training
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's matrices have a peak rate of their own
    accum = t.grad_accum_steps // proc.world_size  # this process's share of the micro-batches
    loss_sum = torch.zeros((), device=proc.device)
    for micro in range(accum):
        if micro and signals.requested():  # a step of many micro-batches can take minutes on a CPU
            run.optimizer.zero_grad(set_to_none=True)
            return None
        # The step's batch is a pure function of (seed, step); each micro-batch is a slice of it, so
        # N processes see exactly the samples of one process with N times the accumulation.
        x, y, docs = run.data.batch("train", cfg.model.block_size, t.batch_size, ("train", t.seed, run.state.step),
                                    proc.device, part=proc.rank * accum + micro, parts=t.grad_accum_steps)  # (B, T)
        # DDP averages gradients across the processes in the last micro-batch's backward pass only.
        # FSDP does it in every one, so that each process only ever holds its own part of them.
        sync = micro == accum - 1 or not isinstance(run.wrapped, DDP)
        with (contextlib.nullcontext() if sync else run.wrapped.no_sync()), autocast(proc.device_type, run.precision):
            _, loss = run.wrapped(x, y, docs)  # GPT.forward: the mean loss of the micro-batch
        # Divided by accum, the summed gradients are those of the mean loss over the whole step. The
        # scaler (fp16 only) multiplies the loss, so that small gradients do not round to zero.
        run.scaler.scale(loss / accum).backward()
        loss_sum += loss.detach().float() / accum
    loss = all_reduce(loss_sum, proc).item()  # the mean over the processes
    if not math.isfinite(loss):
        raise lifecycle.diverged(run, f"the loss became {loss}")
    run.scaler.unscale_(run.optimizer)  # the true gradients, to measure and clip
    params = [p for p in run.model.parameters() if p.grad is not None]  # with LoRA, the adapters alone
    if t.grad_clip > 0:  # scale every gradient down by the same factor when their norm exceeds grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)  # the norm before clipping
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    run.scaler.step(run.optimizer)  # fp16: a step whose gradients overflowed is skipped, the scale lowered
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return loss, whole(grad_norm)  # under FSDP, the norm of sharded gradients is a DTensor


def get_lr(step: int, training: TrainingConfig) -> float:
    """Learning rate from the step alone: linear warmup, then the schedule. cosine and linear decay
    to min_lr over the rest of the run; wsd (warmup-stable-decay) holds the peak and decays linearly
    over the last part only, so a run can be continued from before its decay."""
    t = training
    warmup = t.warmup_steps()
    if step < warmup:
        return t.learning_rate * (step + 1) / warmup
    decay_start = warmup  # cosine and linear decay from the end of the warmup
    if t.lr_schedule == "wsd":
        decay_start = max(warmup, t.max_iters - t.decay_steps())
    if t.lr_schedule == "constant" or step < decay_start or t.max_iters <= decay_start:
        return t.learning_rate
    progress = min(1.0, (step - decay_start) / (t.max_iters - decay_start))
    if t.lr_schedule == "cosine":
        return t.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (t.learning_rate - t.min_lr)
    return t.learning_rate - progress * (t.learning_rate - t.min_lr)  # linear, and wsd's decay


# ----------------------------------------------------------------------------- the loop

def train_loop(run: Run, signals: StopSignals) -> None:
    """Steps until max_iters, evaluating every eval_interval steps and after the last one. The loop
    passes max_iters + 1 times: the last pass makes no update, it evaluates and saves."""
    t, state = run.cfg.training, run.state
    first_step, start_time = state.step, time.time() - state.elapsed_s  # elapsed_s carries on across resumes
    meter = monitor.StepMeter(run.cfg, run.proc, run.model, run.log, run.board, first_step)
    profiler = ProfileWindow(t.profile_start_step, t.profile_end_step, t.profile_dir or run.out_dir / "profile",
                             run.proc.device, run.proc.is_main)
    while True:
        last_step = state.step >= t.max_iters
        if signum := signals.requested():  # Ctrl-C or SIGTERM, agreed by every process
            save(run)  # this step, so that --resume continues from it
            raise lifecycle.stopped(run, signum)

        # A resumed run's step was evaluated before it was saved: last_eval_step says so.
        if (state.step % t.eval_interval == 0 or last_step) and state.last_eval_step != state.step:
            meter.clear()  # the progress line, on a terminal
            began = time.time()
            losses = evaluate(run, signals, estimate=state.step == first_step)
            if losses is None:  # a stop during the evaluation: the top of the loop saves this step and stops
                continue
            state.elapsed_s = time.time() - start_time
            stop_early = after_evaluation(run, losses, signals)
            meter.exclude(time.time() - began)  # the time per step leaves evaluations out
            if stop_early:
                break
            continue  # a stop that came during the evaluation, its sample or its save: acted on at the top
        if t.save_interval and state.step % t.save_interval == 0:
            save(run)  # a numbered checkpoint (nothing to do when the evaluation saved this step)
        if last_step:
            break

        profiler.before_step(state.step)
        lr = get_lr(state.step, t)
        rng = rng_state(run.proc.device)  # dropout's: a dropped step is put back as it was, for an exact resume
        if (done := train_step(run, lr, signals)) is None:  # stopped: the top of the loop saves the step before
            set_rng_state(rng, run.proc.device)
            continue
        loss, grad_norm = done
        state.step += 1
        state.tokens += run.cfg.tokens_per_step()
        state.elapsed_s = time.time() - start_time
        profiler.after_step(state.step)
        meter.step_done(state, loss, lr, grad_norm)


@torch.no_grad()
def evaluate(run: Run, signals: StopSignals | None = None, estimate: bool = False) -> dict[str, float] | None:
    """Mean loss over eval_batches batches of each split: the same batches every time, shared among
    the processes; None when Ctrl-C or SIGTERM came first (an evaluation can take minutes on a CPU).
    `estimate`: say how long the evaluation will take, from its first batch."""
    cfg, proc, n = run.cfg, run.proc, run.cfg.training.eval_batches
    if proc.is_main:
        print(f"eval step {run.state.step}: ", end="", flush=True)  # the rest once it is done
    began, out = time.time(), {}
    run.wrapped.eval()  # no dropout
    for split in ("train", "val"):
        total = torch.zeros((), device=proc.device)
        # Every process runs as many batches (under FSDP each forward gathers weights from all of them):
        # when they do not divide evenly, the ones past eval_batches run but do not count.
        for k in range(proc.rank, math.ceil(n / proc.world_size) * proc.world_size, proc.world_size):
            if signals and signals.requested():
                run.wrapped.train()
                return None
            x, y, docs = run.data.batch(split, cfg.model.block_size, cfg.training.batch_size,
                                        ("eval", split, cfg.training.seed, k), proc.device)
            with autocast(proc.device_type, run.precision):
                _, loss = run.wrapped(x, y, docs)
            if k < n:
                total += loss.float()
            if estimate and proc.is_main and k == 0:  # every batch takes about as long as the first
                loss.item()  # on a GPU, wait for it to finish
                monitor.eval_estimate((time.time() - began) * math.ceil(n / proc.world_size) * 2, run.task)
                estimate = False
        out[split] = all_reduce(total, proc, "sum").item() / n
    run.wrapped.train()
    return out


def after_evaluation(run: Run, losses: dict[str, float], signals: StopSignals) -> bool:
    """What follows an evaluation: the best val loss and early stopping, the log (with a sample, cut
    short by a stop), ckpt_last.pt and ckpt_best.pt, and the report. True when early stopping ends the run."""
    t, state = run.cfg.training, run.state
    if not all(map(math.isfinite, losses.values())):
        raise lifecycle.diverged(run, f"the val loss became {losses['val']} (train {losses['train']})")
    improved = losses["val"] < state.best_val_loss - t.early_stopping_min_delta
    if improved:
        state.best_val_loss, state.best_step, state.bad_evals = losses["val"], state.step, 0
    else:
        state.bad_evals += 1
    stop_early = t.early_stopping and state.bad_evals >= t.early_stopping_patience
    state.last_eval_step = state.step
    state.start_val_loss = losses["val"] if state.start_val_loss is None else state.start_val_loss
    sample = monitor.eval_sample(run.model, run.data.meta, t, run.proc, lambda: bool(signals.received))
    accuracy = monitor.eval_task(run.model, run.task, run.proc, lambda: bool(signals.received))
    if run.proc.is_main:
        # The log goes first: a kill before the checkpoint leaves a log ahead of it, which a resume trims.
        lr = get_lr(min(state.step, t.max_iters - 1), t)  # the last pass makes no step: its rate is the last one's
        val_bpb = monitor.record_eval(run.log, run.board, state, losses, lr, run.data.meta, sample, accuracy)
        if stop_early:
            lifecycle.early_stopped(run)
        monitor.write_log(run.out_dir, run.log)
    save(run, losses["val"], best=improved and t.save_best)
    if run.proc.is_main:
        saved_best = improved and t.save_best and run.saved_step == state.step
        monitor.report_eval(losses, val_bpb, improved, saved_best, state.step, sample, accuracy)
    return stop_early


def save(run: Run, val_loss: float | None = None, best: bool = False) -> None:
    """ckpt_last.pt at this step (and ckpt_best.pt when `best`, a numbered ckpt_000500.pt every
    save_interval steps), each with what resuming needs. Every process calls it: under FSDP each holds
    a part of the weights, and all take part in gathering them; rank 0 writes. A fresh run's step 0 is
    not saved (its weights are the seed's or init_from's, so a run that fails at its start leaves no
    checkpoint), nor a step twice, nor weights that are not finite."""
    t, step = run.cfg.training, run.state.step
    if step == 0 or step == run.saved_step:
        return
    if not all_finite(run.model, run.proc):  # the last update came after the last loss was checked
        raise lifecycle.diverged(run, "the weights became non-finite numbers")
    weights, optimizer = full_state(run.model, run.optimizer)  # of the unwrapped, uncompiled model
    if run.proc.is_main:
        ckpt = {"version": CHECKPOINT_VERSION, **weights_to_save(weights, run.cfg.lora, run.lora_base),
                "optimizer": optimizer, "scaler": run.scaler.state_dict(), "rng": rng_state(run.proc.device),
                **dataclasses.asdict(run.state), "val_loss": val_loss, "config": run.cfg.to_dict(),
                "meta": run.data.meta}
        save_checkpoint(run.out_dir / "ckpt_last.pt", ckpt)
        if best:
            save_checkpoint(run.out_dir / "ckpt_best.pt", ckpt)
        if t.save_interval and step % t.save_interval == 0:  # kept, until keep_last newer ones are
            save_checkpoint(numbered_path(run.out_dir, step), ckpt)
            prune_numbered(run.out_dir, t.keep_last, step, run.state.run_id)
    run.saved_step = step


# ----------------------------------------------------------------------------- set-up

def build_data(cfg: Config, proc: Process, start: Weights | None) -> Data:
    """The train and val splits, prepared on first use (prepare.py). A model that starts from weights
    reads the text with their tokenizer (a char model with its own characters), and the tokenizer
    settings taken from them count as chosen: a folder of another tokenizer is refused.
    model.vocab_size 0 is the data's."""
    model_meta = start.meta if start else None
    chosen = cfg.explicit | ({"data.tokenizer", "data.bpe_encoding"} if model_meta else set())
    if proc.is_main:  # if this fails, the other processes wait at the barrier until torchrun ends the job
        folder, meta = prepare.ensure_prepared(cfg.data, model_meta, cfg.model.block_size + 1, chosen)
    if proc.world_size > 1:
        dist.barrier()  # the others read what rank 0 prepared
    if not proc.is_main:
        folder, meta = prepare.ensure_prepared(cfg.data, model_meta, explicit=chosen)
    if cfg.data.doc_mask and meta.get("eot_token") is None and meta.get("records", {}).get("kind") not in ("pair",
                                                                                                       "messages"):
        raise ConfigError("data.doc_mask = true needs documents that end with an end-of-text token (data.tokenizer = "
                          "bpe, hf or train-bpe), or records of prompts or conversations")
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = meta["vocab_size"]
    elif cfg.model.vocab_size < meta["vocab_size"]:
        fix = ("the model reads no more tokens than its weights have rows: prepare the data with its tokenizer, or "
               "start from other weights" if start else "use 0 to take it from the data")
        raise ConfigError(f"model.vocab_size = {cfg.model.vocab_size} is smaller than the data's vocabulary "
                          f"({meta['vocab_size']}); {fix}")
    data = Data(folder, meta, *(load_tokens(folder, s, meta) for s in ("train", "val")),
                eot_token=meta.get("eot_token"), doc_mask=cfg.data.doc_mask)
    lengths = {s: len(getattr(data, s)) for s in ("train", "val")}  # records: the answers, where each starts
    data.masks = {s: m for s, n in lengths.items() if (m := load_mask(folder, s, meta, n)) is not None}
    data.starts = {s: b for s, n in lengths.items() if (b := load_starts(folder, s, meta, n)) is not None}
    data.drop_long = cfg.data.long_records == "drop"
    check_split_lengths({"train": data.train, "val": data.val}, cfg.model.block_size, folder)
    if cfg.training.sample_tokens:
        monitor.sample_prompt_ids(cfg.training, meta)  # a prompt the tokenizer cannot read fails now, not at the first eval
    return data


def build_model(cfg: Config, proc: Process, weights: dict) -> GPT:
    """The GPT on this process's device, with random weights from training.seed, or `weights`."""
    torch.manual_seed(cfg.training.seed)
    return GPT.from_state_dict(cfg.model, weights).to(proc.device) if weights else GPT(cfg.model).to(proc.device)


def wrap(model: GPT, cfg: Config, proc: Process, precision: str, adapters: dict) -> torch.nn.Module:
    """Make `model` ready to train, in place, and return what a step calls. The order matters:
    1. LoRA freezes every weight and adds the adapters (a resumed run's own come back): before the
       optimizer, which takes the trainable parameters, and before FSDP, which shards those that exist.
       Under autocast, the adapted layers' frozen weights are kept in its dtype (lora.store_base_in),
       unless the checkpoints save them (lora.save = "full") or FSDP shards them.
    2. Activation checkpointing wraps each block's forward, inside FSDP's gathering of its weights, so
       that the replay in the backward pass finds them gathered.
    3. FSDP shards the parameters in place: after the starting weights are in, so that each process
       keeps its part of them.
    4. torch.compile compiles the forward pass, and 5. DDP goes around it: its gradient averaging runs
       outside the compiled code.
    `model` itself stays what checkpoints store: its state dict has the names of an unwrapped GPT."""
    t = cfg.training
    if cfg.lora.rank:
        add_adapters(model, cfg.lora)
        load_adapters(model, adapters)
        if precision != "fp32" and cfg.lora.save == "adapters" and t.parallel != "fsdp":
            store_base_in(model, autocast_dtype(precision))
    if t.activation_checkpointing:
        checkpoint_activations(model)
    if t.parallel == "fsdp":
        shard(model, proc, precision)
    wrapped = torch.compile(model) if t.compile else model
    if proc.world_size > 1 and t.parallel == "ddp":
        wrapped = DDP(wrapped, device_ids=[torch.device(proc.device).index] if proc.device_type == "cuda" else None)
    return wrapped


def build_run(cfg: Config, proc: Process, start: Weights | None, data: Data, model: GPT, adapters: dict) -> Run:
    """Everything the loop works with: the wrappers, the optimizer (after them: it takes LoRA's adapters,
    FSDP's shards), the loop state (on resume, the checkpoint's, with the optimizer's and the RNG's)."""
    t = cfg.training
    precision = pick_precision(t.precision, proc.device_type, proc.is_main)
    wrapped = wrap(model, cfg, proc, precision, adapters)
    optimizer = make_optimizer(model, t, proc.device_type)
    scaler = torch.amp.GradScaler(proc.device_type, enabled=precision == "fp16")
    state = lifecycle.restore(start, t, model, optimizer, scaler, proc.device)
    return Run(cfg=cfg, proc=proc, model=model, wrapped=wrapped, optimizer=optimizer, scaler=scaler, data=data,
               state=state, precision=precision,
               saved_step=state.step if t.resuming and start.path.name == "ckpt_last.pt" else None,  # not a fallback
               log=monitor.start_log(cfg, Path(t.out_dir), model, proc, precision, state if t.resuming else None),
               lora_base=base_reference(start, t.resuming) if cfg.lora.rank else None,
               task=load_task(t.task, "training.task", data.meta, model.config.vocab_size, t.task_examples,
                              MAX_NEW_TOKENS) if t.task else None)


@command
def cli(argv: list[str] | None = None) -> int:
    """python train.py [options]: the exit status is lifecycle.exit_status's (2 for a mistake, 1 a bug)."""
    return lifecycle.exit_status(lambda: main(parse(argv, about=__doc__)[1]))


if __name__ == "__main__":
    sys.exit(cli())
