"""How mistakes and bugs are reported: a user's mistake is one line `error: ...` and exit status 2;
a bug, including a learner's edit to model.py, keeps its full traceback."""

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT


def copy_code(dest):
    """The project's code, presets and corpus, to edit without touching the real files."""
    for p in ROOT.glob("*.py"):
        shutil.copy(p, dest / p.name)
    shutil.copytree(ROOT / "configs", dest / "configs")
    (dest / "data" / "shakespeare").mkdir(parents=True)
    shutil.copy(ROOT / "data" / "shakespeare" / "input.txt", dest / "data" / "shakespeare")
    return dest


def test_a_bug_in_model_py_keeps_its_traceback(tmp_path):
    repo = copy_code(tmp_path)
    model = (repo / "model.py").read_text()
    line = "        return self.dropout(self.c_proj(h))"
    assert line in model
    # A learner's slip: the MLP's output projection (H -> C) applied to its C-wide input, not the hidden layer.
    (repo / "model.py").write_text(model.replace(line, "        return self.dropout(self.c_proj(x))"))
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/cpu/smoke.toml", "--max-iters", "2"],
                       cwd=repo, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr and 'model.py", line' in r.stderr
    assert "RuntimeError" in r.stderr and not any(line.startswith("error:") for line in r.stderr.splitlines())


def test_a_user_mistake_is_one_line(tmp_path):
    repo = copy_code(tmp_path)
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/cpu/smoke.toml", "--model.n_head", "5"],
                       cwd=repo, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr == "error: model.n_embd (64) must be divisible by model.n_head (5), or set model.head_dim\n"


@pytest.mark.parametrize("script", ["train.py", "sample.py", "eval.py", "export.py", "prepare.py", "bench.py"])
def test_ctrl_c_while_torch_loads_is_one_line(script):
    """Ctrl-C in the seconds a script spends importing torch, before its entry point runs: one line,
    no traceback, and the status of a process stopped by SIGINT (the shell's 130)."""
    proc = subprocess.Popen([sys.executable, script, "--help"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text():  # torch is loading: errors.py came first
        assert time.monotonic() < deadline and proc.poll() is None, "torch never started loading"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == -signal.SIGINT and stderr == "\ninterrupted\n"
