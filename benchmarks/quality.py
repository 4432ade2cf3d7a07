"""Time to quality: the speedrun preset against the reference (wall time to val 1.88), and the
ablation that says what each of the speedrun's changes is worth."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import train
from benchmarks.common import BenchOptions, quiet
from config import Config
from options import load_config

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


# The speedrun preset with one change (or a reference point), each trained for its own schedule.
# `--what ablation` evaluates every 25 steps and reports the final val loss and the training time to
# the first val <= TARGET (the logged step times up to that evaluation: evaluation time left out, so
# that the frequent evaluations do not count).
SPEEDRUN_PRESET = SPEEDRUN[1]
ABLATION = {
    "reference: AdamW, GPT-2, 2000 steps": ("configs/cpu/reference.toml", []),
    "speedrun": (SPEEDRUN_PRESET, []),
    "- qk_norm": (SPEEDRUN_PRESET, ["--model.qk_norm", "false"]),
    "- llama (GPT-2 blocks, qk_norm kept)": (SPEEDRUN_PRESET, ["--model.arch", "gpt2"]),
    "- llama - qk_norm": (SPEEDRUN_PRESET, ["--model.arch", "gpt2", "--model.qk_norm", "false"]),
    "previous speedrun: GPT-2, Muon, 500 steps": (SPEEDRUN_PRESET, [
        "--model.arch", "gpt2", "--model.qk_norm", "false", "--max-iters", "500"]),
    "- Muon (AdamW for every weight)": (SPEEDRUN_PRESET, ["--training.optimizer", "adamw"]),
    "- rotary (learned positions)": (SPEEDRUN_PRESET, ["--model.position", "learned"]),
    "- RMSNorm (LayerNorm)": (SPEEDRUN_PRESET, ["--model.norm", "layernorm"]),
    "- SwiGLU (GELU MLP)": (SPEEDRUN_PRESET, ["--model.mlp", "gelu"]),
    "+ ReLU² MLP instead of SwiGLU": (SPEEDRUN_PRESET, ["--model.mlp", "relu2"]),
    "+ logit soft-cap 30": (SPEEDRUN_PRESET, ["--model.logit_softcap", "30"]),
    "+ untied output head": (SPEEDRUN_PRESET, ["--model.tie_embeddings", "false"]),
    "+ warmup-stable-decay (decay the last 30%)": (SPEEDRUN_PRESET, [
        "--training.lr_schedule", "wsd", "--training.decay_frac", "0.3"]),
    "+ biases (model.bias = true)": (SPEEDRUN_PRESET, ["--model.bias", "true"]),
    "+ 200 steps instead of 250": (SPEEDRUN_PRESET, ["--max-iters", "200"]),
    "+ learning_rate 2e-3 (AdamW part; 4e-3)": (SPEEDRUN_PRESET, ["--training.learning_rate", "2e-3"]),
    "+ muon_lr 0.01 (0.02)": (SPEEDRUN_PRESET, ["--training.muon_lr", "0.01"]),
    "+ muon_lr 0.04 (0.02)": (SPEEDRUN_PRESET, ["--training.muon_lr", "0.04"]),
    "+ batch 12, the reference's (16)": (SPEEDRUN_PRESET, ["--training.batch_size", "12"]),
}


def bench_ablation(opts: BenchOptions, cfg: Config, device: str) -> list[dict]:
    """Each row of ABLATION trained in turn: its final val loss, and its training time to val <= TARGET."""
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
