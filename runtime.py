"""Where the work runs: the device, the numeric precision, the processes of a torchrun job, and a
profiler window over some of its steps.

    device = pick_device("auto")                  # "cuda", "mps" or "cpu"
    procs = start_processes(device)               # one process, or this process's rank under torchrun
    with autocast("cuda", "bf16"): loss = ...     # mixed precision, or nothing for fp32
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from config import ConfigError
from files import make_folder

# Dense bf16 peak FLOP/s by GPU name, for MFU (model FLOPs utilization). The first name found in the
# device's name wins, so a longer name comes before its prefix ("L40S" before "L4").
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
              "L4": 121e12, "4090": 165e12, "A10": 125e12, "V100": 125e12, "T4": 65e12}


def pick_device(name: str, setting: str = "training.device") -> str:
    """"auto" becomes the best device present; an absent one is a user error naming `setting`."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else \
            "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting} = cuda, but this torch ({torch.__version__}) sees no CUDA GPU; use "
                          "cpu (or auto), or install a CUDA build of torch on a GPU machine")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{setting} = mps, but MPS is not available here; use cpu (or auto)")
    return name


def pick_precision(precision: str, device_type: str) -> str:
    """The precision actually used: fp16 and unsupported bf16 fall back to fp32 on CPU."""
    if device_type == "cpu" and precision == "fp16":
        print("notice: fp16 autocast is not used on CPU; training in fp32 (bf16 is the fast option)")
        return "fp32"
    if device_type == "cpu" and precision == "bf16" and not cpu_has_bf16():
        print("notice: this CPU has no bf16 support; training in fp32")
        return "fp32"
    return precision


def cpu_has_bf16() -> bool:
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast(device_type: str, precision: str):
    """Matmuls in bf16/fp16 where that is safe, the rest in fp32; nothing at all for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def peak_flops(device: str) -> float | None:
    """The GPU's dense bf16 peak in FLOP/s, when PEAK_FLOPS knows it; None on CPU."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


@dataclass
class Processes:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def master(self) -> bool:
        return self.rank == 0  # the one process that prints and writes files


def start_processes(device: str) -> Processes:
    """Under torchrun (RANK is set), join the process group: one process per GPU, or gloo on CPU."""
    if "RANK" not in os.environ:
        return Processes(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])  # the GPU's index on this machine
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Processes(rank, world, device)


def end_processes(procs: Processes, finished: bool) -> None:
    if procs.world > 1:
        if finished:
            dist.barrier()  # rank 0 may still be writing: tear the group down together, not one by one
        dist.destroy_process_group()


def rng_state(device: str) -> dict:
    """The RNG states that dropout draws from, as tensors (a checkpoint stores them)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.startswith("cuda") else torch.empty(0)}


def set_rng_state(state: dict, device: str) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if device.startswith("cuda") and state["cuda"].numel():
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


class ProfileWindow:
    """torch.profiler over the optimizer steps from `start` to `end`: at `end` it writes a Chrome/Perfetto
    trace (open it at https://ui.perfetto.dev or chrome://tracing) and prints the operators that took
    the most time. `enabled`: false on all but rank 0, and when the window is 0 to 0."""

    def __init__(self, start: int, end: int, folder: str | Path, device: str, enabled: bool):
        self.start, self.end, self.folder, self.device = start, end, Path(folder), device
        self.enabled = enabled and end > 0
        self.prof, self.first = None, None  # the running profiler, and the step it started at
        if self.enabled:
            make_folder(self.folder, "training.profile_dir")

    def before_step(self, step: int) -> None:
        """Call before each optimizer step with the number of steps done; starts recording at `start`
        (or at once, for a run resumed inside the window)."""
        if self.enabled and self.prof is None and self.start <= step < self.end:
            from torch.profiler import ProfilerActivity, profile
            cuda = [ProfilerActivity.CUDA] if self.device.startswith("cuda") else []
            self.prof, self.first = profile(activities=[ProfilerActivity.CPU, *cuda]), step
            self.prof.start()

    def after_step(self, step: int, top: int = 15) -> None:
        """Call after each optimizer step with the number of steps done; stops at `end` and reports."""
        if self.prof is None or step != self.end:
            return
        self.prof.stop()
        path = self.folder / f"trace_steps_{self.first}-{step}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        self.prof.export_chrome_trace(str(tmp))
        os.replace(tmp, path)  # a viewer never opens half a trace
        sort = "self_device_time_total" if self.device.startswith("cuda") else "self_cpu_time_total"
        print(f"profile of steps {self.first} to {step}: {path}\n"
              + self.prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=60))
        self.prof, self.enabled = None, False
