"""The fault catalogue: bad files, bad flags and bad environments, across every script. Each case must
end with a non-zero exit status and exactly one line on stderr, `error: ...`, naming the file or the
setting at fault; no traceback; and every file that existed before unchanged. docs/errors.md's "Common
errors" table quotes messages: each must be one these cases really print.

All cases run once, in this process (each script's entry point is what its command line runs), in a
session fixture; the tests below read the results."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import traceback
from pathlib import Path
from unittest import mock

import pytest
import torch

import bench
import chat
import eval as evaluate
import export
import files
import plot
import prepare
import sample
import train
from conftest import ROOT, prepare_text
from fault_setups import (Case, chat_folder, change_weights, copy, drop_tensor, edit_json, held_lock, lora_run,
                          non_finite, offline_tiktoken, poke_token, quiet_train, resave, shard_outside,
                          shard_with_one_missing, snapshot, tiny, with_huge_weight, with_tokenizer_json,
                          without_pyarrow, write)

SCRIPTS = {"prepare": prepare.main, "train": train.cli, "sample": sample.main, "export": export.main,
           "plot": plot.main, "bench": bench.main, "eval": evaluate.main, "chat": chat.main}
NOT_A_FOLDER = "/dev/null/x"  # a path under a file: no folder can be made there, even by root


def cases(w: Path) -> list[Case]:
    """Every case, with paths in the world `w` (see the fixture) or in the case's own folder `d`."""
    data, run, native, hf, text = w / "data", w / "run", w / "native", w / "hf", w / "text.txt"
    d = Path("{d}")  # replaced by each case's own folder
    return [
        # prepare.py
        Case("prepare-missing-input", "prepare", ["--data.input", str(d / "nope.txt"), "--data.processed_dir", str(d / "o")],
             "nope.txt"),
        Case("prepare-empty-input", "prepare", ["--data.input", str(d / "empty.txt"), "--data.processed_dir", str(d / "o")],
             "empty.txt", lambda w, d: write(d / "empty.txt", "")),
        Case("prepare-not-utf8", "prepare", ["--data.input", str(d / "latin.txt"), "--data.processed_dir", str(d / "o")],
             "latin.txt", lambda w, d: write(d / "latin.txt", "caf\xe9\n".encode("latin-1"))),
        Case("prepare-utf16-without-bom", "prepare", ["--data.input", str(d / "u16.txt"), "--data.processed_dir",
                                                      str(d / "o")], "u16.txt",
             lambda w, d: write(d / "u16.txt", "hello world\n".encode("utf-16-le"))),
        Case("prepare-folder-without-txt", "prepare", ["--data.input", str(d / "docs"), "--data.processed_dir",
                                                       str(d / "o")], "docs", lambda w, d: write(d / "docs" / "a.md", "x")),
        # records (docs/records.md)
        Case("prepare-records-broken-line", "prepare", ["--data.input", str(d / "bad.jsonl"), "--data.processed_dir",
                                                        str(d / "o")], "bad.jsonl:2",
             lambda w, d: write(d / "bad.jsonl", '{"text": "a"}\n{"text": \n{"text": "c"}\n')),
        Case("prepare-records-of-two-kinds", "prepare", ["--data.input", str(d / "mixed.jsonl"), "--data.processed_dir",
                                                         str(d / "o")], "mixed.jsonl:2",
             lambda w, d: write(d / "mixed.jsonl", '{"text": "a"}\n{"prompt": "b", "completion": "c"}\n')),
        Case("prepare-records-of-no-kind", "prepare", ["--data.input", str(d / "q.jsonl"), "--data.processed_dir",
                                                       str(d / "o")], "q.jsonl:1",
             lambda w, d: write(d / "q.jsonl", '{"question": "a", "answer": "b"}\n')),
        Case("prepare-records-unknown-role", "prepare", ["--data.input", str(d / "c.jsonl"), "--data.processed_dir",
                                                         str(d / "o")], "c.jsonl:1",
             lambda w, d: write(d / "c.jsonl", '{"messages": [{"role": "tool", "content": "x"}]}\n')),
        Case("prepare-records-message-without-content", "prepare", ["--data.input", str(d / "c.jsonl"),
                                                                    "--data.processed_dir", str(d / "o")], "c.jsonl:1",
             lambda w, d: write(d / "c.jsonl", '{"messages": [{"role": "user"}]}\n')),
        Case("prepare-json-not-an-array", "prepare", ["--data.input", str(d / "r.json"), "--data.processed_dir",
                                                      str(d / "o")], "r.json",
             lambda w, d: write(d / "r.json", '{"text": "one record, not a list"}')),
        Case("prepare-glob-matches-nothing", "prepare", ["--data.input", str(d / "*.jsonl"), "--data.processed_dir",
                                                         str(d / "o")], "*.jsonl"),
        Case("prepare-too-few-records", "prepare", ["--data.input", str(d / "one.jsonl"), "--data.processed_dir",
                                                    str(d / "o")], "one.jsonl",
             lambda w, d: write(d / "one.jsonl", '{"prompt": "2+2=", "completion": "4"}\n')),
        Case("prepare-records-as-txt", "prepare", ["--data.input", str(d / "p.jsonl"), "--data.processed_dir",
                                                   str(d / "o"), "--data.format", "txt"], "data.format",
             lambda w, d: write(d / "p.jsonl", '{"prompt": "2+2=", "completion": "4"}\n' * 20)),
        Case("prepare-parquet-without-pyarrow", "prepare", ["--data.input", str(d / "r.parquet"),
                                                            "--data.processed_dir", str(d / "o")], "pyarrow",
             lambda w, d: (write(d / "r.parquet", b"PAR1"), without_pyarrow())[1]),
        Case("train-conversations-on-a-model-of-text", "train",
             tiny(d / "o", d / "p", "--data.input", str(d / "c.jsonl"), "--training.init_from", str(run)),
             "training.init_from", lambda w, d: write(d / "c.jsonl", '{"messages": [{"role": "user", "content": "x"}, '
                                                      '{"role": "assistant", "content": "y"}]}\n' * 9)),
        Case("train-task-of-texts", "train", tiny(d / "o", data, "--training.task", str(d / "t.jsonl")),
             "training.task", lambda w, d: write(d / "t.jsonl", '{"text": "2+2=4"}\n' * 3)),
        Case("prepare-conversations-and-a-tokenizer-without-a-template", "prepare",
             ["--data.input", str(d / "chat.jsonl"), "--data.tokenizer", "hf", "--data.tokenizer_path", str(d / "hf"),
              "--data.processed_dir", str(d / "o")], "chat template", lambda w, d: chat_folder(d / "hf", None)),
        Case("prepare-records-half-a-character", "prepare", ["--data.input", str(d / "s.jsonl"), "--data.processed_dir",
                                                             str(d / "o")], "s.jsonl:2",
             lambda w, d: write(d / "s.jsonl", '{"text": "fine"}\n{"text": "emoji \\ud83d cut"}\n')),
        Case("prepare-records-empty-object", "prepare", ["--data.input", str(d / "e.jsonl"), "--data.processed_dir",
                                                         str(d / "o")], "e.jsonl:1", lambda w, d: write(d / "e.jsonl", "{}\n")),
        Case("prepare-records-message-not-an-object", "prepare", ["--data.input", str(d / "c.jsonl"),
                                                                  "--data.processed_dir", str(d / "o")], "c.jsonl:1",
             lambda w, d: write(d / "c.jsonl", '{"messages": ["hello"]}\n')),
        Case("prepare-parquet-damaged", "prepare", ["--data.input", str(d / "r.parquet"), "--data.processed_dir",
                                                    str(d / "o")], "r.parquet",
             lambda w, d: write(d / "r.parquet", b"PAR1 not really parquet PAR1")),
        *(Case(f"prepare-mixture-weights-{name}", "prepare", ["--data.input", f"{d / 'a.jsonl'}, {d / 'b.jsonl'}",
              "--data.weights", weights, "--data.processed_dir", str(d / "o")], "data.weights")
          for name, weights in (("not-positive", "3, 0"), ("miscounted", "1"))),
        Case("prepare-mixture-of-texts", "prepare", ["--data.input", f"{d / 'a.txt'}, {d / 'b.txt'}", "--data.weights",
                                                     "1, 2", "--data.processed_dir", str(d / "o")], "data.weights",
             lambda w, d: (write(d / "a.txt", "some text\n" * 50), write(d / "b.txt", "more text\n" * 50))),
        Case("prepare-chat-template-fails", "prepare", ["--data.input", str(d / "chat.jsonl"), "--data.tokenizer", "hf",
                                                        "--data.tokenizer_path", str(d / "hf"), "--data.processed_dir",
                                                        str(d / "o")], "chat.jsonl:1",
             lambda w, d: chat_folder(d / "hf", "{{ raise_exception('this template takes no assistant turns') }}")),
        Case("prepare-chat-template-escapes", "prepare", ["--data.input", str(d / "chat.jsonl"), "--data.tokenizer", "hf",
                                                          "--data.tokenizer_path", str(d / "hf"), "--data.processed_dir",
                                                          str(d / "o")], "sandbox",
             lambda w, d: chat_folder(d / "hf", "{{ messages.__class__.__base__.__subclasses__() }}")),
        Case("prepare-chat-template-rewrites-answers", "prepare", ["--data.input", str(d / "chat.jsonl"),
                                                                   "--data.tokenizer", "hf", "--data.tokenizer_path",
                                                                   str(d / "hf"), "--data.processed_dir", str(d / "o")],
             "data.loss_on", lambda w, d: chat_folder(d / "hf", "{% for m in messages %}{{ m.role }}: "
                                                                "{{ m.content | upper }}\n{% endfor %}")),
        Case("prepare-out-is-a-file", "prepare", ["--data.input", str(text), "--data.processed_dir", str(d / "f")],
             "data.processed_dir", lambda w, d: write(d / "f", "mine")),
        Case("prepare-out-not-writable", "prepare", ["--data.input", str(text), "--data.processed_dir", NOT_A_FOLDER],
             "data.processed_dir"),
        # Never over the user's own files: the input's folder, the input file, splits no meta.json vouches for.
        Case("prepare-into-the-input-folder", "prepare", ["--data.input", str(d / "corpus"), "--data.processed_dir",
                                                          str(d / "corpus"), "--data.format", "txt"],
             "data.processed_dir", lambda w, d: [write(d / "corpus" / f"{s}.txt", f"my own {s} text\n" * 50)
                                                 for s in ("train", "val")]),
        Case("prepare-over-the-input-file", "prepare", ["--data.input", str(d / "my" / "train.txt"),
                                                        "--data.processed_dir", str(d / "my"), "--data.format", "txt"],
             "data.processed_dir", lambda w, d: write(d / "my" / "train.txt", "my own text\n" * 100)),
        Case("prepare-over-files-it-did-not-write", "prepare", ["--data.input", str(text), "--data.processed_dir",
                                                                str(d / "mine")], "train.txt",
             lambda w, d: write(d / "mine" / "train.txt", "my notes")),
        Case("prepare-val-fraction-range", "prepare", ["--data.val_fraction", "1.5"], "data.val_fraction"),
        Case("prepare-val-fraction-nan", "prepare", ["--data.val_fraction", "nan"], "data.val_fraction"),
        Case("prepare-bad-tokenizer", "prepare", ["--tokenizer", "words"], "data.tokenizer"),
        Case("prepare-unknown-encoding", "prepare", ["--data.input", str(text), "--tokenizer", "bpe",
                                                     "--data.bpe_encoding", "gpt5", "--data.processed_dir", str(d / "o")],
             "gpt5"),
        Case("prepare-one-character", "prepare", ["--data.input", str(d / "one.txt"), "--data.processed_dir", str(d / "o")],
             "one.txt", lambda w, d: write(d / "one.txt", "a")),
        Case("prepare-differently-without-force", "prepare", ["--data.input", str(text), "--data.processed_dir",
                                                              str(d / "data"), "--data.val_fraction", "0.2"],
             "data.val_fraction", lambda w, d: copy(data, d / "data")),
        Case("prepare-unknown-option", "prepare", ["--inptu", "x.txt"], "--inptu"),
        Case("prepare-model-setting", "prepare", ["--model.n_layer", "2"], "--model.n_layer"),
        Case("prepare-config-is-a-folder", "prepare", ["--config", str(w)], "--config"),
        Case("prepare-config-not-utf8", "prepare", ["--config", str(d / "p.toml")], "p.toml",
             lambda w, d: write(d / "p.toml", b"[data]\ninput = \"\xff\xfe\"\n")),
        Case("prepare-config-missing", "prepare", ["--config", str(d / "nope.toml")], "nope.toml"),
        # A second prepare.py into a folder in use waits for the first: tests/test_data.py.
        # train.py
        Case("train-overwrite-of-its-own-start", "train",
             tiny(d / "run", data, "--training.init_from", str(d / "run" / "ckpt_best.pt"), "--training.overwrite",
                  "--lora.rank", "2"), "training.init_from", lambda w, d: copy(run, d / "run")),
        Case("train-unknown-key", "train", ["--training.max_iter", "3"], "training.max_iter"),
        Case("train-wrong-type-in-preset", "train", ["--config", str(d / "p.toml")], "training.batch_size",
             lambda w, d: write(d / "p.toml", '[training]\nbatch_size = "64"\n')),
        Case("train-key-outside-any-section", "train", ["--config", str(d / "p.toml")],
             "batch_size is outside any section; put it under [training]",
             lambda w, d: write(d / "p.toml", 'batch_size = 64\n[training]\nmax_iters = 5\n')),
        Case("train-two-presets", "train", ["--config", str(ROOT / "configs/cpu/small.toml"), "--config",
                                            str(ROOT / "configs/cpu/smoke.toml")], "--config given twice"),
        Case("train-heads-do-not-divide", "train", ["--model.n_embd", "64", "--model.n_head", "5"], "model.n_head"),
        Case("train-out-dir-is-a-file", "train", tiny(d / "f", data), "training.out_dir", lambda w, d: write(d / "f", "x")),
        Case("train-out-dir-not-writable", "train", tiny(NOT_A_FOLDER, data), "training.out_dir"),
        Case("train-run-exists", "train", tiny(d / "run", data, "--training.resume", "false"), "training.out_dir",
             lambda w, d: copy(run, d / "run")),
        Case("train-rerun-with-other-settings", "train", tiny(d / "run", data, "--training.learning_rate", "0.5"),
             "training.learning_rate", lambda w, d: copy(run, d / "run")),
        Case("train-keep-last-zero", "train", tiny(d / "o", data, "--training.save_interval", "5",
                                                   "--training.keep_last", "0"), "training.keep_last"),
        Case("train-auto-resume-and-overwrite", "train", tiny(d / "r", data, "--training.resume", "auto",
                                                              "--training.overwrite"), "training.overwrite"),
        Case("train-tensorboard-missing", "train", tiny(d / "o", data, "--training.tensorboard"), "training.tensorboard",
             lambda w, d: mock.patch.dict(sys.modules, {"torch.utils.tensorboard": None})),
        Case("train-resume-without-checkpoint", "train", tiny(d / "empty", data, "--resume"), "ckpt_last.pt"),
        Case("train-resume-with-another-init-from", "train", tiny(d / "r", data, "--resume", "--training.init_from",
                                                                  str(run)), "training.init_from",
             lambda w, d: copy(run, d / "r")),
        Case("train-resume-and-overwrite", "train", tiny(d / "r", data, "--resume", "--training.overwrite"),
             "training.overwrite"),
        Case("train-init-from-missing", "train", tiny(d / "o", data, "--training.init_from", str(d / "nope.pt")),
             "training.init_from = '{d}/nope.pt' does not exist"),
        Case("sample-a-checkpoints-json", "sample", ["--ckpt", str(run / "ckpt_best.json")],
             "(a ckpt_*.json is the readable record beside one)"),
        Case("train-init-from-corrupt", "train", tiny(d / "o", data, "--training.init_from", str(d / "bad.pt")),
             "bad.pt", lambda w, d: write(d / "bad.pt", b"not a checkpoint")),
        Case("train-init-from-not-a-checkpoint", "train", tiny(d / "o", data, "--training.init_from", str(d / "t.pt")),
             "t.pt", lambda w, d: torch.save({"weights": torch.zeros(2)}, d / "t.pt")),
        Case("train-init-from-damaged-meta", "train", tiny(d / "o", data, "--training.init_from", str(d / "m.pt")),
             "m.pt", lambda w, d: resave(run / "ckpt_last.pt", d / "m.pt", meta={"tokenizer": "words"})),
        Case("train-init-from-nan-weights", "train", tiny(d / "o", data, "--training.init_from", str(d / "nan.pt")),
             "nan.pt", lambda w, d: resave(run / "ckpt_last.pt", d / "nan.pt", model=non_finite(run / "ckpt_last.pt"))),
        Case("train-resume-nan-weights", "train", tiny(d / "r", data, "--resume"), "ckpt_last.pt",
             lambda w, d: (copy(run, d / "r"), resave(run / "ckpt_last.pt", d / "r" / "ckpt_last.pt",
                                                      model=non_finite(run / "ckpt_last.pt")))),
        Case("sample-nan-weights", "sample", ["--ckpt", str(d / "nan.pt")], "nan.pt",
             lambda w, d: resave(run / "ckpt_last.pt", d / "nan.pt", model=non_finite(run / "ckpt_last.pt"))),
        Case("eval-nan-weights", "eval", ["--ckpt", str(d / "nan.pt"), "--text", str(text)], "nan.pt",
             lambda w, d: resave(run / "ckpt_last.pt", d / "nan.pt", model=non_finite(run / "ckpt_last.pt"))),
        Case("export-nan-weights", "export", ["--ckpt", str(d / "nan.pt"), "--out", str(d / "ex")], "nan.pt",
             lambda w, d: resave(run / "ckpt_last.pt", d / "nan.pt", model=non_finite(run / "ckpt_last.pt"))),
        Case("train-resume-negative-step", "train", tiny(d / "r", data, "--resume"), "ckpt_last.pt",
             lambda w, d: (copy(run, d / "r"), (d / "r" / "ckpt_best.pt").unlink(),
                           resave(run / "ckpt_last.pt", d / "r" / "ckpt_last.pt", step=-7))),
        Case("train-resume-without-optimizer", "train", tiny(d / "r", data, "--resume"), "ckpt_last.pt",
             lambda w, d: resave(run / "ckpt_last.pt", d / "r" / "ckpt_last.pt", optimizer=None)),
        Case("train-meta-wrong-types", "train", tiny(d / "o", d / "data"), "meta.json",
             lambda w, d: (copy(data, d / "data"), edit_json(d / "data" / "meta.json",
                                                             lambda m: m.update(vocab_size="65")))),
        Case("train-meta-bytes-damaged", "train", tiny(d / "o", d / "data"), "meta.json",
             lambda w, d: (copy(data, d / "data"), edit_json(d / "data" / "meta.json",
                                                             lambda m: m.update(bytes={"val": 0})))),
        Case("train-meta-repeated-chars", "train", tiny(d / "o", d / "data"), "meta.json",
             lambda w, d: (copy(data, d / "data"), edit_json(d / "data" / "meta.json",
                                                             lambda m: m.update(chars=m["chars"][:-1] + "a")))),
        Case("train-token-ids-beyond-the-vocabulary", "train", tiny(d / "o", d / "data"), "train.bin",
             lambda w, d: (copy(data, d / "data"), poke_token(d / "data" / "train.bin", 60000))),
        Case("train-meta-dtype-not-the-files", "train", tiny(d / "o", d / "data"), "train.bin",
             lambda w, d: (copy(data, d / "data"), edit_json(d / "data" / "meta.json",
                                                             lambda m: m.update(dtype="uint32")))),
        Case("train-diverged", "train", tiny(d / "o", data, "--training.learning_rate", "1e6", "--training.grad_clip",
                                             "0", "--training.warmup_iters", "0", "--training.eval_interval", "1",
                                             "--max-iters", "50"), "training.learning_rate"),
        Case("train-bin-odd-size", "train", tiny(d / "o", d / "data"), "train.bin",
             lambda w, d: (copy(data, d / "data"), open(d / "data" / "train.bin", "ab").write(b"\x00"))),
        Case("train-named-data-prepared-differently", "train", tiny(d / "o", d / "data", "--data.val_fraction", "0.3"),
             "data.val_fraction", lambda w, d: copy(data, d / "data")),
        Case("train-learning-rate-zero", "train", ["--training.learning_rate", "0", "--training.min_lr", "0"],
             "training.learning_rate"),
        Case("train-learning-rate-inf", "train", ["--training.learning_rate", "inf"], "training.learning_rate"),
        Case("train-min-lr-above-lr", "train", ["--training.min_lr", "0.1"], "training.min_lr"),
        Case("train-out-dir-in-use", "train", tiny(d / "busy", data), "training.out_dir",
             held_lock(lambda w, d: files.make_folder(d / "busy", "x") / ".lock")),
        Case("train-vocab-too-small", "train", tiny(d / "o", data, "--model.vocab_size", "10"), "model.vocab_size"),
        Case("train-doc-mask-on-char-data", "train", tiny(d / "o", data, "--data.doc_mask"), "data.doc_mask"),
        Case("train-block-longer-than-split", "train", tiny(d / "o", data, "--model.block_size", "200000"), "block_size"),
        Case("train-init-from-other-shape", "train", tiny(d / "o", data, "--model.n_embd", "64",
                                                           "--training.init_from", str(run)), "model.n_embd"),
        Case("train-out-of-memory", "train", tiny(d / "o", data, "--model.vocab_size", str(10**12)),
             "out of memory"),
        *([Case("train-no-cuda", "train", tiny(d / "o", data, "--device", "cuda"), "training.device"),
           Case("train-flex-on-cpu", "train", tiny(d / "o", data, "--model.attention", "flex"), "model.attention")]
          if not torch.cuda.is_available() else []),
        Case("prepare-bpe-offline", "prepare", ["--data.input", str(text), "--tokenizer", "bpe", "--data.bpe_encoding",
                                                "cl100k_base", "--data.processed_dir", str(d / "o")], "TIKTOKEN_CACHE_DIR",
             lambda w, d: offline_tiktoken(d / "cache")),
        # sample.py
        Case("sample-missing", "sample", ["--ckpt", str(d / "nope.pt")], "nope.pt"),
        Case("sample-folder-without-checkpoint", "sample", ["--ckpt", str(d / "empty")], "empty",
             lambda w, d: (d / "empty").mkdir()),
        Case("sample-corrupt", "sample", ["--ckpt", str(d / "bad.pt")], "bad.pt", lambda w, d: write(d / "bad.pt", b"x")),
        Case("sample-temperature-nan", "sample", ["--ckpt", str(run), "--temperature", "nan"], "--temperature"),
        Case("sample-top-p", "sample", ["--ckpt", str(run), "--top-p", "2"], "--top-p"),
        Case("sample-prompt-file-missing", "sample", ["--ckpt", str(run), "--start", f"FILE:{d / 'p.txt'}"], "p.txt"),
        Case("sample-unknown-characters", "sample", ["--ckpt", str(run), "--start", "héllo"], "prompt"),
        Case("sample-export-enormous-config", "sample", ["--ckpt", str(d / "x")], "model.n_layer",
             lambda w, d: (copy(native, d / "x"), edit_json(d / "x" / "config.json",
                                                             lambda c: c["model"].update(n_layer=10**6)))),
        Case("sample-export-wrong-type", "sample", ["--ckpt", str(d / "x")], "model.n_embd",
             lambda w, d: (copy(native, d / "x"), edit_json(d / "x" / "config.json",
                                                             lambda c: c["model"].update(n_embd="32")))),
        Case("sample-export-unknown-key", "sample", ["--ckpt", str(d / "x")], "model.n_heads",
             lambda w, d: (copy(native, d / "x"), edit_json(d / "x" / "config.json",
                                                             lambda c: c["model"].update(n_heads=2)))),
        Case("sample-export-missing-tensor", "sample", ["--ckpt", str(d / "x")], "transformer.ln_f.weight",
             lambda w, d: (copy(native, d / "x"), drop_tensor(d / "x" / "model.safetensors", "transformer.ln_f.weight"))),
        Case("sample-export-damaged-meta", "sample", ["--ckpt", str(d / "x")], "tokenizer_meta.json",
             lambda w, d: (copy(native, d / "x"), write(d / "x" / "tokenizer_meta.json", '{"tokenizer": 3}'))),
        Case("sample-export-config-not-json", "sample", ["--ckpt", str(d / "x")], "x",
             lambda w, d: (copy(hf, d / "x"), write(d / "x" / "config.json", "{oops"))),
        Case("sample-hf-enormous-vocab", "sample", ["--ckpt", str(d / "x")], "model.vocab_size",
             lambda w, d: (copy(hf, d / "x"), edit_json(d / "x" / "config.json",
                                                        lambda c: (c.pop("tinygpt"), c.update(vocab_size=10**12))))),
        Case("sample-hf-enormous-layers", "sample", ["--ckpt", str(d / "x")], "model.n_layer",
             lambda w, d: (copy(hf, d / "x"), edit_json(d / "x" / "config.json",
                                                        lambda c: (c.pop("tinygpt"), c.update(n_layer=10**9))))),
        Case("sample-hf-variant", "sample", ["--ckpt", str(d / "x")], "activation_function",
             lambda w, d: (copy(hf, d / "x"), edit_json(d / "x" / "config.json",
                                                         lambda c: (c.pop("tinygpt"), c.update(activation_function="relu"))))),
        # export.py
        Case("export-fp16-overflow", "export", ["--ckpt", str(d / "big.pt"), "--out", str(d / "o"), "--dtype", "fp16"],
             "--dtype bf16", lambda w, d: with_huge_weight(run / "ckpt_last.pt", d / "big.pt")),
        Case("export-no-out", "export", ["--ckpt", str(run)], "--out"),
        Case("export-force-over-a-downloaded-model", "export", ["--ckpt", str(run), "--out", str(d / "dl"), "--force"],
             "is not an export of tinygpt's", lambda w, d: edit_json(copy(hf, d / "dl") / "config.json",
                                                                     lambda c: c.pop("tinygpt"))),
        Case("sample-a-model-folder-without-config", "sample", ["--ckpt", str(d / "m")], "needs both config.json",
             lambda w, d: (copy(hf, d / "m") / "config.json").unlink()),
        Case("export-over-its-own-input", "export", ["--ckpt", str(d / "n"), "--out", str(d / "n"), "--force"],
             "is the --ckpt being exported", lambda w, d: copy(native, d / "n")),
        Case("export-adapters-as-gguf", "export", ["--ckpt", str(run), "--out", str(d / "a.gguf"), "--format", "gguf",
                                                   "--adapters-only"], "without --adapters-only"),
        Case("export-gguf-name-for-a-folder", "export", ["--ckpt", str(run), "--out", str(d / "m.gguf")],
             "add --format gguf"),
        Case("export-force-on-a-user-folder", "export", ["--ckpt", str(run), "--out", str(d / "notes"), "--force"],
             "notes", lambda w, d: write(d / "notes" / "keep.txt", "mine")),
        Case("export-over-an-export", "export", ["--ckpt", str(run), "--out", str(d / "ex")], "ex",
             lambda w, d: copy(native, d / "ex")),
        Case("export-out-not-writable", "export", ["--ckpt", str(run), "--out", NOT_A_FOLDER + "/ex"], "--out"),
        Case("export-bad-format", "export", ["--ckpt", str(run), "--out", str(d / "ex"), "--format", "onnx"],
             "--format"),
        Case("export-missing-source", "export", ["--ckpt", str(d / "nope"), "--out", str(d / "ex")], "nope"),
        # plot.py
        Case("plot-out-not-a-picture", "plot", [str(run), "--out", str(d / "curves.txt")], "--out"),
        # odd but legal arguments: a seed past 64 bits, bytes that are not UTF-8 (as Python gets them from
        # the command line: lone surrogates), a newline in a path
        Case("train-seed-beyond-64-bits", "train", tiny(d / "o", data, "--training.seed", str(2 ** 70)), "training.seed"),
        Case("train-out-dir-not-utf8", "train", tiny(d / "o\udcff", data), "training.out_dir"),
        Case("sample-prompt-not-utf8", "sample", ["--ckpt", str(run), "--start", "caf\udce9"], "--start"),
        Case("sample-path-with-a-newline", "sample", ["--ckpt", str(d / "a\nb")], "a\\nb"),
        # every script's output pointed at its input, at a folder of user files, at the run it starts from
        Case("train-out-dir-is-its-data", "train", tiny(d / "data", d / "data"), "data.processed_dir",
             lambda w, d: copy(data, d / "data")),
        Case("train-out-dir-holds-user-files", "train", tiny(d / "notes", data), "keep.txt",
             lambda w, d: write(d / "notes" / "keep.txt", "mine")),
        Case("train-into-the-run-it-starts-from", "train", tiny(d / "r", data, "--training.init_from", str(d / "r")),
             "training.init_from", lambda w, d: copy(run, d / "r")),
        Case("prepare-into-a-run", "prepare", ["--data.input", str(text), "--data.processed_dir", str(d / "r")],
             "ckpt_best.json", lambda w, d: copy(run, d / "r")),
        Case("prepare-into-user-files", "prepare", ["--data.input", str(text), "--data.processed_dir", str(d / "notes")],
             "keep.txt", lambda w, d: write(d / "notes" / "keep.txt", "mine")),
        Case("export-over-its-run", "export", ["--ckpt", str(run), "--out", str(run), "--force"], str(run)),
        Case("export-over-the-data", "export", ["--ckpt", str(run), "--out", str(data), "--force"], str(data)),
        Case("export-over-a-text-file", "export", ["--ckpt", str(run), "--out", str(text), "--force"], str(text)),
        Case("plot-over-its-log", "plot", [str(run), "--out", str(run / "train_log.json")], "train_log.json"),
        Case("plot-over-a-users-picture", "plot", [str(run), "--out", str(d / "mine.png")], "mine.png",
             lambda w, d: write(d / "mine.png", b"\x89PNG not ours")),
        Case("plot-out-is-a-folder", "plot", [str(run), "--out", str(d / "notes")], "notes",
             lambda w, d: write(d / "notes" / "keep.txt", "mine")),
        Case("bench-json-over-a-users-file", "bench", ["--what", "prepare", "--json", str(d / "notes.json")],
             "notes.json", lambda w, d: write(d / "notes.json", '{"mine": 1}')),
        Case("plot-missing-log", "plot", [str(d / "nope.json")], "nope.json"),
        Case("plot-not-json", "plot", [str(d / "log.json")], "log.json", lambda w, d: write(d / "log.json", "{oops")),
        Case("plot-no-log", "plot", [], "train_log.json"),
        Case("plot-bad-axis", "plot", [str(run), "--x", "time"], "--x"),
        Case("plot-watch-and-show", "plot", [str(run), "--watch", "--show"], "--watch"),
        # eval.py
        Case("eval-no-text", "eval", ["--ckpt", str(run)], "--text"),
        Case("eval-task-options-with-text", "eval", ["--ckpt", str(run), "--text", str(text), "--limit", "3"],
             "--limit and --max-new-tokens are for --task"),
        Case("eval-task-of-texts", "eval", ["--ckpt", str(run), "--task", str(d / "t.jsonl")], "--task",
             lambda w, d: write(d / "t.jsonl", '{"text": "First Citizen"}\n')),
        Case("eval-task-without-the-answer", "eval", ["--ckpt", str(d / "hf"), "--task", str(d / "q.jsonl")],
             "q.jsonl:1", lambda w, d: (chat_folder(d / "hf", "{% for m in messages %}{{ m.content }}{% endfor %}"),
                                        write(d / "q.jsonl", '{"messages": [{"role": "user", "content": "2+2?"}]}\n'))),
        Case("chat-without-a-chat-template", "chat", ["--ckpt", str(run), "--device", "cpu"], "chat template"),
        Case("eval-empty-text", "eval", ["--ckpt", str(run), "--text", str(d / "e.txt")], "e.txt",
             lambda w, d: write(d / "e.txt", "")),
        Case("eval-unknown-characters", "eval", ["--ckpt", str(run), "--text", str(d / "n.txt")], "n.txt",
             lambda w, d: write(d / "n.txt", "café au lait, très chaud")),
        Case("eval-stride-too-long", "eval", ["--ckpt", str(run), "--text", str(text), "--stride", "300"], "--stride"),
        Case("eval-text-missing", "eval", ["--ckpt", str(run), "--text", str(d / "nope.txt")], "nope.txt"),
        # train.py's profiler window
        Case("train-profile-window-reversed", "train", ["--training.profile_start_step", "5",
                                                        "--training.profile_end_step", "3"], "training.profile_end_step"),
        Case("train-profile-window-past-the-end", "train", ["--max-iters", "100", "--training.profile_start_step", "5",
                                                            "--training.profile_end_step", "200"],
             "training.profile_end_step"),
        Case("train-sample-prompt-unknown-characters", "train", tiny(d / "o", data, "--training.sample_tokens", "5",
                                                                     "--training.sample_prompt", "é"),
             "training.sample_prompt"),
        # LoRA
        Case("lora-without-init-from", "train", tiny(d / "o", data, "--lora.rank", "2"), "training.init_from"),
        Case("lora-unknown-target", "train", tiny(d / "o", data, "--training.init_from", str(run), "--lora.rank", "2",
                                                  "--lora.targets", "attn.c_fc"), "lora.targets"),
        Case("lora-rank-too-large", "train", tiny(d / "o", data, "--training.init_from", str(run), "--lora.rank", "64"),
             "lora.rank"),
        Case("lora-alpha-zero", "train", tiny(d / "o", data, "--training.init_from", str(run), "--lora.rank", "2",
                                              "--lora.alpha", "0"), "lora.alpha"),
        Case("lora-base-gone", "sample", ["--ckpt", str(d / "lora")], "base", lambda w, d: lora_run(w, d, delete_base=True)),
        Case("lora-base-changed", "sample", ["--ckpt", str(d / "lora")], "base",
             lambda w, d: (lora_run(w, d, delete_base=False), change_weights(d / "base" / "ckpt_best.pt"),
                           change_weights(d / "base" / "ckpt_last.pt"))),
        Case("lora-adapters-only-onto-a-native-base", "export", ["--ckpt", str(d / "lora"), "--out", str(d / "a"),
                                                                 "--adapters-only"], "--adapters-only",
             lambda w, d: lora_run(w, d, delete_base=False)),
        Case("lora-adapters-only-of-a-full-run", "export", ["--ckpt", str(run), "--out", str(d / "a"), "--adapters-only"],
             "--adapters-only"),
        # Hugging Face folders and GGUF files from elsewhere
        Case("hf-missing-shard", "sample", ["--ckpt", str(d / "shards")], "model-00002-of-00002.safetensors",
             lambda w, d: shard_with_one_missing(w / "hf", d / "shards")),
        Case("hf-tokenizer-larger-than-the-model", "sample", ["--ckpt", str(d / "hf")], "tokenizer",
             lambda w, d: with_tokenizer_json(copy(w / "hf", d / "hf"), 100)),
        Case("hf-model-type-we-do-not-read", "sample", ["--ckpt", str(d / "hf")], "mixtral",
             lambda w, d: edit_json(copy(w / "hf", d / "hf") / "config.json",
                                    lambda c: c.update(model_type="mixtral", tinygpt=None))),
        Case("hf-config-field-of-the-wrong-type", "sample", ["--ckpt", str(d / "hf")], "config.json",
             lambda w, d: edit_json(copy(w / "hf", d / "hf") / "config.json",
                                    lambda c: c.update(rope_scaling="linear", tinygpt=None))),
        Case("hf-export-source-not-an-object", "sample", ["--ckpt", str(d / "hf")], "config.json",
             lambda w, d: edit_json(copy(w / "hf", d / "hf") / "config.json", lambda c: c["tinygpt"].update(source="x"))),
        Case("hf-shard-outside-its-folder", "sample", ["--ckpt", str(d / "shards")], "model.safetensors.index.json",
             lambda w, d: shard_outside(w / "hf", d / "shards")),
        Case("hf-tokenizer-config-eos-of-the-wrong-type", "sample", ["--ckpt", str(d / "hf")], "tokenizer_config.json",
             lambda w, d: (with_tokenizer_json(copy(w / "hf", d / "hf"), 50),
                           write(d / "hf" / "tokenizer_config.json", '{"eos_token": 7}'))),
        Case("gguf-not-gguf", "sample", ["--ckpt", str(d / "model.gguf")], "model.gguf",
             lambda w, d: write(d / "model.gguf", b"not a GGUF file at all")),
        Case("prepare-hf-tokenizer-without-path", "prepare", ["--data.input", str(text), "--tokenizer", "hf",
                                                              "--data.processed_dir", str(d / "o")], "data.tokenizer_path"),
        # the Llama-style switches
        Case("llama-rope-theta", "train", ["--model.arch", "llama", "--model.rope_theta", "0"], "model.rope_theta"),
        Case("llama-odd-head-size", "train", ["--model.arch", "llama", "--model.n_embd", "30", "--model.n_head", "2"],
             "model.n_head"),
        Case("llama-hf-export-of-a-switch", "export", ["--ckpt", str(d / "run"), "--out", str(d / "hf"), "--format", "hf"],
             "model.logit_softcap", lambda w, d: quiet_train(tiny(d / "run", w / "data", "--model.arch", "llama",
                                                                  "--model.logit_softcap", "30", "--max-iters", "1"))),
        Case("llama-resume-with-another-arch", "train", tiny(d / "run", data, "--model.arch", "llama", "--resume"),
             "model.arch", lambda w, d: copy(run, d / "run")),
        # sharded training
        Case("train-fsdp-in-one-process", "train", tiny(d / "o", data, "--training.parallel", "fsdp"),
             "training.parallel"),
        # bench.py
        *([Case("bench-gpu-without-cuda", "bench", ["--what", "gpu"], "--what gpu")]
          if not torch.cuda.is_available() else []),
        Case("bench-bad-what", "bench", ["--what", "nope"], "--what"),
        Case("bench-misspelt-option", "bench", ["--stpes", "3"], "--stpes"),
    ]


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """What the cases start from: a text, its prepared data, a short run, and its two exports."""
    w = tmp_path_factory.mktemp("world")
    (w / "text.txt").write_text((ROOT / "data/shakespeare/input.txt").read_text()[:20000])
    prepare_text(w / "text.txt", w / "data")
    with contextlib.redirect_stdout(io.StringIO()):
        assert train.cli(tiny(w / "run", w / "data")) == 0
        export.export(w / "run", w / "native")
        export.export(w / "run", w / "hf", "hf")
    return w


def run_script(script: str, argv: list[str], cwd: Path) -> tuple[int | None, str]:
    """One script's command line, run in this process in `cwd`: (its exit status, or None when an
    exception escaped; its stderr, or the traceback)."""
    stderr, here = io.StringIO(), os.getcwd()
    os.chdir(ROOT if script == "bench" else cwd)  # bench.py reads the shipped presets
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            return SCRIPTS[script](argv), stderr.getvalue()
    except BaseException:
        return None, traceback.format_exc()
    finally:
        os.chdir(here)


def set_up(case: Case, w: Path, d: Path) -> tuple[list[str], contextlib.AbstractContextManager]:
    """The case's command line in its folder `d`, and what its set-up holds while it runs (a lock...)."""
    held = case.setup(w, d) if case.setup else None
    managed = isinstance(held, contextlib.AbstractContextManager) and not isinstance(held, Path)
    return [a.replace("{d}", str(d)) for a in case.argv], held if managed else contextlib.nullcontext()


@pytest.fixture(scope="session")
def results(world, tmp_path_factory) -> dict[str, dict]:
    """Run every case once: {id: {"code", "stderr", "changed"}}."""
    out = {}
    for case in cases(world):
        d = tmp_path_factory.mktemp(case.id)
        argv, held = set_up(case, world, d)
        before = snapshot(world, d)
        with held:
            code, stderr = run_script(case.script, argv, d)
        after = snapshot(world, d)
        out[case.id] = {"code": code, "stderr": stderr, "names": case.names.replace("{d}", str(d)),
                        "changed": sorted(p for p in before if before[p] != after.get(p))}
    return out


CASE_IDS = [c.id for c in cases(Path("w"))]


def test_there_are_enough_cases():
    assert len(CASE_IDS) == len(set(CASE_IDS)) >= 60


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_each_fault_is_one_line_naming_what_to_fix(results, case_id):
    r = results[case_id]
    assert r["code"] is not None, f"an exception escaped:\n{r['stderr']}"
    assert r["code"] == 2, (r["code"], r["stderr"])
    lines = r["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r["stderr"]
    assert "Traceback" not in r["stderr"]
    assert r["names"] in lines[0], (r["names"], lines[0])
    assert not r["changed"], f"files changed: {r['changed']}"


def test_documented_common_errors_are_what_the_programs_print(results):
    """Each message quoted in docs/errors.md's table (`...` stands for an omitted part) is printed by a case."""
    section = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")
    quoted = [m for m in re.findall(r"^\| `(error: [^`]*)` \|", section, re.MULTILINE)]
    assert len(quoted) >= 20, f"only {len(quoted)} quoted messages in docs/errors.md"
    printed = [r["stderr"].strip() for r in results.values()]
    missing = []
    for message in quoted:
        pattern = ".*".join(re.escape(part) for part in message.split("..."))
        if not any(re.fullmatch(pattern, p, re.DOTALL) for p in printed):
            missing.append(message)
    assert not missing, "docs/errors.md messages no case prints:\n" + "\n".join(missing)
