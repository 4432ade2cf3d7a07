"""Never lose a run: runs end, finished runs are not replaced, one process per folder, a diverged state
is never saved, and Ctrl-C or SIGTERM save the current step and say how to continue (tiny models, CPU)."""

import io
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import checkpoint
import files
import monitor
import lifecycle
import runtime
import data
import train
from conftest import ROOT, output_lines, wait_for_line
from options import load_config
from test_train import read_log, tiny, weights


def digest(path) -> bytes:
    return path.read_bytes()


def run_cli(*argv, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *map(str, argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def tiny_argv(out_dir, data_dir, *extra) -> list[str]:
    return ["--data.processed_dir", str(data_dir), "--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd",
            "32", "--model.block_size", "16", "--model.dropout", "0", "--training.batch_size", "4",
            "--training.eval_interval", "10", "--training.eval_batches", "2", "--training.log_interval", "1",
            "--training.warmup_iters", "2", "--device", "cpu", "--training.out_dir", str(out_dir), *extra]


def test_resuming_at_or_past_max_iters_ends_at_once(tmp_path, char_data):
    train.main(tiny(tmp_path, char_data))  # 20 steps
    before = digest(tmp_path / "ckpt_last.pt")
    r = run_cli(*tiny_argv(tmp_path, char_data, "--max-iters", "10", "--resume"), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "nothing to do: " in r.stdout and "is at step 20 and training.max_iters is 10" in r.stdout
    assert digest(tmp_path / "ckpt_last.pt") == before
    assert train.main(tiny(tmp_path, char_data, "--resume"))["status"] == "nothing_to_do"  # at max_iters too


def test_a_finished_run_is_never_replaced_by_a_fresh_one(tmp_path, char_data):
    train.main(tiny(tmp_path, char_data))
    best, last = digest(tmp_path / "ckpt_best.pt"), digest(tmp_path / "ckpt_last.pt")
    log = (tmp_path / "train_log.json").read_text()
    r = run_cli(*tiny_argv(tmp_path, char_data, "--training.resume", "false"))  # else the same command continues it
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr == (f"error: training.out_dir = '{tmp_path}' holds a run already (its ckpt_last.pt); continue "
                        "it with --resume, replace it with --training.overwrite, or choose another "
                        "training.out_dir\n")
    assert digest(tmp_path / "ckpt_best.pt") == best and digest(tmp_path / "ckpt_last.pt") == last
    assert (tmp_path / "train_log.json").read_text() == log
    (tmp_path / "curves.png").write_bytes(b"plot.py's picture of the old run")
    # --training.overwrite replaces it, including an old ckpt_best.pt the new run does not beat, and the
    # old run's curves (a picture of a run that is gone).
    summary = train.main(tiny(tmp_path, char_data, "--training.overwrite", "--max-iters", "10",
                              "--training.learning_rate", "1e-9", "--training.min_lr", "0",
                              "--training.warmup_iters", "0"))
    assert summary["step"] == 10 and digest(tmp_path / "ckpt_last.pt") != last
    assert not (tmp_path / "ckpt_best.pt").exists() or digest(tmp_path / "ckpt_best.pt") != best
    assert not (tmp_path / "curves.png").exists()


def test_a_run_that_fails_at_its_start_writes_no_checkpoint(tmp_path, char_data):
    # flex attention evaluates on CPU but cannot train there: the failure comes at the first step.
    with pytest.raises(train.ConfigError, match='model.attention = "flex" cannot run here'):
        train.main(tiny(tmp_path, char_data, "--model.attention", "flex"))
    assert not list(tmp_path.glob("ckpt_*"))
    assert train.main(tiny(tmp_path, char_data, "--max-iters", "2"))["step"] == 2  # not "holds a run"


def test_a_run_refused_at_its_start_leaves_no_folder_it_made(tmp_path, char_data, capsys):
    """A mistake found before anything is written (here a missing input) leaves no empty out_dir behind; an
    out_dir that was there before stays."""
    argv = ["--config", str(ROOT / "configs/cpu/smoke.toml"), "--data.input", str(tmp_path / "missing.txt"),
            "--data.processed_dir", str(tmp_path / "p"), "--device", "cpu"]
    assert train.cli([*argv, "--training.out_dir", str(tmp_path / "new" / "run")]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err and not (tmp_path / "new" / "run").exists()
    (tmp_path / "mine").mkdir()
    assert train.cli([*argv, "--training.out_dir", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine").is_dir() and not list((tmp_path / "mine").iterdir())


def test_two_trainings_into_one_folder_one_refuses_and_sigterm_saves(tmp_path, char_data):
    argv = [sys.executable, "-u", "train.py", *tiny_argv(tmp_path, char_data, "--max-iters", "100000",
                                                          "--training.log_interval", "50")]
    first = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stdout:  # wait until it trains
            if line.startswith("step "):
                break
        second = run_cli(*tiny_argv(tmp_path, char_data, "--max-iters", "5"), timeout=60)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert second.stderr == (f"error: training.out_dir = '{tmp_path}' is in use by another process "
                                 f"(PID {first.pid}); wait for it to finish, or choose another folder\n")
        first.send_signal(signal.SIGTERM)  # what `timeout` and job schedulers send
        out, err = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 143, err
    step = json.loads((tmp_path / "ckpt_last.json").read_text())["step"]
    assert step > 50 and f"stopped at step {step}: ckpt_last.pt holds step {step}; continue with:" in out
    command = out.strip().splitlines()[-1].strip()
    assert command == "python train.py " + shlex.join(argv[3:])  # the same command again continues it
    assert read_log(tmp_path)["run"]["status"] == "stopped"


def test_ctrl_c_saves_the_step_and_the_resume_is_exact(tmp_path, char_data, monkeypatch, capsys):
    """A signal in the middle of a step (here the 7th, no evaluation due) drops that step at its next
    micro-batch, saves the 6th, and resuming from it gives the weights of an uninterrupted run, bit for bit."""
    extra = ("--model.dropout", "0.1", "--training.grad_accum_steps", "2")
    train.main(tiny(tmp_path / "full", char_data, *extra))
    real_batch = data.Data.batch

    def signal_at_step_6(self, split, block_size, batch_size, key, *args, **kwargs):
        if key[0] == "train" and key[2] == 6 and kwargs.get("part") == 0:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while step 6 (the 7th) is being computed
        return real_batch(self, split, block_size, batch_size, key, *args, **kwargs)

    monkeypatch.setattr(data.Data, "batch", signal_at_step_6)
    cut = tiny(tmp_path / "cut", char_data, *extra)
    cut.argv = tiny_argv(tmp_path / "cut", char_data, *extra)
    with pytest.raises(runtime.Stopped) as stopped:
        train.main(cut)
    assert stopped.value.code == 130
    out = capsys.readouterr().out
    assert "SIGINT: stopping, with the last whole step saved" in out
    assert "stopped at step 6: ckpt_last.pt holds step 6; continue with:" in out
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    train.main(tiny(tmp_path / "cut", char_data, *extra, "--resume"))
    a, b = weights(tmp_path / "full" / "ckpt_last.pt"), weights(tmp_path / "cut" / "ckpt_last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    full, resumed = read_log(tmp_path / "full"), read_log(tmp_path / "cut")
    assert [r["loss"] for r in resumed["train"]] == [r["loss"] for r in full["train"]]
    assert [e["step"] for e in resumed["evals"]] == [0, 10, 20]
    assert resumed["resumes"][0]["step"] == 6  # plot.py marks it



def test_sigterm_while_preparing_is_one_line_and_exit_143(tmp_path, char_data, monkeypatch, capsys):
    """A scheduler's SIGTERM during setup (preparing data, loading weights) ends the run at once, saying
    so, with 143 as for a SIGTERM in the loop; the usual SIGTERM handling is back afterwards."""
    real_build_data = train.build_data

    def sigterm_then_build_data(cfg, proc, start):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_build_data(cfg, proc, start)

    monkeypatch.setattr(train, "build_data", sigterm_then_build_data)
    before = signal.getsignal(signal.SIGTERM)
    assert train.cli(tiny_argv(tmp_path, char_data, "--max-iters", "5")) == 143
    err = capsys.readouterr().err
    assert err == "\nSIGTERM: stopped outside the training loop; no step was saved by it\n"
    assert signal.getsignal(signal.SIGTERM) is before and not (tmp_path / "ckpt_last.pt").exists()


def test_a_warmup_longer_than_a_shortened_run_is_named(tmp_path, char_data, capsys):
    """A preset's warmup_iters kept by --max-iters 20: the rate never reaches its peak, and the header says
    so with the rate it does reach (get_lr's own at the last step)."""
    cfg = tiny(tmp_path, char_data, "--training.warmup_iters", "50", "--training.learning_rate", "1e-3")
    train.main(cfg)
    reached = train.get_lr(cfg.training.max_iters - 1, cfg.training)
    assert f"{reached:.1e}" == "4.0e-04"
    assert "notice: training.warmup_iters = 50 is not below max_iters = 20: the learning rate rises for the whole " \
           "run, to 4.0e-04 of 1.0e-03; for a short run lower it (e.g. --training.warmup_iters 2)" in \
           capsys.readouterr().out
    train.main(tiny(tmp_path / "fits", char_data))
    assert "notice" not in capsys.readouterr().out


def test_a_bare_run_on_a_cpu_says_so_first_and_ctrl_c_during_an_evaluation_stops_within_seconds(tmp_path):
    """`python train.py` alone trains the GPU-sized defaults: its first line says so, before any slow work.
    Its first evaluation takes minutes on a CPU; Ctrl-C ends it within a batch, not after it."""
    argv = [sys.executable, "train.py", "--device", "cpu", "--training.out_dir", str(tmp_path / "run"),
            "--data.processed_dir", str(tmp_path / "data")]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = output_lines(proc)
        first = wait_for_line(lines, "")[0]
        assert first.startswith("notice: no --config, so the default model (6 layers, 384 wide) for 5,000 steps"), \
            first
        wait_for_line(lines, "effective batch")
        time.sleep(3)  # inside the first evaluation: 400 batches of 64 x 256 tokens
        os.kill(proc.pid, signal.SIGINT)
        asked = time.monotonic()
        assert proc.wait(timeout=60) == 130
        assert time.monotonic() - asked < 20
    finally:
        proc.kill()
    out = "".join(iter(lines.get, None))
    assert "stopped at step 0: nothing was saved (it was the first step); start it again with:" in out, out


def train_into_head(tmp_path, char_data, stderr) -> subprocess.Popen:
    """A long training whose stdout is read, as `head` would, up to the log line of step 5, then closed."""
    proc = subprocess.Popen([sys.executable, "train.py", *tiny_argv(tmp_path, char_data, "--max-iters", "100000")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 5/"):
                break
        proc.stdout.close()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    return proc


def test_a_closed_stdout_stops_the_run_like_ctrl_c_and_sample_py_ends_quietly(tmp_path, char_data):
    """`train.py | head`: once the reader has gone, the run saves the step it is at and exits 141 (SIGPIPE's
    status), saying how to continue on stderr, never with a BrokenPipeError traceback. sample.py too."""
    proc = train_into_head(tmp_path, char_data, stderr=subprocess.PIPE)
    assert proc.returncode == 141
    err = proc.stderr.read()
    assert "Traceback" not in err and "SIGPIPE: stopping, with the last whole step saved (stdout was closed)" in err
    step = int(re.search(r"stopped at step (\d+): ckpt_last.pt holds step \1; continue with:", err).group(1))
    assert 5 <= step < 100000 and checkpoint.load_weights(tmp_path / "ckpt_last.pt").step == step
    assert json.loads((tmp_path / "train_log.json").read_text())["run"]["stop_reason"] == f"SIGPIPE at step {step}"
    quiet = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered, as usual
    for samples, read in (("1000", 1), ("1", 0)):  # closed while it writes; closed before its last flush
        sample = subprocess.Popen([sys.executable, "sample.py", "--ckpt", str(tmp_path), "--num-samples", samples,
                                   "--max-new-tokens", "50"], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=quiet)
        for _ in range(read):
            sample.stdout.readline()
        sample.stdout.close()
        assert sample.wait(timeout=60) == 141
        err = sample.stderr.read()
        assert "Traceback" not in err and "Exception ignored" not in err, err


def test_a_closed_pipe_that_took_stderr_too_still_saves(tmp_path, char_data):
    """`train.py 2>&1 | head`: the messages about stopping have nowhere to go, the checkpoint still does."""
    assert train_into_head(tmp_path, char_data, stderr=subprocess.STDOUT).returncode == 141
    stop = json.loads((tmp_path / "train_log.json").read_text())["run"]["stop_reason"]
    step = int(re.fullmatch(r"SIGPIPE at step (\d+)", stop).group(1))
    assert step >= 5 and checkpoint.load_weights(tmp_path / "ckpt_last.pt").step == step


def test_a_stop_before_the_first_step_says_to_start_again_not_to_resume(tmp_path, char_data, monkeypatch, capsys):
    """Nothing is saved before step 1, so the way on is the same command, not --resume (which would find
    no checkpoint)."""
    real_enter = train.StopSignals.__enter__

    def enter_then_ctrl_c(self):
        signals = real_enter(self)
        os.kill(os.getpid(), signal.SIGINT)  # arrives before the loop's first look at the signals
        return signals

    monkeypatch.setattr(train.StopSignals, "__enter__", enter_then_ctrl_c)
    with pytest.raises(runtime.Stopped) as stopped:
        train.main(load_config(tiny_argv(tmp_path, char_data, "--max-iters", "20")))
    assert stopped.value.code == 130
    out = capsys.readouterr().out
    said, command = out.split("\n")[-3:-1]
    assert said == "stopped at step 0: nothing was saved (it was the first step); start it again with:"
    assert "--resume" not in command and not (tmp_path / "ckpt_last.pt").exists()
    monkeypatch.undo()
    argv = shlex.split(command)
    assert argv[:2] == ["python", "train.py"]
    assert train.main(load_config(argv[2:]))["step"] == 20  # the printed command trains the run


def test_a_stop_after_an_update_that_broke_the_weights_saves_nothing(tmp_path, char_data, monkeypatch):
    """Ctrl-C saves the weights of the last update, which no loss has checked yet: non-finite ones are
    refused as a divergence, and ckpt_last.pt keeps the last good step (10, after its evaluation)."""
    real_batch = data.Data.batch

    def signal_at_step_12(self, split, block_size, batch_size, key, *args, **kwargs):
        if key[0] == "train" and key[2] == 12 and kwargs.get("part") == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return real_batch(self, split, block_size, batch_size, key, *args, **kwargs)

    def break_the_weights(optimizer, args, kwargs):
        if optimizer.state and next(iter(optimizer.state.values()))["step"] == 13:  # the update of step 12
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].fill_(float("nan"))

    monkeypatch.setattr(data.Data, "batch", signal_at_step_12)
    hook = register_optimizer_step_post_hook(break_the_weights)  # every optimizer's step calls it
    try:
        with pytest.raises(lifecycle.TrainError) as e:
            train.main(tiny(tmp_path, char_data))
    finally:
        hook.remove()
    assert str(e.value) == ("the weights became non-finite numbers at step 13: training diverged; ckpt_last.pt holds "
                            "step 10, the last finite state: resume from it with a lower training.learning_rate "
                            "(or bf16 instead of fp16)")
    assert checkpoint.load_weights(tmp_path / "ckpt_last.pt").step == 10


def test_a_diverged_state_is_never_saved_and_the_log_stays_valid_json(tmp_path, char_data):
    cfg = tiny(tmp_path, char_data, "--training.learning_rate", "1e6", "--training.grad_clip", "0",
               "--training.eval_interval", "1", "--training.warmup_iters", "0", "--max-iters", "50")
    with pytest.raises(lifecycle.TrainError) as e:
        train.main(cfg)
    message = str(e.value)
    assert "training diverged" in message
    if (tmp_path / "ckpt_last.pt").exists():
        saved = checkpoint.load_weights(tmp_path / "ckpt_last.pt")
        assert all(torch.isfinite(v).all() for v in saved.state_dict.values())
        assert math.isfinite(saved.val_loss) and f"ckpt_last.pt holds step {saved.step}, the last finite" in message
    else:
        assert "no checkpoint was written" in message
    text = (tmp_path / "train_log.json").read_text()
    log = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in train_log.json"))
    assert log["run"]["status"] == "diverged" and "training diverged" not in log["run"]["stop_reason"]


def test_a_damaged_log_is_rebuilt_on_resume(tmp_path, char_data, capsys):
    train.main(tiny(tmp_path, char_data, "--max-iters", "10"))
    (tmp_path / "train_log.json").write_text('{"version": 1, "evals": [')  # cut short
    assert train.main(tiny(tmp_path, char_data, "--resume"))["step"] == 20
    assert "train_log.json is missing or damaged; the curves before step 10 are lost" in capsys.readouterr().out
    assert [e["step"] for e in read_log(tmp_path)["evals"]] == [20]


def test_locks_are_released_however_the_process_ends(tmp_path):
    with files.lock(tmp_path / ".lock", "x"):
        with pytest.raises(files.FileError, match=f"is in use by another process \\(PID {os.getpid()}\\)"):
            with files.lock(tmp_path / ".lock", "x"):
                pass
    # A killed holder leaves its lock file, but not its lock.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, '.'); import files; "
                               f"cm = files.lock({str(tmp_path / '.lock')!r}, 'x'); cm.__enter__(); "
                               "print('held', flush=True); time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(files.FileError, match=f"PID {holder.pid}"):
        with files.lock(tmp_path / ".lock", "x"):
            pass
    holder.kill()
    holder.wait()
    with files.lock(tmp_path / ".lock", "x"):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".lock").exists()  # removed by its holder on the way out


def test_no_lock_file_is_left_beside_a_run_or_its_data(tmp_path, char_data):
    train.main(tiny(tmp_path, char_data, "--max-iters", "2"))
    assert not (tmp_path / ".lock").exists() and not os.path.exists(os.path.join(char_data, ".lock"))


def test_progress_and_the_first_speed_estimate(tmp_path, char_data, capsys):
    train.main(tiny(tmp_path, char_data, "--training.log_interval", "10"))
    out = capsys.readouterr().out
    assert "first steps: " in out and " s/step, so about " in out and "for the 18 steps left" in out
    assert "eval step 0: train " in out  # printed in two parts: "eval step 0: " before evaluating
    monitor.announce_speed(5000, 0, runtime.Process(threads=1), 4.0)  # a CPU run of a preset sized for a GPU
    hint = capsys.readouterr().out
    assert "about 5h33m for the 5000 steps left" in hint and "sized for a GPU (--device cuda)" in hint
    monitor.announce_speed(3, 2, runtime.Process(threads=1), 4.0)
    assert "about 0m04s for the 1 step left" in capsys.readouterr().out
    # A run of two steps has none left after the first two: no estimate; its summary counts 2 steps.
    train.main(tiny(tmp_path / "two", char_data, "--training.log_interval", "10", "--max-iters", "2"))
    out = capsys.readouterr().out
    assert "first steps: " not in out and "\n  2 steps, " in out


def test_threads_are_set_named_in_the_header_and_a_busy_machine_is_told(tmp_path, char_data, capsys, monkeypatch):
    """0 takes torch's own count capped by the cores this process may use, shared among torchrun's
    processes on the machine; the header names it; a load above the cores suggests fewer threads."""
    cores = runtime.usable_cores()
    assert runtime.use_threads(0) == torch.get_num_threads() == min(runtime.TORCH_THREADS, cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))  # more processes than cores: one thread each
    assert runtime.use_threads(0) == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    train.main(tiny(tmp_path, char_data, "--training.threads", "1"))
    assert "| device: cpu, fp32, threads 1" in capsys.readouterr().out
    assert torch.get_num_threads() == 1
    runtime.use_threads(0)
    monkeypatch.setattr(monitor.os, "getloadavg", lambda: (cores + 1.0, 0.0, 0.0))
    monitor.announce_speed(100, 0, runtime.Process(threads=2), 0.1)
    said = capsys.readouterr().out
    assert f"this machine is busy (load {cores + 1:.1f} on {cores} cores)" in said and "--training.threads 1" in said
    monitor.announce_speed(100, 0, runtime.Process(threads=1), 0.1)  # one thread: nothing fewer to suggest
    assert "busy" not in capsys.readouterr().out


def test_a_long_first_evaluation_says_how_long_before_it_ends(tmp_path, char_data, capsys, monkeypatch):
    """A big preset's first evaluation on a CPU takes minutes: its estimate is printed after one batch.
    (Here any evaluation counts as long; the later evaluations print no estimate.)"""
    monkeypatch.setattr(monitor, "ESTIMATE_EVAL_ABOVE_S", 0)
    train.main(tiny(tmp_path, char_data))
    out = capsys.readouterr().out
    assert re.search(r"^eval step 0: \(about \d+m\d\ds\) train \d\.\d{4}, val ", out, re.M), out
    assert re.search(r"^eval step 10: train ", out, re.M)
    task = tmp_path / "task.jsonl"  # answers after the losses, for a time the estimate cannot know: it says so
    task.write_text('{"prompt": "ROMEO:", "completion": " ay"}\n' * 3, encoding="utf-8")
    train.main(tiny(tmp_path / "with_task", char_data, "--training.task", str(task)))
    out = capsys.readouterr().out
    assert re.search(r"^eval step 0: \(about \d+m\d\ds, then training.task's 3 examples\) train ", out, re.M), out


def test_resume_keeps_the_init_from_the_run_started_with_and_refuses_another(tmp_path, char_data):
    """A fine-tune preset's init_from stays in the settings when its run is resumed; another one is a
    contradiction, reported rather than resolved."""
    train.main(tiny(tmp_path / "base", char_data, "--max-iters", "4"))
    tune = ("--training.init_from", str(tmp_path / "base"))
    train.main(tiny(tmp_path / "tune", char_data, *tune, "--max-iters", "4"))
    assert train.main(tiny(tmp_path / "tune", char_data, *tune, "--max-iters", "6", "--resume"))["step"] == 6
    r = run_cli(*tiny_argv(tmp_path / "base", char_data, "--max-iters", "6", "--resume", *tune), timeout=60)
    assert r.returncode == 2 and r.stderr == (
        f"error: training.init_from = '{tmp_path / 'base'}', but the run in training.out_dir started from "
        "'random weights': --resume continues it from its own checkpoint; drop training.init_from, or train a "
        "new run into another out_dir\n")


def test_a_full_disk_is_one_line_and_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    """torch.save reports a failed write as a RuntimeError of its own; the disk's error is what the user
    reads, the previous file stays whole, and no temporary file is left behind."""
    path = tmp_path / "ckpt_last.pt"
    checkpoint.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "step": 1})
    before = digest(path)

    class FullDisk(io.FileIO):  # a disk with room for 100 more bytes
        def write(self, data):
            if self.tell() + len(data) > 100:
                raise OSError(28, "No space left on device")
            return super().write(data)

    monkeypatch.setattr(files, "open", lambda path, mode: FullDisk(path, mode), raising=False)
    with pytest.raises(files.FileError, match=r"cannot write .*ckpt_last.pt \(No space left on device\); check that"):
        checkpoint.save_checkpoint(path, {"model": {"w": torch.zeros(10_000)}, "step": 2})
    assert digest(path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_last.json", "ckpt_last.pt"]
