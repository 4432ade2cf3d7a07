"""Measure speed, memory and time to quality; check what only a GPU can check.

    python bench.py                                          # base model: train, sample, prepare
    python bench.py --config configs/cpu/small.toml --what train
    python bench.py --what sample,prepare --json bench.json
    python bench.py --what train --training.compile true     # any config override applies
    python bench.py --help                                   # every option, with its default

--what takes names from BENCHMARKS, below, each a function in benchmarks/ (its docstring says what
it measures). Each figure is a median over repeats, taken after warm-up steps. Results are printed as
one table; --json also writes them to a file. docs/benchmarks.md records figures with the machine they
came from. --what gpu exits with status 1 if one of its checks failed, and without CUDA says so in one
line and exits with status 2.
"""

from __future__ import annotations

# Before torch, which takes seconds to load: a Ctrl-C meanwhile ends in one line (errors.py).
from errors import UserError, command

import os
import platform
import sys
from pathlib import Path
from dataclasses import dataclass

import torch

from benchmarks import BENCHMARKS
from benchmarks.common import BenchOptions
from files import check_replaceable, write_json
from options import parse
from runtime import pick_device

@dataclass
class Options(BenchOptions):
    def problems(self) -> list[str]:
        unknown = [name for name in self.what.split(",") if name not in BENCHMARKS]
        return [f"--what {','.join(unknown)} is not one of: {', '.join(BENCHMARKS)}"] if unknown else []


# How each figure of a row is printed, in this order.
FORMATS = (("ms_per_step", "{:.1f} ms/step"), ("ms_per_token", "{:.1f} ms/token"), ("seconds", "{:.2f} s"),
           ("tokens_per_s", "{:,.0f} tok/s"), ("mb_per_s", "{:.1f} MB/s"), ("mfu", "MFU {:.1%}"), ("val_start", "from val {:.4f}"),
           ("best_val_loss", "val {:.4f}"), ("ratio", "{:.2f}x"), ("trained_share", "{:.2%} trained"),
           ("peak_rss_mb", "peak RSS {:,.0f} MiB"), ("start_rss_mb", "{:,.0f} MiB before training"),
           ("cuda_peak_mb", "CUDA peak {:,.0f} MiB"), ("params_mb", "parameters {:,.2f} MiB"),
           ("grads_mb", "gradients {:,.2f} MiB"), ("optimizer_mb", "optimizer {:,.2f} MiB"),
           ("held_mb", "total {:,.2f} MiB"), ("peak_mb", "peak {:,.2f} MiB"), ("result", "{}"))


def print_table(rows: list[dict]) -> None:
    print(f"{'bench':<9} {'what':<44} {'result'}")
    for r in rows:
        parts = [] if "ok" not in r else ["ok" if r["ok"] else "FAILED"]
        parts += [fmt.format(r[key]) for key, fmt in FORMATS if key in r]
        print(f"{r['bench']:<9} {r['what']:<44} {' | '.join(parts)}")


@command
def main(argv: list[str] | None = None) -> int:
    head, examples, *_ = __doc__.split("\n\n")
    names = "\n".join(f"    {name:<9} {what}" for name, (what, _) in BENCHMARKS.items())
    about = f"{head}\n\n{examples}\n\n    --what takes these names, comma-separated:\n{names}"
    opts, cfg = parse(argv, Options, program="bench.py", about=about, preset="configs/base/base.toml")
    names = [name for name in BENCHMARKS if name in opts.what.split(",")]
    if opts.json:  # it replaces the results of an earlier run, never another file: said before the run
        check_replaceable(Path(opts.json), (b'"results": [',), "--json", "bench.py")
    if "gpu" in names and not torch.cuda.is_available():
        raise UserError(f"--what gpu needs a CUDA GPU, and this torch ({torch.__version__}) sees none; run it on a "
                        "machine with one (and a CUDA build of torch)")
    device = pick_device(cfg.training.device)
    machine = (f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}" if device.startswith("cuda") else
               f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs") + \
        f", torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"device: {device} ({machine}); config: {cfg.preset} {' '.join(cfg.overrides)}".rstrip())
    rows = [row for name in names for row in BENCHMARKS[name][1](opts, cfg, device)]
    if rows:
        print_table(rows)
    if opts.json:
        write_json(opts.json, {"machine": machine, "device": device, "config": cfg.preset,
                               "overrides": cfg.overrides, "results": rows})
    return 1 if any(row.get("ok") is False for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
