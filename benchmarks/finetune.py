"""Fine-tuning: a LoRA run against a full fine-tune of the same model, each in a fresh process that
reports its own peak memory (run as python -m benchmarks.finetune TRAIN_ARGS...)."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import train
from benchmarks.common import ROOT, BenchOptions, preset_argv
from config import Config, ConfigError
from errors import UserError


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
            argv = preset_argv(cfg, *extra, "--device", device, "--training.log_interval", "1",
                               "--training.out_dir", str(out_dir))
            r = subprocess.run([sys.executable, "-m", "benchmarks.finetune", *argv], cwd=ROOT, capture_output=True,
                               text=True)
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


def peak_rss() -> int:
    """This process's peak resident set size in bytes. On Linux, VmHWM, whose count restart_peak_rss
    restarts; elsewhere (macOS) ru_maxrss, the peak since the process started."""
    if not os.path.exists("/proc/self/status"):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def restart_peak_rss() -> None:
    """Start VmHWM's count again at the present RSS (Python, torch and the imports), so that the peak
    is the run's, not an import's passing peak (ru_maxrss is not used: it can carry the parent's RSS
    from the fork)."""
    if os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def train_and_report_memory(argv: list[str]) -> int:
    """train.py with `argv` in this process, then its peak memory on one line: the resident set size
    on a CPU, and on CUDA the most memory torch's allocator held."""
    restart_peak_rss()
    start = peak_rss()
    code = train.cli(argv)
    cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    print("peak memory: " + json.dumps({"start_rss": start, "peak_rss": peak_rss(), "cuda_peak": cuda}))
    return code


if __name__ == "__main__":
    sys.exit(train_and_report_memory(sys.argv[1:]))
