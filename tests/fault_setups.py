"""The set-ups of tests/test_faults.py's cases: the bad files, held locks and runs each case needs."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import load_file, save_file

import files
import train


@dataclass
class Case:
    """One fault of tests/test_faults.py: a script's command line, and what its one error line must name."""
    id: str
    script: str
    argv: list[str]
    names: str  # what the one error line must mention: the file or setting at fault
    setup: object = None  # setup(world, case_dir) -> None: makes the bad file, holds a lock...


def tiny(out_dir, data_dir, *extra) -> list[str]:
    return ["--data.processed_dir", str(data_dir), "--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd",
            "32", "--model.block_size", "16", "--training.batch_size", "4", "--training.eval_interval", "5",
            "--training.eval_batches", "2", "--training.log_interval", "5", "--device", "cpu", "--max-iters", "5",
            "--training.out_dir", str(out_dir), *extra]


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def copy(src: Path, dest: Path) -> Path:
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dest)
    return dest


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def held_lock(path: Path):
    """A setup that holds `path`'s lock (as another process would) while the case runs."""
    def setup(world, d):
        return files.lock(path(world, d) if callable(path) else path, "x")
    return setup


@contextlib.contextmanager
def offline_tiktoken(cache: Path):
    """An empty tiktoken cache, and a proxy that refuses every connection: offline, whatever the machine."""
    cache.mkdir()
    saved = {k: os.environ.get(k) for k in ("TIKTOKEN_CACHE_DIR", "HTTPS_PROXY", "https_proxy")}
    os.environ.update(TIKTOKEN_CACHE_DIR=str(cache), HTTPS_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def quiet_train(argv: list[str]) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        assert train.cli(argv) == 0


def lora_run(w: Path, d: Path, delete_base: bool) -> None:
    """A short LoRA run in d/lora on a copy of the world's run, whose copy is then deleted if asked."""
    base = copy(w / "run", d / "base")
    with contextlib.redirect_stdout(io.StringIO()):
        assert train.cli(tiny(d / "lora", w / "data", "--training.init_from", str(base), "--lora.rank", "2")) == 0
    if delete_base:
        shutil.rmtree(base)


def change_weights(path: Path) -> None:
    """The same checkpoint with one tensor nudged: what a LoRA run's base digest must notice."""
    ckpt = torch.load(path, weights_only=True)
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = ckpt["model"][name] + 1e-3
    torch.save(ckpt, path)


def with_huge_weight(src: Path, dest: Path) -> None:
    """A copy of a checkpoint with one weight beyond fp16's range, as a diverging run can leave."""
    ckpt = torch.load(src, weights_only=True)
    name = next(iter(ckpt["model"]))
    ckpt["model"][name].view(-1)[0] = 1e6
    torch.save(ckpt, dest)


def resave(src: Path, dest: Path, **changes) -> None:
    """A copy of a checkpoint with some entries changed (None: removed)."""
    ckpt = torch.load(src, weights_only=True)
    for k, v in changes.items():
        ckpt.pop(k) if v is None else ckpt.__setitem__(k, v)
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dest)


def poke_token(path: Path, token: int) -> None:
    """Overwrite one token id of a uint16 split in place."""
    with open(path, "r+b") as f:
        f.seek(10)
        f.write(token.to_bytes(2, "little"))


def non_finite(path: Path) -> dict:
    """A checkpoint's weights with a NaN and an inf in them (as a run that diverged would leave them)."""
    model = torch.load(path, weights_only=True)["model"]
    weight = next(k for k in model if k.endswith("attn.c_attn.weight") or k.endswith("c_attn.weight"))
    model[weight][0, 0], model[weight][0, 1] = float("nan"), float("inf")
    return model


def drop_tensor(path: Path, name: str) -> None:
    tensors = load_file(path)
    del tensors[name]
    save_file(tensors, path)


def shard_with_one_missing(folder: Path, dest: Path) -> None:
    """A Hugging Face folder whose model.safetensors.index.json names two shards, the second not there."""
    copy(folder, dest)
    names = list(load_file(dest / "model.safetensors"))
    (dest / "model.safetensors").rename(dest / "model-00001-of-00002.safetensors")
    write(dest / "model.safetensors.index.json", json.dumps({"weight_map": {
        name: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, name in enumerate(names)}}))


def shard_outside(folder: Path, dest: Path) -> None:
    """A Hugging Face folder whose index names its one shard by a path out of the folder, where it is."""
    copy(folder, dest)
    names = list(load_file(dest / "model.safetensors"))
    (dest / "model.safetensors").rename(dest.parent / "x.safetensors")
    write(dest / "model.safetensors.index.json", json.dumps({"weight_map": dict.fromkeys(names, "../x.safetensors")}))


def with_tokenizer_json(folder: Path, tokens: int) -> None:
    """A tokenizer.json of `tokens` tokens in place of our tokenizer_meta.json."""
    from tokenizers import Tokenizer, models

    (folder / "tokenizer_meta.json").unlink()
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(tokens)}, unk_token="t0")).save(str(folder / "tokenizer.json"))


def snapshot(*roots: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for root in roots for p in root.rglob("*")
            if p.is_file() and p.suffix != ".lock"}


def chat_folder(folder: Path, template: str | None) -> Path:
    """A Hugging Face folder (tests/test_real_models.py's tokenizer and a random model) with `template` as its
    chat template (None: none), and conversations to prepare with it in folder/../chat.jsonl."""
    from test_real_models import hf_tokenizer, saved_by_transformers
    saved_by_transformers(folder, "smollm2", vocab=300)  # a random model with it, for eval.py and chat.py
    hf_tokenizer(folder)
    if template is not None:
        write(folder / "chat_template.jinja", template)
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "four"}]
    return write(folder.parent / "chat.jsonl", "".join(json.dumps({"messages": messages}) + "\n" for _ in range(20)))


@contextlib.contextmanager
def without_pyarrow():
    """pyarrow not installed (an optional dependency), whether or not it is."""
    with mock.patch.dict(sys.modules, {"pyarrow": None, "pyarrow.parquet": None}):
        yield
