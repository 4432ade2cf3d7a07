"""How mistakes and bugs are reported: a user's mistake is one line `error: ...` and exit status 2;
a bug, including a learner's edit to model.py, keeps its full traceback."""

import shutil
import subprocess
import sys

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
