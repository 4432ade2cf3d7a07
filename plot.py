"""Plot loss and learning-rate curves from one or more train_log.json files.

    python plot.py checkpoints/train_log.json                  # writes checkpoints/curves.png
    python plot.py runs/a/train_log.json runs/b --out cmp.png   # overlay two runs
    python plot.py checkpoints --x tokens --title "char model" --show
    python plot.py checkpoints/small --watch                    # redraw while the run goes on

A run folder may be given instead of its train_log.json. The figure is written to
--out (default: curves.png next to the first log) and its path is printed.
Top panel: loss (faint per-step train loss, train/val loss at each evaluation, the best
checkpoint as a star, an early stop as a dotted vertical line, each resume as a dashed one);
below it, when the log has them: validation bits per byte, and the gradient norm before clipping
(the clipping threshold dashed); bottom: learning rate. One color per run; the legend, right of
the panels, names each run (with its best val loss) and each kind of line once.
The log may belong to a run that is still going: it is rewritten atomically. --watch redraws
the PNG whenever the log changes (checked every --every seconds) until Ctrl-C, which ends it
with exit status 0; the PNG is replaced whole each time, so an image viewer can keep it open.
"""

from __future__ import annotations

# Before torch, which takes seconds to load: a Ctrl-C meanwhile ends in one line (errors.py).
from errors import UserError, command

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from checks import log_problems
from config import doc
from options import parse
from files import atomic_file, check_replaceable

LOG_NAME = "train_log.json"
# matplotlib's formats that name it in their metadata: plot.py replaces only a picture that does
MARK, FORMATS = b"Matplotlib", ("png", "svg", "pdf", "eps", "ps")
FIGSIZE = (10.0, 7.0)  # inches; at DPI below: a 1000 x 700 pixel PNG
DPI = 100
X_CHOICES = ("step", "tokens")


class PlotError(UserError):
    """A problem with the input that the user can fix; main() prints it as one line."""


def load_log(path: Path | str) -> dict:
    """Read and check a train log, raising PlotError with the problem and the fix."""
    path = Path(path)
    fix = f"pass the {LOG_NAME} that train.py writes in its run folder (training.out_dir)"
    try:
        log = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlotError(f"{path} does not exist; {fix}") from None
    except OSError as e:
        raise PlotError(f"cannot read {path} ({e.strerror}); {fix}") from None
    except ValueError as e:  # bad JSON, or bytes that are not UTF-8 text
        raise PlotError(f"{path} is not valid JSON ({e}); {fix}") from None

    # Every record checked up front (checks.py), so a broken log gives a message rather than a traceback.
    if problems := log_problems(log):
        raise PlotError(f"{path} is not a train log: {problems[0]}; {fix}")
    if not log["evals"]:
        raise PlotError(f"no evaluations yet in {path}; wait for the first eval_interval "
                        f"and run plot.py again")
    return log


def dedupe_by_step(records: list[dict]) -> list[dict]:
    """Keep the last record for each step, sorted by step.

    A resumed run may have logged a step twice; the later record is the one from
    the run that carried on, and a curve must never go back in x.
    """
    by_step = {record["step"]: record for record in records}  # later records overwrite
    return [by_step[step] for step in sorted(by_step)]


def run_labels(paths: list[Path]) -> list[str]:
    """Name each log by its run folder; fall back to relative paths if two names clash."""
    folders = [Path(p).resolve().parent for p in paths]
    names = [folder.name for folder in folders]
    if len(set(names)) < len(names):
        names = [os.path.relpath(folder) for folder in folders]
    # The same log given twice still gets two labels, so no run is silently dropped.
    return [name if names[:i].count(name) == 0 else f"{name} #{names[:i].count(name) + 1}"
            for i, name in enumerate(names)]


def x_at_step(log: dict, step: int, x: str) -> float:
    """Where a step (the best checkpoint, an early stop) lies on the chosen x axis."""
    if x == "step":
        return step
    for record in reversed(log["evals"]):  # the last record wins, as in dedupe_by_step
        if record["step"] == step:
            return record["tokens"]
    return step * log["run"].get("tokens_per_step", 0)  # a step that was not evaluated


# The legend has one entry per run (its color) and one per kind of curve (its style), beside the panels:
# with several runs, an entry per run and curve would cover the data.
STYLES = {"train loss, each step": dict(alpha=0.25, linewidth=0.8),
          "train loss, evaluations": dict(linestyle="--", marker="o", markersize=3),
          "val loss": dict(marker="s", markersize=3),
          "task accuracy (exact answers)": dict(marker="^", markersize=4),
          "best checkpoint": dict(marker="*", markersize=14, markeredgecolor="black", linestyle="none"),
          "early stop": dict(linestyle=":", linewidth=1.5),
          "resumed": dict(linestyle="--", linewidth=0.8, alpha=0.6),
          "clipping threshold": dict(linestyle="--", linewidth=1)}
STYLES = {kind: {**style, "gid": kind} for kind, style in STYLES.items()}  # each line drawn knows its kind


def curve(ax, xs: list[float], ys: list[float], color, label: str, **style) -> None:
    """One line; a single point (a run with one evaluation so far) is drawn as a marker, or it would not show."""
    if len(xs) == 1:
        style = {**style, "marker": style.get("marker") or "o", "markersize": max(6, style.get("markersize", 0))}
    ax.plot(xs, ys, color=color, label=label, **style)


def run_label(name: str, log: dict) -> str:
    """The run's legend entry: its name, how it ended when it did not simply finish, its best val loss."""
    status, best = log["run"].get("status", ""), log.get("best")
    return name + (f" ({status})" if status and status != "finished" else "") + \
        (f", best {best['val_loss']:.3f} @ step {best['step']}" if best else "")


def plot_run(ax_loss, ax_lr, name: str, log: dict, x: str, color, ax_bpb=None, ax_grad=None, ax_task=None) -> None:
    """Draw one run on the panels (bits per byte, gradient norm and task accuracy when those axes are given),
    in one color.
    Each line's label (not shown: the legend is by run and by style) says which run and curve it is."""
    evals, train = dedupe_by_step(log["evals"]), dedupe_by_step(log["train"])
    status = log["run"].get("status", "")

    def xs(records: list[dict]) -> list[float]:
        return [record[x] for record in records]

    if train:  # drawn faintly: noisy, and absent until the first log_interval
        curve(ax_loss, xs(train), [r["loss"] for r in train], color, f"{name} train (per step)",
              **STYLES["train loss, each step"])
    curve(ax_loss, xs(evals), [r["train_loss"] for r in evals], color, f"{name} train",
          **STYLES["train loss, evaluations"])
    curve(ax_loss, xs(evals), [r["val_loss"] for r in evals], color, f"{name} val", **STYLES["val loss"])

    best = log.get("best")
    if best:
        ax_loss.plot([x_at_step(log, best["step"], x)], [best["val_loss"]], color=color,
                     label=f"{name} best {best['val_loss']:.3f} @ step {best['step']}", **STYLES["best checkpoint"])
    for resume in log.get("resumes", []):  # where a run was continued with --resume
        for ax in (ax_loss, ax_lr):
            ax.axvline(x_at_step(log, resume["step"], x), color=color, label=f"{name} resumed @ step {resume['step']}",
                       **STYLES["resumed"])
    stop = log["run"].get("early_stop_step")
    if status == "early_stopped" and stop is not None:
        for ax in (ax_loss, ax_lr):
            ax.axvline(x_at_step(log, stop, x), color=color, label=f"{name} early stop @ step {stop}",
                       **STYLES["early stop"])

    # The lr is in both kinds of record; merged, the curve starts at the step-0 eval.
    lr_points = dedupe_by_step(log["evals"] + log["train"])
    curve(ax_lr, xs(lr_points), [r["lr"] for r in lr_points], color, name)

    # Logs written before these fields existed have none, and draw nothing here.
    bpb = [r for r in evals if r.get("val_bpb") is not None]
    if ax_bpb is not None and bpb:
        curve(ax_bpb, xs(bpb), [r["val_bpb"] for r in bpb], color, f"{name} val", **STYLES["val loss"])
    task = [r for r in evals if r.get("task_accuracy") is not None]
    if ax_task is not None and task:
        curve(ax_task, xs(task), [r["task_accuracy"] for r in task], color, f"{name} task",
              **STYLES["task accuracy (exact answers)"])
    grad = [r for r in train if r.get("grad_norm") is not None]
    if ax_grad is not None and grad:
        curve(ax_grad, xs(grad), [r["grad_norm"] for r in grad], color, name, linewidth=1)
        clip = log.get("config", {}).get("training", {}).get("grad_clip")
        if clip:
            ax_grad.axhline(clip, color=color, label=f"{name} clip at {clip:g}", **STYLES["clipping threshold"])


def legend(fig, logs: dict[str, dict], colors: list[str]) -> None:
    """One entry per run, then one per kind of curve the figure shows, to the right of the panels."""
    from matplotlib.lines import Line2D

    drawn = {line.get_gid() for ax in fig.axes for line in ax.get_lines() if len(line.get_xdata())}
    runs = [Line2D([], [], color=colors[i % len(colors)], linewidth=3, label=run_label(name, log))
            for i, (name, log) in enumerate(logs.items())]
    kinds = [Line2D([], [], color="dimgray", label=kind, **style) for kind, style in STYLES.items() if kind in drawn]
    fig.legend(handles=runs + kinds, loc="outside right upper", fontsize="small")


def plot_logs(logs: dict[str, dict], out: Path | str | None, x: str = "step",
              title: str | None = None, show: bool = False) -> Figure:
    """Plot runs ({label: log}) on one figure, save it to `out` (if given) and return it.

    The figure is closed unless `show` (the caller can still read its axes and legend).
    """
    if x not in X_CHOICES:
        raise ValueError(f"x must be one of {X_CHOICES}, not {x!r}")
    # Imported here, not at the top, so that main() can choose the backend first.
    import matplotlib.pyplot as plt

    # A panel for bits per byte, one for the task's accuracy and one for the gradient norm, when some log has them.
    has_bpb = any(r.get("val_bpb") is not None for log in logs.values() for r in log["evals"])
    has_task = any(r.get("task_accuracy") is not None for log in logs.values() for r in log["evals"])
    has_grad = any(r.get("grad_norm") is not None for log in logs.values() for r in log["train"])
    heights = (3,) + (1.2,) * has_bpb + (1.2,) * has_task + (1.2,) * has_grad + (1,)
    fig, axes = plt.subplots(len(heights), 1, sharex=True, figsize=FIGSIZE, dpi=DPI,
                             height_ratios=heights, layout="constrained")
    ax_loss, ax_lr = axes[0], axes[-1]
    ax_bpb = axes[1] if has_bpb else None
    ax_task = axes[1 + has_bpb] if has_task else None
    ax_grad = axes[1 + has_bpb + has_task] if has_grad else None
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, log) in enumerate(logs.items()):
        plot_run(ax_loss, ax_lr, name, log, x, colors[i % len(colors)], ax_bpb, ax_grad, ax_task)

    ax_loss.set_ylabel("loss")
    ax_loss.set_title(title or "training curves")
    legend(fig, logs, colors)
    if ax_bpb is not None:
        ax_bpb.set_ylabel("val bits/byte")
    if ax_task is not None:
        ax_task.set_ylabel("task accuracy")
        ax_task.set_ylim(-0.05, 1.05)
    if ax_grad is not None:
        ax_grad.set_ylabel("grad norm")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step" if x == "step" else "tokens seen")
    if x == "tokens":
        ax_lr.xaxis.set_major_formatter(EngFormatter())  # 1.2M rather than 1.2e6
    for ax in axes:
        ax.grid(alpha=0.3)

    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        # Written whole, then renamed: a viewer never shows half a picture. No bbox_inches="tight":
        # it would change the pixel size.
        with atomic_file(out) as f:  # the file itself, not its writer: svg and pdf take only a real file
            fig.savefig(f.file, format=Path(out).suffix[1:].lower() or "png")
    if show:
        plt.show()
    else:
        plt.close(fig)  # free it: scripts and tests may plot many figures
    return fig


@dataclass
class PlotOptions:
    logs: list[str] = doc(f"{LOG_NAME} files or the run folders holding them", [], positional=True)
    out: str = doc("picture to write (.png, .svg, .pdf, .eps or .ps); empty: curves.png next to the first log", "")
    x: str = doc("x axis", "step", choices=X_CHOICES)
    show: bool = doc("also open a window with the figure", False)
    title: str = doc("figure title; empty: training curves", "")
    watch: bool = doc("redraw the PNG whenever a log changes, until Ctrl-C", False)
    every: float = doc("with --watch: seconds between looks at the logs", 5.0, within="(0, inf)")

    def problems(self) -> list[str]:
        return ["--watch redraws the PNG for an image viewer to show; it does not go with --show"] \
            if self.watch and self.show else []


def draw(paths: list[Path], out: Path, opts: PlotOptions) -> None:
    logs = dict(zip(run_labels(paths), (load_log(p) for p in paths)))
    try:
        plot_logs(logs, out, x=opts.x, title=opts.title or None, show=opts.show)
    except OSError as e:  # e.g. --out in a folder that cannot be created
        raise PlotError(f"cannot write {out} ({e.strerror}); choose another --out") from None


def watch(paths: list[Path], out: Path, opts: PlotOptions) -> None:
    """Redraw whenever a log changes, until Ctrl-C. A log that is not there yet or has no evaluation
    yet (a run just starting) is waited for, with the reason printed once."""
    seen, waiting = None, None
    while True:
        # train.py replaces the log by a rename, so a new version has a new inode (and a new mtime).
        stamp = [(s.st_ino, s.st_mtime_ns, s.st_size) if (s := stat_or_none(p)) else None for p in paths]
        if stamp != seen:
            try:
                draw(paths, out, opts)
                print(f"wrote {out} at {time.strftime('%H:%M:%S')}", flush=True)
                seen, waiting = stamp, None
            except PlotError as e:
                if str(e) != waiting:
                    print(f"waiting: {e}", file=sys.stderr, flush=True)
                    waiting = str(e)
        time.sleep(opts.every)


def stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


@command
def main(argv: list[str] | None = None) -> int:
    opts, _ = parse(argv, PlotOptions, sections=(), program="plot.py", about=__doc__)
    if not opts.logs:
        raise PlotError(f"no log given; pass a {LOG_NAME} or a run folder, e.g. python plot.py checkpoints/small")
    if not opts.show:
        matplotlib.use("Agg")  # draw to files only: works with no display

    # A run folder means its log; so does a path not there yet that is not a .json file (a run to watch).
    paths = [Path(p) / LOG_NAME if Path(p).is_dir() or not (Path(p).exists() or p.endswith(".json")) else Path(p)
             for p in opts.logs]
    out = Path(opts.out) if opts.out else paths[0].parent / "curves.png"
    if out.is_dir():
        raise PlotError(f"--out {out} is a folder; give the picture's file name, e.g. {out / 'curves.png'}")
    check_replaceable(out, (MARK,), "--out", "plot.py")
    if out.suffix and out.suffix[1:].lower() not in FORMATS:
        raise PlotError(f"--out {out}: a picture cannot be written as {out.suffix}; end it in .png, .svg or .pdf "
                        "(or .eps, .ps)")
    if opts.watch:
        try:
            watch(paths, out, opts)
        except KeyboardInterrupt:  # Ctrl-C: how a watch ends, not an error
            print(f"stopped watching; the last picture is {out}")
        return 0
    draw(paths, out, opts)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
