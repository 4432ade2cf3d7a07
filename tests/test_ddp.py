"""Multi-process training with torchrun on CPU (gloo): the same samples as one process, one set of outputs."""

import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import train
from options import load_config
from conftest import ROOT, run_killed_after_checkpoint

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def args(out_dir, data_dir, *extra):
    return ["--data.processed_dir", data_dir, "--model.n_layer", "1", "--model.n_head", "2",
            "--model.n_embd", "32", "--model.block_size", "16", "--model.dropout", "0",
            "--training.batch_size", "4", "--training.grad_accum_steps", "4", "--training.max_iters", "6",
            "--training.eval_interval", "3", "--training.eval_batches", "4", "--training.log_interval", "1",
            "--training.warmup_iters", "2", "--device", "cpu", "--training.out_dir", str(out_dir), *extra]


def torchrun(*argv, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([*TORCHRUN, "train.py", *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=env)
    print(r.stdout, r.stderr, sep="\n")  # pytest shows it in full when a test fails
    return r


def final_weights(out_dir):
    return checkpoint.load_weights(out_dir / "ckpt_last.pt").state_dict


def test_two_processes_equal_one_process_with_the_same_global_accumulation(tmp_path, char_data):
    train.main(load_config(args(tmp_path / "single", char_data)))
    r = torchrun(*args(tmp_path / "ddp", char_data))
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    single, ddp = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    for k in single:
        assert torch.allclose(single[k], ddp[k], atol=1e-5), k
    s_log = json.loads((tmp_path / "single" / "train_log.json").read_text())
    d_log = json.loads((tmp_path / "ddp" / "train_log.json").read_text())
    assert d_log["run"]["world_size"] == 2
    for a, b in zip(s_log["evals"], d_log["evals"]):  # evaluation averaged over the ranks
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
    # Only rank 0 prints and writes: one line per eval, one set of files.
    assert r.stdout.count("eval step 3:") == 1
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(
        p.name for p in (tmp_path / "single").iterdir())


def test_resume_of_a_two_process_run(tmp_path, char_data, monkeypatch):
    train.main(load_config(args(tmp_path / "full", char_data)))
    run_killed_after_checkpoint(monkeypatch, load_config(args(tmp_path / "cut", char_data)), step=3)
    r = torchrun(*args(tmp_path / "cut", char_data, "--resume"))
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert r.stdout.count("resuming from") == 1  # every rank loads it; rank 0 alone says so
    full, cut = final_weights(tmp_path / "full"), final_weights(tmp_path / "cut")
    for k in full:
        assert torch.allclose(full[k], cut[k], atol=1e-5), k
    log = json.loads((tmp_path / "cut" / "train_log.json").read_text())
    assert [e["step"] for e in log["evals"]] == [0, 3, 6]


def test_accumulation_must_divide_among_processes_and_errors_end_the_job(tmp_path, char_data):
    r = torchrun(*args(tmp_path, char_data, "--training.grad_accum_steps", "3"), timeout=120)
    assert r.returncode != 0
    # One line, from rank 0 only, with a value that would work.
    assert [line for line in r.stderr.splitlines() if line.startswith("error: ")] == [
        "error: training.grad_accum_steps = 3 must be divisible by the number of processes (2), e.g. 4"]
    assert "traceback : error: training.grad_accum_steps = 3" in r.stderr  # torchrun's summary names it
    assert "error: training.grad_accum_steps = 3 must be divisible by the number of processes (2), e.g. 4" in r.stderr
    # torchrun itself reports the failed workers; the workers print one line each, no traceback.
    assert 'train.py", line' not in r.stderr


@pytest.mark.slow
def test_a_lora_run_on_two_processes_equals_one_process(tmp_path, char_data):
    train.main(load_config(args(tmp_path / "base", char_data, "--training.max_iters", "3")))
    lora = ("--training.init_from", str(tmp_path / "base"), "--lora.rank", "4", "--training.learning_rate", "1e-2")
    train.main(load_config(args(tmp_path / "single", char_data, *lora)))
    r = torchrun(*args(tmp_path / "ddp", char_data, *lora))
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    single, ddp = (torch.load(tmp_path / run / "ckpt_last.pt", weights_only=True)["model"]
                   for run in ("single", "ddp"))
    assert single.keys() == ddp.keys() and all(k.endswith(("lora_A", "lora_B")) for k in single)
    for k in single:
        assert torch.allclose(single[k], ddp[k], atol=1e-5), k
    assert any(v.abs().max() > 1e-3 for k, v in single.items() if k.endswith("lora_B"))  # the adapters trained


@pytest.mark.slow
def test_conversations_with_the_loss_on_the_answers_and_a_task_on_two_processes_equal_one(tmp_path):
    """Records keep the promise of text: the masks, the windows at record starts and the documents of a
    packed window are a pure function of the data, so two processes train exactly as one; the task is
    checked by rank 0 alone, on the same weights."""
    import prepare
    from config import DataConfig

    chats = [{"messages": [{"role": "user", "content": f"{a}+{b}?"}, {"role": "assistant", "content": str(a + b)}]}
             for a in range(9) for b in range(9)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats[:8]))
    prepare.prepare(DataConfig(input=str(tmp_path / "chat.jsonl"), processed_dir=str(tmp_path / "p")), progress=False)
    extra = ("--data.doc_mask", "true", "--model.block_size", "32", "--training.task", str(tmp_path / "task.jsonl"))
    train.main(load_config(args(tmp_path / "single", str(tmp_path / "p"), *extra)))
    r = torchrun(*args(tmp_path / "ddp", str(tmp_path / "p"), *extra))
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    single, ddp = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    for k in single:
        assert torch.allclose(single[k], ddp[k], atol=1e-5), k
    s_log, d_log = (json.loads((tmp_path / run / "train_log.json").read_text())["evals"] for run in ("single", "ddp"))
    assert [e["task_accuracy"] for e in s_log] == [e["task_accuracy"] for e in d_log]
    assert [e["val_loss"] for e in s_log] == pytest.approx([e["val_loss"] for e in d_log], abs=1e-5)
    assert r.stdout.count("eval step 6:") == 1 and ", task " in r.stdout
