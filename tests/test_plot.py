"""Tests for plot.py: PNG output, overlays, --x tokens, resumed logs and clear errors.

    python -m pytest -q tests/test_plot.py

Other tests can reuse `make_log`, `write_log` and `check_png` (e.g. to plot a real run's log).
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import plot
from conftest import ROOT

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(path: Path | str) -> tuple[int, int]:
    """Assert `path` is a PNG of the size plot.py promises; return (width, height) in pixels."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    # The IHDR chunk comes first: 4-byte length, b"IHDR", then width and height (big-endian).
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    expected = (round(plot.FIGSIZE[0] * plot.DPI), round(plot.FIGSIZE[1] * plot.DPI))
    assert (width, height) == expected
    return width, height


def make_log(status: str = "finished", max_step: int = 200, eval_interval: int = 50,
             log_interval: int = 10, tokens_per_step: int = 12288, out_dir: str = "checkpoints",
             early_stop_step: int | None = None) -> dict:
    """A synthetic train log in train.py's format, with loss decaying towards 1.5."""
    def loss(step: int) -> float:
        return 1.5 + 2.7 * math.exp(-step / 60)

    def lr(step: int) -> float:  # 20 steps of warmup, then constant: enough for a curve
        return 1e-3 * min(1.0, step / 20)

    evals = [{"step": s, "train_loss": loss(s) - 0.05, "val_loss": loss(s), "lr": lr(s),
              "tokens": s * tokens_per_step, "elapsed_s": 0.1 * s}
             for s in range(0, max_step + 1, eval_interval)]
    train = [{"step": s, "loss": loss(s) + 0.1 * math.sin(s), "lr": lr(s), "ms_per_step": 50.0,
              "tokens_per_s": 24000.0, "tokens": s * tokens_per_step}
             for s in range(log_interval, max_step + 1, log_interval)]
    best = min(evals, key=lambda e: e["val_loss"])
    return {
        "version": 1,
        "config": {"data": {}, "model": {}, "training": {"out_dir": out_dir}},
        "run": {"tokens_per_step": tokens_per_step, "n_params": 123456, "status": status,
                "stop_reason": None, "early_stop_step": early_stop_step},
        "evals": evals,
        "train": train,
        "best": {"step": best["step"], "val_loss": best["val_loss"]},
    }


def write_log(folder: Path, log: dict) -> Path:
    """Write `log` as folder/train_log.json (creating the folder) and return the path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / plot.LOG_NAME
    path.write_text(json.dumps(log), encoding="utf-8")
    return path


def legend_labels(fig) -> list[str]:
    (legend,) = fig.legends
    return [text.get_text() for text in legend.get_texts()]


def test_single_log_writes_png(tmp_path, capsys):
    log_path = write_log(tmp_path / "run", make_log())
    out = tmp_path / "curves.png"
    assert plot.main([str(log_path), "--out", str(out)]) == 0
    check_png(out)
    assert str(out) in capsys.readouterr().out  # the path written is printed


@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
def test_a_picture_is_replaced_only_if_plot_wrote_it(tmp_path, capsys, suffix):
    """plot.py replaces a picture that matplotlib made (its own, named in the picture's metadata):
    drawing again works; a picture of the user's by the same name is left as it was."""
    log_path = write_log(tmp_path / "run", make_log())
    out = tmp_path / f"curves{suffix}"
    assert plot.main([str(log_path), "--out", str(out)]) == 0
    assert plot.MARK in out.read_bytes()
    assert plot.main([str(log_path), "--out", str(out)]) == 0  # its own: replaced
    theirs = tmp_path / f"mine{suffix}"
    theirs.write_bytes(out.read_bytes().replace(plot.MARK, b"SomeEditor"))
    capsys.readouterr()
    assert plot.main([str(log_path), "--out", str(theirs)]) == 2
    assert "plot.py did not write it" in capsys.readouterr().err and plot.MARK not in theirs.read_bytes()


def test_default_out_is_next_to_first_log(tmp_path):
    log_path = write_log(tmp_path / "run", make_log())
    assert plot.main([str(tmp_path / "run")]) == 0  # a run folder works as well as its log
    check_png(log_path.parent / "curves.png")


def test_overlay_labels_each_run_in_its_own_color(tmp_path):
    paths = [write_log(tmp_path / "run_a", make_log()),
             write_log(tmp_path / "run_b", make_log(status="running", max_step=100))]
    logs = {name: plot.load_log(p) for name, p in zip(plot.run_labels(paths), paths)}
    out = tmp_path / "cmp.png"
    fig = plot.plot_logs(logs, out, title="compare")
    check_png(out)
    labels = legend_labels(fig)
    assert any(label.startswith("run_a") for label in labels)
    assert any(label.startswith("run_b") for label in labels)
    assert any(label.startswith("run_b (running), best ") for label in labels)  # unfinished runs are flagged
    val_colors = {line.get_color() for line in fig.axes[0].get_lines()
                  if line.get_label().startswith(("run_a val", "run_b val"))}
    assert len(val_colors) == 2


def test_run_labels_disambiguate_same_folder_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = [write_log(tmp_path / "a" / "checkpoints", make_log()),
             write_log(tmp_path / "b" / "checkpoints", make_log()),
             write_log(tmp_path / "other", make_log())]
    assert plot.run_labels(paths) == [os.path.join("a", "checkpoints"),
                                      os.path.join("b", "checkpoints"), "other"]
    assert plot.run_labels([paths[2], paths[2]]) == ["other", "other #2"]


def test_agg_backend_unless_show(tmp_path, monkeypatch):
    # On a headless machine matplotlib falls back to Agg by itself, so spy on the calls;
    # and no window may open during tests.
    import matplotlib.pyplot as plt

    chosen, shown = [], []
    monkeypatch.setattr(plot.matplotlib, "use", chosen.append)
    monkeypatch.setattr(plt, "show", lambda: shown.append(True))
    log_path = write_log(tmp_path / "run", make_log())
    assert plot.main([str(log_path), "--out", str(tmp_path / "a.png")]) == 0
    assert chosen == ["Agg"] and shown == []
    assert plot.main([str(log_path), "--out", str(tmp_path / "b.png"), "--show"]) == 0
    assert chosen == ["Agg"] and shown == [True]  # --show keeps a backend that opens windows
    check_png(tmp_path / "b.png")
    plt.close("all")  # --show leaves the figure open for the window


def test_x_tokens(tmp_path):
    log = make_log(tokens_per_step=1000)
    out = tmp_path / "tokens.png"
    assert plot.main([str(write_log(tmp_path / "run", log)), "--x", "tokens",
                      "--out", str(out)]) == 0
    check_png(out)
    fig = plot.plot_logs({"run": log}, None, x="tokens")
    val_line = next(line for line in fig.axes[0].get_lines() if line.get_label() == "run val")
    assert list(val_line.get_xdata()) == [e["tokens"] for e in log["evals"]]
    best_star = next(line for line in fig.axes[0].get_lines() if line.get_label().startswith("run best"))
    assert list(best_star.get_xdata()) == [log["best"]["step"] * 1000]
    assert fig.axes[1].get_xlabel() == "tokens seen"


def test_dedupe_keeps_last_record_of_each_step_sorted():
    records = [{"step": 0, "loss": 4.0}, {"step": 20, "loss": 2.0}, {"step": 10, "loss": 3.0},
               {"step": 20, "loss": 1.9}]
    assert plot.dedupe_by_step(records) == [{"step": 0, "loss": 4.0}, {"step": 10, "loss": 3.0},
                                            {"step": 20, "loss": 1.9}]


def test_resumed_log_is_plotted_without_repeated_steps(tmp_path):
    log = make_log(max_step=100)
    # A resume from step 50 that re-logged steps 50..100 (train.py should truncate, but may not).
    log["evals"] += [dict(e, val_loss=e["val_loss"] - 0.01)
                     for e in log["evals"] if e["step"] >= 50]
    log["train"] += [r for r in log["train"] if r["step"] >= 50]
    fig = plot.plot_logs({"run": log}, tmp_path / "resumed.png")
    check_png(tmp_path / "resumed.png")
    for line in fig.axes[0].get_lines() + fig.axes[1].get_lines():
        xs = list(line.get_xdata())
        assert xs == sorted(set(xs)), line.get_label()


def test_running_log_with_only_the_first_eval(tmp_path):
    log = make_log(status="running", max_step=0)  # step-0 eval, no train records yet
    log["best"] = None
    assert log["train"] == [] and len(log["evals"]) == 1
    fig = plot.plot_logs({"run": log}, tmp_path / "running.png")
    check_png(tmp_path / "running.png")
    assert not any("best" in label for label in legend_labels(fig))


def test_best_and_early_stop_are_marked(tmp_path):
    log = make_log(status="early_stopped", max_step=150, early_stop_step=150)
    fig = plot.plot_logs({"run": log}, tmp_path / "early.png")
    check_png(tmp_path / "early.png")
    labels = legend_labels(fig)
    assert f"run (early_stopped), best {log['best']['val_loss']:.3f} @ step {log['best']['step']}" in labels
    assert "best checkpoint" in labels and "early stop" in labels
    assert any(line.get_label() == "run early stop @ step 150" for line in fig.axes[0].get_lines())


def test_diverged_log_with_nan_loss_still_plots(tmp_path):
    log = make_log(status="diverged", max_step=100)
    log["evals"][-1]["val_loss"] = float("nan")  # json writes NaN, and reads it back
    log["train"][-1]["loss"] = float("inf")
    out = tmp_path / "diverged.png"
    assert plot.main([str(write_log(tmp_path / "run", log)), "--out", str(out)]) == 0
    check_png(out)


def not_a_train_log(tmp_path: Path) -> Path:
    return write_log(tmp_path / "run", {"hello": "world"})


def eval_without_val_loss(tmp_path: Path) -> Path:
    log = make_log()
    del log["evals"][1]["val_loss"]
    return write_log(tmp_path / "run", log)


def no_evals_yet(tmp_path: Path) -> Path:
    log = make_log(status="running")
    log["evals"], log["train"], log["best"] = [], [], None
    return write_log(tmp_path / "run", log)


def not_json(tmp_path: Path) -> Path:
    path = tmp_path / "train_log.json"
    path.write_text('{"version": 1, "evals": [', encoding="utf-8")  # cut off mid-write
    return path


@pytest.mark.parametrize("make_bad_input, expected", [
    (lambda tmp_path: tmp_path / "nowhere" / "train_log.json", "does not exist"),
    (not_json, "is not valid JSON"),
    (not_a_train_log, "is not a train log"),
    (eval_without_val_loss, "evals[1] has no val_loss"),
    (no_evals_yet, "no evaluations yet in"),
])
def test_bad_input_is_one_line_error(tmp_path, capsys, make_bad_input, expected):
    path = make_bad_input(tmp_path)
    out = tmp_path / "curves.png"
    assert plot.main([str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def run_script(*args: str) -> subprocess.CompletedProcess:
    """Run `python plot.py ...` as a user would, with no display."""
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    return subprocess.run([sys.executable, str(ROOT / "plot.py"), *args], capture_output=True,
                          text=True, env=env, timeout=60)


def test_script_error_has_no_traceback(tmp_path):
    result = run_script(str(no_evals_yet(tmp_path)))
    assert result.returncode == 2
    assert result.stderr.startswith("error: no evaluations yet in")
    assert "wait for the first eval_interval" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_script_writes_png_without_a_display(tmp_path):
    log_path = write_log(tmp_path / "run", make_log())
    out = tmp_path / "script.png"
    result = run_script(str(log_path), "--out", str(out), "--x", "tokens", "--title", "T")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out}"
    check_png(out)


def test_real_runs_log_plots_and_overlays(tmp_path):
    """A real short run of train.py, early-stopped and resumed, then plotted and overlaid."""
    import train
    from options import load_config
    from conftest import CORPUS, prepare_text

    data_dir = str(tmp_path / "data")
    prepare_text(CORPUS, data_dir)

    def run(out, *extra):
        train.main(load_config([
            "--data.processed_dir", data_dir, "--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd",
            "32", "--model.block_size", "16", "--training.batch_size", "4", "--training.eval_interval", "5",
            "--training.eval_batches", "2", "--training.log_interval", "1", "--device", "cpu",
            "--training.out_dir", str(tmp_path / out), *extra]))

    run("a", "--max-iters", "10")
    run("a", "--max-iters", "20", "--resume")
    run("b", "--max-iters", "30", "--training.early_stopping", "true", "--training.early_stopping_patience", "1",
        "--training.early_stopping_min_delta", "100")
    assert plot.main([str(tmp_path / "a" / "train_log.json"), str(tmp_path / "b"), "--out",
                      str(tmp_path / "both.png")]) == 0
    assert check_png(tmp_path / "both.png") == (1000, 700)
    log = plot.load_log(tmp_path / "a" / "train_log.json")
    steps = [e["step"] for e in log["evals"]]
    assert steps == sorted(set(steps)) == [0, 5, 10, 15, 20]  # the resume continued the same curve
    assert [r["step"] for r in log["resumes"]] == [10]
    fig = plot.plot_logs({"a": log}, None)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "a resumed @ step 10" in labels
    assert plot.load_log(tmp_path / "b" / "train_log.json")["run"]["early_stop_step"] == 5


def test_bits_per_byte_and_grad_norm_panels_appear_when_logged(tmp_path):
    old = make_log()
    assert len(plot.plot_logs({"run": old}, None).axes) == 2  # a log without them: loss and lr only
    log = make_log()
    log["config"]["training"]["grad_clip"] = 1.0
    for e in log["evals"]:
        e["val_bpb"] = e["val_loss"] * 1.44
    for r in log["train"]:
        r["grad_norm"], r["clipped"] = 2.0 / (1 + r["step"] / 50), 0.0
    fig = plot.plot_logs({"new": log, "old": old}, tmp_path / "panels.png")
    check_png(tmp_path / "panels.png")
    loss, bpb, grad, lr = fig.axes
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "val bits/byte", "grad norm", "learning rate"]
    assert [line.get_label() for line in bpb.get_lines()] == ["new val"]  # the old log draws nothing there
    curve = next(line for line in grad.get_lines() if line.get_label() == "new")
    assert list(curve.get_ydata()) == [r["grad_norm"] for r in log["train"]]
    assert any(line.get_label() == "new clip at 1" and list(line.get_ydata()) == [1.0, 1.0]
               for line in grad.get_lines())


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT, which Windows processes do not receive")
def test_watch_waits_for_the_log_redraws_on_change_and_stops_on_ctrl_c(tmp_path):
    """plot.py --watch on a run folder that does not exist yet: it waits, draws when the log appears,
    draws again when the log is replaced, and ends with status 0 on Ctrl-C (SIGINT)."""
    import signal

    from conftest import output_lines, wait_for_line

    run, out = tmp_path / "run", tmp_path / "live.png"
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "plot.py"), str(run), "--watch", "--every", "0.1",
                             "--out", str(out)], text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        lines = output_lines(proc)
        assert "train_log.json does not exist" in wait_for_line(lines, "waiting: ")[-1]
        write_log(run, make_log(status="running", max_step=100))
        wait_for_line(lines, f"wrote {out}")
        first = out.read_bytes()
        check_png(out)
        # As train.py writes it: a new file renamed over the old one.
        write_log(tmp_path / "next", make_log(status="running", max_step=200))
        os.replace(tmp_path / "next" / plot.LOG_NAME, run / plot.LOG_NAME)
        wait_for_line(lines, f"wrote {out}")
        assert out.read_bytes() != first
        check_png(out)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        rest = wait_for_line(lines, "stopped watching")
        assert not any("Traceback" in line for line in rest)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_watch_does_not_go_with_show(tmp_path, capsys):
    assert plot.main([str(write_log(tmp_path / "run", make_log())), "--watch", "--show"]) == 2
    assert "--watch redraws the PNG for an image viewer to show; it does not go with --show" in capsys.readouterr().err


def test_several_runs_keep_a_short_legend_beside_the_panels(tmp_path):
    """Three runs, each with train, val, best and resume lines: one legend entry per run and per kind of
    line (not per run and line: that was 15), placed right of the panels, over none of them."""
    logs = {}
    for name in ("a", "b", "c"):
        log = make_log(max_step=100)
        log["resumes"] = [{"step": 50}]
        logs[name] = log
    fig = plot.plot_logs(logs, tmp_path / "three.png")
    check_png(tmp_path / "three.png")
    labels = legend_labels(fig)
    assert labels[:3] == [plot.run_label(name, log) for name, log in logs.items()]
    assert labels[3:] == ["train loss, each step", "train loss, evaluations", "val loss", "best checkpoint", "resumed"]
    fig.canvas.draw()
    box = fig.legends[0].get_window_extent()
    assert all(box.x0 >= ax.get_window_extent().x1 for ax in fig.axes)


def test_a_run_with_one_evaluation_is_drawn_as_markers(tmp_path):
    log = make_log(status="running", max_step=0)
    log["best"] = None
    fig = plot.plot_logs({"run": log}, None)
    val = next(line for line in fig.axes[0].get_lines() if line.get_label() == "run val")
    lr = next(line for line in fig.axes[-1].get_lines() if line.get_label() == "run")
    assert len(val.get_xdata()) == len(lr.get_xdata()) == 1
    assert val.get_marker() != "None" and val.get_markersize() >= 6 and lr.get_marker() == "o"
