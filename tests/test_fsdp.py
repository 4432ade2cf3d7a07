"""Sharded training (training.parallel = fsdp) with torchrun on CPU (gloo): the same training as one process
and as DDP, an exact resume after a SIGTERM, a resume on another number of processes, LoRA, activation
checkpointing, two machines (two torchrun agents here), and its errors. How much each process holds is
measured by tests/test_bench.py::test_memory_fsdp_holds_half_per_process_and_checkpointing_cuts_activations."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import checkpoint
import export
import runtime
import sample
import train
from config import TrainingConfig
from generate import generate
from options import load_config
from conftest import ROOT
from test_ddp import TORCHRUN, args, final_weights, torchrun
from test_readme import free_port

FSDP = ("--training.parallel", "fsdp")
# Not bit-identical to one process or to DDP: FSDP sums the processes' gradients of each micro-batch
# (reduce-scatter) and then adds micro-steps, one process adds its micro-batches in order, and float32
# addition rounds differently in each order (by about 6e-8 of the value). Adam divides each gradient by
# its running size, which turns such a rounding of a tiny gradient into a visible change of its update,
# so the weights drift apart by more than float32's precision: after the 6 steps of test_ddp.args (lr
# 1e-3), 1.3e-6 from one process (and 1.6e-6 from DDP). 1e-5 is about ten times that, and a hundred times
# below one step's change of a weight (up to lr). Adam's division also hides a gradient scaled by a
# constant (a sum instead of a mean), so the losses and gradient norms are compared too.
ATOL = 1e-5


def ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])


def log(out_dir) -> dict:
    return json.loads((out_dir / "train_log.json").read_text())


def assert_close(a: dict, b: dict, atol: float = ATOL) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=atol), (k, (a[k] - b[k]).abs().max().item())


SAMPLES = ("--training.sample_tokens", "8")  # drawn from a generator of their own: the training is the same


@pytest.fixture(scope="module")
def runs(tmp_path_factory, char_data):
    """test_ddp.args's run in one process, and by DDP and FSDP in 2 processes each."""
    d = tmp_path_factory.mktemp("runs")
    # A task too: DDP shares its examples out, FSDP answers all of them on every process, to the end of
    # every budget (each forward gathers the weights: the processes must make the same calls).
    (d / "task.jsonl").write_text("".join(f'{{"prompt": "{w}:", "completion": " {w.lower()}"}}\n'
                                          for w in ("ROMEO", "JULIET", "KING", "QUEEN", "FIRST")))
    extra = (*SAMPLES, "--training.task", str(d / "task.jsonl"))
    train.main(load_config(args(d / "single", char_data, *extra)))
    ok(torchrun(*args(d / "ddp", char_data, *extra)))
    r = torchrun(*args(d / "fsdp", char_data, *extra, *FSDP))
    ok(r)
    (d / "fsdp_stdout.txt").write_text(r.stdout)
    return d


@pytest.mark.slow
def test_two_sharded_processes_equal_one_process_and_ddp(runs, tmp_path, char_data):
    single, ddp, fsdp = (final_weights(runs / name) for name in ("single", "ddp", "fsdp"))
    assert_close(single, fsdp)
    assert_close(ddp, fsdp)
    # wte and lm_head stayed one matrix: a broken tie would have trained them apart.
    assert torch.equal(fsdp["lm_head.weight"], fsdp["transformer.wte.weight"])
    s_log, f_log = log(runs / "single"), log(runs / "fsdp")
    assert f_log["run"]["world_size"] == 2 and f_log["run"]["n_params"] == s_log["run"]["n_params"]
    for a, b in zip(s_log["train"], f_log["train"], strict=True):  # the loss and the norm before clipping
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for a, b in zip(s_log["evals"], f_log["evals"], strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
        assert len(b["sample"]) == 8  # every process generates it, gathering the weights together
    assert s_log["evals"][0]["sample"] == f_log["evals"][0]["sample"]  # from the same weights at step 0
    tasks = [[e["task_accuracy"] for e in log(runs / name)["evals"]] for name in ("single", "ddp", "fsdp")]
    assert tasks[0] == tasks[1] == tasks[2] and len(tasks[0]) == 3
    # The checkpoint is an ordinary one: the optimizer state of one process, by parameter index.
    single_opt, fsdp_opt = (torch.load(runs / n / "ckpt_last.pt", weights_only=True)["optimizer"]
                            for n in ("single", "fsdp"))
    assert single_opt["param_groups"] == fsdp_opt["param_groups"]
    for i, state in single_opt["state"].items():
        for k, v in state.items():
            assert torch.allclose(v.float(), fsdp_opt["state"][i][k].float(), rtol=1e-3, atol=1e-7), (i, k)
    # What sample.py, eval.py, export.py and training.init_from do with it, in one process.
    model, weights = checkpoint.load_model(runs / "fsdp")
    assert weights.step == 6 and generate(model, torch.zeros((1, 1), dtype=torch.long), 5).shape == (1, 6)
    assert sample.main(["--ckpt", str(runs / "fsdp"), "--num-samples", "1", "--max-new-tokens", "5"]) == 0
    train.main(load_config(args(tmp_path / "init", char_data, "--training.init_from", str(runs / "fsdp"),
                                "--training.max_iters", "1")))
    assert log(tmp_path / "init")["evals"][0]["val_loss"] == pytest.approx(f_log["evals"][-1]["val_loss"], abs=1e-6)
    export.export(runs / "fsdp", tmp_path / "export")
    exported = checkpoint.load_weights(tmp_path / "export").state_dict
    assert all(torch.equal(exported[k], fsdp[k]) for k in fsdp)
    stdout = (runs / "fsdp_stdout.txt").read_text()
    assert "2 processes (fsdp)" in stdout and stdout.count("eval step 3:") == 1  # rank 0 alone prints
    assert sorted(p.name for p in (runs / "fsdp").iterdir()) == sorted(p.name for p in (runs / "single").iterdir())


def documented_two_machine_command() -> list[str]:
    """docs/distributed.md's command for the first of two machines, as a list of arguments."""
    page = (ROOT / "docs" / "distributed.md").read_text(encoding="utf-8")
    line = next(line for line in page.splitlines() if line.startswith("torchrun --nnodes=2 "))
    return shlex.split(line)


@pytest.mark.slow
def test_the_documented_two_machine_command_equals_one_machine(runs, char_data, tmp_path):
    """docs/distributed.md's two-machine command, run as two torchrun agents on this machine (node ranks 0 and 1,
    one process each, HOST = 127.0.0.1): the same run as 2 processes on one machine, bit for bit (the
    same processes hold the same ranks and exchange the same numbers, over TCP either way)."""
    argv = documented_two_machine_command()
    script = argv.index("train.py")
    assert "--training.parallel" in argv[script:], "docs/distributed.md's two-machine command trains with fsdp"
    port = free_port()
    agents = []
    for node in (0, 1):
        launcher = []
        for a in argv[1:script]:
            flag, _, value = a.partition("=")
            value = {"--node-rank": str(node), "--nproc-per-node": "1",
                     "--rdzv-endpoint": value.replace("HOST:29500", f"127.0.0.1:{port}")}.get(flag, value)
            launcher.append(f"{flag}={value}" if value else flag)
        assert [a.split("=")[0] for a in launcher] == [a.split("=")[0] for a in argv[1:script]]
        agents.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, "train.py",
                                        *args(tmp_path, char_data, *FSDP)], cwd=ROOT, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       env=dict(os.environ, OMP_NUM_THREADS="1")))
    try:
        outputs = [agent.communicate(timeout=240)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    assert [a.returncode for a in agents] == [0, 0], outputs
    assert "2 processes (fsdp)" in outputs[0] and "eval step" not in outputs[1]  # node 1 holds rank 1
    two_machines, one_machine = final_weights(tmp_path), final_weights(runs / "fsdp")
    assert all(torch.equal(two_machines[k], one_machine[k]) for k in one_machine)


@pytest.mark.slow
def test_sigterm_saves_a_sharded_run_and_the_resume_is_exact(tmp_path, char_data):
    """SIGTERM to torchrun (what a job scheduler sends) reaches every process; they agree on a step,
    gather the shards into ckpt_last.pt and stop. Resuming on 2 processes gives the weights and optimizer
    state of an uninterrupted run bit for bit; resuming the same checkpoint in one process continues it
    too, to the same weights up to float rounding (no dropout here: N processes draw other dropout masks
    than one process, so with dropout a resume on another number of processes takes another path)."""
    common = ("--training.max_iters", "60", "--training.eval_interval", "30", *FSDP)
    ok(torchrun(*args(tmp_path / "full", char_data, *common)))
    cut = subprocess.Popen([*TORCHRUN, "train.py", *args(tmp_path / "cut", char_data, *common)], cwd=ROOT, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    try:
        seen = []
        for line in cut.stdout:
            seen.append(line)
            if line.startswith("step 3/"):
                cut.send_signal(signal.SIGTERM)  # to the torchrun agent, which passes it on to its processes
                break
        out = "".join(seen) + cut.communicate(timeout=120)[0]
    finally:
        cut.kill()
    step = json.loads((tmp_path / "cut" / "ckpt_last.json").read_text())["step"]
    assert 3 <= step < 60, out
    assert f"stopped at step {step}: ckpt_last.pt holds step {step}; continue with:" in out, out
    assert 'train.py", line' not in out  # the processes stop cleanly (torchrun reports its own signal)
    assert log(tmp_path / "cut")["run"]["status"] == "stopped"
    shutil.copytree(tmp_path / "cut", tmp_path / "one")

    ok(torchrun(*args(tmp_path / "cut", char_data, *common, "--resume")))
    full, resumed = (torch.load(tmp_path / n / "ckpt_last.pt", weights_only=True) for n in ("full", "cut"))
    assert resumed["step"] == 60 and all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])
    assert all(torch.equal(a[k], b[k]) for a, b in zip(full["optimizer"]["state"].values(),
                                                       resumed["optimizer"]["state"].values(), strict=True) for k in a)
    assert [r["loss"] for r in log(tmp_path / "cut")["train"]] == [r["loss"] for r in log(tmp_path / "full")["train"]]

    summary = train.main(load_config(args(tmp_path / "one", char_data, "--training.max_iters", "60",
                                          "--training.eval_interval", "30", "--resume")))
    assert summary["step"] == 60
    # ATOL's rounding, over 60 steps: a one-process run from the start ended 6e-6 from the sharded one,
    # this one 1.1e-5. 1e-4 is ten times that, and far below the 2.6e-2 that the same resume without
    # the optimizer state (Adam's moments) measured.
    assert_close(final_weights(tmp_path / "full"), final_weights(tmp_path / "one"), atol=1e-4)


@pytest.mark.slow
def test_activation_checkpointing_under_fsdp_changes_no_weight(runs, char_data, tmp_path):
    """Each sharded block, recomputed in the backward pass (it gathers its weights again for that)."""
    ok(torchrun(*args(tmp_path, char_data, *FSDP, "--training.activation_checkpointing")))
    assert_close(final_weights(runs / "fsdp"), final_weights(tmp_path), atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not runtime.cpu_has_bf16(), reason="this CPU has no bf16 support: training would fall back to fp32")
def test_bf16_sharded_training_matches_ddp_to_bf16_precision(char_data, tmp_path):
    """bf16 under FSDP: weights gathered and used in bf16 (MixedPrecisionPolicy), gradients summed in
    fp32; under DDP, autocast casts the fp32 weights to bf16 for each matmul. The same training, to
    bf16's precision (8 bits: a relative step of 2^-8 = 0.4%): the losses agree to 0.01 (0.25% of them)
    and the gradient norms to 2%, while the weights do differ by more than float32 rounding (ATOL):
    the gathered weights and the stream between blocks (FSDP's) are bf16, not fp32 (DDP's)."""
    bf16 = ("--training.precision", "bf16")
    ok(torchrun(*args(tmp_path / "ddp", char_data, *bf16)))
    ok(torchrun(*args(tmp_path / "fsdp", char_data, *bf16, *FSDP)))
    ddp, fsdp = log(tmp_path / "ddp"), log(tmp_path / "fsdp")
    assert ddp["run"]["precision"] == fsdp["run"]["precision"] == "bf16"
    for a, b in zip(ddp["train"], fsdp["train"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=0.01)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=0.02)
    a, b = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "fsdp")
    assert max((a[k] - b[k]).abs().max().item() for k in a) > ATOL


@pytest.mark.slow
def test_a_lora_run_sharded_on_two_processes_equals_one_process(tmp_path, char_data):
    """Frozen weights and trainable adapters in the same sharded blocks: only the adapters train, and the
    checkpoint holds only them, as in one process."""
    train.main(load_config(args(tmp_path / "base", char_data, "--training.max_iters", "3")))
    lora = ("--training.init_from", str(tmp_path / "base"), "--lora.rank", "4", "--training.learning_rate", "1e-2")
    train.main(load_config(args(tmp_path / "single", char_data, *lora)))
    ok(torchrun(*args(tmp_path / "fsdp", char_data, *lora, *FSDP)))
    single, fsdp = (torch.load(tmp_path / run / "ckpt_last.pt", weights_only=True)["model"]
                    for run in ("single", "fsdp"))
    assert all(k.endswith(("lora_A", "lora_B")) for k in fsdp)
    assert_close(single, fsdp)
    assert any(v.abs().max() > 1e-3 for k, v in fsdp.items() if k.endswith("lora_B"))  # the adapters trained


def test_errors_under_torchrun_are_one_line_from_rank_0(tmp_path, char_data):
    r = torchrun(*args(tmp_path, char_data, *FSDP, "--training.grad_accum_steps", "3"), timeout=120)
    assert r.returncode != 0
    assert [line for line in r.stderr.splitlines() if line.startswith("error: ")] == [
        "error: training.grad_accum_steps = 3 must be divisible by the number of processes (2), e.g. 4"]
    assert 'train.py", line' not in r.stderr


def test_fsdp_needs_several_processes_on_cuda_or_cpu():
    """One process needs no sharding; MPS has no collective backend (a check made before anything runs,
    so it can be shown on any machine)."""
    fsdp = TrainingConfig(parallel="fsdp", grad_accum_steps=2)
    (one,) = runtime.parallel_problems(fsdp, runtime.Process(device="cpu"))
    assert one.startswith("training.parallel = fsdp shards the model across the processes of a torchrun job")
    assert runtime.parallel_problems(fsdp, runtime.Process(0, 2, "cpu")) == []
    assert runtime.parallel_problems(fsdp, runtime.Process(0, 2, "cuda:0")) == []
    (mps,) = runtime.parallel_problems(fsdp, runtime.Process(0, 2, "mps"))
    assert re.match(r"training.parallel = fsdp cannot run on MPS: .*; use --device cpu", mps)
    assert runtime.parallel_problems(TrainingConfig(grad_accum_steps=2), runtime.Process(0, 2, "mps")) == []


def test_more_processes_than_gpus_is_one_line_before_the_process_group(monkeypatch):
    """torchrun --nproc-per-node=2 on a machine with one GPU: every process refuses at its start (shown
    here with the GPU count faked: the check runs before anything touches a GPU)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(runtime.ConfigError) as e:
        runtime.start_process("cuda")
    assert e.value.problems == ["torchrun started 2 processes on this machine, which has 1 CUDA GPU(s): one process "
                                "per GPU, so use --nproc-per-node=1 (or --device cpu)"]
    assert not torch.distributed.is_initialized()
