"""Long runs: numbered checkpoints (save_interval, keep_last), rerunning a command to resume it
(training.resume = auto), TensorBoard events, and stopping within seconds whatever the run is doing
(between micro-batches, during a sample, during a save) with an exact resume (tiny models, CPU)."""

import contextlib
import json
import os
import pty
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint
import files
import monitor
import runtime
import data
import train
from config import ConfigError
from conftest import ROOT
from test_runs import run_cli, tiny_argv
from test_train import read_log, tiny

NUMBERED = ("--training.save_interval", "4", "--training.keep_last", "2")


def numbered(out_dir) -> list[int]:
    return sorted(int(p.stem[5:]) for p in out_dir.glob("ckpt_0*.pt"))


def full_state(path) -> dict:
    return torch.load(path, weights_only=True)


def same_training(a, b) -> None:
    """Two checkpoints hold the same weights and optimizer state, bit for bit."""
    a, b = full_state(a), full_state(b)
    assert a["step"] == b["step"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)


# ----------------------------------------------------------------------------- numbered checkpoints

def test_numbered_checkpoints_are_kept_pruned_and_read_like_any_other(tmp_path, char_data, capsys):
    out = tmp_path / "run"
    train.main(tiny(out, char_data, *NUMBERED))  # 20 steps: numbered at 4, 8, 12, 16, 20; the last 2 kept
    assert numbered(out) == [16, 20]
    assert json.loads((out / "ckpt_000016.json").read_text())["step"] == 16
    assert f"checkpoints in {out}: ckpt_000016.pt, ckpt_000020.pt, ckpt_best.pt, ckpt_last.pt (" \
        in capsys.readouterr().out  # and the disk they take
    # Another run's numbered checkpoint (copied in), and a file of the same name tinygpt did not write,
    # survive the pruning: only this run's own are deleted.
    other = tmp_path / "other"
    train.main(tiny(other, char_data, "--training.max_iters", "4", *NUMBERED))
    shutil.copy(other / "ckpt_000004.pt", out / "ckpt_000004.pt")
    shutil.copy(other / "ckpt_000004.json", out / "ckpt_000004.json")
    (out / "ckpt_000008.pt").write_bytes(b"the user's own file")
    summary = train.main(tiny(out, char_data, *NUMBERED, "--training.max_iters", "32"))  # rerun: it continues
    assert summary["step"] == 32 and numbered(out) == [4, 8, 28, 32]
    assert (out / "ckpt_000008.pt").read_bytes() == b"the user's own file"
    assert f"checkpoints in {out}: ckpt_000004.pt, ckpt_000028.pt, ckpt_000032.pt, ckpt_best.pt, ckpt_last.pt (" \
        in capsys.readouterr().out  # not the user's file
    # sample.py and init_from take a numbered checkpoint as they take any other.
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", str(out / "ckpt_000028.pt"), "--max-new-tokens", "5",
                        "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ckpt_000028.pt" in r.stdout + r.stderr, r.stderr
    assert checkpoint.load_weights(out / "ckpt_000028.pt").step == 28
    new = train.main(tiny(tmp_path / "new", char_data, "--training.init_from", str(out / "ckpt_000028.pt"),
                          "--training.max_iters", "2"))
    assert new["step"] == 2


def test_bad_settings_for_numbered_checkpoints_and_resume_are_one_line(tmp_path, char_data):
    r = run_cli(*tiny_argv(tmp_path / "a", char_data, "--training.save_interval", "5", "--training.keep_last", "0"))
    assert r.returncode == 2 and r.stderr == (
        "error: training.keep_last = 0 would delete every numbered checkpoint that training.save_interval = 5 "
        "writes: keep at least 1, or set save_interval = 0\n")
    r = run_cli(*tiny_argv(tmp_path / "a", char_data, "--training.resume", "auto", "--training.overwrite"))
    assert r.returncode == 2 and r.stderr == (
        "error: training.resume = auto and training.overwrite contradict each other: resume continues the run "
        "in out_dir, overwrite replaces it; drop one of them\n")
    r = run_cli(*tiny_argv(tmp_path / "a", char_data, "--training.resume", "maybe"))
    assert r.returncode == 2 and "training.resume = 'maybe' is not one of: auto, true, false" in r.stderr
    assert not (tmp_path / "a").exists() or not list((tmp_path / "a").glob("ckpt_*"))


def test_a_full_disk_during_a_numbered_save_keeps_the_older_ones(tmp_path, char_data, monkeypatch):
    out = tmp_path / "run"
    train.main(tiny(out, char_data, *NUMBERED, "--training.max_iters", "8"))
    before = {p.name: p.read_bytes() for p in out.glob("ckpt_0*")}
    real_save = checkpoint.save_checkpoint

    def full_disk_at_12(path, state):
        if path.name == "ckpt_000012.pt":
            raise files.cannot_write(path, OSError(28, "No space left on device"))
        real_save(path, state)

    monkeypatch.setattr(train, "save_checkpoint", full_disk_at_12)
    with pytest.raises(files.FileError, match=r"^cannot write .*ckpt_000012.pt \(No space left on device\); check "):
        train.main(tiny(out, char_data, *NUMBERED, "--training.max_iters", "16"))
    assert {p.name: p.read_bytes() for p in out.glob("ckpt_0*")} == before  # 4 and 8, untouched
    assert json.loads((out / "ckpt_last.json").read_text())["step"] == 12  # written before the numbered one


# ----------------------------------------------------------------------------- rerun to resume

def test_the_same_command_again_continues_a_run_and_other_settings_are_refused(tmp_path, char_data, capsys):
    out = tmp_path / "run"
    argv = tiny_argv(out, char_data, "--training.max_iters", "10")
    assert run_cli(*argv).returncode == 0  # an empty folder: a fresh run
    r = run_cli(*argv)  # finished: nothing to do, nothing replaced
    assert r.returncode == 0 and "nothing to do" in r.stdout
    r = run_cli(*argv, "--training.learning_rate", "0.002")
    assert r.returncode == 2 and r.stderr == (
        f"error: training.out_dir = '{out}' holds a run with other settings (training.learning_rate = 0.001 "
        "there, 0.002 here): run its command again to continue it, add --resume to continue it with these "
        "settings, --training.overwrite to replace it, or choose another training.out_dir\n")
    r = run_cli(*argv, "--training.resume", "false")
    assert r.returncode == 2 and "holds a run already (its ckpt_last.pt)" in r.stderr
    r = run_cli(*argv[:-2], "--training.max_iters", "14")  # what may change on resume: max_iters, intervals, ...
    assert r.returncode == 0 and f"resuming from {out / 'ckpt_last.pt'} at step 10" in r.stdout
    assert read_log(out)["resumes"][0]["step"] == 10
    r = run_cli(*argv[:-2], "--training.max_iters", "14", "--training.learning_rate", "0.002", "--resume")
    assert r.returncode == 0 and "nothing to do" in r.stdout  # --resume takes the new settings as they are
    r = run_cli(*argv, "--model.n_embd", "48")  # another model: named, with the ways out
    assert r.returncode == 2 and r.stderr.endswith(
        "model.n_embd: 32 in the weights, 48 in the config; to train another model in this out_dir, add "
        "--training.overwrite, or choose another training.out_dir\n")


def test_a_run_that_early_stopping_ended_is_finished_too(tmp_path, char_data):
    argv = tiny_argv(tmp_path, char_data, "--training.early_stopping", "--training.early_stopping_patience", "1",
                     "--training.eval_interval", "2", "--training.learning_rate", "1e-9", "--training.min_lr", "0",
                     "--training.max_iters", "40")
    r = run_cli(*argv)
    assert r.returncode == 0 and "done: early stopping" in r.stdout
    step = json.loads((tmp_path / "ckpt_last.json").read_text())["step"]
    assert step < 40
    r = run_cli(*argv)  # the same command again: nothing to do, nothing written
    assert r.returncode == 0 and f"nothing to do: the run in {tmp_path} stopped early at step {step}" in r.stdout
    assert json.loads((tmp_path / "ckpt_last.json").read_text())["step"] == step


def test_a_sigterm_while_a_checkpoint_loads_is_a_stop_not_a_damaged_file(tmp_path, char_data, monkeypatch):
    train.main(tiny(tmp_path, char_data, "--training.max_iters", "4"))

    def terminated(*args, **kwargs):
        raise runtime.Stopped(143)  # what the SIGTERM handler outside the loop raises

    monkeypatch.setattr(checkpoint.torch, "load", terminated)
    with pytest.raises(runtime.Stopped):
        train.main(tiny(tmp_path, char_data, "--training.max_iters", "8"))


def test_a_damaged_newest_checkpoint_is_skipped_and_the_resume_is_still_exact(tmp_path, char_data, capsys):
    train.main(tiny(tmp_path / "full", char_data, *NUMBERED, "--model.dropout", "0.1"))
    out = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", out)
    for name in ("ckpt_last.pt", "ckpt_best.pt", "ckpt_000020.pt"):  # step 20's, cut short (a failing disk, say)
        raw = (out / name).read_bytes()
        (out / name).write_bytes(raw[:len(raw) // 2])
    (out / "ckpt_last.json").unlink()  # and a JSON lost with them
    capsys.readouterr()
    train.main(tiny(out, char_data, *NUMBERED, "--model.dropout", "0.1"))  # the same command again
    captured = capsys.readouterr()
    warnings = captured.err.splitlines()
    assert len(warnings) == 3 and warnings[-1].endswith("skipping it, trying ckpt_000016.pt"), captured.err
    assert all(re.fullmatch(r"warning: checkpoint \S+ cannot be read \(\w+\); skipping it, trying \S+", w)
               for w in warnings)
    assert f"resuming from {out / 'ckpt_000016.pt'} at step 16" in captured.out
    same_training(tmp_path / "full" / "ckpt_last.pt", out / "ckpt_last.pt")


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (torchrun starts its workers in sessions of their own)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        found = children.get(todo.pop(), [])
        out += found
        todo += found
    return out


def kill_at_random_moments(command: list[str], out_dir, seed: int, env=None, delays=(2.0, 5.0)) -> int:
    """Start `command` again and again, each time killed with SIGKILL (with every process it started: a
    machine that goes down) after a random delay in `delays` (seconds), until a run ends on its own;
    returns the number of kills."""
    rng, kills = random.Random(seed), 0
    while True:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env=env)
        try:
            proc.wait(timeout=rng.uniform(*delays) if kills < 6 else 300)  # torch's import takes about 1.5 s
            assert proc.returncode == 0, proc.stderr.read()
            return kills
        except subprocess.TimeoutExpired:
            for pid in [proc.pid, *descendants(proc.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            kills += 1


@pytest.mark.slow
def test_kill_9_at_random_moments_and_a_plain_rerun_equal_an_uninterrupted_run(tmp_path, char_data):
    extra = ("--training.max_iters", "1500", "--training.eval_interval", "500", "--training.save_interval", "50",
             "--training.log_interval", "100", "--model.dropout", "0.1", "--training.grad_accum_steps", "2")
    start = time.perf_counter()
    train.main(tiny(tmp_path / "full", char_data, *extra))
    seconds = time.perf_counter() - start
    # Each kill comes after torch's import (~1.5 s) and at most a quarter of the run's training, on a
    # machine of any speed: at least 3 kills before a run can end on its own.
    kills = kill_at_random_moments([sys.executable, "train.py", *tiny_argv(tmp_path / "cut", char_data, *extra)],
                                   tmp_path / "cut", seed=0, delays=(1.5, 1.5 + seconds / 4))
    assert kills >= 3
    same_training(tmp_path / "full" / "ckpt_last.pt", tmp_path / "cut" / "ckpt_last.pt")
    assert [e["val_loss"] for e in read_log(tmp_path / "cut")["evals"]] == \
        [e["val_loss"] for e in read_log(tmp_path / "full")["evals"]]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_kill_9_of_a_torchrun_job_and_a_plain_rerun_equal_an_uninterrupted_one(tmp_path, char_data, parallel):
    from test_ddp import TORCHRUN, args, torchrun
    extra = ("--training.max_iters", "120", "--training.eval_interval", "60", "--training.save_interval", "10",
             "--training.parallel", parallel)
    r = torchrun(*args(tmp_path / "full", char_data, *extra))
    assert r.returncode == 0, r.stderr[-2000:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    kills = kill_at_random_moments([*TORCHRUN, "train.py", *args(tmp_path / "cut", char_data, *extra)],
                                   tmp_path / "cut", seed=1, env=env)
    assert kills >= 1
    same_training(tmp_path / "full" / "ckpt_last.pt", tmp_path / "cut" / "ckpt_last.pt")


# ----------------------------------------------------------------------------- stop within seconds

def test_a_stop_between_micro_batches_drops_the_step_and_the_resume_is_exact(tmp_path, char_data, monkeypatch,
                                                                            capsys):
    """Ctrl-C during the 2nd of 4 micro-batches of step 6: the step is dropped (nothing applied, dropout's
    RNG put back), step 6 as it stood is saved, and a rerun gives an uninterrupted run's weights."""
    extra = ("--model.dropout", "0.1", "--training.grad_accum_steps", "4")
    train.main(tiny(tmp_path / "full", char_data, *extra))
    real_batch, batches = data.Data.batch, []

    def signal_in_step_6(self, split, block_size, batch_size, key, *args, **kwargs):
        if key[0] == "train":
            batches.append((key[2], kwargs.get("part")))
            if (key[2], kwargs.get("part")) == (6, 1):
                os.kill(os.getpid(), signal.SIGINT)
        return real_batch(self, split, block_size, batch_size, key, *args, **kwargs)

    monkeypatch.setattr(data.Data, "batch", signal_in_step_6)
    with pytest.raises(runtime.Stopped) as stopped:
        train.main(tiny(tmp_path / "cut", char_data, *extra))
    assert stopped.value.code == 130 and batches[-1] == (6, 1)  # micro-batches 2 and 3 never ran
    assert "stopped at step 6: ckpt_last.pt holds step 6" in capsys.readouterr().out
    monkeypatch.undo()
    train.main(tiny(tmp_path / "cut", char_data, *extra))
    same_training(tmp_path / "full" / "ckpt_last.pt", tmp_path / "cut" / "ckpt_last.pt")


def test_a_stop_during_a_sample_cuts_it_short(tmp_path, char_data, monkeypatch):
    real_stream, made = monitor.generate_stream, []

    def counted(*args, **kwargs):
        for i, token in enumerate(real_stream(*args, **kwargs)):
            made.append(token)
            if i == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            yield token

    monkeypatch.setattr(monitor, "generate_stream", counted)
    with pytest.raises(runtime.Stopped) as stopped:
        train.main(tiny(tmp_path / "run", char_data, "--training.sample_tokens", "100000"))
    assert stopped.value.code == 143 and len(made) == 6
    assert read_log(tmp_path / "run")["run"]["status"] == "stopped"


def test_a_stop_during_a_save_ends_right_after_it_with_a_loadable_checkpoint(tmp_path, char_data, monkeypatch):
    real_save = checkpoint.save_checkpoint

    def signal_while_saving(path, state):
        if state["step"] == 10 and path.name == "ckpt_last.pt":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
        real_save(path, state)

    monkeypatch.setattr(train, "save_checkpoint", signal_while_saving)
    with pytest.raises(runtime.Stopped) as stopped:
        train.main(tiny(tmp_path / "run", char_data))
    assert stopped.value.code == 143
    assert checkpoint.load_weights(tmp_path / "run" / "ckpt_last.pt").step == 10
    assert [e["step"] for e in read_log(tmp_path / "run")["evals"]] == [0, 10]


# ----------------------------------------------------------------------------- TensorBoard, progress

def test_tensorboard_events_equal_the_log(tmp_path, char_data):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional dependency (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train.main(tiny(out, char_data, "--training.tensorboard", "--training.sample_tokens", "8",
                    "--training.max_iters", "12"))
    # A resume drops the events past its checkpoint and goes on, as the log does.
    train.main(tiny(out, char_data, "--training.tensorboard", "--training.sample_tokens", "8"))
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    log = read_log(out)
    for kind, key in [("train", "loss"), ("train", "lr"), ("train", "grad_norm"), ("train", "tokens_per_s"),
                      ("evals", "val_loss"), ("evals", "train_loss"), ("evals", "val_bpb")]:
        got = {e.step: e.value for e in events.Scalars(f"{kind}/{key}")}
        want = {r["step"]: r[key] for r in log[kind]}
        assert got.keys() == want.keys() and all(abs(got[s] - want[s]) <= 1e-6 * abs(want[s]) for s in want), key
    samples = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("sample/text_summary")}
    assert samples == {r["step"]: r["sample"] for r in log["evals"]}


def test_tensorboard_missing_is_one_line(tmp_path, char_data, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"^training.tensorboard = true needs the tensorboard package: pip install "
                                          r"tensorboard, or set training.tensorboard = false"):
        train.main(tiny(tmp_path / "run", char_data, "--training.tensorboard"))
    assert not list((tmp_path / "run").glob("ckpt_*"))


def test_a_progress_line_on_a_terminal_and_plain_lines_elsewhere(tmp_path, char_data):
    extra = ("--training.log_interval", "5", "--training.max_iters", "10")
    argv = [sys.executable, "train.py", *tiny_argv(tmp_path / "run", char_data, *extra)]
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=follower, stderr=subprocess.DEVNULL)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=60) == 0
    text = out.decode()
    assert "\r  step 3/10 | loss " in text and " tok/s | eta " in text and "\r\x1b[Kstep 5/10 | loss" in text
    plain = run_cli(*tiny_argv(tmp_path / "plain", char_data, *extra))  # stdout a pipe
    assert plain.returncode == 0 and "\r" not in plain.stdout and "\nstep 5/10 | loss" in plain.stdout
