"""Speed: training steps (train.py itself, and the plainest eager loop beside it), sampling with and
without the KV cache, data preparation (text, and records with its memory), and a profile of where a
training step's time goes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import prepare
from benchmarks.common import (CORPUS, ROOT, BenchOptions, configured, model_for, precisions, timed,
                               trainer_step_ms)
from config import Config, DataConfig
from errors import DataError, UserError
from tokenizer import BPETokenizer, split_safely
from generate import generate
from lora import add_adapters
from monitor import estimate_mfu
from runtime import autocast, peak_flops, profile_table, profiler


def plain_loop(cfg: Config, device: str, precision: str = "fp32"):
    """The plainest eager PyTorch training step over the same model and batch size (and LoRA adapters, with
    lora.rank > 0): a function that runs one step. fp32, or bf16 autocast for the profile."""
    model = model_for(cfg).to(device)
    if cfg.lora.rank:  # random weights of init_from's shape: the same work per step as its fine-tune
        add_adapters(model, cfg.lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    t = cfg.training
    x = torch.randint(model.config.vocab_size, (t.batch_size, model.config.block_size), device=device)

    def step():
        for _ in range(t.grad_accum_steps):
            with autocast(torch.device(device).type, precision):
                _, loss = model(x, x)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # wait for the device, as the trainer does
    return step


def bench_train(opts: BenchOptions, cfg: Config, device: str) -> list[dict]:
    """ms per step of train.py at each precision the device has (and MFU on a known GPU), and of the
    plain loop in fp32."""
    tokens = configured(cfg).tokens_per_step()
    peak, rows = peak_flops(device), []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in precisions(torch.device(device).type):
            ms = trainer_step_ms(opts, cfg, device, precision, f"{tmp}/{precision}")
            row = {"bench": "train", "what": f"trainer {precision}", "ms_per_step": ms,
                   "tokens_per_s": tokens * 1000 / ms}
            if peak:
                row["mfu"] = estimate_mfu(model_for(cfg), row["tokens_per_s"], peak)
                row["peak"] = f"{peak / 1e12:.0f} TFLOP/s bf16 dense ({torch.cuda.get_device_name()})"
            rows.append(row)
    ms = 1000 * timed(plain_loop(cfg, device), opts.steps, opts.warmup)
    rows.append({"bench": "train", "what": "plain eager loop fp32", "ms_per_step": ms,
                 "tokens_per_s": tokens * 1000 / ms})
    return rows


def bench_sample(opts: BenchOptions, cfg: Config, device: str, new_tokens: int = 500) -> list[dict]:
    """Greedy generation of 500 tokens, with the KV cache and without."""
    model = model_for(cfg, "--model.dropout", "0").to(device).eval()
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    rows = []
    for use_cache in (True, False):
        s = timed(lambda: generate(model, prompt, new_tokens, temperature=0, use_cache=use_cache), opts.repeats, 1)
        rows.append({"bench": "sample", "what": f"{new_tokens} tokens, {'KV cache' if use_cache else 'no cache'}",
                     "seconds": s, "tokens_per_s": new_tokens / s})
    rows.append({"bench": "sample", "what": "KV cache speed-up", "ratio": rows[1]["seconds"] / rows[0]["seconds"]})
    return rows


def bench_prepare(opts: BenchOptions, cfg: Config, device: str, target_mb: int = 50) -> list[dict]:
    """prepare.py on 50 MB of the shipped corpus, char and bpe, and tiktoken alone on the same text."""
    text = Path(CORPUS).read_text(encoding="utf-8")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.txt"
        copies = max(1, round(target_mb * 1e6 / len(text.encode())))
        big.write_text(text * copies, encoding="utf-8")
        mb = big.stat().st_size / 1e6
        for tokenizer in ("char", "bpe"):
            runs = iter(range(opts.repeats))  # each run prepares into a folder of its own
            try:
                s = timed(lambda: prepare.prepare(DataConfig(input=str(big), tokenizer=tokenizer,
                                                             processed_dir=f"{tmp}/{tokenizer}{next(runs)}"),
                                                  progress=False), opts.repeats)
            except DataError as e:
                print(f"skipping bpe preparation: {e}", file=sys.stderr)
                continue
            rows.append({"bench": "prepare", "what": f"prepare.py {tokenizer}, {mb:.0f} MB", "seconds": s,
                         "mb_per_s": mb / s})
    try:  # tiktoken's own batched encoding of the same text on the same threads: the floor for bpe
        tok = BPETokenizer("gpt2")
    except DataError:
        return rows
    pieces = split_safely(text * copies)
    s = timed(lambda: tok.enc.encode_ordinary_batch(pieces, num_threads=os.cpu_count() or 1), opts.repeats)
    rows.append({"bench": "prepare", "what": f"tiktoken encode_ordinary_batch, {mb:.0f} MB", "seconds": s,
                 "mb_per_s": mb / s})
    return rows


def bench_records(opts: BenchOptions, cfg: Config, device: str, target_mb: int = 200) -> list[dict]:
    """prepare.py on 200 MB of JSONL prompt/completion pairs (consecutive lines of the shipped corpus), GPT-2
    BPE with the loss on the completions: its time and the peak memory (RSS) of its process."""
    lines = [line for line in Path(CORPUS).read_text(encoding="utf-8").splitlines() if line]
    pairs = "".join(json.dumps({"prompt": a + "\n", "completion": b + "\n"}) + "\n" for a, b in zip(lines, lines[1:]))
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "pairs.jsonl"
        big.write_text(pairs * max(1, round(target_mb * 1e6 / len(pairs.encode()))), encoding="utf-8")
        mb = big.stat().st_size / 1e6
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "prepare.py", "--data.input", str(big), "--data.tokenizer", "bpe",
                                 "--data.processed_dir", f"{tmp}/prepared"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)  # this process's own peak RSS (KB on Linux), not another child's
        proc.returncode, seconds = os.waitstatus_to_exitcode(status), time.perf_counter() - start
        if proc.returncode != 0:
            last = (err.decode(errors="replace").strip().splitlines() or [""])[-1]  # its error line
            raise UserError(f"--what records: prepare.py failed (exit {proc.returncode}): {last}")
    return [{"bench": "records", "what": f"prepare.py, {mb:.0f} MB of JSONL pairs, bpe", "seconds": seconds,
             "mb_per_s": mb / seconds, "peak_rss_mb": usage.ru_maxrss / 1024}]


def bench_profile(opts: BenchOptions, cfg: Config, device: str, top: int = 12) -> list[dict]:
    """torch.profiler over opts.steps plain-loop steps at each precision: the operators that take
    the most time, printed as tables (nothing added to the results table)."""
    for precision in precisions(torch.device(device).type):
        step = plain_loop(cfg, device, precision)
        for _ in range(opts.warmup):
            step()
        with profiler(device) as prof:
            for _ in range(opts.steps):
                step()
        print(f"\nprofile: {opts.steps} steps, {precision}, {cfg.preset}")
        print(profile_table(prof, device, top))
    return []
