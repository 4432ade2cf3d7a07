"""A training run around its loop: what it holds (Run), the checks before it starts, where it starts
from (load_start, restore), how it ends (finished, nothing to do, stopped by Ctrl-C or SIGTERM,
diverged), its summary and its exit status.
train.py is the training itself; this is the bookkeeping that keeps a run safe to stop and to rerun.

Exit status of train.py: 0 finished (or nothing left to do), 2 a mistake to fix (errors.command),
130 Ctrl-C, 143 SIGTERM and 141 a closed stdout (`| head`), each after saving the current step when
there is one, 1 a bug.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from attention import flex_cannot_train
from checks import optimizer_problems
from checkpoint import (CheckpointError, DamagedCheckpoint, LoopState, Weights, adopt_model_shape, find_weights,
                        load_weights, run_checkpoints)
from config import Config, ConfigError, TrainingConfig
from data import FOLDER_SETTINGS, Data
from errors import UserError
from files import atomic_write_text, lock, make_folder, others
from model import GPT
from monitor import Board, print_header, tensorboard_writer, write_log
from options import resume_command, to_toml
from runtime import (Process, Stopped, all_reduce, end_process, format_duration, load_optimizer_state, message_stream,
                     parallel_problems, set_rng_state)
from tasks import Task


class TrainError(UserError):
    """A problem that stops training; the message says what to do."""


@dataclass
class Run:
    """What the training loop works with: made by train.build_run, moved on by every step."""
    cfg: Config
    proc: Process                 # this process: its rank, the number of processes, its device
    model: GPT                    # the network itself, whose weights checkpoints store (FSDP shards it in place)
    wrapped: torch.nn.Module      # what a step calls: `model` compiled and/or inside DDP, or `model` itself
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16: scales the loss up so that small gradients survive; else a no-op
    data: Data                    # the token splits and their meta.json
    state: LoopState              # the step, the best val loss, ...: saved in every checkpoint
    log: dict                     # train_log.json (monitor.py)
    precision: str                # the one used: fp32, bf16 or fp16
    lora_base: dict | None = None  # a LoRA run's base weights, {"path", "digest"}, saved in its checkpoints
    board: Board | None = None    # training.tensorboard's event writer (rank 0)
    saved_step: int | None = None  # the step ckpt_last.pt holds, once there is one
    task: Task | None = None      # training.task's examples, checked at every evaluation

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.training.out_dir)


# ----------------------------------------------------------------------------- before the loop

@contextlib.contextmanager
def held(cfg: Config, proc: Process) -> Iterator[None]:
    """The run's out_dir, locked for this run alone (rank 0 holds the lock until the process ends,
    however it ends); on the way out, the processes of a torchrun job end together."""
    finished, made = False, proc.is_main and not Path(cfg.training.out_dir).exists()
    try:
        with lock(make_folder(cfg.training.out_dir, "training.out_dir") / ".lock",
                  f"training.out_dir = {cfg.training.out_dir!r}") if proc.is_main else contextlib.nullcontext():
            yield
        finished = True
    finally:
        if made:  # a run that failed before writing anything leaves no empty folder behind (rmdir: only if empty)
            with contextlib.suppress(OSError):
                Path(cfg.training.out_dir).rmdir()
        end_process(proc, finished)


def check_run(cfg: Config, proc: Process) -> None:
    """Decide what training.resume = auto means here; refuse a run that cannot work on these
    processes, or that would replace a finished one."""
    problems = parallel_problems(cfg.training, proc)
    if problems:
        raise ConfigError(problems)
    out_dir, t = Path(cfg.training.out_dir), cfg.training
    # Whether out_dir holds a run, as rank 0 sees it (every process must decide alike).
    held = run_checkpoints(out_dir) if proc.is_main else []
    foreign = others(out_dir, RUN_FILES) if proc.is_main and not held else []  # a run's own folder may hold notes
    counts = all_reduce(torch.tensor([len(held), len(foreign)], device=proc.device), proc, "max").tolist()
    found = bool(counts[0])
    t.run_found = found and not t.overwrite  # resume = auto: the same command continues the run, or starts it
    if counts[1]:
        raise TrainError(f"training.out_dir = {str(out_dir)!r} holds files that train.py did not write "
                         f"({', '.join(foreign[:3])}); give the run a folder of its own")
    if not t.resuming and not t.overwrite and found:
        raise TrainError(f"training.out_dir = {str(out_dir)!r} holds a run already (its "
                         f"{held[0].name if held else 'checkpoints'}); continue "
                         "it with --resume, replace it with --training.overwrite, or choose another "
                         "training.out_dir")
    start = Path(t.init_from).resolve() if t.init_from else None
    if start and not t.resuming and (start == out_dir.resolve() or (
            start.parent == out_dir.resolve() and start.name.startswith("ckpt_"))):  # written over by this run
        raise TrainError(f"training.init_from = {t.init_from!r} is a checkpoint in training.out_dir, which this run "
                         "writes its own over (and --training.overwrite removes); copy it to another folder and "
                         "start from there, or choose another training.out_dir")
    if t.tensorboard:
        tensorboard_writer()  # a missing package is said now, not at the first log line
    if cfg.model.attention == "flex" and proc.device_type != "cuda" and (why := flex_cannot_train(proc.device)):
        raise ConfigError(why)
    # The first thing a bare `python train.py` says on a laptop.
    if proc.is_main and proc.device_type == "cpu" and not (cfg.preset or t.init_from or t.resuming) and \
            cfg.model == type(cfg.model)() and "training.max_iters" not in cfg.explicit:
        print(f"notice: no --config, so the default model ({cfg.model.n_layer} layers, {cfg.model.n_embd} wide) for "
              f"{t.max_iters:,} steps: sized for a GPU, hours on this CPU; for a run of minutes, stop this one "
              "(Ctrl-C) and use --config configs/cpu/small.toml", flush=True)


def check_memory(run: Run) -> None:
    """Refuse a run that will not fit in memory, before its first step, in one line naming the settings
    to lower. The estimate (step_memory) counts only what a step surely adds: it refuses runs
    that cannot fit, not every run that might not."""
    available = available_memory(run.proc.device)
    need = step_memory(run.model, run.cfg, run.precision, run.proc.world_size)
    if available is not None and need > available:
        m, t = run.cfg.model, run.cfg.training
        raise TrainError(f"this run needs at least {size(need)} more for its first step and {run.proc.device} has "
                         f"{size(available)} available: lower model.block_size ({m.block_size}) or "
                         f"training.batch_size ({t.batch_size}, with a larger training.grad_accum_steps to keep the "
                         "batch), or set training.activation_checkpointing = true")


def available_memory(device: str) -> int | None:
    """Bytes the device can still give: a GPU's free memory, or the memory Linux can give without
    swapping (MemAvailable); None where that is not known (MPS, other systems)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def step_memory(model: torch.nn.Module, cfg, precision: str, world_size: int) -> int:
    """A lower bound of what a training step allocates beyond the weights (cfg: the run's Config): the
    gradients and AdamW's two moments of the trained parameters (fp32; under FSDP each process holds its
    share), the activations the backward pass keeps (at least the input of each block, its q, k, v and
    the MLP's hidden layer per token, per block; with activation checkpointing the blocks' inputs and one
    block's), and the logits of a micro-batch with their gradient (fp32: B * T * V each)."""
    m, t = cfg.model, cfg.training
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    share = world_size if t.parallel == "fsdp" else 1
    tokens, size = t.batch_size * m.block_size, 2 if precision in ("bf16", "fp16") else 4
    block = model.transformer.h[0]  # its input and normed input, q k v, the MLP's hidden layer (2H for SwiGLU)
    per_block = (2 * m.n_embd + block.attn.c_attn.out_features + block.mlp.c_fc.out_features) * tokens * size
    blocks = m.n_layer * m.n_embd * tokens * size + per_block if t.activation_checkpointing else m.n_layer * per_block
    return 3 * 4 * trained // share + blocks + 2 * 4 * tokens * m.vocab_size


def size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def begin(run: Run, start: Weights | None) -> None:
    """Rank 0: remove the run that --training.overwrite replaces (now that this one has started),
    write config.toml, open the TensorBoard events, and say what this run is."""
    if not run.proc.is_main:
        return
    if run.cfg.training.overwrite:  # what train.py wrote there, and nothing else
        for old in [*run_checkpoints(run.out_dir), *run.out_dir.glob("tensorboard/events.out.tfevents.*"),
                    run.out_dir / "train_log.json", *run.out_dir.glob("curves.*")]:  # plot.py's pictures of it
            old.unlink(missing_ok=True)
            if old.suffix == ".pt":
                old.with_suffix(".json").unlink(missing_ok=True)
    atomic_write_text(run.out_dir / "config.toml", to_toml(run.cfg))
    if run.cfg.training.tensorboard:
        run.board = Board(run.out_dir, run.state.step if run.cfg.training.resuming else None)
    print_header(run.cfg, run.model, run.data, run.proc, run.precision, start, run.state, run.lora_base)


# ----------------------------------------------------------------------------- where a run starts

def load_start(cfg: Config, proc: Process) -> Weights | None:
    """The weights a run starts from: its own newest checkpoint (training.resume), training.init_from's,
    or None (random weights). Their model shape and tokenizer settings go into cfg (adopt_model_shape)."""
    training = cfg.training
    if training.resuming:
        start = newest_checkpoint(Path(training.out_dir), proc)
    elif training.init_from:
        start = load_weights(announce_size(find_weights(training.init_from, "training.init_from"), proc), proc.device)
    else:
        return None
    if training.resuming and training.init_from:
        # A resume continues from the run's own checkpoint. The init_from it started from (a preset's,
        # say) may stay in the settings; another one is a contradiction, not something to choose for you.
        began = ((start.config or {}).get("training") or {}).get("init_from", "")
        if training.init_from != began:
            raise ConfigError(f"training.init_from = {training.init_from!r}, but the run in training.out_dir "
                              f"started from {began or 'random weights'!r}: --resume continues it from its own "
                              "checkpoint; drop training.init_from, or train a new run into another out_dir")
    auto_resumed = training.resume == "auto" and training.resuming  # a rerun found the run: say how else
    problems = adopt_model_shape(cfg, start)
    if problems:
        another = ("; to train another model in this out_dir, add --training.overwrite, or choose another "
                   "training.out_dir" if auto_resumed else "")
        raise CheckpointError(f"{start.path} does not match this run: " + "; ".join(problems) + another)
    if auto_resumed and (changed := changed_settings(cfg, start.config)):
        raise TrainError(f"training.out_dir = {training.out_dir!r} holds a run with other settings ("
                         + "; ".join(changed) + "): run its command again to continue it, add --resume to "
                         "continue it with these settings, --training.overwrite to replace it, or choose another "
                         "training.out_dir")
    return start


def newest_checkpoint(out_dir: Path, proc: Process) -> Weights:
    """The newest checkpoint of the run in out_dir that loads: a damaged one is skipped, said in one line."""
    candidates = run_checkpoints(out_dir)
    if not candidates:
        raise CheckpointError(f"training.resume: {out_dir} holds no checkpoint (ckpt_last.pt); train without "
                              "--resume first, or set training.out_dir to the run to continue")
    for path, older in zip(candidates, candidates[1:]):
        try:
            return load_weights(announce_size(path, proc), proc.device)
        except DamagedCheckpoint as e:
            if proc.is_main:
                print(f"warning: {str(e).split(';')[0]}; skipping it, trying {older.name}", file=sys.stderr,
                      flush=True)
    return load_weights(announce_size(candidates[-1], proc), proc.device)  # the oldest: its error is the run's


def announce_size(path: Path, proc: Process) -> Path:
    size = sum(p.stat().st_size for p in ([path] if path.is_file() else path.glob("*.safetensors")))
    if proc.is_main and size > 100e6:
        print(f"loading {path} ({size / 1e9:.1f} GB)...", flush=True)
    return path


# Settings that may differ when a rerun continues a run: what it runs on, how often it reports and saves,
# when it ends. The others must be the run's (a rerun with another learning rate is likely a mistake).
MAY_CHANGE = {f"training.{k}" for k in (
    "max_iters", "eval_interval", "eval_batches", "log_interval", "device", "threads", "compile", "parallel",
    "activation_checkpointing", "early_stopping", "early_stopping_patience", "early_stopping_min_delta",
    "save_best", "save_interval", "keep_last", "out_dir", "resume", "overwrite", "init_from", "sample_tokens",
    "sample_prompt", "profile_start_step", "profile_end_step", "profile_dir", "tensorboard")} | {"model.attention"}
# The files train.py writes in training.out_dir (and plot.py's picture): a folder holding others is the
# user's, and a new run there is refused. Its folders (tensorboard/, profile/, runs in it) are not files.
RUN_FILES = ("ckpt_*.pt", "ckpt_*.json", "train_log.json", "config.toml", "curves.*")
PATHS = {"data.input", "data.processed_dir", "data.tokenizer_path"}  # compared as the files they name


def changed_settings(cfg: Config, stored: dict | None) -> list[str]:
    """The settings of cfg that differ from a checkpoint's stored config, outside MAY_CHANGE, as
    "name = theirs there, ours here"; a setting the checkpoint does not store (an older version) counts as equal."""
    ours, out = cfg.to_dict(), []
    for section, values in (stored or {}).items():
        for key, theirs in (values.items() if isinstance(values, dict) else ()):
            name, here = f"{section}.{key}", ours.get(section, {}).get(key, theirs)
            if section == "data" and key in FOLDER_SETTINGS and cfg.data.processed_dir and name not in cfg.explicit:
                continue  # taken from the folder's meta.json later (prepare.ensure_prepared), checked there
            if name in PATHS and here and isinstance(theirs, str) and theirs:  # the same file, named either way
                here, theirs = str(Path(here).resolve()), str(Path(theirs).resolve())
            if name not in MAY_CHANGE and here != theirs:
                out.append(f"{name} = {theirs!r} there, {here!r} here")
    return out


def restore(start: Weights | None, training: TrainingConfig, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, device: str) -> LoopState:
    """The loop state to start from: a new one, or on resume the checkpoint's, with the optimizer's,
    the scaler's and the RNG's states put back (the weights are in the model already)."""
    if not (start and training.resuming):
        return LoopState()
    ckpt = start.training
    missing = [k for k in ("optimizer", "scaler", "rng", "step", "best_val_loss", "tokens") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{start.path} cannot be resumed: it has no {', '.join(missing)}; start a new run "
                              "from its weights with training.init_from instead")
    if problems := optimizer_problems(ckpt["optimizer"], optimizer):
        raise CheckpointError(f"{start.path} cannot be resumed: its {problems[0]}; start a new run from its weights "
                              "with training.init_from instead")
    load_optimizer_state(model, optimizer, ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"], device)
    # Checkpoints written before last_eval_step existed were all written right after an evaluation.
    saved = {"last_eval_step": ckpt["step"]} | {f.name: ckpt[f.name] for f in dataclasses.fields(LoopState)
                                                if f.name in ckpt}
    return LoopState(**saved)


# ----------------------------------------------------------------------------- how a run ends

def early_stopped(run: Run) -> None:
    """Record that early stopping ends the run at this evaluation (the log is written with it)."""
    t, state = run.cfg.training, run.state
    run.log["run"].update(status="early_stopped", early_stop_step=state.step, stop_reason=(
        f"early stopping: val loss has not improved by {t.early_stopping_min_delta} for {state.bad_evals} "
        f"evaluations (best {state.best_val_loss:.4f} at step {state.best_step})"))


def stopped(run: Run, signum: int) -> Stopped:
    """After Ctrl-C, SIGTERM or a closed stdout, with the step saved: log it, print the command that continues the run,
    and return the exception that ends it with exit status 128 + signal."""
    step = run.state.step
    if run.proc.is_main:
        run.log["run"].update(status="stopped", stop_reason=f"{signal.Signals(signum).name} at step {step}")
        write_log(run.out_dir, run.log)
        launcher = "python" if run.proc.world_size == 1 else "torchrun [your torchrun options]"
        to = message_stream()
        if run.saved_step is None:  # a resume would find no checkpoint: the way on is the same command again
            print(f"stopped at step {step}: nothing was saved (it was the first step); start it again "
                  f"with:\n  {launcher} train.py {shlex.join(run.cfg.argv)}", file=to)
        else:
            print(f"stopped at step {step}: ckpt_last.pt holds step {run.saved_step}; continue "
                  f"with:\n  {resume_command(run.cfg, launcher)}", file=to)
    if run.proc.world_size > 1:
        torch.distributed.barrier()  # torchrun ends every process once one has ended: not before rank 0 wrote
    return Stopped(128 + signum)


def diverged(run: Run, what: str) -> TrainError:
    """The error for a loss or weights that are no longer finite numbers, saying truly which step is safe."""
    step = run.state.step
    if run.proc.is_main:
        run.log["run"].update(status="diverged", stop_reason=f"{what} at step {step}")
        write_log(run.out_dir, run.log)  # nulls where the values were not finite numbers
    safe = (f"ckpt_last.pt holds step {run.saved_step}, the last finite state: resume from it with a lower "
            "training.learning_rate" if run.saved_step is not None else
            "no checkpoint was written: start again with a lower training.learning_rate")
    return TrainError(f"{what} at step {step}: training diverged; {safe} (or bf16 instead of fp16)")


def finished(run: Run) -> bool:
    """Whether the run being resumed has ended: at max_iters, or stopped early (early stopping)."""
    t, state = run.cfg.training, run.state
    return state.step >= t.max_iters or (t.early_stopping and state.bad_evals >= t.early_stopping_patience)


def nothing_to_do(run: Run) -> dict:
    t, state = run.cfg.training, run.state
    if run.proc.is_main and state.step < t.max_iters:
        print(f"nothing to do: the run in {run.out_dir} stopped early at step {state.step} ({state.bad_evals} "
              f"evaluations without improvement); to train further, raise training.early_stopping_patience or "
              "set training.early_stopping = false")
    elif run.proc.is_main:
        print(f"nothing to do: the run in {run.out_dir} is at step {state.step} and training.max_iters is "
              f"{t.max_iters}; raise --max-iters to train further")
    return summary_of(run, "nothing_to_do")


def summarize(run: Run) -> dict:
    """Mark the log finished and print what the run did and what to do next."""
    state, out_dir, cfg = run.state, run.out_dir, run.cfg
    if run.proc.is_main:
        if run.log["run"]["status"] == "running":
            run.log["run"].update(status="finished", stop_reason=f"reached max_iters = {cfg.training.max_iters}")
        write_log(out_dir, run.log)
        start, best = state.start_val_loss, state.best_val_loss
        if state.best_step == 0 and state.step > 0:
            start_weights = cfg.training.init_from or f"random (training.seed = {cfg.training.seed})"
            best_line = (f"no evaluation improved on step 0 (val {best:.4f}), so there is no ckpt_best.pt; "
                         f"step 0's weights are {start_weights}")
        else:
            best_line = f"best val loss {best:.4f} at step {state.best_step}" + \
                (f" ({best - start:+.4f} from {start:.4f} at the start)" if start is not None else "")
        conversations = run.data.meta.get("records", {}).get("kind") == "messages"
        talk = "chat.py" if conversations else "sample.py"  # a model trained on conversations answers turns
        print(f"\ndone: {run.log['run']['stop_reason']}\n"
              f"  {state.step} step{'s' * (state.step != 1)}, {state.tokens:,} tokens, "
              f"{format_duration(state.elapsed_s)} wall time\n"
              f"  {best_line}\n"
              f"  {checkpoint_list(out_dir)}; log: {out_dir}/train_log.json\n"
              f"next:\n  python {talk} --ckpt {out_dir}\n"
              f"  python plot.py {out_dir}/train_log.json")
    return summary_of(run, run.log["run"]["status"])


def checkpoint_list(out_dir: Path) -> str:
    """The run's checkpoints and the disk they take, for its summary."""
    paths = sorted(run_checkpoints(out_dir), key=lambda p: (not p.stem[5:].isdigit(), len(p.name), p.name))
    total = sum(p.stat().st_size for p in paths)
    return f"checkpoints in {out_dir}: {', '.join(p.name for p in paths)} ({total / 1e6:.1f} MB in all)"


def summary_of(run: Run, status: str) -> dict:
    state = run.state
    return {"step": state.step, "tokens": state.tokens, "best_val_loss": state.best_val_loss,
            "best_step": state.best_step, "start_val_loss": state.start_val_loss, "status": status,
            "out_dir": str(run.out_dir), "wall_s": state.elapsed_s}


# ----------------------------------------------------------------------------- exit status

def exit_status(train: Callable[[], object]) -> int:
    """Run `train` (train.py's whole job) and return its exit status: 0, or 128 + the signal that
    stopped it. A SIGTERM while no step is in progress (preparing data, loading weights, the summary)
    ends the run at once, saying so; inside the loop, runtime.StopSignals takes over: the step is saved."""
    previous = signal.signal(signal.SIGTERM, terminated_outside_the_loop)
    try:
        train()
    except Stopped as e:
        return e.code
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def terminated_outside_the_loop(signum: int, frame) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"\n{signal.Signals(signum).name}: stopped outside the training loop; no step was saved by it",
              file=sys.stderr)
    raise Stopped(128 + signum)
