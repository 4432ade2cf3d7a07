"""What the benchmarks share: their options, the measured config as train.py would resolve it, runs
of train.py itself, and one timing helper."""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

import prepare
import train
from checkpoint import adopt_model_shape, load_weights
from config import Config, doc
from model import GPT
from options import load_config
from runtime import cpu_has_bf16

ROOT = Path(__file__).resolve().parents[1]  # the project, where python -m benchmarks.* runs from
CORPUS = "data/shakespeare/input.txt"


@dataclass
class BenchOptions:
    what: str = doc("comma-separated names of benchmarks (see above)", "train,sample,prepare")
    steps: int = doc("timed training steps per precision", 5, within="[1, inf)")
    warmup: int = doc("untimed training steps first", 2, within="[0, inf)")
    repeats: int = doc("repeats for sample and prepare; turns of each side for peft", 3, within="[1, inf)")
    json: str = doc("also write the results to this file; empty: do not", "")


def quiet(fn, *args, **kwargs):
    """Run fn with its printing swallowed (train.main prints a config and a line per step)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def timed(fn: Callable[[], object], repeats: int, warmup: int = 0) -> float:
    """The median wall time of `repeats` calls of fn, in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def precisions(device_type: str) -> list[str]:
    if device_type == "cuda":
        return ["fp32", "bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp32", "fp16"]
    return ["fp32", "bf16"] if device_type == "cpu" and cpu_has_bf16() else ["fp32"]


def low_precision(device: str) -> str:
    """The low precision that mixed-precision training uses on this device: bf16 where it is supported."""
    return next((p for p in ("bf16", "fp16") if p in precisions(torch.device(device).type)), "fp32")


def preset_argv(cfg: Config, *extra: str) -> list[str]:
    """train.py's command line for the measured config: its preset, its overrides, then `extra`."""
    return [*(["--config", cfg.preset] if cfg.preset else []), *cfg.overrides, *extra]


def configured(cfg: Config, *extra: str) -> Config:
    """The measured config with `extra` settings on top, and the model shape of training.init_from's
    weights, as train.py takes it."""
    run_cfg = load_config(preset_argv(cfg, *extra))
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
                         "--training.eval_interval", str(10**9), "--training.eval_batches", "1",
                         "--training.out_dir", out_dir, "--training.save_best", "false", *extra)
    quiet(train.main, run_cfg)
    return json.loads((Path(out_dir) / "train_log.json").read_text())["train"]


def trainer_step_ms(opts: BenchOptions, cfg: Config, device: str, precision: str, out_dir: str, *extra: str) -> float:
    """Median ms per optimizer step of train.py itself, from its own per-step log."""
    records = trainer_log(opts, cfg, device, precision, out_dir, *extra)
    return statistics.median(r["ms_per_step"] for r in records[opts.warmup:])


@contextlib.contextmanager
def exact_matmuls() -> Iterator[None]:
    """fp32 matmuls without TF32 inside the block: TF32 would hide a real difference in rounding."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
