"""What only a CUDA GPU can check (--what gpu), one row each, ok or FAILED: fp16 with its gradient
scaler and exact resume, bf16, flex attention against sdpa, torch.compile, LoRA in fp16, FSDP2 on 2 GPUs,
and the MFU and projected wall time of the measured preset. Each check takes the device as an argument,
so that its code can be tried on a CPU too (see the tests): (opts, cfg, device, tmp folder) -> one row,
{"what", "result" (words), "ok", figures}."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import train
from benchmarks.common import (ROOT, BenchOptions, configured, exact_matmuls, low_precision, model_for,
                               preset_argv, quiet, timed, trainer_log, trainer_step_ms)
from checkpoint import load_weights
from config import Config
from errors import UserError
from lora import add_adapters
from model import GPT
from monitor import estimate_mfu
from runtime import autocast, format_duration, peak_flops


def bench_gpu(opts: BenchOptions, cfg: Config, device: str) -> list[dict]:
    """Every check of GPU_CHECKS, in a temporary folder of its own."""
    if not device.startswith("cuda"):
        raise UserError(f"--what gpu checks a CUDA GPU, but the device is {device}: leave --device at auto or cuda")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for check in GPU_CHECKS:
            print(f"gpu: {check.__name__} ...", file=sys.stderr, flush=True)
            rows.append({"bench": "gpu", **check(opts, cfg, device, Path(tmp) / check.__name__)})
    return rows


GPU_TINY = ["--model.n_layer", "2", "--model.n_head", "4", "--model.n_embd", "128", "--model.block_size", "128",
            "--training.batch_size", "16", "--training.warmup_iters", "2", "--training.eval_batches", "4",
            "--training.log_interval", "1", "--training.save_best", "false"]


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
    with torch.no_grad(), autocast(torch.device(device).type, precision):
        forward_s = timed(lambda: model(x, x)[1].item(), opts.repeats, 1)  # .item(): wait for the device
    evals = t.max_iters // t.eval_interval + 1
    eval_s = evals * 2 * t.eval_batches * forward_s  # 2 splits
    total = t.max_iters * ms / 1000 + eval_s
    tok_s, peak = run_cfg.tokens_per_step() * 1000 / ms, peak_flops(device)
    mfu = f"MFU {estimate_mfu(model, tok_s, peak):.1%}" if peak else "MFU unknown (no peak FLOP/s for this GPU)"
    return {"what": f"{cfg.preset or 'defaults'}, {precision}", "ok": True, "ms_per_step": ms, "tokens_per_s": tok_s,
            "result": f"{mfu}; {t.max_iters} steps projected at {format_duration(total)} "
                      f"({format_duration(eval_s)} of it evaluation)"}


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
    argv = preset_argv(cfg, *common, "--training.parallel", "fsdp", "--training.out_dir", f"{tmp}/fsdp")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
                        str(ROOT / "train.py"), *argv],
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
