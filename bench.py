"""Measure speed: training steps, sampling, data preparation, and time to quality.

    python bench.py                                          # base model: train, sample, prepare
    python bench.py --config configs/cpu/small.toml --what train
    python bench.py --what sample,prepare --json bench.json
    python bench.py --what speedrun                          # reference vs speedrun preset, side by side
    python bench.py --what profile                           # where a training step's time goes
    python bench.py --what train --training.compile true     # any config override applies

Each figure is a median over repeats, taken after warm-up steps. Results are printed as
one table; --json also writes them to a file. docs/benchmarks.md records figures with the
machine they came from.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import prepare
import train
from config import ConfigError, load_config
from data import BPETokenizer, DataError, split_safely
from model import GPT

CORPUS = "data/shakespeare/input.txt"


def quiet(fn, *args, **kwargs):
    """Run fn with its printing swallowed (train.main prints a config and a line per step)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def precisions(device_type: str) -> list[str]:
    if device_type == "cuda":
        return ["fp32", "bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp32", "fp16"]
    if device_type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return ["fp32", "bf16"]
    return ["fp32"]


def trainer_step_ms(args, device: str, precision: str, out_dir: str) -> float:
    """Median ms per optimizer step of train.py itself, from its own per-step log."""
    steps, warmup = args.steps, args.warmup
    cfg = load_config(["--config", args.config, *args.overrides, "--device", device,
                       "--training.precision", precision,
                       "--training.max_iters", str(warmup + steps), "--training.log_interval", "1",
                       "--training.eval_interval", str(10**9), "--training.eval_iters", "1",
                       "--training.out_dir", out_dir, "--training.save_best", "false"])
    quiet(train.main, cfg)
    records = json.loads((Path(out_dir) / "train_log.json").read_text())["train"]
    return statistics.median(r["ms_per_step"] for r in records[warmup:])


def plain_loop(args, device: str, precision: str = "fp32"):
    """The plainest eager PyTorch training step over the same model and batch size: a function
    that runs one step. fp32, or bf16 autocast for the profile."""
    cfg = load_config(["--config", args.config, *args.overrides, "--device", device, "--model.vocab_size", "65"])
    torch.manual_seed(0)
    model = GPT(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t = cfg.training
    x = torch.randint(65, (t.batch_size, cfg.model.block_size), device=device)

    def step():
        for _ in range(t.grad_accum_steps):
            with train.autocast(torch.device(device).type, precision):
                _, loss = model(x, x)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # wait for the device, as the trainer does
    return step


def plain_step_ms(args, device: str) -> float:
    """Median ms per step of the plain loop (fp32)."""
    step = plain_loop(args, device)
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[args.warmup:])


def bench_profile(args, device: str, top: int = 12) -> list[dict]:
    """torch.profiler over args.steps plain-loop steps at each precision: the operators that take
    the most time, printed as tables (nothing added to the results table)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    sort = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    for precision in precisions(torch.device(device).type):
        step = plain_loop(args, device, precision)
        for _ in range(args.warmup):
            step()
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
        print(f"\nprofile: {args.steps} steps, {precision}, {args.config}")
        print(prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=64))
    return []


def bench_train(args, device: str) -> list[dict]:
    cfg = load_config(["--config", args.config, *args.overrides, "--device", device])
    tokens = cfg.training.batch_size * cfg.training.grad_accum_steps * cfg.model.block_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in precisions(torch.device(device).type):
            ms = trainer_step_ms(args, device, precision, f"{tmp}/{precision}")
            row = {"bench": "train", "what": f"trainer {precision}", "ms_per_step": ms,
                   "tokens_per_s": tokens * 1000 / ms}
            if device.startswith("cuda"):
                peak = next((f for n, f in train.PEAK_FLOPS.items() if n in torch.cuda.get_device_name()), None)
                if peak:
                    model = GPT(load_config(["--config", args.config, *args.overrides,
                                             "--model.vocab_size", "65"]).model)
                    row["mfu"] = model.estimate_mfu(row["tokens_per_s"], peak)
                    row["peak"] = f"{peak / 1e12:.0f} TFLOP/s bf16 dense ({torch.cuda.get_device_name()})"
            rows.append(row)
        ms = plain_step_ms(args, device)
        rows.append({"bench": "train", "what": "plain eager loop fp32", "ms_per_step": ms,
                     "tokens_per_s": tokens * 1000 / ms})
    return rows


def bench_sample(args, device: str, new_tokens: int = 500) -> list[dict]:
    cfg = load_config(["--config", args.config, *args.overrides, "--model.vocab_size", "65",
                       "--model.dropout", "0"])
    torch.manual_seed(0)
    model = GPT(cfg.model).to(device).eval()
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    rows = []
    for use_cache in (True, False):
        times = []
        for _ in range(1 + args.repeats):  # the first run is warm-up
            start = time.perf_counter()
            model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache)
            times.append(time.perf_counter() - start)
        s = statistics.median(times[1:])
        rows.append({"bench": "sample", "what": f"{new_tokens} tokens, {'KV cache' if use_cache else 'no cache'}",
                     "seconds": s, "tokens_per_s": new_tokens / s})
    rows.append({"bench": "sample", "what": "KV cache speed-up", "ratio": rows[1]["seconds"] / rows[0]["seconds"]})
    return rows


def bench_prepare(args, target_mb: int = 50) -> list[dict]:
    text = Path(CORPUS).read_text(encoding="utf-8")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.txt"
        copies = max(1, round(target_mb * 1e6 / len(text.encode())))
        big.write_text(text * copies, encoding="utf-8")
        mb = big.stat().st_size / 1e6
        for tokenizer in ("char", "bpe"):
            times = []
            for i in range(args.repeats):
                start = time.perf_counter()
                try:
                    prepare.prepare(str(big), f"{tmp}/{tokenizer}{i}", tokenizer, progress=False)
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
        for _ in range(args.repeats):
            start = time.perf_counter()
            tok.enc.encode_ordinary_batch(pieces, num_threads=os.cpu_count() or 1)
            times.append(time.perf_counter() - start)
        rows.append({"bench": "prepare", "what": f"tiktoken encode_ordinary_batch, {mb:.0f} MB",
                     "seconds": statistics.median(times), "mb_per_s": mb / statistics.median(times)})
    return rows


def bench_speedrun(args, device: str) -> list[dict]:
    """Wall time (evaluation included) and val loss of the reference and speedrun presets, one after the other."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in ("configs/cpu/reference.toml", "configs/cpu/speedrun.toml"):
            cap = ["--max-iters", str(args.max_iters)] if args.max_iters else []
            cfg = load_config(["--config", preset, *args.overrides, "--training.out_dir", f"{tmp}/{Path(preset).stem}",
                               *cap])
            start = time.perf_counter()
            summary = quiet(train.main, cfg)
            rows.append({"bench": "speedrun", "what": preset, "seconds": time.perf_counter() - start,
                         "best_val_loss": summary["best_val_loss"], "steps": summary["step"]})
    rows.append({"bench": "speedrun", "what": "speedrun / reference wall time",
                 "ratio": rows[1]["seconds"] / rows[0]["seconds"]})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'bench':<9} {'what':<44} {'result'}")
    for r in rows:
        parts = []
        for key, fmt in (("ms_per_step", "{:.1f} ms/step"), ("seconds", "{:.2f} s"), ("tokens_per_s", "{:,.0f} tok/s"),
                         ("mb_per_s", "{:.1f} MB/s"), ("mfu", "MFU {:.1%}"), ("best_val_loss", "val {:.4f}"),
                         ("ratio", "{:.2f}x")):
            if key in r:
                parts.append(fmt.format(r[key]))
        print(f"{r['bench']:<9} {r['what']:<44} {' | '.join(parts)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="Other arguments are config overrides --section.key VALUE, as for "
                                       "train.py (e.g. --training.compile true). training.* settings reach "
                                       "the trainer's rows; the plain loop, the profile and sampling take the "
                                       "model and batch settings.")
    p.add_argument("--config", default="configs/base/base.toml", help="model and batch to measure")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--what", default="train,sample,prepare",
                   help="comma-separated: train, sample, prepare, speedrun, profile")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per precision")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    p.add_argument("--repeats", type=int, default=3, help="repeats for sample and prepare")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--max-iters", type=int, default=0, help="cap the speedrun runs' steps (a quick check)")
    args, args.overrides = p.parse_known_args(argv)
    own = ["--" + name.replace("_", "-") for name in vars(args) if name != "overrides"]
    for flag in (a.split("=")[0] for a in args.overrides if a.startswith("--") and "." not in a.split("=")[0]):
        if flag != "--tokenizer":  # the one config short flag bench.py has no option of its own for
            close = difflib.get_close_matches(flag, own, n=1)
            print(f"error: unknown option {flag}" + (f" (did you mean {close[0]}?)" if close else "")
                  + "; config overrides are --section.key VALUE", file=sys.stderr)
            return 2
    kinds = ("train", "sample", "prepare", "speedrun", "profile")
    unknown = set(args.what.split(",")) - set(kinds)
    if unknown:
        print(f"error: --what {','.join(sorted(unknown))} is not one of: {', '.join(kinds)}", file=sys.stderr)
        return 2
    try:
        device = train.pick_device(args.device)
        load_config(["--config", args.config, *args.overrides])
    except (train.TrainError, ConfigError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    machine = (f"{torch.cuda.get_device_name()}" if device.startswith("cuda") else
               f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs") + \
        f", torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"device: {device} ({machine}); config: {args.config} {' '.join(args.overrides)}".rstrip())
    rows = []
    for what in args.what.split(","):
        rows += {"train": lambda: bench_train(args, device), "sample": lambda: bench_sample(args, device),
                 "prepare": lambda: bench_prepare(args), "speedrun": lambda: bench_speedrun(args, device),
                 "profile": lambda: bench_profile(args, device)}[what]()
    if rows:
        print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "device": device, "config": args.config,
                                               "overrides": args.overrides,
                                               "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
