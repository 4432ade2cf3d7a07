"""What a run shows besides its loss: its header, a log line every log_interval steps, the report of
each evaluation with a sample, the log file train_log.json (plot.py draws it), how long the run will
take, and MFU (model FLOPs utilisation).

    log = start_log(cfg, out_dir, model, proc, precision, resumed=None)
    meter = StepMeter(cfg, proc, model, log, board=None, first_step=0)
    meter.step_done(state, loss, lr, grad_norm)   # every log_interval steps: one line, one record
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from checkpoint import LoopState, Weights
from checks import log_problems
from config import Config, ConfigError, TrainingConfig
from data import Data, split_bits_per_byte
from errors import DataError
from tokenizer import start_token, tokenizer_from_meta
from files import write_json
from generate import generate_stream
from lora import trainable
from model import GPT
from records import records_summary
from options import config_changes
from runtime import Process, all_reduce, format_duration, gathered, is_sharded, peak_flops, usable_cores
from tasks import Task

SAMPLE_TEMPERATURE = 0.8  # of the samples at each evaluation (training.sample_tokens)
ESTIMATE_EVAL_ABOVE_S = 10  # a first evaluation expected to take longer says how long, before it ends


# ----------------------------------------------------------------------------- what the run is

def print_header(cfg: Config, model: GPT, data: Data, proc: Process, precision: str, start: Weights | None,
                 state: LoopState, lora_base: dict | None) -> None:
    """The settings that differ from the defaults, where the weights come from, the model, the data,
    the device and the batch (rank 0 prints it)."""
    out_dir, meta = Path(cfg.training.out_dir), data.meta
    print(f"settings: {cfg.preset or 'defaults'}" + (" + command line" if cfg.overrides else "")
          + f"; all of them in {out_dir / 'config.toml'}\n" + config_changes(cfg))
    if start:
        print(f"{'resuming' if cfg.training.resuming else 'initialised'} from {start.path} at step {state.step}")
    print(f"model: {model.num_params() / 1e6:.2f}M parameters | data: {data.folder} "
          f"({meta['tokenizer']}, vocab {meta['vocab_size']:,}) | device: {proc.device}, {precision}"
          + (f", threads {proc.threads}" if proc.device_type == "cpu" else "")
          + (f", {proc.world_size} processes ({cfg.training.parallel})" if proc.world_size > 1 else ""))
    if "records" in meta:  # how many, and with the loss on the answers, how much of them is trained on
        long = int((np.diff(data.starts["train"]) > cfg.model.block_size + 1).sum()) if data.starts else 0
        print(records_summary(meta) + (f"; {long:,} longer than block_size ({'dropped' if data.drop_long else 'cut'})"
                                        if long else ""))
    if cfg.lora.rank:
        n, total = trainable(model)
        print(f"lora: rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g}, targets {cfg.lora.targets} | trainable: "
              f"{n:,} of {total:,} parameters ({100 * n / total:.2f}%) | base: {lora_base['path']}")
    t = cfg.training
    print(f"effective batch: {t.batch_size} x {t.grad_accum_steps} accumulation = "
          f"{t.batch_size * t.grad_accum_steps} sequences = {cfg.tokens_per_step():,} tokens per step")
    if notice := schedule_notice(t):
        print(notice)


def schedule_notice(t: TrainingConfig) -> str | None:
    """A warmup or decay in steps that a shortened max_iters no longer leaves room for (a preset run with
    --max-iters 30, say), said in one line: the run is still what was asked, but rarely what was meant."""
    if t.warmup_iters >= t.max_iters:
        peak = t.learning_rate * t.max_iters / t.warmup_iters
        return (f"notice: training.warmup_iters = {t.warmup_iters} is not below max_iters = {t.max_iters}: the "
                f"learning rate rises for the whole run, to {peak:.1e} of {t.learning_rate:.1e}; for a short run "
                f"lower it (e.g. --training.warmup_iters {max(1, t.max_iters // 10)}), or set training.warmup_frac")
    warmup, decay = t.warmup_steps(), t.decay_steps()
    if t.lr_schedule == "wsd" and warmup + decay > t.max_iters:
        return (f"notice: wsd's decay of {decay} steps does not fit after a warmup of {warmup} in max_iters = "
                f"{t.max_iters}: it is cut to {max(0, t.max_iters - warmup)} steps; lower training.decay_iters "
                "or set training.decay_frac")
    return None


# ----------------------------------------------------------------------------- the log file

def start_log(cfg: Config, out_dir: Path, model: GPT, proc: Process, precision: str,
              resumed: LoopState | None) -> dict:
    """The run's log (train_log.json). On resume the old curves continue, trimmed to the checkpoint's
    step, and the resume is recorded (plot.py marks it)."""
    log = {"version": 1, "config": cfg.to_dict(),
           "run": {"tokens_per_step": cfg.tokens_per_step(), "n_params": model.num_params(),
                   "n_trainable": trainable(model)[0],
                   "device": proc.device, "precision": precision, "world_size": proc.world_size,
                   "status": "running", "stop_reason": None, "early_stop_step": None},
           "evals": [], "train": [], "best": None, "resumes": []}
    if not (resumed and proc.is_main):
        return log
    step, old = resumed.step, read_log(out_dir / "train_log.json")
    if old is None:
        print(f"notice: {out_dir / 'train_log.json'} is missing or damaged; the curves before step {step} are "
              "lost, the log starts again from the checkpoint")
    else:  # what the log holds past the checkpoint's step (a kill came between the two) is dropped
        for kind in ("evals", "train", "resumes"):
            log[kind] = [r for r in old[kind] if r["step"] <= step]
    log["resumes"].append({"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    log["best"] = {"step": resumed.best_step, "val_loss": resumed.best_val_loss}
    return log


class Board:
    """train_log.json's records also as TensorBoard events in <out_dir>/tensorboard (training.tensorboard):
    the same values at the same steps. train_log.json stays the record that plot.py and resume read."""
    SCALARS = {"train": ("loss", "lr", "grad_norm", "clipped", "tokens_per_s", "mfu"),
               "evals": ("train_loss", "val_loss", "val_bpb", "task_accuracy", "lr")}

    def __init__(self, out_dir: Path, resumed_step: int | None):
        # A resumed run's events past its checkpoint (a kill came after them) are dropped, as in the log.
        self.writer = tensorboard_writer()(str(out_dir / "tensorboard"),
                                           purge_step=None if resumed_step is None else resumed_step + 1)

    def add(self, kind: str, record: dict) -> None:
        for key in self.SCALARS[kind]:
            if record.get(key) is not None:
                self.writer.add_scalar(f"{kind}/{key}", record[key], record["step"])
        if record.get("sample") is not None:
            self.writer.add_text("sample", record["sample"], record["step"])
        self.writer.flush()  # a run may be killed at any moment


def tensorboard_writer():
    """torch's SummaryWriter class, which needs the optional tensorboard package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("training.tensorboard = true needs the tensorboard package: pip install tensorboard, or "
                          "set training.tensorboard = false (train_log.json and plot.py need nothing more)") from None
    return SummaryWriter


def read_log(path: Path) -> dict | None:
    """A train_log.json's records, or None when it is missing or damaged."""
    try:
        log = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if log_problems(log):  # checks.py: the same checks as plot.py's
        return None
    return {kind: log.get(kind, []) for kind in ("evals", "train", "resumes")}


def write_log(out_dir: Path, log: dict) -> None:
    write_json(out_dir / "train_log.json", log, indent=1)


# ----------------------------------------------------------------------------- each evaluation

def eval_estimate(seconds: float, task: Task | None) -> None:
    """Before the first evaluation's result: how long its losses will take, when that is more than a moment,
    and that training.task's answers come after them (their time depends on how long the answers get)."""
    if seconds > ESTIMATE_EVAL_ABOVE_S:
        then = f", then training.task's {len(task.examples)} examples" if task else ""
        print(f"(about {format_duration(seconds)}{then}) ", end="", flush=True)


def record_eval(log: dict, board: Board | None, state: LoopState, losses: dict[str, float], lr: float, meta: dict,
                sample: str | None, accuracy: float | None) -> float | None:
    """Add an evaluation to the log; returns the val loss in bits per byte (None: unknown for the data)."""
    val_bpb = split_bits_per_byte(meta, "val", losses["val"])
    record(log, board, "evals", {"step": state.step, "train_loss": losses["train"], "val_loss": losses["val"],
                                 "val_bpb": val_bpb, "lr": lr, "tokens": state.tokens,
                                 "elapsed_s": round(state.elapsed_s, 2),
                                 **({"task_accuracy": accuracy} if accuracy is not None else {}),
                                 **({"sample": sample} if sample is not None else {})})
    log["best"] = {"step": state.best_step, "val_loss": state.best_val_loss}
    return val_bpb


def record(log: dict, board: Board | None, kind: str, values: dict) -> None:
    """One record of the log ("train" or "evals"), and its TensorBoard events."""
    log[kind].append(values)
    if board:
        board.add(kind, values)


def report_eval(losses: dict[str, float], val_bpb: float | None, improved: bool, saved_best: bool,
                step: int, sample: str | None, accuracy: float | None) -> None:
    """The rest of the line "eval step N: " (train and val loss, bits per byte, task accuracy, best), and the
    sample."""
    print(f"train {losses['train']:.4f}, val {losses['val']:.4f}"
          + (f" = {val_bpb:.4f} bits/byte" if val_bpb is not None else "")
          + (f", task {accuracy:.4f}" if accuracy is not None else "")
          + (" (best" + (", saved ckpt_best.pt)" if saved_best else ")") if improved else ""))
    if sample is not None:
        print(f"sample at step {step}:\n{sample}\n")


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
def eval_sample(model: GPT, meta: dict, training: TrainingConfig, proc: Process,
                stopping: Callable[[], bool] = lambda: False) -> str | None:
    """training.sample_tokens tokens after training.sample_prompt (None when 0), from the same seed at
    every evaluation, so that two samples differ only by the weights. Its generator is its own: the
    training RNG (dropout) does not move, so a run trains the same with or without samples. Rank 0
    samples, or under FSDP every process (each forward gathers weights from all of them, so none may
    stop alone); `stopping()` (Ctrl-C, SIGTERM) cuts the sample short on rank 0."""
    if training.sample_tokens == 0 or not (proc.is_main or is_sharded(model)):
        return None
    ids = sample_prompt_ids(training, meta)
    generator = torch.Generator(proc.device).manual_seed(training.seed)
    new = []  # (1, 1) each, left on the device until the end: reading one would make the CPU wait for a GPU
    model.eval()
    with gathered(model):
        for token in generate_stream(model, torch.tensor([ids], device=proc.device), training.sample_tokens,
                                     SAMPLE_TEMPERATURE, generator=generator):
            new.append(token)
            if not is_sharded(model) and stopping():
                break
    model.train()
    text = tokenizer_from_meta(meta).decode(torch.cat(new, dim=1)[0].tolist() if new else [])
    return training.sample_prompt + text


@torch.no_grad()
def eval_task(model: GPT, task: Task | None, proc: Process, stopping: Callable[[], bool] = lambda: False
              ) -> float | None:
    """training.task's accuracy: the share of its examples answered exactly (greedy, so the same weights
    always score the same); None without a task, or when `stopping()` cuts it short. Each process answers
    its share of the examples and the counts are summed; under FSDP every process answers all of them, to
    the end of every budget (each forward gathers weights from all of them: all make the same calls)."""
    if task is None:
        return None
    sharded = is_sharded(model)
    mine = task if sharded else dataclasses.replace(task, examples=task.examples[proc.rank::proc.world_size])
    model.eval()
    with gathered(model):
        result = mine.score(model, (lambda: False) if sharded else stopping, whole=sharded)
    model.train()
    if sharded:
        return result["accuracy"]
    counts = torch.tensor([result["correct"] if result else 0, result is None], dtype=torch.float64, device=proc.device)
    correct, stopped = all_reduce(counts, proc, "sum").tolist()
    return None if stopped else correct / len(task.examples)


# ----------------------------------------------------------------------------- each step

class StepMeter:
    """Every log_interval steps, one line (loss, learning rate, the gradient norm before clipping and
    the share of the steps since the last line that were clipped, ms per step, tokens per second, MFU,
    time left) and its record in train_log.json's "train". After the first two steps, how long the run
    will take. Gradient norms stay on the device until a line needs them: reading one would make the
    CPU wait for a GPU at every step. Rank 0 measures and prints; the others do nothing."""

    def __init__(self, cfg: Config, proc: Process, model: GPT, log: dict, board: Board | None, first_step: int):
        self.cfg, self.proc, self.model, self.first_step = cfg, proc, model, first_step
        self.log, self.board = log, board  # train_log.json's records, and TensorBoard's (or None)
        self.peak = peak_flops(proc.device)
        self.interval_start = time.time()  # of the current log interval, evaluations left out
        self.clipped = torch.zeros((), device=proc.device)  # steps clipped since the last line
        self.steps = 0
        # On a terminal, one line that each step rewrites, between the log lines; never in a file.
        self.progress = proc.is_main and sys.stdout.isatty()

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (an evaluation) out of the time per step."""
        self.interval_start += seconds

    def step_done(self, state: LoopState, loss: float, lr: float, grad_norm: torch.Tensor) -> None:
        t = self.cfg.training
        if not self.proc.is_main:
            return
        self.steps += 1
        if t.grad_clip > 0:
            self.clipped += grad_norm > t.grad_clip
        step = state.step
        if step == self.first_step + 2 and t.log_interval > 2 and step < t.max_iters:  # before the first log line
            self.clear()
            announce_speed(t.max_iters, step, self.proc, (time.time() - self.interval_start) / 2)
        if step % t.log_interval:
            self.show_progress(step, loss)
            return
        self.clear()
        if self.proc.device_type == "cuda":
            torch.cuda.synchronize()
        # A resumed run's first interval may be short: it starts where the checkpoint was.
        dt_ms = (time.time() - self.interval_start) * 1000 / min(t.log_interval, step - self.first_step)
        self.interval_start = time.time()
        tok_s = self.cfg.tokens_per_step() * 1000 / dt_ms
        mfu = estimate_mfu(self.model, tok_s, self.peak * self.proc.world_size) if self.peak else None
        eta = format_duration((t.max_iters - step) * dt_ms / 1000)  # at this interval's speed
        norm, clipped = grad_norm.item(), self.clipped.item() / self.steps
        self.clipped.zero_()
        self.steps = 0
        print(f"step {step}/{t.max_iters} | loss {loss:.4f} | lr {lr:.2e} | grad norm {norm:.3f} (clipped "
              f"{clipped:.0%}) | {dt_ms:.1f} ms/step | {tok_s:,.0f} tok/s"
              + (f" | mfu {100 * mfu:.1f}%" if mfu is not None else "") + f" | eta {eta}")
        record(self.log, self.board, "train", {
            "step": step, "loss": loss, "lr": lr, "ms_per_step": round(dt_ms, 2), "tokens_per_s": round(tok_s),
            "tokens": state.tokens, "grad_norm": norm, "clipped": clipped,
            **({"mfu": round(mfu, 4)} if mfu is not None else {})})

    def show_progress(self, step: int, loss: float) -> None:
        if self.progress:
            seconds = (time.time() - self.interval_start) / self.steps  # per step, in this interval so far
            left = format_duration((self.cfg.training.max_iters - step) * seconds)
            sys.stdout.write(f"\r  step {step}/{self.cfg.training.max_iters} | loss {loss:.4f} | "
                             f"{self.cfg.tokens_per_step() / seconds:,.0f} tok/s | eta {left}\033[K")
            sys.stdout.flush()

    def clear(self) -> None:
        """Erase the progress line, before anything else is printed."""
        if self.progress:
            sys.stdout.write("\r\033[K")


def announce_speed(max_iters: int, step: int, proc: Process, seconds_per_step: float) -> None:
    """After the first steps: how long the whole run will take, with a hint when that is hours on a CPU,
    and one when other work keeps the cores busy (the load average counts this run's threads too)."""
    steps = max_iters - step
    left = steps * seconds_per_step
    hint = ("; on a CPU these settings take hours: they are sized for a GPU (--device cuda), or try "
            "configs/cpu/small.toml" if proc.device_type == "cpu" and left > 3600 else "")
    load, cores = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0, usable_cores()
    # The load average counts the whole machine: it says nothing about a share of it (a container, taskset).
    if proc.device_type == "cpu" and proc.threads > 1 and cores == os.cpu_count() and load > cores + 0.5:
        hint += (f"; this machine is busy (load {load:.1f} on {cores} cores): if other work keeps running, "
                 f"fewer threads may be much faster (--training.threads {max(1, proc.threads // 2)})")
    print(f"first steps: {seconds_per_step:.2f} s/step, so about {format_duration(left)} for the "
          f"{steps} step{'s' * (steps != 1)} left, evaluations not included{hint}", flush=True)


def flops_per_token(model: GPT) -> int:
    """Training FLOPs per token, the standard estimate (Kaplan et al. 2020; PaLM appendix B):
    6 per parameter (2 for the forward multiply-add, 4 for the backward), plus attention's
    q k^T and weights @ v, which use no parameters: each costs 2 * nh * hd * T per token and
    layer in the forward (nh * hd = n_embd unless head_dim is set), times 3 with the backward, so
    12 * n_layer * nh * hd * T, counted for a full context of T = block_size. Element-wise work (norms, activations, the SwiGLU
    product, rotary, softmax, soft-cap) is left out, as is usual: it is small next to matmuls."""
    cfg = model.config
    return 6 * model.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_head * cfg.head_size() * cfg.block_size


def estimate_mfu(model: GPT, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: the fraction of the hardware's peak that training achieves."""
    return flops_per_token(model) * tokens_per_s / peak_flops
