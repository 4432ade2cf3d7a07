"""Memory: what each of 2 processes holds under DDP and under FSDP (each process of a torchrun job
runs this file: python -m benchmarks.memory ddp|fsdp TRAIN_ARGS...), and what activation
checkpointing saves in a forward and backward pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import torch.distributed as dist
from torch.autograd import DeviceType
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks.common import ROOT, BenchOptions, configured, model_for, preset_argv, quiet, timed
from config import Config
from errors import UserError
from model import GPT
from muon import make_optimizer
from options import load_config
from runtime import (autocast, checkpoint_activations, end_process, pick_device, pick_precision, profiler, shard,
                     start_process)


def bench_memory(opts: BenchOptions, cfg: Config, device: str) -> list[dict]:
    """What each of 2 processes holds under ddp and under fsdp (parameters, gradients, optimizer state,
    between steps), each in a torchrun job of its own; then the memory a forward and backward pass
    adds, without and with activation checkpointing (training.activation_checkpointing), in this
    process. On a CPU the 2 processes talk through gloo; on CUDA they need 2 GPUs."""
    if device.startswith("cuda") and torch.cuda.device_count() < 2:
        raise UserError("--what memory runs 2 processes, one per GPU, and this machine has 1; use --device cpu")
    vocab = model_for(cfg).config.vocab_size  # prepares the data here, once: the processes need only its size
    argv = preset_argv(cfg, "--device", device, "--model.vocab_size", str(vocab))
    rows = []
    for parallel in ("ddp", "fsdp"):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            "--no-python", sys.executable, "-m", "benchmarks.memory", parallel, *argv],
                           cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
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


def held_by_this_process(parallel: str, argv: list[str]) -> None:
    """In each process of a torchrun job: the config's model takes one training step under `parallel`
    (ddp or fsdp) on one sequence (the batch changes none of what is counted here), then the bytes of
    the tensors this process holds: its parameters, gradients and optimizer state, counted from the
    tensors themselves, each process's own part of them under FSDP (DTensor.to_local()). Rank 0
    prints every process's counts as JSON, after "held: "."""
    cfg = load_config(argv)
    proc = start_process(pick_device(cfg.training.device))
    precision = quiet(pick_precision, cfg.training.precision, proc.device_type)
    torch.manual_seed(0)
    model = GPT(cfg.model).to(proc.device)
    if parallel == "fsdp":
        shard(model, proc, precision)
    step_model = model if parallel == "fsdp" else DDP(model, device_ids=[proc.device] if proc.device_type == "cuda"
                                                      else None)
    optimizer = make_optimizer(model, cfg.training, proc.device_type)
    x = torch.randint(cfg.model.vocab_size, (1, cfg.model.block_size), device=proc.device)
    with autocast(proc.device_type, precision):
        _, loss = step_model(x, x)
    loss.backward()
    optimizer.step()  # the gradients stay, as they are between a backward pass and zero_grad

    def nbytes(tensors) -> int:
        local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
        return sum(t.numel() * t.element_size() for t in local)

    params = list(model.parameters())  # a tied matrix once
    held = {"params": nbytes(params), "grads": nbytes(p.grad for p in params if p.grad is not None),
            "optimizer": nbytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))}
    every = [None] * proc.world_size
    dist.all_gather_object(every, held)
    if proc.is_main:
        print("held: " + json.dumps(every), flush=True)
    end_process(proc, finished=True)


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
    run_cfg = configured(cfg)
    precision = quiet(pick_precision, run_cfg.training.precision, torch.device(device).type)
    model = model_for(cfg).to(device)
    if checkpointing:
        checkpoint_activations(model)
    x = torch.randint(model.config.vocab_size, (run_cfg.training.batch_size, model.config.block_size), device=device)

    def step() -> None:
        with autocast(torch.device(device).type, precision):
            _, loss = model(x, x)
        loss.backward()  # into the gradients of the first pass: none are allocated again
        loss.item()  # wait for the device

    ms = 1000 * timed(step, opts.steps, 1 + opts.warmup)  # the first pass makes the gradients
    with profiler(device, memory=True) as prof:
        step()
    return {"bench": "memory", "what": f"activations, {'with' if checkpointing else 'no'} checkpointing, {precision}",
            "peak_mb": peak_allocated_mb(prof, device), "ms_per_step": ms,
            "result": "torch.profiler: peak of the memory allocated during forward + backward"}


if __name__ == "__main__":
    held_by_this_process(sys.argv[1], sys.argv[2:])
