"""Train a GPT on prepared text.

    python train.py --config configs/cpu/small.toml                  # a few minutes on a CPU
    python train.py --config configs/base/base.toml --device cuda    # the classic GPU run
    python train.py --config configs/cpu/small.toml --resume         # continue from ckpt_last.pt
    torchrun --nproc_per_node=4 train.py --config configs/base/base.toml
    python train.py --help                                           # every setting, with its doc

Reading order: main() sets everything up, then runs the loop. Each optimizer step
accumulates gradients over grad_accum_steps micro-batches; every eval_interval steps
(and at the last step) it evaluates, writes ckpt_last.pt, ckpt_best.pt on improvement,
and train_log.json, and checks early stopping.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import CheckpointError, adopt_model_shape, save_checkpoint
from config import Config, ConfigError, load_or_exit, to_toml
from data import (DataError, atomic_write_text, check_split_lengths, default_processed_dir, document_ids,
                  get_batch, load_meta, load_tokens, resolve_bin_dir)
from export import load_weights
from model import GPT

# Dense bf16 peak FLOP/s by GPU name, for MFU (model FLOPs utilization).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12,
              "A10": 125e12, "V100": 125e12, "T4": 65e12}


class TrainError(Exception):
    """A problem that stops training; the message says what to do."""


# ----------------------------------------------------------------------------- setup helpers

def setup_distributed(device_name: str) -> tuple[int, int, int, str]:
    """(rank, local_rank, world_size, device). Under torchrun one process per device."""
    if "RANK" not in os.environ:
        return 0, 0, 1, device_name
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), \
        int(os.environ["WORLD_SIZE"])
    if device_name == "cuda":
        torch.cuda.set_device(local_rank)
        device_name = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if device_name.startswith("cuda") else "gloo")
    return rank, local_rank, world, device_name


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else \
            "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"training.device = cuda, but this torch ({torch.__version__}) sees no CUDA "
                         "GPU; use --device cpu, or install a CUDA build of torch on a GPU machine")
    if name == "mps" and not torch.backends.mps.is_available():
        raise TrainError("training.device = mps, but MPS is not available; use --device cpu")
    return name


def pick_precision(precision: str, device_type: str) -> str:
    """The precision actually used: fp16 and unsupported bf16 fall back to fp32 on CPU."""
    if device_type == "cpu" and precision == "fp16":
        print("notice: fp16 autocast is not used on CPU; training in fp32 (bf16 is the fast option)")
        return "fp32"
    if device_type == "cpu" and precision == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print("notice: this CPU has no bf16 support; training in fp32")
        return "fp32"
    return precision


def autocast(device_type: str, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def prepare_data(cfg: Config, rank: int, world: int, start_meta: dict | None) -> tuple[Path, dict]:
    """The prepared-data folder and its meta; prepares it from data.input when missing. A char
    model's text is encoded with the model's own characters (start_meta), so it can go on training."""
    d = cfg.data
    folder = Path(d.processed_dir or default_processed_dir(d.input, d.tokenizer, d.bpe_encoding,
                                                           cfg.training.data_format))
    if cfg.training.data_format == "bin":
        folder = resolve_bin_dir(folder)
    if not (folder / "meta.json").exists() and rank == 0:
        # If this fails, the other ranks wait at the barrier below until torchrun ends the job.
        vocab = start_meta["chars"] if start_meta and start_meta.get("tokenizer") == d.tokenizer == "char" else None
        print(f"no prepared data in {folder}: preparing it from {d.input}"
              + (" with the model's characters" if vocab else ""))
        from prepare import prepare
        prepare(d.input, str(folder), d.tokenizer, cfg.training.data_format, d.bpe_encoding, d.val_fraction,
                vocab=vocab)
    if world > 1:
        dist.barrier()  # the other ranks wait until rank 0 has prepared the data
    meta = load_meta(folder)
    wanted = {"tokenizer": d.tokenizer, "format": cfg.training.data_format}
    if d.tokenizer == "bpe":
        wanted["encoding"] = d.bpe_encoding
    diffs = [f"{k} {meta.get(k)!r} (config: {v!r})" for k, v in wanted.items() if meta.get(k) != v]
    if diffs:
        raise DataError(f"{folder} holds data prepared with {', '.join(diffs)}; set "
                        "data.processed_dir to another folder, or prepare it again with --force")
    return folder, meta


def load_start(t, device: str) -> tuple[dict | None, str | None]:
    """(weights to start from, resume path). Weights come from the seed (None), a checkpoint
    (resume), or init_from (a checkpoint or an export)."""
    resume_path = str(Path(t.out_dir) / "ckpt_last.pt") if t.resume == "auto" else \
        None if t.resume == "false" else t.resume
    source = resume_path or t.init_from or None
    start = load_weights(source, device) if source else None
    if resume_path and start["checkpoint"] is None:
        raise CheckpointError(f"training.resume needs a checkpoint file, and {source} is an exported "
                              "folder; start from it with training.init_from instead")
    if start:
        start["source"] = source
    return start, resume_path


def fit_model_to(cfg: Config, start: dict | None, meta: dict, data_dir: Path) -> None:
    """Settle cfg.model against the starting weights (their shape replaces the defaults) and the data."""
    if start:
        problems = adopt_model_shape(cfg, start["model_config"], start["meta"], meta)
        theirs = (start["meta"] or {}).get("tokenizer")
        if theirs and theirs != meta["tokenizer"]:
            problems.append(f"set data.tokenizer = {theirs} (the model's)")
        elif theirs == "char" and start["meta"]["chars"] != meta["chars"]:
            problems.append(f"{data_dir} was prepared with other characters: set data.processed_dir to a "
                            "new folder, and train.py prepares the text there with the model's characters")
        if problems:
            raise CheckpointError(f"{start['source']} does not match this run: " + "; ".join(problems))
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = meta["vocab_size"]
    elif cfg.model.vocab_size < meta["vocab_size"]:
        raise ConfigError([f"model.vocab_size = {cfg.model.vocab_size} is smaller than the data's "
                           f"vocabulary ({meta['vocab_size']}); use 0 to take it from the data"])


def new_state() -> dict:
    """The loop state that a checkpoint carries besides the weights and the optimizer."""
    return {"step": 0, "best_val_loss": math.inf, "best_step": None, "bad_evals": 0, "tokens": 0,
            "elapsed_s": 0.0}


def restore(start: dict, resume_path: str | None, model: GPT, optimizer, scaler, device: str,
            master: bool) -> dict:
    """Load the starting weights; on resume also the optimizer, scaler, RNG and loop state."""
    model.load_state_dict(start["state_dict"])
    state = new_state()
    if resume_path:
        ckpt = start["checkpoint"]
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        state = {k: ckpt[k] for k in state}
        torch.set_rng_state(ckpt["rng"]["cpu"].cpu())
        if device.startswith("cuda") and ckpt["rng"]["cuda"].numel():
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu(), device)
    if master:
        print(f"{'resuming' if resume_path else 'initialised'} from {start['source']} at step {state['step']}")
    return state


def start_log(cfg: Config, out_dir: Path, n_params: int, tokens_per_step: int, device: str, precision: str,
              world: int, resumed_state: dict | None) -> dict:
    """The run's log (train_log.json). On resume the old curves continue, trimmed to the checkpoint's step."""
    log = {"version": 1, "config": cfg.to_dict(),
           "run": {"tokens_per_step": tokens_per_step, "n_params": n_params,
                   "device": device, "precision": precision, "world_size": world,
                   "status": "running", "stop_reason": None, "early_stop_step": None},
           "evals": [], "train": [], "best": None}
    old_log = out_dir / "train_log.json"
    if resumed_state and old_log.exists():
        old, step = json.loads(old_log.read_text()), resumed_state["step"]
        log["evals"] = [r for r in old["evals"] if r["step"] <= step]
        log["train"] = [r for r in old["train"] if r["step"] <= step]
        log["best"] = {"step": resumed_state["best_step"], "val_loss": resumed_state["best_val_loss"]}
    return log


def get_lr(step: int, t) -> float:
    """Learning rate from the step alone: linear warmup, then decay to min_lr."""
    if step < t.warmup_iters:
        return t.learning_rate * (step + 1) / t.warmup_iters
    if t.lr_schedule == "constant" or t.max_iters <= t.warmup_iters:
        return t.learning_rate
    progress = min(1.0, (step - t.warmup_iters) / (t.max_iters - t.warmup_iters))
    if t.lr_schedule == "linear":
        return t.learning_rate - progress * (t.learning_rate - t.min_lr)
    return t.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (t.learning_rate - t.min_lr)


@torch.no_grad()
def evaluate(model, splits: dict, cfg: Config, device: str, precision: str, rank: int, world: int,
             eot: int | None) -> dict[str, float]:
    """Mean loss over eval_iters batches per split; the same batches every time, shared among ranks."""
    model.eval()
    out = {}
    for split, tokens in splits.items():
        total = torch.zeros((), device=device)
        for k in range(rank, cfg.training.eval_iters, world):
            x, y = get_batch(tokens, cfg.model.block_size, cfg.training.batch_size,
                             ("eval", split, cfg.training.seed, k), device)
            with autocast(torch.device(device).type, precision):
                _, loss = model(x, y, doc_ids(x, cfg, eot))
            total += loss.float()
        if world > 1:
            dist.all_reduce(total)
        out[split] = total.item() / cfg.training.eval_iters
    model.train()
    return out


def doc_ids(x: torch.Tensor, cfg: Config, eot: int | None) -> torch.Tensor | None:
    return document_ids(x, eot) if cfg.data.doc_mask else None


def rng_state(device: str) -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.startswith("cuda") else torch.empty(0)}


def write_log(out_dir: Path, log: dict) -> None:
    atomic_write_text(out_dir / "train_log.json", json.dumps(log, indent=1) + "\n")


def format_duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ----------------------------------------------------------------------------- main

def main(cfg: Config) -> dict:
    """Train as `cfg` says; returns a summary dict (also printed at the end)."""
    t = cfg.training
    rank, local_rank, world, device = setup_distributed(pick_device(t.device))
    master = rank == 0
    try:
        summary = train(cfg, t, rank, world, device, master)
        if world > 1:
            dist.barrier()  # rank 0 may still be writing: tear the group down together, not one by one
        return summary
    finally:
        if world > 1:
            dist.destroy_process_group()


def train(cfg: Config, t, rank: int, world: int, device: str, master: bool) -> dict:
    device_type = torch.device(device).type
    precision = pick_precision(t.precision, device_type)
    if t.grad_accum_steps % world:
        raise ConfigError([f"training.grad_accum_steps = {t.grad_accum_steps} must be divisible by "
                           f"the number of processes ({world})"])
    accum = t.grad_accum_steps // world  # micro-steps per process
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    out_dir = Path(t.out_dir)

    start, resume_path = load_start(t, device)
    # Data: prepared on first use. Batches are drawn by key, so no data state needs saving.
    data_dir, meta = prepare_data(cfg, rank, world, start["meta"] if start else None)
    splits = {s: load_tokens(data_dir, s, meta) for s in ("train", "val")}
    eot = meta.get("eot_token")
    if cfg.data.doc_mask and eot is None:
        raise ConfigError(["data.doc_mask = true needs bpe data with end-of-text tokens "
                           "(data.tokenizer = bpe)"])
    fit_model_to(cfg, start, meta, data_dir)
    check_split_lengths(splits, cfg.model.block_size, data_dir)

    torch.manual_seed(t.seed)
    raw_model = GPT(cfg.model).to(device)
    optimizer = raw_model.configure_optimizer(t.weight_decay, t.learning_rate, (t.beta1, t.beta2), device_type,
                                              t.optimizer, t.muon_lr)
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "fp16")
    state = restore(start, resume_path, raw_model, optimizer, scaler, device, master) if start else new_state()
    model = torch.compile(raw_model) if t.compile else raw_model
    if world > 1:
        model = DDP(model, device_ids=[torch.device(device).index] if device_type == "cuda" else None)

    tokens_per_step = t.batch_size * cfg.model.block_size * t.grad_accum_steps
    peak = next((f for name, f in PEAK_FLOPS.items() if device_type == "cuda"
                 and name in torch.cuda.get_device_name(device)), None)
    log = start_log(cfg, out_dir, raw_model.num_params(), tokens_per_step, device, precision, world,
                    resumed_state=state if resume_path and master else None)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.toml", to_toml(cfg))
        print(to_toml(cfg))
        print(f"model: {raw_model.num_params() / 1e6:.2f}M parameters | data: {data_dir} "
              f"({meta['tokenizer']}, vocab {meta['vocab_size']:,}) | device: {device}, {precision}"
              + (f", {world} processes" if world > 1 else ""))
        print(f"effective batch: {t.batch_size} x {t.grad_accum_steps} accumulation = "
              f"{t.batch_size * t.grad_accum_steps} sequences = {tokens_per_step:,} tokens per step")

    # ------------------------------------------------------------------------- the loop
    step, resumed_step = state["step"], state["step"] if resume_path else None
    start_time, t0 = time.time() - state["elapsed_s"], time.time()
    ms_per_step = None
    while True:
        last_step = step == t.max_iters
        stop_reason = None

        # Evaluate, checkpoint and decide on early stopping (not again at a resumed step).
        if (step % t.eval_interval == 0 or last_step) and step != resumed_step:
            eval_start = time.time()
            losses = evaluate(model, splits, cfg, device, precision, rank, world, eot)
            improved = losses["val"] < state["best_val_loss"] - t.early_stopping_min_delta
            if improved:
                state.update(best_val_loss=losses["val"], best_step=step, bad_evals=0)
            else:
                state["bad_evals"] += 1
            if t.early_stopping and state["bad_evals"] >= t.early_stopping_patience:
                stop_reason = (f"early stopping: val loss has not improved by {t.early_stopping_min_delta} "
                               f"for {state['bad_evals']} evaluations (best {state['best_val_loss']:.4f} "
                               f"at step {state['best_step']})")
            state["elapsed_s"] = time.time() - start_time
            if master:
                # The log first, then the checkpoint: a kill in between leaves a log ahead of the
                # checkpoint, and resuming trims the log back to the checkpoint's step.
                log["evals"].append({"step": step, "train_loss": losses["train"], "val_loss": losses["val"],
                                     "lr": get_lr(min(step, t.max_iters - 1), t),
                                     "tokens": state["tokens"], "elapsed_s": round(state["elapsed_s"], 2)})
                log["best"] = {"step": state["best_step"], "val_loss": state["best_val_loss"]}
                if stop_reason:
                    log["run"].update(status="early_stopped", stop_reason=stop_reason, early_stop_step=step)
                write_log(out_dir, log)
                ckpt = {"version": 1, "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(), **state, "val_loss": losses["val"],
                        "rng": rng_state(device), "config": cfg.to_dict(), "meta": meta}
                save_checkpoint(out_dir / "ckpt_last.pt", ckpt)
                if improved and t.save_best:
                    save_checkpoint(out_dir / "ckpt_best.pt", ckpt)
                print(f"eval step {step}: train {losses['train']:.4f}, val {losses['val']:.4f}"
                      + (" (best" + (", saved ckpt_best.pt)" if t.save_best else ")") if improved else ""))
            t0 += time.time() - eval_start  # keep evaluation time out of ms/step
        if last_step or stop_reason:
            break

        # One optimizer step: accumulate gradients over micro-batches, then update.
        lr = get_lr(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            x, y = get_batch(splits["train"], cfg.model.block_size, t.batch_size, ("train", t.seed, step),
                             device, part=rank * accum + micro, parts=t.grad_accum_steps)
            # Under DDP, gradients are averaged across processes only on the last micro-step.
            sync = micro == accum - 1 or world == 1
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast(device_type, precision):
                _, loss = model(x, y, doc_ids(x, cfg, eot))
            # Each micro-batch's loss is scaled by 1/accum, so the summed gradients are
            # the gradient of the mean loss over the whole effective batch.
            scaler.scale(loss / accum).backward()
            loss_sum += loss.detach().float() / accum
        if world > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        loss_value = loss_sum.item()
        if not math.isfinite(loss_value):
            if master:
                log["run"].update(status="diverged", stop_reason=f"non-finite loss at step {step}")
                write_log(out_dir, log)
            raise TrainError(f"the loss became {loss_value} at step {step}; ckpt_last.pt holds the last "
                             "good state. Lower training.learning_rate or use bf16 instead of fp16")
        if t.grad_clip > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), t.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        state.update(step=step, tokens=state["tokens"] + tokens_per_step)

        if step % t.log_interval == 0 and master:
            if device_type == "cuda":
                torch.cuda.synchronize()
            dt_ms = (time.time() - t0) * 1000 / t.log_interval
            t0 = time.time()
            ms_per_step = dt_ms if ms_per_step is None else 0.9 * ms_per_step + 0.1 * dt_ms
            tok_s = tokens_per_step * 1000 / dt_ms
            mfu = f" | mfu {100 * raw_model.estimate_mfu(tok_s, peak * world):.1f}%" if peak else ""
            eta = format_duration((t.max_iters - step) * ms_per_step / 1000)
            print(f"step {step}/{t.max_iters} | loss {loss_value:.4f} | lr {lr:.2e} | {dt_ms:.1f} ms/step "
                  f"| {tok_s:,.0f} tok/s{mfu} | eta {eta}")
            log["train"].append({"step": step, "loss": loss_value, "lr": lr, "ms_per_step": round(dt_ms, 2),
                                 "tokens_per_s": round(tok_s), "tokens": state["tokens"]})

    # ------------------------------------------------------------------------- summary
    wall = time.time() - start_time
    if master:
        if log["run"]["status"] == "running":
            log["run"].update(status="finished", stop_reason=f"reached max_iters = {t.max_iters}")
        write_log(out_dir, log)
        best = f"{state['best_val_loss']:.4f} at step {state['best_step']}"
        print(f"\ndone: {log['run']['stop_reason']}\n"
              f"  {step} steps, {state['tokens']:,} tokens, {format_duration(wall)} wall time\n"
              f"  best val loss {best}\n"
              f"  checkpoints: {out_dir}/ckpt_best.pt, {out_dir}/ckpt_last.pt; log: {out_dir}/train_log.json\n"
              f"next:\n  python sample.py --ckpt {out_dir}/ckpt_best.pt\n"
              f"  python plot.py {out_dir}/train_log.json")
    return {"step": step, "tokens": state["tokens"], "best_val_loss": state["best_val_loss"],
            "best_step": state["best_step"], "status": log["run"]["status"], "out_dir": str(out_dir),
            "wall_s": wall}


def cli(argv: list[str] | None = None) -> int:
    cfg = load_or_exit("train.py", argv)
    try:
        main(cfg)
    except torch.OutOfMemoryError:
        print("error: out of memory: lower training.batch_size (and raise training.grad_accum_steps to keep "
              "the effective batch), or model.block_size, or use training.precision = bf16", file=sys.stderr)
        return 2
    except (ConfigError, DataError, CheckpointError, TrainError, ValueError, RuntimeError) as e:
        problems = e.problems if isinstance(e, ConfigError) else [str(e).splitlines()[0]]
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: python train.py {' '.join(sys.argv[1:])} --resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
