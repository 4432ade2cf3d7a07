"""Every suggested fix is one that works. For each case of tests/test_faults.py whose message proposes
a command or a setting, the suggestion is followed, in a fresh copy of the case: the command it names is
run (it must succeed), or the setting is changed, and the case's command then gets further: it succeeds,
or stops at another problem."""

from __future__ import annotations

import re
import shlex
from pathlib import Path


from fault_setups import copy, edit_json
from test_faults import cases, results, run_script, set_up, world  # noqa: F401 (fixtures)

# What reads as a proposal: a command, or a setting to set, add, pass, use or drop.
PROPOSES = re.compile(r"python \w+\.py|\bset [a-z_]+\.[a-z_]+|\b(add|pass|use|drop|export with) --?[a-z]|e\.g\. --|"
                      r"use at most|did you mean|end it in|give the text in|copy it to|export it first|"
                      r"choose another|of its own|give the picture")
COMMAND = re.compile(r"python (\w+)\.py ((?:(?! \(|,|;|\)).)*)")  # up to " (", ",", ";" or ")"


def swap(argv: list[str], flag: str, value) -> list[str]:
    """argv with `flag`'s value replaced, or with `flag value` added."""
    if flag not in argv:
        return [*argv, flag, str(value)]
    i = argv.index(flag)
    return [*argv[:i + 1], str(value), *argv[i + 2:]]


def without(argv: list[str], flag: str, values: int = 1) -> list[str]:
    i = argv.index(flag)
    return argv[:i] + argv[i + 1 + values:]


def data_from(w: Path) -> list[str]:
    return ["--data.input", str(w / "text.txt")]


# case id -> (argv, world, case folder) -> the steps that follow its message's suggestion: (script, argv)
# to run, or a function to call; the last step is the case's own command, changed as suggested.
FIXES = {
    "prepare-missing-input": lambda a, w, d: [("prepare", swap(a, "--data.input", w / "text.txt"))],
    "prepare-empty-input": lambda a, w, d: [("prepare", swap(a, "--data.input", w / "text.txt"))],
    "prepare-folder-without-txt": lambda a, w, d: [("prepare", swap(a, "--data.input", w / "text.txt"))],
    "prepare-into-the-input-folder": lambda a, w, d: [("prepare", swap(a, "--data.processed_dir", d / "prepared"))],
    "prepare-over-the-input-file": lambda a, w, d: [("prepare", swap(a, "--data.processed_dir", d / "prepared"))],
    "prepare-over-files-it-did-not-write": lambda a, w, d: [("prepare", swap(a, "--data.processed_dir", d / "new"))],
    "prepare-records-as-txt": lambda a, w, d: [("prepare", swap(a, "--data.format", "bin"))],
    "prepare-parquet-without-pyarrow": lambda a, w, d: [  # its other suggestion: the records as .jsonl
        lambda: (d / "r.jsonl").write_text('{"text": "a record"}\n' * 20), ("prepare", swap(a, "--data.input", d / "r.jsonl"))],
    "prepare-conversations-without-a-template": lambda a, w, d: [
        lambda: (d / "hf" / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}"),
        ("prepare", [*a, "--data.tokenizer", "hf", "--data.tokenizer_path", str(d / "hf")])],
    "prepare-conversations-and-a-tokenizer-without-a-template": lambda a, w, d: [
        lambda: (d / "hf" / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}"),
        ("prepare", a)],
    "prepare-chat-template-rewrites-answers": lambda a, w, d: [("prepare", [*a, "--data.loss_on", "all"])],
    "prepare-differently-without-force": lambda a, w, d: [("prepare", [*a, "--force"])],
    "train-overwrite-of-its-own-start": lambda a, w, d: [
        lambda: copy(d / "run" / "ckpt_best.pt", d / "start.pt"),
        ("train", swap(a, "--training.init_from", d / "start.pt"))],
    "train-heads-do-not-divide": lambda a, w, d: [("train", [*a, "--model.head_dim", "16"])],
    "train-rerun-with-other-settings": lambda a, w, d: [("train", [*a, "--resume"])],
    "train-tensorboard-missing": lambda a, w, d: [("train", [*a, "--training.tensorboard", "false"])],
    "train-resume-without-checkpoint": lambda a, w, d: [("train", without(a, "--resume", 0)), ("train", a)],
    "train-resume-with-another-init-from": lambda a, w, d: [("train", without(a, "--training.init_from"))],
    "train-unknown-key": lambda a, w, d: [("train", [a[0].replace("max_iter", "max_iters"), *a[1:]])],
    "train-out-dir-not-utf8": lambda a, w, d: [("train", swap(a, "--training.out_dir", d / "o"))],
    "train-fsdp-in-one-process": lambda a, w, d: [("train", without(a, "--training.parallel"))],
    "lora-unknown-target": lambda a, w, d: [("train", swap(a, "--lora.targets", "mlp.c_fc"))],
    "lora-rank-too-large": lambda a, w, d: [("train", swap(a, "--lora.rank", "32"))],
    "sample-export-unknown-key": lambda a, w, d: [
        lambda: edit_json(d / "x" / "config.json", lambda c: c["model"].update(n_head=c["model"].pop("n_heads"))),
        ("sample", [*a, "--max-new-tokens", "5"])],
    "lora-without-init-from": lambda a, w, d: [("train", [*a, "--training.init_from", str(w / "run")])],
    "train-out-dir-is-its-data": lambda a, w, d: [("train", swap(a, "--training.out_dir", d / "run"))],
    "train-out-dir-holds-user-files": lambda a, w, d: [("train", swap(a, "--training.out_dir", d / "run"))],
    "prepare-into-a-run": lambda a, w, d: [("prepare", swap(a, "--data.processed_dir", d / "prepared"))],
    "prepare-into-user-files": lambda a, w, d: [("prepare", swap(a, "--data.processed_dir", d / "prepared"))],
    "export-over-its-run": lambda a, w, d: [("export", swap(a, "--out", d / "export"))],
    "export-over-the-data": lambda a, w, d: [("export", swap(a, "--out", d / "export"))],
    "export-over-a-text-file": lambda a, w, d: [("export", swap(a, "--out", d / "export"))],
    "plot-over-its-log": lambda a, w, d: [("plot", swap(a, "--out", d / "curves.png"))],
    "plot-over-a-users-picture": lambda a, w, d: [("plot", swap(a, "--out", d / "curves.png"))],
    "plot-out-is-a-folder": lambda a, w, d: [("plot", swap(a, "--out", d / "notes" / "curves.png"))],
    "bench-json-over-a-users-file": lambda a, w, d: [("bench", [*swap(a, "--json", d / "bench.json"), "--help"])],
    "prepare-out-is-a-file": lambda a, w, d: [("prepare", swap(a, "--data.processed_dir", d / "prepared"))],
    "prepare-out-not-writable": lambda a, w, d: [("prepare", swap(a, "--data.processed_dir", d / "prepared"))],
    "train-out-dir-is-a-file": lambda a, w, d: [("train", swap(a, "--training.out_dir", d / "run"))],
    "train-out-dir-not-writable": lambda a, w, d: [("train", swap(a, "--training.out_dir", d / "run"))],
    "train-out-dir-in-use": lambda a, w, d: [("train", swap(a, "--training.out_dir", d / "run"))],
    "train-run-exists": lambda a, w, d: [("train", [*a, "--resume"])],
    "export-out-not-writable": lambda a, w, d: [("export", swap(a, "--out", d / "export"))],
    "export-fp16-overflow": lambda a, w, d: [("export", swap(a, "--dtype", "bf16"))],
    "export-no-out": lambda a, w, d: [("export", [*a, "--out", str(d / "exports" / "small")])],
    "export-force-on-a-user-folder": lambda a, w, d: [("export", swap(a, "--out", d / "other"))],
    "export-over-an-export": lambda a, w, d: [("export", [*a, "--force"])],
    "export-force-over-a-downloaded-model": lambda a, w, d: [("export", swap(a, "--out", d / "other"))],
    "export-gguf-name-for-a-folder": lambda a, w, d: [("export", [*a, "--format", "gguf"])],
    "llama-hf-export-of-a-switch": lambda a, w, d: [("export", swap(a, "--format", "native"))],
    "sample-prompt-not-utf8": lambda a, w, d: [("sample", swap(a, "--start", "cafe"))],
    "plot-out-not-a-picture": lambda a, w, d: [("plot", swap(a, "--out", d / "curves.png"))],
    # The message's example names the README's run; here the world's run is the one there is.
    "plot-no-log": lambda a, w, d: [("plot", [str(w / "run"), "--out", str(d / "curves.png")])],
    "eval-no-text": lambda a, w, d: [("eval", [*a, "--text", str(w / "text.txt")])],
    "eval-unknown-characters": lambda a, w, d: [("eval", swap(a, "--text", w / "text.txt"))],
    "eval-stride-too-long": lambda a, w, d: [("eval", swap(a, "--stride", "16"))],
    # The option it means is one bench.py takes (--help after it: parsed, and no benchmark run).
    "bench-misspelt-option": lambda a, w, d: [("bench", ["--steps", *a[1:], "--help"])],
    # The command of the message, then the case's command with what the message adds after it.
    "lora-adapters-only-onto-a-native-base": lambda a, w, d: [*suggested(a, w, d), ("export", [*a, "--base",
                                                                                        "exports/base_hf"])],
}


def suggested(argv: list[str], w: Path, d: Path, message: str = "") -> list:
    """The command a message names, as a step: a prepare.py command for a damaged folder is run with
    the --data.input the data was made from, as its message says."""
    script, args = COMMAND.search(message or MESSAGES[d.name]).groups()
    args = shlex.split(args)
    if script == "prepare" and "--data.input" not in args:
        args += data_from(w)
    return [(script, args)]


MESSAGES: dict[str, str] = {}  # case folder name -> its message, for `suggested`


def test_the_proposals_found_are_many(results):  # noqa: F811 (a fixture)
    assert sum(bool(PROPOSES.search(r["stderr"])) for r in results.values()) >= 30


def test_each_suggested_fix_gets_further(results, world, tmp_path):  # noqa: F811 (fixtures)
    wrong = []
    for case in [c for c in cases(world) if PROPOSES.search(results[c.id]["stderr"])]:
        if "pip install" in results[case.id]["stderr"] and case.id not in FIXES:
            wrong.append(f"{case.id}: a message proposing pip install needs a declared fix (its other suggestion)")
            continue
        d = tmp_path / case.id
        d.mkdir()
        argv, held = set_up(case, world, d)
        with held:
            problem = follow(case, argv, world, d)
        if problem:
            wrong.append(f"{case.id}: {problem}")
    assert not wrong, "\n".join(wrong)


def follow(case, argv: list[str], w: Path, d: Path) -> str | None:
    """Run a fresh copy of the case, follow its message's suggestion; what went wrong, or None."""
    code, first = run_script(case.script, argv, d)  # this copy fails as the case did
    if code != 2:
        return f"the copy of the case ended with {code}: {first}"
    MESSAGES[d.name] = first
    if case.id in FIXES:
        steps = FIXES[case.id](argv, w, d)
    elif COMMAND.search(first):
        steps = [*suggested(argv, w, d, first), (case.script, argv)]
    else:
        return f"no declared fix, and no command in: {first}"
    for i, step in enumerate(steps):
        if callable(step):
            step()
            continue
        code, err = run_script(*step, d)
        if i < len(steps) - 1 and code != 0:
            return f"the suggested {step} failed: {err}"
        if i == len(steps) - 1 and not (code == 0 or (code == 2 and err.splitlines()[:1] != first.splitlines()[:1])):
            return f"after the fix, exit {code}: {err}"
    return None
