"""Where the work runs: the device, the numeric precision, the processes of a torchrun job and how
they share the model (DDP, or FSDP's shards), activation checkpointing, stop signals, and a profiler.

    device = pick_device("auto")                  # "cuda", "mps" or "cpu"
    proc = start_process(device)                  # this process: rank 0 of 1, or its rank under torchrun;
                                                  # on a CPU it keeps the memory it frees (reuse_freed_memory)
    with autocast("cuda", "bf16"): loss = ...     # mixed precision, or nothing for fp32
    shard(model, proc, "bf16")                    # FSDP: each process keeps a part of every weight
    all_reduce(loss, proc)                        # the mean over the processes (no-op for one)
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from config import ConfigError, TrainingConfig
from errors import to_devnull
from files import make_folder

TORCH_THREADS = torch.get_num_threads()  # torch's own choice (torchrun's OMP_NUM_THREADS=1 included)
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


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a container's CPU quota (cgroup v2)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))  # 1.5 CPUs: 1 thread, never one too many
    return cores


def use_threads(threads: int) -> int:
    """Set torch's CPU threads: `threads`, or for 0 torch's own choice (its physical cores) capped by the
    cores this process may use, shared among the processes torchrun started on this machine. More
    threads than free cores is the costly mistake: each step waits for the slowest thread."""
    if threads == 0:
        here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        threads = max(1, min(TORCH_THREADS, usable_cores() // here))
    torch.set_num_threads(threads)
    return threads


def pick_precision(precision: str, device_type: str, say: bool = True) -> str:
    """The precision actually used: fp16 and unsupported bf16 fall back to fp32 on CPU (with a notice,
    when `say`: rank 0 only, under torchrun)."""
    used = precision
    if device_type == "cpu" and precision == "fp16":
        used, why = "fp32", "fp16 autocast is not used on CPU; training in fp32 (bf16 is the fast option)"
    elif device_type == "cpu" and precision == "bf16" and not cpu_has_bf16():
        used, why = "fp32", "this CPU has no bf16 support; training in fp32"
    if used != precision and say:
        print(f"notice: {why}")
    return used


def cpu_has_bf16() -> bool:
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast(device_type: str, precision: str):
    """Matmuls in bf16/fp16 where that is safe, the rest in fp32; nothing at all for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=autocast_dtype(precision))


def autocast_dtype(precision: str) -> torch.dtype:
    """The dtype autocast computes in at a half precision ("bf16" or "fp16")."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def peak_flops(device: str) -> float | None:
    """The GPU's dense bf16 peak in FLOP/s, when PEAK_FLOPS knows it; None on CPU."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


@dataclass
class Process:
    """This process's place in a torchrun job: its rank among world_size processes (0 of 1 without
    torchrun) and its device."""
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    threads: int = 1  # torch's CPU threads in this process

    @property
    def is_main(self) -> bool:
        return self.rank == 0  # the one process that prints and writes files

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type  # "cuda:1" -> "cuda"


def start_process(device: str, threads: int = 0) -> Process:
    """Set the CPU threads (use_threads), and under torchrun (RANK is set) join the process group: one
    process per GPU, or gloo on CPU. On CUDA, fp32 matmuls may use TF32 (10 bits of mantissa instead
    of 23: much faster, and training does not notice)."""
    threads = use_threads(threads)
    if device == "cpu":
        reuse_freed_memory()
    if "RANK" not in os.environ:
        return tf32(Process(device=device, threads=threads))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])  # the GPU's index on this machine
        here, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1)), torch.cuda.device_count()
        if here > gpus:  # every process refuses, so none waits for the others; rank 0 prints it
            raise ConfigError(f"torchrun started {here} processes on this machine, which has {gpus} CUDA GPU(s): one "
                              f"process per GPU, so use --nproc-per-node={gpus} (or --device cpu)")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return tf32(Process(rank, world, device, threads))


def reuse_freed_memory() -> None:
    """Linux's C library gives each allocation over 32 MB pages of its own from the kernel and returns them
    when it is freed, so a tensor that size made at every step (the logits, B * T * V floats, their
    softmax and gradient) is zeroed and mapped again page by page at every step. Served from the heap, and
    the heap kept, freed memory is reused: a LoRA step of SmolLM2 in bf16 took 1.38 s instead of 1.53 on a
    2-core CPU, for a higher peak of memory (docs/benchmarks.md). Elsewhere (macOS, Windows) nothing changes."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no allocation gets pages of its own
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: the heap's free top is not handed back to the kernel


def tf32(proc: Process) -> Process:
    if proc.device_type == "cuda":
        torch.set_float32_matmul_precision("high")
    return proc


def parallel_problems(training: TrainingConfig, proc: Process) -> list[str]:
    """What keeps the processes from sharing the work as the settings say."""
    problems, world = [], proc.world_size
    if training.grad_accum_steps % world:
        ok = training.grad_accum_steps + world - training.grad_accum_steps % world
        problems.append(f"training.grad_accum_steps = {training.grad_accum_steps} must be divisible by the number "
                        f"of processes ({world}), e.g. {ok}")
    if training.parallel == "fsdp" and world == 1:
        problems.append("training.parallel = fsdp shards the model across the processes of a torchrun job, but "
                        "this is one process; start it with torchrun (e.g. torchrun --standalone --nproc-per-node=2 "
                        "train.py ...), or drop training.parallel: one process needs no sharding")
    elif training.parallel == "fsdp" and proc.device == "mps":
        problems.append("training.parallel = fsdp cannot run on MPS: torch.distributed has no backend that "
                        "connects MPS processes; use --device cpu (gloo) or CUDA GPUs (nccl)")
    return problems


def all_reduce(t: torch.Tensor, proc: Process, op: str = "avg") -> torch.Tensor:
    """t, in place, reduced over every process: "avg" (their mean), "sum", "min" or "max". Every
    process must call it with a tensor of the same shape; for one process it is t as it is."""
    if proc.world_size > 1:
        dist.all_reduce(t, op={"avg": dist.ReduceOp.AVG, "sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                               "max": dist.ReduceOp.MAX}[op])
    return t


def checkpoint_activations(model: torch.nn.Module) -> None:
    """Activation checkpointing, in place: each block's forward keeps only its input x (B, T, C) for
    the backward pass, which runs the block's forward again to get the activations it needs (less
    memory for more compute). The replay draws the same dropout masks: checkpoint saves the RNG state
    and restores it for the replay. Without gradients (evaluation, generation) a block runs as usual."""
    for block in model.transformer.h:
        forward = block.forward

        def checkpointed(*args, forward=forward):
            if not torch.is_grad_enabled():
                return forward(*args)
            return checkpoint(forward, *args, use_reentrant=False)

        block.forward = checkpointed


def shard(model: torch.nn.Module, proc: Process, precision: str) -> None:
    """Fully sharded data parallel (FSDP2, PyTorch's fully_shard), in place: every process keeps 1/world
    of each weight (its part of dim 0), and so 1/world of the gradients and of the optimizer state,
    which the optimizer makes from the parameters it is given: create the optimizer after this.

    The parameters become DTensors, tensors that know they are one part of a whole (p.to_local() is
    this process's part). Each transformer block is a unit: just before it computes, its weights are
    gathered from every process (all-gather), and dropped again after; after its backward pass, its
    gradients are summed across the processes and each keeps only its own part (reduce-scatter).
    So one block's whole weights exist at a time, beside those of the last unit, fully_shard(model):
    what is left over, the embeddings, the final norm and the output layer. wte and lm_head are one
    Parameter (weight tying), in that one unit, so it is sharded once and stays tied.

    Mixed precision (bf16 or fp16): each process stores its part of the weights in fp32, and the
    optimizer updates them there, as without FSDP. param_dtype: the weights are gathered in the low
    precision, half the bytes to send and to hold, and the blocks compute with them (autocast would
    cast them for its matmuls anyway). reduce_dtype=fp32: the gradients are summed across processes
    in fp32, where many small values do not round away. autocast stays on, as in one process: it still
    runs the operations that need range and precision (softmax, norms, the loss) in fp32. One
    difference remains: the activations between blocks are in the low precision too (the embedding's
    output is), where autocast alone keeps that stream in fp32. fp16's GradScaler works on the sharded
    gradients: DTensor makes every process agree on whether a step overflowed (a MAX across them), so
    they all skip the same steps."""
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None)
    mesh = init_device_mesh(proc.device_type, (proc.world_size,))  # all processes, one dimension
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # GPT.forward returns logits sliced from the padded vocabulary, a view. FSDP warns that changing such
    # an output in place would lose its backward hook; nothing changes the logits in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def all_finite(model: torch.nn.Module, proc: Process) -> bool:
    """Whether every weight of every process is a finite number (each checks its own shards)."""
    local = all(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all() for p in model.parameters())
    return bool(all_reduce(torch.tensor(int(local), device=proc.device), proc, "min").item())


def whole(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: a DTensor's whole value (gathered from every process when it is sharded)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """Under FSDP, the top unit's weights (embeddings, final norm, output layer) gathered for as long as
    the block lasts, such as a whole generation, instead of once per forward (per token); the blocks
    gather their own when called. Every process must take part, with the same calls."""
    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The model's and the optimizer's state dicts as one process holds them, so that a checkpoint is
    the same whether it was trained by one process, by DDP or by FSDP, and any of them can read it.

    Under FSDP, every process must call this: each sends its parts, and rank 0 receives the whole,
    one tensor at a time, moved to the CPU (cpu_offload), where the checkpoint is written from; the
    other processes get empty dicts. The checkpoint is then one file that sample.py, export.py or a
    run with another number of processes reads as it is (torch.distributed.checkpoint would instead
    write one file per process, which only its own API reads back)."""
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    if not weights:
        return {}, {}
    # A tied matrix arrives once per name, as two copies: store it once, as model.state_dict() does.
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for first, *others in names.values():
        weights.update({other: weights[first] for other in others})
    # get_optimizer_state_dict keys the state by parameter name; optimizer.state_dict() by the index of
    # the parameter, counted across the param groups in order. Checkpoints keep the latter.
    index = {name: i for i, name in enumerate(n for group in by_name["param_groups"] for n in group["params"])}
    return weights, {"state": {index[n]: s for n, s in by_name["state"].items()},
                     "param_groups": [g | {"params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict(state), where state is optimizer.state_dict()'s format (full_state's).
    Under FSDP, every process loads the whole state and keeps its own part of each tensor."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    name_of = {id(p): name for name, p in model.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]  # by index
    by_name = {"state": {names[i]: s for i, s in state["state"].items()},
               "param_groups": [g | {"params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def end_process(proc: Process, finished: bool) -> None:
    """Leave the process group (torchrun): after a barrier when the run finished, so that no process
    tears it down while rank 0 is still writing."""
    if proc.world_size > 1:
        # gloo's threads free each finished collective's tensors themselves, and need Python's lock (the
        # GIL) to free one that Python has let go of; a thread that gets there while Python shuts down
        # aborts the process ("terminate called without an active exception"). Freeing the garbage now,
        # then waiting at the barrier, where the lock is free, gives them their turn.
        gc.collect()
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def rng_state(device: str) -> dict:
    """The RNG states that dropout draws from, as tensors (a checkpoint stores them)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.startswith("cuda") else torch.empty(0)}


def set_rng_state(state: dict, device: str) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if device.startswith("cuda") and state["cuda"].numel():
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def profiler(device: str, memory: bool = False):
    """A torch.profiler recording the CPU's operators, and the GPU's kernels on CUDA; with `memory`,
    every allocation and free too. Use it as a context manager, or start() and stop() it."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if device.startswith("cuda") else [])]
    return profile(activities=activities, profile_memory=memory)


def profile_table(prof, device: str, top: int = 15) -> str:
    """The operators that took the most time (on the GPU, its time), as a table."""
    sort = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=60)


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
            self.prof, self.first = profiler(self.device), step
            self.prof.start()

    def after_step(self, step: int) -> None:
        """Call after each optimizer step with the number of steps done; stops at `end` and reports."""
        if self.prof is None or step != self.end:
            return
        self.prof.stop()
        path = self.folder / f"trace_steps_{self.first}-{step}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        self.prof.export_chrome_trace(str(tmp))
        os.replace(tmp, path)  # a viewer never opens half a trace
        print(f"profile of steps {self.first} to {step}: {path}\n" + profile_table(self.prof, self.device))
        self.prof, self.enabled = None, False


class Stopped(BaseException):
    """Ctrl-C or SIGTERM stopped the run after saving it; `code` is the exit status (128 + signal). Not
    an Exception, which code may catch (a damaged file's reader does): like KeyboardInterrupt."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM (what `timeout` and job schedulers send) ask the loop to stop: at the
    next micro-batch, evaluation batch or sampled token it saves the last whole step in ckpt_last.pt and
    exits. A second one of the same kind stops at once.
    A reader of stdout that goes away (`train.py | head`) stops it the same way, as SIGPIPE (exit 141)."""

    def __init__(self, proc: Process):
        self.proc, self.received, self.previous, self.stdout = proc, 0, {}, None

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        self.stdout = sys.stdout
        if sys.stdout is not None:  # None: started with stdout closed (`>&-`)
            sys.stdout = WatchedStdout(sys.stdout, lambda: self.handle(signal.SIGPIPE, None))
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        sys.stdout = self.stdout

    def handle(self, signum: int, frame) -> None:
        self.received = self.received or signum  # the first one is what stopped the run
        if signum in self.previous:
            signal.signal(signum, self.previous[signum])  # the next one acts at once, as usual
        if self.proc.is_main:
            print(f"\n{signal.Signals(signum).name}: stopping, with the last whole step saved "
                  + ("(stdout was closed)" if signum == signal.SIGPIPE else "(again to stop at once, without saving)"),
                  file=message_stream(), flush=True)

    def requested(self) -> int:
        """The signal to stop for, agreed by every process (they must stop at the same step), or 0."""
        if self.proc.world_size == 1:
            return self.received
        return int(all_reduce(torch.tensor(self.received, device=self.proc.device), self.proc, "max").item())


class WatchedStdout:
    """sys.stdout during the loop: written line by line (so that `| tee` shows each line as it comes,
    and a closed pipe is noticed at once); when the reader has gone, `closed` is called once and the
    rest of the output goes to /dev/null instead of raising BrokenPipeError."""

    def __init__(self, stream, closed: Callable[[], None]):
        self.stream, self.closed, self.gone = stream, closed, False

    def write(self, text: str) -> int:
        try:
            n = self.stream.write(text)
            if "\n" in text:
                self.stream.flush()
            return n
        except BrokenPipeError:
            self.reader_gone()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.reader_gone()

    def reader_gone(self) -> None:
        if not self.gone:
            self.gone = True
            fd = self.stream.fileno()
            if os.path.sameopenfile(fd, sys.stderr.fileno()):  # `2>&1 | head`: stderr has gone too
                to_devnull(sys.stderr.fileno())
            to_devnull(fd)  # what is still buffered goes nowhere
            self.closed()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def message_stream():
    """Where the run's messages go: stdout, or stderr once stdout's reader has gone (`| head`)."""
    return sys.stderr if getattr(sys.stdout, "gone", False) else sys.stdout


def format_duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
