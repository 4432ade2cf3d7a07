"""checks.py: every field of a checkpoint, mutated one at a time (missing, of the wrong type, negative,
huge, NaN, infinite, another model's), is either named in one `error:` line with the file, or a
documented default; never a traceback, never a run that goes on from a wrong state."""

import shutil

import pytest
import torch

import checks
import sample
import train
from test_runs import tiny_argv

MUTATIONS = {"missing": None, "text": "7", "bool": True, "negative": -7, "huge": 10 ** 30, "nan": float("nan"),
             "inf": float("inf"), "float": 2.5}
# Fields a checkpoint may lack: what takes their place (checkpoint.LoopState's defaults, documented there).
OPTIONAL = {"best_step", "bad_evals", "elapsed_s", "last_eval_step", "start_val_loss", "run_id", "val_loss", "version"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, char_data):
    out = tmp_path_factory.mktemp("checks") / "run"
    task = out.parent / "task.jsonl"  # so that the log has every field, task_accuracy too
    task.write_text('{"prompt": "ROMEO:", "completion": " ay"}\n' * 3, encoding="utf-8")
    assert train.cli(tiny_argv(out, char_data, "--max-iters", "4", "--training.eval_interval", "2",
                               "--training.task", str(task))) == 0
    return out


def mutated(run, tmp_path, change) -> tuple:
    """A copy of the run whose ckpt_last.pt is changed by `change` (ckpt_best.pt removed: it would be resumed
    from instead of the damaged ckpt_last.pt)."""
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / "ckpt_best.pt").unlink()
    ckpt = torch.load(out / "ckpt_last.pt", weights_only=True)
    change(ckpt)
    torch.save(ckpt, out / "ckpt_last.pt")
    return out, out / "ckpt_last.pt"


def assert_named_or_fine(code: int, err: str, path) -> None:
    """Exit 2 with one line naming the file, or 0 with nothing on stderr."""
    assert (code == 2 and err.count("\n") == 1 and err.startswith("error: ") and str(path) in err) or \
        (code == 0 and err == ""), (code, err)


def expected(field: str, kind: str) -> str:
    """What a resume must do with `field` mutated by `kind`: "ok" (a legal value, or the default of a
    missing optional field), "error" (the field named), "missing" (a resume needs it), "newer"."""
    if kind == "missing":
        return "ok" if field in OPTIONAL else "missing"
    if field == "run_id":
        return "ok" if kind == "text" else "error"  # any string names a run
    if kind in ("text", "bool", "nan", "negative"):
        return "error"
    if kind == "inf":
        return "ok" if field == "best_val_loss" else "error"  # inf until a first evaluation
    if kind == "float":
        return "ok" if float in checks.LOOP_FIELDS[field][0] else "error"
    return "newer" if field == "version" else "ok"  # huge: a count of 10**30 is absurd, not damaging


@pytest.mark.parametrize("field", sorted(checks.LOOP_FIELDS))
@pytest.mark.parametrize("kind", sorted(MUTATIONS))
def test_each_loop_field_mutated_is_named_or_a_default(run, char_data, tmp_path, capsys, field, kind):
    value = MUTATIONS[kind]
    out, path = mutated(run, tmp_path, lambda c: c.pop(field, None) if value is None else c.__setitem__(field, value))
    capsys.readouterr()
    code = train.cli(tiny_argv(out, char_data, "--max-iters", "6", "--training.eval_interval", "2", "--resume"))
    err = capsys.readouterr().err
    assert_named_or_fine(code, err, path)
    want = expected(field, kind)
    assert code == (0 if want == "ok" else 2), err
    assert {"ok": "", "error": f": {field} is ", "missing": "cannot be resumed: it has no ",
            "newer": "written by a newer version"}[want] in err, err


@pytest.mark.parametrize("what", ["int8 weights", "bool weights", "short rng", "rng of another kind",
                                  "another model's optimizer", "optimizer of fewer parameters", "optimizer text"])
def test_weights_rng_and_optimizer_of_the_wrong_kind_are_named(run, char_data, tmp_path, capsys, what):
    wte = "transformer.wte.weight"
    change = {
        "int8 weights": lambda c: c["model"].__setitem__(wte, c["model"][wte].to(torch.int8)),
        "bool weights": lambda c: c["model"].__setitem__(wte, c["model"][wte] > 0),
        "short rng": lambda c: c["rng"].__setitem__("cpu", c["rng"]["cpu"][:10]),
        "rng of another kind": lambda c: c.__setitem__("rng", [1, 2, 3]),
        "another model's optimizer": lambda c: c["optimizer"]["state"][0].__setitem__("exp_avg", torch.zeros(3, 3)),
        "optimizer of fewer parameters": lambda c: c["optimizer"]["param_groups"][0]["params"].pop(),
        "optimizer text": lambda c: c.__setitem__("optimizer", "adamw"),
    }[what]
    out, path = mutated(run, tmp_path, change)
    capsys.readouterr()
    code = train.cli(tiny_argv(out, char_data, "--max-iters", "6", "--training.eval_interval", "2", "--resume"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert_named_or_fine(code, err, path)
    if "weights" in what:  # what sample.py, eval.py and export.py read is checked the same way
        assert sample.main(["--ckpt", str(path), "--max-new-tokens", "3"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is damaged or was edited: weight transformer.wte.weight is torch." in err


LOG_MUTATIONS = {"missing": None, "text": "7", "bool": True, "negative": -3, "list": [1]}


@pytest.mark.parametrize("where", [f"{kind}.{key}" for kind, fields in checks.LOG_RECORDS.items() for key in fields]
                         + ["run.status", "run.tokens_per_step", "run.early_stop_step", "best.step", "best.val_loss",
                            "resumes.step", "config.training.grad_clip"])
@pytest.mark.parametrize("kind", sorted(LOG_MUTATIONS))
def test_each_field_of_a_train_log_mutated_is_named_or_a_default(run, tmp_path, capsys, where, kind):
    """plot.py on a train_log.json with one field changed: one line naming the file, or a picture when
    the value is legal (a loss may be null, a missing val_bpb or grad_norm is an older log)."""
    import json

    import plot

    log = json.loads((run / "train_log.json").read_text())
    log["resumes"] = [{"step": 2, "time": "then"}]
    path, value = where.split("."), LOG_MUTATIONS[kind]
    holder = log[path[0]][-1] if path[0] in ("evals", "train", "resumes") else log[path[0]]
    for key in path[1:-1]:
        holder = holder[key]
    holder.pop(path[-1]) if value is None else holder.__setitem__(path[-1], value)
    (tmp_path / "train_log.json").write_text(json.dumps(log))
    capsys.readouterr()
    code = plot.main([str(tmp_path / "train_log.json"), "--out", str(tmp_path / "c.png")])
    err = capsys.readouterr().err
    key = path[-1]
    numbers = [k for fields in checks.LOG_RECORDS.values() for k, t in fields.items() if t is checks.NUMBER]
    legal = (kind == "missing" and (key in checks.LOG_OPTIONAL or where.startswith(("run.", "config.")))
             or kind == "negative" and key in (*numbers, "grad_clip", "val_loss")
             or kind == "text" and where == "run.status")  # any text: shown in the legend
    if legal:
        assert code == 0 and err == "" and (tmp_path / "c.png").is_file(), err
    else:
        assert code == 2 and err.count("\n") == 1 and str(tmp_path / "train_log.json") in err, (code, err)
