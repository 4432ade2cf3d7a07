"""Measure speed: training steps, sampling, data preparation, and time to quality.

    python bench.py                                          # base model: train, sample, prepare
    python bench.py --config configs/cpu/small.toml --what train
    python bench.py --what sample,prepare --json bench.json
    python bench.py --what speedrun                          # reference vs speedrun preset, side by side
    python bench.py --what ablation                          # what each change of the speedrun is worth
    python bench.py --what profile                           # where a training step's time goes
    python bench.py --what lora --config configs/finetune/shakespeare_lora.toml  # vs a full fine-tune
    python bench.py --what train --training.compile true     # any config override applies
    python bench.py --what gpu                               # everything only a CUDA GPU can check
    python bench.py --what memory                            # ddp vs fsdp per process; activation checkpointing
    python bench.py --help                                   # every option, with its default

Each figure is a median over repeats, taken after warm-up steps. Results are printed as
one table; --json also writes them to a file. docs/benchmarks.md records figures with the
machine they came from.

--what gpu runs the checks that no CPU run can make (GPU_CHECKS: fp16 with its gradient scaler
and exact resume, bf16, flex attention against sdpa, torch.compile, LoRA in fp16, FSDP2 on 2
GPUs, MFU and the projected wall time of the measured preset), each a row with ok or FAILED; the
exit status is 1 if one failed.
Without CUDA it says so in one line and exits with status 2.
Peak memory (--what lora) is measured in a fresh process per run: its peak resident set size
on CPU, torch's own allocator counter on CUDA. --what memory counts the bytes of the tensors each
of 2 torchrun processes holds under ddp and fsdp, and takes the peak of a forward and backward
pass, with and without activation checkpointing, from torch.profiler's record of every allocation.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.autograd import DeviceType
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import prepare
import train
from checkpoint import adopt_model_shape, load_weights
from config import Config, ConfigError, DataConfig, doc
from options import load_config, parse
from data import BPETokenizer, DataError, split_safely
from errors import UserError, command
from files import write_json
from lora import add_adapters
from model import GPT
from runtime import (autocast, cpu_has_bf16, end_processes, format_duration, peak_flops, pick_device, pick_precision, shard,
                     start_processes)

CORPUS = "data/shakespeare/input.txt"
KINDS = ("train", "sample", "prepare", "speedrun", "ablation", "profile", "gpu", "lora", "memory")


@dataclass
class BenchOptions:
    what: str = doc(f"comma-separated, from: {', '.join(KINDS)}", "train,sample,prepare")
    steps: int = doc("timed training steps per precision", 5, within="[1, inf)")
    warmup: int = doc("untimed training steps first", 2, within="[0, inf)")
    repeats: int = doc("repeats for sample and prepare", 3, within="[1, inf)")
    json: str = doc("also write the results to this file; empty: do not", "")

    def problems(self) -> list[str]:
        unknown = sorted(set(self.what.split(",")) - set(KINDS))
        return [f"--what {','.join(unknown)} is not one of: {', '.join(KINDS)}"] if unknown else []


def quiet(fn, *args, **kwargs):
    """Run fn with its printing swallowed (train.main prints a config and a line per step)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def precisions(device_type: str) -> list[str]:
    if device_type == "cuda":
        return ["fp32", "bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp32", "fp16"]
    return ["fp32", "bf16"] if device_type == "cpu" and cpu_has_bf16() else ["fp32"]


def configured(cfg: Config, *extra: str) -> Config:
    """The measured config (preset and command-line overrides) with `extra` settings on top, and the
    model shape of training.init_from's weights, as train.py takes it."""
    run_cfg = load_config(["--config", cfg.preset, *cfg.overrides, *extra] if cfg.preset else [*cfg.overrides, *extra])
    if run_cfg.training.init_from:
        adopt_model_shape(run_cfg, load_weights(run_cfg.training.init_from))
    return run_cfg


def model_for(cfg: Config, *extra: str) -> GPT:
    """The measured model, its vocabulary taken from the prepared data as train.py takes it."""
    cfg = configured(cfg, *extra)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = quiet(prepare.ensure_prepared, cfg.data)[1]["vocab_size"]
    torch.manual_seed(0)
    return GPT(cfg.model)


def trainer_log(opts: BenchOptions, cfg: Config, device: str, precision: str, out_dir: str, *extra: str) -> list[dict]:
    """train.py's own per-step log records of warmup + steps optimizer steps (`extra`: more settings)."""
    run_cfg = configured(cfg, "--device", device, "--training.precision", precision,
                         "--training.max_iters", str(opts.warmup + opts.steps), "--training.log_interval", "1",
                         "--training.eval_interval", str(10**9), "--training.eval_iters", "1",
                         "--training.out_dir", out_dir, "--training.save_best", "false", *extra)
    quiet(train.main, run_cfg)
    return json.loads((Path(out_dir) / "train_log.json").read_text())["train"]


def trainer_step_ms(opts: BenchOptions, cfg: Config, device: str, precision: str, out_dir: str, *extra: str) -> float:
    """Median ms per optimizer step of train.py itself, from its own per-step log."""
    records = trainer_log(opts, cfg, device, precision, out_dir, *extra)
    return statistics.median(r["ms_per_step"] for r in records[opts.warmup:])


def plain_loop(cfg: Config, device: str, precision: str = "fp32"):
    """The plainest eager PyTorch training step over the same model and batch size: a function
    that runs one step. fp32, or bf16 autocast for the profile."""
    model = model_for(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t = cfg.training
    x = torch.randint(model.config.vocab_size, (t.batch_size, model.config.block_size), device=device)

    def step():
        for _ in range(t.grad_accum_steps):
            with autocast(torch.device(device).type, precision):
                _, loss = model(x, x)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # wait for the device, as the trainer does
    return step


def plain_step_ms(opts: BenchOptions, cfg: Config, device: str) -> float:
    """Median ms per step of the plain loop (fp32)."""
    step = plain_loop(cfg, device)
    times = []
    for i in range(opts.warmup + opts.steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[opts.warmup:])


def bench_profile(opts: BenchOptions, cfg: Config, device: str, top: int = 12) -> list[dict]:
    """torch.profiler over opts.steps plain-loop steps at each precision: the operators that take
    the most time, printed as tables (nothing added to the results table)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    sort = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    for precision in precisions(torch.device(device).type):
        step = plain_loop(cfg, device, precision)
        for _ in range(opts.warmup):
            step()
        with profile(activities=activities) as prof:
            for _ in range(opts.steps):
                step()
        print(f"\nprofile: {opts.steps} steps, {precision}, {cfg.preset}")
        print(prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=64))
    return []


def bench_train(opts: BenchOptions, cfg: Config, device: str) -> list[dict]:
    tokens = configured(cfg).tokens_per_step()
    peak, rows = peak_flops(device), []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in precisions(torch.device(device).type):
            ms = trainer_step_ms(opts, cfg, device, precision, f"{tmp}/{precision}")
            row = {"bench": "train", "what": f"trainer {precision}", "ms_per_step": ms,
                   "tokens_per_s": tokens * 1000 / ms}
            if peak:
                row["mfu"] = model_for(cfg).estimate_mfu(row["tokens_per_s"], peak)
                row["peak"] = f"{peak / 1e12:.0f} TFLOP/s bf16 dense ({torch.cuda.get_device_name()})"
            rows.append(row)
        ms = plain_step_ms(opts, cfg, device)
        rows.append({"bench": "train", "what": "plain eager loop fp32", "ms_per_step": ms,
                     "tokens_per_s": tokens * 1000 / ms})
    return rows


def bench_sample(opts: BenchOptions, cfg: Config, device: str, new_tokens: int = 500) -> list[dict]:
    model = model_for(cfg, "--model.dropout", "0").to(device).eval()
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    rows = []
    for use_cache in (True, False):
        times = []
        for _ in range(1 + opts.repeats):  # the first run is warm-up
            start = time.perf_counter()
            model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache)
            times.append(time.perf_counter() - start)
        s = statistics.median(times[1:])
        rows.append({"bench": "sample", "what": f"{new_tokens} tokens, {'KV cache' if use_cache else 'no cache'}",
                     "seconds": s, "tokens_per_s": new_tokens / s})
    rows.append({"bench": "sample", "what": "KV cache speed-up", "ratio": rows[1]["seconds"] / rows[0]["seconds"]})
    return rows


def bench_prepare(opts: BenchOptions, cfg: Config, device: str, target_mb: int = 50) -> list[dict]:
    text = Path(CORPUS).read_text(encoding="utf-8")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.txt"
        copies = max(1, round(target_mb * 1e6 / len(text.encode())))
        big.write_text(text * copies, encoding="utf-8")
        mb = big.stat().st_size / 1e6
        for tokenizer in ("char", "bpe"):
            times = []
            for i in range(opts.repeats):
                start = time.perf_counter()
                try:
                    prepare.prepare(DataConfig(input=str(big), processed_dir=f"{tmp}/{tokenizer}{i}",
                                               tokenizer=tokenizer), progress=False)
                except DataError as e:
                    print(f"skipping bpe preparation: {e}", file=sys.stderr)
                    break
                times.append(time.perf_counter() - start)
            if times:
                rows.append({"bench": "prepare", "what": f"prepare.py {tokenizer}, {mb:.0f} MB",
                             "seconds": statistics.median(times), "mb_per_s": mb / statistics.median(times)})
        # tiktoken's own batched encoding of the same text on the same threads: the floor for bpe.
        try:
            tok = BPETokenizer("gpt2")
        except DataError:
            return rows
        pieces = split_safely(text * copies)
        times = []
        for _ in range(opts.repeats):
            start = time.perf_counter()
            tok.enc.encode_ordinary_batch(pieces, num_threads=os.cpu_count() or 1)
            times.append(time.perf_counter() - start)
        rows.append({"bench": "prepare", "what": f"tiktoken encode_ordinary_batch, {mb:.0f} MB",
                     "seconds": statistics.median(times), "mb_per_s": mb / statistics.median(times)})
    return rows


SPEEDRUN = ("configs/cpu/reference.toml", "configs/cpu/speedrun.toml")
TARGET = 1.88  # the val loss the speedrun must reach (the reference reaches about 1.88)


def bench_speedrun(opts: BenchOptions, cfg: Config, device: str) -> list[dict]:
    """Wall time (evaluation included) and val loss of the reference and speedrun presets, run in turn
    --repeats times (the median counts), each with the command line's overrides (e.g. --max-iters 3
    for a quick check)."""
    runs = {preset: [] for preset in SPEEDRUN}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(opts.repeats):
            for preset in SPEEDRUN:  # alternating, so that a slower spell of the machine hits both
                run_cfg = load_config(["--config", preset, *cfg.overrides, "--training.out_dir",
                                       f"{tmp}/{Path(preset).stem}{i}"])
                start = time.perf_counter()
                summary = quiet(train.main, run_cfg)
                runs[preset].append((time.perf_counter() - start, summary["best_val_loss"], summary["step"]))
    rows = [{"bench": "speedrun", "what": f"{preset} (median of {len(r)})",
             "seconds": statistics.median(t for t, _, _ in r), "best_val_loss": statistics.median(v for _, v, _ in r),
             "steps": r[0][2]} for preset, r in runs.items()]
    rows.append({"bench": "speedrun", "what": "speedrun / reference wall time",
                 "ratio": rows[1]["seconds"] / rows[0]["seconds"]})
    return rows


# What each change of the speedrun is worth: the speedrun preset with one change (or a reference
# point), each trained for its own schedule. `--what ablation` evaluates every 25 steps and reports the
# final val loss and the training time to the first val <= TARGET (the logged step times up to that
# evaluation: evaluation time left out, so that the frequent evaluations do not count).
ABLATION = {
    "reference: AdamW, GPT-2, 2000 steps": ("configs/cpu/reference.toml", []),
    "speedrun": ("configs/cpu/speedrun.toml", []),
    "- qk_norm": ("configs/cpu/speedrun.toml", ["--model.qk_norm", "false"]),
    "- llama (GPT-2 blocks, qk_norm kept)": ("configs/cpu/speedrun.toml", ["--model.arch", "gpt2"]),
    "- llama - qk_norm": ("configs/cpu/speedrun.toml", ["--model.arch", "gpt2", "--model.qk_norm", "false"]),
    "previous speedrun: GPT-2, Muon, 500 steps": ("configs/cpu/speedrun.toml", [
        "--model.arch", "gpt2", "--model.qk_norm", "false", "--max-iters", "500"]),
    "- Muon (AdamW for every weight)": ("configs/cpu/speedrun.toml", ["--training.optimizer", "adamw"]),
    "- rotary (learned positions)": ("configs/cpu/speedrun.toml", ["--model.position", "learned"]),
    "- RMSNorm (LayerNorm)": ("configs/cpu/speedrun.toml", ["--model.norm", "layernorm"]),
    "- SwiGLU (GELU MLP)": ("configs/cpu/speedrun.toml", ["--model.mlp", "gelu"]),
    "+ ReLU² MLP instead of SwiGLU": ("configs/cpu/speedrun.toml", ["--model.mlp", "relu2"]),
    "+ logit soft-cap 30": ("configs/cpu/speedrun.toml", ["--model.logit_softcap", "30"]),
    "+ untied output head": ("configs/cpu/speedrun.toml", ["--model.tie_embeddings", "false"]),
    "+ warmup-stable-decay (decay the last 30%)": ("configs/cpu/speedrun.toml", [
        "--training.lr_schedule", "wsd", "--training.decay_frac", "0.3"]),
    "+ biases (model.bias = true)": ("configs/cpu/speedrun.toml", ["--model.bias", "true"]),
    "+ 200 steps instead of 250": ("configs/cpu/speedrun.toml", ["--max-iters", "200"]),
    "+ learning_rate 2e-3 (AdamW part; 4e-3)": ("configs/cpu/speedrun.toml", ["--training.learning_rate", "2e-3"]),
    "+ muon_lr 0.01 (0.02)": ("configs/cpu/speedrun.toml", ["--training.muon_lr", "0.01"]),
    "+ muon_lr 0.04 (0.02)": ("configs/cpu/speedrun.toml", ["--training.muon_lr", "0.04"]),
    "+ batch 12, the reference's (16)": ("configs/cpu/speedrun.toml", ["--training.batch_size", "12"]),
}


def bench_ablation(opts: BenchOptions, cfg: Config, device: str) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (preset, changes)) in enumerate(ABLATION.items()):
            run_cfg = load_config(["--config", preset, *changes, *cfg.overrides, "--training.eval_interval", "25",
                                   "--training.log_interval", "25", "--training.out_dir", f"{tmp}/{i}"])
            quiet(train.main, run_cfg)
            log = json.loads((Path(tmp) / str(i) / "train_log.json").read_text())
            reached = next((e["step"] for e in log["evals"] if e["val_loss"] <= TARGET), None)
            seconds = sum(r["ms_per_step"] * 25 for r in log["train"] if reached and r["step"] <= reached) / 1000
            rows.append({"bench": "ablation", "what": name, "steps": log["evals"][-1]["step"],
                         "best_val_loss": log["evals"][-1]["val_loss"],
                         "result": f"val <= {TARGET} at step {reached}, after {seconds:.1f} s of training"
                                   if reached else f"val never <= {TARGET}"})
            if log["train"]:  # none in a run shorter than a log interval (--max-iters 3: a quick check)
                rows[-1]["ms_per_step"] = statistics.median(r["ms_per_step"] for r in log["train"])
    return rows


# ----------------------------------------------------------------------------- --what gpu
# Each check: (opts, cfg, device, tmp folder) -> one row, {"what", "result" (words), "ok", figures}.
# They take the device as an argument, so that their code can be tried on a CPU too (see the tests).

GPU_TINY = ["--model.n_layer", "2", "--model.n_head", "4", "--model.n_embd", "128", "--model.block_size", "128",
            "--training.batch_size", "16", "--training.warmup_iters", "2", "--training.eval_iters", "4",
            "--training.log_interval", "1", "--training.save_best", "false"]


@contextlib.contextmanager
def exact_matmuls() -> Iterator[None]:
    """fp32 matmuls without TF32 inside the block: TF32 would hide a real difference in rounding."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)


def gpu_fp16_resume(opts: BenchOptions, cfg: Config, device: str, tmp: Path) -> dict:
    """fp16 autocast with the gradient scaler, stopped at step 10 and resumed to step 20: the weights,
    optimizer and scaler must equal those of an uninterrupted 20-step run bit for bit. (Eager attention
    and a constant learning rate: a stopped run's schedule must not depend on its max_iters, and the
    fused attention kernels' backward need not be deterministic.)"""
    common = [*GPU_TINY, "--device", device, "--training.precision", "fp16", "--training.lr_schedule", "constant",
              "--model.attention", "eager", "--model.dropout", "0.1", "--training.eval_interval", "10"]
    quiet(train.main, configured(cfg, *common, "--max-iters", "20", "--training.out_dir", f"{tmp}/full"))
    quiet(train.main, configured(cfg, *common, "--max-iters", "10", "--training.out_dir", f"{tmp}/cut"))
    quiet(train.main, configured(cfg, *common, "--max-iters", "20", "--training.out_dir", f"{tmp}/cut", "--resume"))
    full, cut = (load_weights(f"{tmp}/{run}/ckpt_last.pt").training for run in ("full", "cut"))
    weights_equal = all(torch.equal(full["model"][k], cut["model"][k]) for k in full["model"])
    moments = [(a, b) for a, b in zip(full["optimizer"]["state"].values(), cut["optimizer"]["state"].values())]
    optimizer_equal = all(torch.equal(a[k], b[k]) for a, b in moments for k in a)
    scaler_equal = full["scaler"] == cut["scaler"]
    identical = weights_equal and optimizer_equal and scaler_equal
    precision = json.loads((tmp / "cut" / "train_log.json").read_text())["run"]["precision"]  # fp32 on a CPU
    result = (f"resumed run {'bit-identical' if identical else 'DIFFERS'} (weights {weights_equal}, optimizer "
              f"{optimizer_equal}, scaler {scaler_equal}); {precision}, loss scale {full['scaler'].get('scale')}")
    return {"what": "fp16 + GradScaler, save and resume", "result": result, "ok": identical and precision == "fp16"}


def gpu_bf16(opts: BenchOptions, cfg: Config, device: str, tmp: Path) -> dict:
    """bf16 autocast trains: 40 steps of a small model, finite losses, and val loss going down."""
    quiet(train.main, configured(cfg, *GPU_TINY, "--device", device, "--training.precision", "bf16",
                                 "--max-iters", "40", "--training.eval_interval", "40",
                                 "--training.out_dir", f"{tmp}/bf16"))
    log = json.loads((tmp / "bf16" / "train_log.json").read_text())
    first, last = log["evals"][0]["val_loss"], log["evals"][-1]["val_loss"]
    ms = statistics.median(r["ms_per_step"] for r in log["train"][opts.warmup:])
    ok = math.isfinite(last) and last < first and log["run"]["precision"] == "bf16"
    return {"what": "bf16 training", "result": f"{log['run']['precision']}: val loss {first:.3f} -> {last:.3f} in 40 "
            f"steps", "ok": ok, "ms_per_step": ms}


def gpu_flex_vs_sdpa(opts: BenchOptions, cfg: Config, device: str, tmp: Path) -> dict:
    """Flex attention (compiled on CUDA) against sdpa on the same weights and tokens, in fp32 without
    TF32: logits and every gradient, with the causal mask and with a document mask."""
    sdpa = model_for(cfg, "--model.dropout", "0").to(device)
    flex = model_for(cfg, "--model.dropout", "0", "--model.attention", "flex").to(device)
    flex.load_state_dict(sdpa.state_dict())
    T, gen = sdpa.config.block_size, torch.Generator().manual_seed(0)
    x = torch.randint(sdpa.config.vocab_size, (4, T + 1), generator=gen).to(device)
    docs = (torch.rand(4, T, generator=gen) < 4 / T).long().cumsum(dim=1).to(device)  # (B, T): ~4 documents
    worst = {"logits": 0.0, "grads": 0.0}
    with exact_matmuls():
        for doc_ids in (None, docs):
            outputs = []
            for model in (sdpa, flex):
                model.zero_grad(set_to_none=True)
                logits, loss = model(x[:, :-1], x[:, 1:], doc_ids)
                loss.backward()
                outputs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
            (la, ga), (lb, gb) = outputs
            worst["logits"] = max(worst["logits"], (la - lb).abs().max().item())
            worst["grads"] = max(worst["grads"], max((ga[n] - gb[n]).abs().max().item() for n in ga))
    ok = worst["logits"] < 1e-4 and worst["grads"] < 1e-4
    return {"what": "flex attention vs sdpa, fwd + bwd", "ok": ok,
            "result": f"max |diff| logits {worst['logits']:.1e}, grads {worst['grads']:.1e} (causal and document "
                      f"masks; allowed 1e-4)"}


def gpu_compile(opts: BenchOptions, cfg: Config, device: str, tmp: Path) -> dict:
    """torch.compile on and off: the same per-step losses (no dropout: compiled code draws other dropout
    masks), and the step time of each."""
    precision = configured(cfg).training.precision
    logs = [trainer_log(opts, cfg, device, precision, f"{tmp}/compile_{on}", "--model.dropout", "0",
                        "--training.compile", on) for on in ("false", "true")]
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(*logs))
    eager_ms, compiled_ms = (statistics.median(r["ms_per_step"] for r in log[opts.warmup:]) for log in logs)
    allowed = 1e-3 if precision == "fp32" else 2e-2
    return {"what": f"torch.compile on/off ({precision})", "ok": diff < allowed,
            "result": f"max |loss diff| {diff:.1e} (allowed {allowed:g}); {eager_ms:.1f} -> {compiled_ms:.1f} ms/step",
            "ratio": eager_ms / compiled_ms}


def gpu_projection(opts: BenchOptions, cfg: Config, device: str, tmp: Path) -> dict:
    """MFU of the measured preset (configs/base/base.toml unless --config) over its first steps, and
    its projected wall time: max_iters steps, plus its evaluations timed as forward passes."""
    run_cfg = configured(cfg)
    t, precision = run_cfg.training, run_cfg.training.precision
    ms = trainer_step_ms(opts, cfg, device, precision, f"{tmp}/projection")
    model = model_for(cfg).to(device).eval()
    x = torch.randint(model.config.vocab_size, (t.batch_size, model.config.block_size), device=device)
    times = []
    with torch.no_grad(), autocast(torch.device(device).type, precision):
        for _ in range(1 + opts.repeats):  # the first is warm-up
            start = time.perf_counter()
            model(x, x)[1].item()  # .item(): wait for the device
            times.append(time.perf_counter() - start)
    evals = t.max_iters // t.eval_interval + 1
    eval_s = evals * 2 * t.eval_iters * statistics.median(times[1:])  # 2 splits
    total = t.max_iters * ms / 1000 + eval_s
    tok_s, peak = run_cfg.tokens_per_step() * 1000 / ms, peak_flops(device)
    mfu = f"MFU {model.estimate_mfu(tok_s, peak):.1%}" if peak else "MFU unknown (no peak FLOP/s for this GPU)"
    return {"what": f"{cfg.preset or 'defaults'}, {precision}", "ok": True, "ms_per_step": ms, "tokens_per_s": tok_s,
            "result": f"{mfu}; {t.max_iters} steps projected at {format_duration(total)} "
                      f"({format_duration(eval_s)} of it evaluation)"}


def low_precision(device: str) -> str:
    """The low precision that mixed-precision training uses on this device: bf16 where it is supported."""
    return next((p for p in ("bf16", "fp16") if p in precisions(torch.device(device).type)), "fp32")


def gpu_lora(opts: BenchOptions, cfg: Config, device: str, tmp: Path) -> dict:
    """LoRA in fp16, with the gradient scaler over the adapters alone: a base model trained 20 steps in
    fp32, then adapters on it for 20 steps. Val loss must go down, and the merged weights (what export.py
    writes) must give the adapted model's logits, in fp32 without TF32."""
    quiet(train.main, configured(cfg, *GPU_TINY, "--device", device, "--training.precision", "fp32", "--max-iters",
                                 "20", "--training.eval_interval", "20", "--training.out_dir", f"{tmp}/base"))
    quiet(train.main, configured(cfg, *GPU_TINY, "--device", device, "--training.precision", "fp16", "--max-iters",
                                 "20", "--training.eval_interval", "20", "--training.init_from", f"{tmp}/base",
                                 "--lora.rank", "8", "--training.learning_rate", "1e-2",
                                 "--training.out_dir", f"{tmp}/lora"))
    log = json.loads((tmp / "lora" / "train_log.json").read_text())
    first, last = log["evals"][0]["val_loss"], log["evals"][-1]["val_loss"]
    w = load_weights(tmp / "lora" / "ckpt_last.pt")
    adapted, plain = GPT(w.model), GPT(w.model)
    add_adapters(adapted, w.lora.config)
    adapted.load_state_dict(w.lora.state_dict)
    plain.load_state_dict(w.state_dict)
    x = torch.randint(w.model.vocab_size, (4, w.model.block_size), generator=torch.Generator().manual_seed(0))
    with exact_matmuls(), torch.no_grad():
        a, b = (model.to(device).eval()(x.to(device))[0] for model in (adapted, plain))
    diff = (a - b).abs().max().item()
    ran = log["run"]["precision"]  # fp32 on a CPU
    ok = ran == "fp16" and math.isfinite(last) and last < first and diff < 1e-4
    return {"what": "LoRA, fp16 + GradScaler", "ok": ok, "val_start": first, "best_val_loss": last, "max_diff": diff,
            "result": f"{ran}: val loss {first:.3f} -> {last:.3f} in 20 steps; merged vs adapted logits max |diff| "
                      f"{diff:.1e} (allowed 1e-4)"}


def gpu_fsdp(opts: BenchOptions, cfg: Config, device: str, tmp: Path) -> dict:
    """FSDP2 on 2 GPUs (nccl), in mixed precision (FSDP's policy: see runtime.shard), against one process
    with autocast, the same global batch: per-step losses within bf16's precision (as
    tests/test_fsdp.py checks on CPU), and the sharded run's checkpoint read back in one process."""
    procs = 2 if not device.startswith("cuda") else min(2, torch.cuda.device_count())
    if procs < 2:
        return {"what": "FSDP2, 2 processes", "result": f"not run: it needs 2 GPUs, this machine has "
                                                        f"{torch.cuda.device_count()}"}
    precision = low_precision(device)
    common = [*GPU_TINY, "--device", device.split(":")[0], "--training.precision", precision, "--model.dropout", "0",
              "--training.grad_accum_steps", "2", "--max-iters", "20", "--training.eval_interval", "20"]
    quiet(train.main, configured(cfg, *common, "--training.out_dir", f"{tmp}/single"))  # prepares the data too
    argv = [*(["--config", cfg.preset] if cfg.preset else []), *cfg.overrides, *common,
            "--training.parallel", "fsdp", "--training.out_dir", f"{tmp}/fsdp"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
                        str(Path(__file__).resolve().parent / "train.py"), *argv],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        print(r.stdout[-2000:], r.stderr[-3000:], file=sys.stderr)
        return {"what": "FSDP2, 2 processes", "ok": False, "result": f"the torchrun job failed (exit {r.returncode}); "
                "its output is above"}
    single, fsdp = (json.loads((tmp / run / "train_log.json").read_text()) for run in ("single", "fsdp"))
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(single["train"], fsdp["train"], strict=True))
    allowed = 2e-2 if precision != "fp32" else 1e-4
    w = load_weights(tmp / "fsdp" / "ckpt_last.pt")
    ok = fsdp["run"]["world_size"] == 2 and fsdp["run"]["precision"] == precision and diff < allowed and w.step == 20
    return {"what": f"FSDP2, 2 processes, {precision}", "ok": ok,
            "result": f"per-step losses vs one process: max |diff| {diff:.1e} (allowed {allowed:g}); checkpoint "
                      f"read in one process at step {w.step}"}


GPU_CHECKS = (gpu_fp16_resume, gpu_bf16, gpu_flex_vs_sdpa, gpu_compile, gpu_lora, gpu_fsdp, gpu_projection)


def bench_gpu(opts: BenchOptions, cfg: Config, device: str) -> list[dict]:
    if not device.startswith("cuda"):
        raise UserError(f"--what gpu checks a CUDA GPU, but the device is {device}: leave --device at auto or cuda")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for check in GPU_CHECKS:
            print(f"gpu: {check.__name__} ...", file=sys.stderr, flush=True)
            rows.append({"bench": "gpu", **check(opts, cfg, device, Path(tmp) / check.__name__)})
    return rows


# A training run in a process of its own, which then reports its own peak memory. On CPU: the peak
# resident set size. On Linux that is VmHWM, whose count restarts just before training (clear_refs 5)
# at the RSS of Python, torch and the imports, so that the peak is the run's, not an import's passing
# peak (ru_maxrss is not used there: it can carry the parent's RSS from the fork). Elsewhere (macOS):
# ru_maxrss, the peak since the process started. On CUDA: the most memory torch's allocator held.
RUN_AND_MEASURE = """
import json, os, resource, sys
sys.path.insert(0, sys.argv[1])  # this project's folder
import torch
import train

def peak_rss():
    if not os.path.exists("/proc/self/status"):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

if os.path.exists("/proc/self/clear_refs"):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
start = peak_rss()
code = train.cli(sys.argv[2:])
cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
print("peak memory: " + json.dumps({"start_rss": start, "peak_rss": peak_rss(), "cuda_peak": cuda}))
sys.exit(code)
"""


def bench_lora(opts: BenchOptions, cfg: Config, device: str) -> list[dict]:
    """The config's LoRA run against a full fine-tune of the same model (lora.rank = 0, every other
    setting the same, its learning rate included), each in a fresh process: val loss at the start and
    the best, the trained share of the parameters, ms per step (median after the warm-up steps; the
    whole config runs, so shorten it with --max-iters) and peak memory."""
    if cfg.lora.rank == 0:
        raise ConfigError("--what lora compares a LoRA run with a full fine-tune: give a config with lora.rank "
                          "> 0, e.g. --config configs/finetune/shakespeare_lora.toml")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("LoRA", []), ("full fine-tune", ["--lora.rank", "0"])):
            out_dir = Path(tmp) / name.replace(" ", "_")
            argv = [*(["--config", cfg.preset] if cfg.preset else []), *cfg.overrides, *extra, "--device", device,
                    "--training.log_interval", "1", "--training.out_dir", str(out_dir)]
            here = str(Path(__file__).resolve().parent)
            r = subprocess.run([sys.executable, "-c", RUN_AND_MEASURE, here, *argv], capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stderr[-3000:], file=sys.stderr)
                raise UserError(f"--what lora: the {name} run failed (exit {r.returncode}); its output is above")
            memory = json.loads(r.stdout.rsplit("peak memory: ", 1)[1])
            log = json.loads((out_dir / "train_log.json").read_text())
            row = {"bench": "lora", "what": f"{name}, {log['run']['precision']}",
                   "ms_per_step": statistics.median(t["ms_per_step"] for t in log["train"][opts.warmup:]),
                   "val_start": log["evals"][0]["val_loss"], "best_val_loss": log["best"]["val_loss"],
                   "trained_share": log["run"]["n_trainable"] / log["run"]["n_params"],
                   "peak_rss_mb": memory["peak_rss"] / 2**20, "start_rss_mb": memory["start_rss"] / 2**20}
            if memory["cuda_peak"] is not None:
                row["cuda_peak_mb"] = memory["cuda_peak"] / 2**20
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- --what memory

# Run by torchrun in each of bench_memory's processes: argv[1] is this project's folder, argv[2] ddp or
# fsdp, the rest the config's command line.
HELD_BY_EACH_PROCESS = """
import sys
sys.path.insert(0, sys.argv[1])
import bench
bench.held_by_this_process(sys.argv[2], sys.argv[3:])
"""


def held_by_this_process(parallel: str, argv: list[str]) -> None:
    """In each process of a torchrun job: the config's model takes one training step under `parallel`
    (ddp or fsdp) on one sequence (the batch changes none of what is counted here), then the bytes of
    the tensors this process holds: its parameters, gradients and optimizer state, counted from the
    tensors themselves, each process's own part of them under FSDP (DTensor.to_local()). Rank 0
    prints every process's counts as JSON, after "held: "."""
    cfg = load_config(argv)
    procs = start_processes(pick_device(cfg.training.device))
    device_type = torch.device(procs.device).type
    precision = quiet(pick_precision, cfg.training.precision, device_type)
    torch.manual_seed(0)
    model = GPT(cfg.model).to(procs.device)
    if parallel == "fsdp":
        shard(model, procs, precision)
    step_model = model if parallel == "fsdp" else DDP(model, device_ids=[procs.device] if device_type == "cuda"
                                                      else None)
    t = cfg.training
    optimizer = model.configure_optimizer(t.weight_decay, t.learning_rate, (t.beta1, t.beta2), device_type,
                                          t.optimizer, t.muon_lr)
    x = torch.randint(cfg.model.vocab_size, (1, cfg.model.block_size), device=procs.device)
    with autocast(device_type, precision):
        _, loss = step_model(x, x)
    loss.backward()
    optimizer.step()  # the gradients stay, as they are between a backward pass and zero_grad

    def nbytes(tensors) -> int:
        local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
        return sum(t.numel() * t.element_size() for t in local)

    params = list(model.parameters())  # a tied matrix once
    held = {"params": nbytes(params), "grads": nbytes(p.grad for p in params if p.grad is not None),
            "optimizer": nbytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))}
    every = [None] * procs.world
    dist.all_gather_object(every, held)
    if procs.master:
        print("held: " + json.dumps(every), flush=True)
    end_processes(procs, finished=True)


def peak_allocated_mb(prof, device: str) -> float:
    """The most memory of `device` that was allocated and not yet freed at any moment of a torch.profiler
    recording (profile_memory=True), above what was allocated when it started: from its record of every
    allocation and free, taken in time order. (Memory allocated before the recording and freed during
    it is not counted as freed: the profiler cannot know its size.)"""
    kind = DeviceType.CUDA if device.startswith("cuda") else DeviceType.CPU
    records = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                      and e.device_type() == kind), key=lambda e: e.start_ns())
    live = peak = 0
    for e in records:
        live += e.nbytes()  # > 0 for an allocation, < 0 for a free
        peak = max(peak, live)
    return peak / 2**20


def activation_memory(opts: BenchOptions, cfg: Config, device: str, checkpointing: bool) -> dict:
    """One forward and backward pass of the config's batch, at its precision: the peak of the memory
    allocated during it above what was there before (the weights, and the gradients a first pass made),
    which is what the activations add, from torch.profiler; and the median ms of such a pass."""
    from torch.profiler import ProfilerActivity, profile
    run_cfg = configured(cfg)
    precision = quiet(pick_precision, run_cfg.training.precision, torch.device(device).type)
    model = model_for(cfg).to(device)
    model.activation_checkpointing = checkpointing
    x = torch.randint(model.config.vocab_size, (run_cfg.training.batch_size, model.config.block_size), device=device)

    def step() -> None:
        with autocast(torch.device(device).type, precision):
            _, loss = model(x, x)
        loss.backward()  # into the gradients of the first pass: none are allocated again
        loss.item()  # wait for the device

    times = []
    for _ in range(1 + opts.warmup + opts.steps):  # the first pass makes the gradients
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities, profile_memory=True) as prof:
        step()
    return {"bench": "memory", "what": f"activations, {'with' if checkpointing else 'no'} checkpointing, {precision}",
            "peak_mb": peak_allocated_mb(prof, device), "ms_per_step": statistics.median(times[1 + opts.warmup:]),
            "result": "torch.profiler: peak of the memory allocated during forward + backward"}


def bench_memory(opts: BenchOptions, cfg: Config, device: str) -> list[dict]:
    """What each of 2 processes holds under ddp and under fsdp (parameters, gradients, optimizer state,
    between steps), each in a torchrun job of its own; then the memory a forward and backward pass
    adds, without and with activation checkpointing (training.activation_checkpointing), in this
    process. On a CPU the 2 processes talk through gloo; on CUDA they need 2 GPUs."""
    if device.startswith("cuda") and torch.cuda.device_count() < 2:
        raise UserError("--what memory runs 2 processes, one per GPU, and this machine has 1; use --device cpu")
    vocab = model_for(cfg).config.vocab_size  # prepares the data here, once: the processes need only its size
    argv = [*(["--config", cfg.preset] if cfg.preset else []), *cfg.overrides, "--device", device,
            "--model.vocab_size", str(vocab)]
    rows = []
    for parallel in ("ddp", "fsdp"):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            "--no-python", sys.executable, "-c", HELD_BY_EACH_PROCESS,
                            str(Path(__file__).resolve().parent), parallel, *argv],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if r.returncode != 0:
            print(r.stdout[-2000:], r.stderr[-3000:], file=sys.stderr)
            raise UserError(f"--what memory: the 2 {parallel} processes failed (exit {r.returncode}); their output "
                            "is above")
        for rank, held in enumerate(json.loads(r.stdout.rsplit("held: ", 1)[1].splitlines()[0])):
            mb = {k: v / 2**20 for k, v in held.items()}
            rows.append({"bench": "memory", "what": f"{parallel}, process {rank} of 2: what it holds",
                         "params_mb": mb["params"], "grads_mb": mb["grads"], "optimizer_mb": mb["optimizer"],
                         "held_mb": sum(mb.values()),
                         "result": "counted from its tensors" + (" (its shards)" if parallel == "fsdp" else "")})
    rows.append({"bench": "memory", "what": "fsdp / ddp, held per process",
                 "ratio": max(r["held_mb"] for r in rows[2:]) / max(r["held_mb"] for r in rows[:2])})
    plain, checkpointed = (activation_memory(opts, cfg, device, on) for on in (False, True))
    rows += [plain, checkpointed,
             {"bench": "memory", "what": "checkpointing / none: activation memory",
              "ratio": checkpointed["peak_mb"] / plain["peak_mb"]},
             {"bench": "memory", "what": "checkpointing / none: time per pass",
              "ratio": checkpointed["ms_per_step"] / plain["ms_per_step"]}]
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'bench':<9} {'what':<44} {'result'}")
    for r in rows:
        parts = [] if "ok" not in r else ["ok" if r["ok"] else "FAILED"]
        for key, fmt in (("ms_per_step", "{:.1f} ms/step"), ("seconds", "{:.2f} s"), ("tokens_per_s", "{:,.0f} tok/s"),
                         ("mb_per_s", "{:.1f} MB/s"), ("mfu", "MFU {:.1%}"), ("val_start", "from val {:.4f}"),
                         ("best_val_loss", "val {:.4f}"), ("ratio", "{:.2f}x"), ("trained_share", "{:.2%} trained"),
                         ("peak_rss_mb", "peak RSS {:,.0f} MiB"), ("start_rss_mb", "{:,.0f} MiB before training"),
                         ("cuda_peak_mb", "CUDA peak {:,.0f} MiB"), ("params_mb", "parameters {:,.2f} MiB"),
                         ("grads_mb", "gradients {:,.2f} MiB"), ("optimizer_mb", "optimizer {:,.2f} MiB"),
                         ("held_mb", "total {:,.2f} MiB"), ("peak_mb", "peak {:,.2f} MiB"), ("result", "{}")):
            if key in r:
                parts.append(fmt.format(r[key]))
        print(f"{r['bench']:<9} {r['what']:<44} {' | '.join(parts)}")


@command
def main(argv: list[str] | None = None) -> int:
    opts, cfg = parse(argv, BenchOptions, program="bench.py", about=__doc__, preset="configs/base/base.toml")
    if "gpu" in opts.what.split(",") and not torch.cuda.is_available():
        raise UserError(f"--what gpu needs a CUDA GPU, and this torch ({torch.__version__}) sees none; run it on a "
                        "machine with one (and a CUDA build of torch)")
    device = pick_device(cfg.training.device)
    machine = (f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}" if device.startswith("cuda") else
               f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs") + \
        f", torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"device: {device} ({machine}); config: {cfg.preset} {' '.join(cfg.overrides)}".rstrip())
    benches = {"train": bench_train, "sample": bench_sample, "prepare": bench_prepare,
               "speedrun": bench_speedrun, "ablation": bench_ablation, "profile": bench_profile, "gpu": bench_gpu,
               "lora": bench_lora, "memory": bench_memory}
    rows = [row for what in opts.what.split(",") for row in benches[what](opts, cfg, device)]
    if rows:
        print_table(rows)
    if opts.json:
        write_json(opts.json, {"machine": machine, "device": device, "config": cfg.preset,
                               "overrides": cfg.overrides, "results": rows})
    return 1 if any(row.get("ok") is False for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
