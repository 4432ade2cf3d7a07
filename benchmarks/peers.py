"""Against what people would use otherwise, on the same real model: LoRA fine-tuning with a plain
transformers + PEFT loop, and generation with transformers' generate. The same weights (a Hugging Face
folder), batches, length, LoRA rank and targets, and precision on both sides; each side's training in a
fresh process of its own, which reports its ms per step and its peak memory, the two sides taking turns:

    python bench.py --what peft --config configs/finetune/smollm2_lora.toml
    python bench.py --what peft --config configs/finetune/smollm2_lora.toml --training.compile true
    python -m benchmarks.peers ours|peft WARMUP TRAIN_ARGS...    # one side, as bench.py runs it
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import export
import prepare
import train
from benchmarks.common import ROOT, BenchOptions, precisions, preset_argv, quiet, timed
from benchmarks.finetune import peak_rss, restart_peak_rss
from checkpoint import load_model
from config import Config, ConfigError
from data import get_batch, load_tokens
from errors import UserError
from generate import generate
from options import load_config
from runtime import autocast
from tokenizer import hf_tokenizer_meta

GENERATED = 256  # tokens per greedy generation


def bench_peft(opts: BenchOptions, cfg: Config, device: str) -> list[dict]:
    """ms per LoRA step (median after the warm-up steps) and peak RSS, ours against transformers + PEFT, at
    each precision the device has, the two sides' processes taking turns --repeats times; then greedy
    generation of 256 tokens with the KV cache, ms per token."""
    if cfg.lora.rank == 0 or not cfg.training.init_from:
        raise ConfigError("--what peft compares LoRA on a pretrained model: give a config with lora.rank > 0 and "
                          "training.init_from, e.g. --config configs/finetune/smollm2_lora.toml")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = export.export(cfg.training.init_from, Path(tmp) / "hf", "hf")  # both sides read the same folder
        ours_name = "tinygpt" + (", compiled" if cfg.training.compile else "")
        names = {"ours": ours_name, "peft": "transformers + PEFT"}
        for precision in precisions(torch.device(device).type):
            runs = {side: [] for side in names}
            for turn in range(opts.repeats):  # A B A B ...: a slower spell of the machine hits both sides
                for side in names:
                    argv = preset_argv(cfg, "--device", device, "--training.precision", precision,
                                       "--training.init_from", str(folder),
                                       "--max-iters", str(opts.warmup + opts.steps), "--training.log_interval", "1",
                                       "--training.eval_interval", str(10**9), "--training.eval_batches", "1",
                                       "--training.out_dir", f"{tmp}/{side}_{precision}_{turn}")
                    runs[side].append(one_side(side, names[side], opts.warmup, argv))
            for side, name in names.items():
                rows.append({"bench": "peft", "what": f"LoRA {name}, {precision}",
                             "ms_per_step": statistics.median(r["ms_per_step"] for r in runs[side]),
                             "peak_rss_mb": max(r["peak_rss"] for r in runs[side]) / 2**20})
            pairs = [theirs["ms_per_step"] / ours["ms_per_step"] for ours, theirs in zip(runs["ours"], runs["peft"])]
            turns = ", ".join(f"{r:.2f}x" for r in pairs)
            rows.append({"bench": "peft", "what": f"LoRA speed: {ours_name} / transformers + PEFT, {precision}",
                         "ratio": statistics.median(pairs), "result": f"each turn: {turns}"})
        rows += generation(opts, folder, device)
    return rows


def one_side(side: str, name: str, warmup: int, argv: list[str]) -> dict:
    """One side's training in a fresh process (this module run as a script): its ms per step and peak RSS."""
    r = subprocess.run([sys.executable, "-m", "benchmarks.peers", side, str(warmup), *argv], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        raise UserError(f"--what peft: the {name} run failed (exit {r.returncode}); its output is above")
    return json.loads(r.stdout.rsplit("result: ", 1)[1])


def generation(opts: BenchOptions, folder: Path, device: str) -> list[dict]:
    """Greedy generation of GENERATED tokens after an 8-token prompt, the two taking turns (--repeats
    times each, the median counting), and whether they give the same tokens."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    ours, _ = load_model(folder, device)
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    prompt = torch.randint(0, ours.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)
    plain = GenerationConfig(eos_token_id=None, pad_token_id=0, max_new_tokens=GENERATED, do_sample=False)
    sides = {"tinygpt": lambda: generate(ours, prompt, GENERATED, temperature=0),  # no end of sequence: all GENERATED
             "transformers": lambda: theirs.generate(prompt, generation_config=plain)}
    same = torch.equal(sides["tinygpt"](), sides["transformers"]())
    times = {name: [] for name in sides}
    for _ in range(opts.repeats):  # in turns, so that a slower spell of the machine hits both
        for name, run in sides.items():
            times[name].append(timed(run, 1))
    ms = {name: 1000 * statistics.median(t) / GENERATED for name, t in times.items()}
    return [{"bench": "peft", "what": f"generate {GENERATED} tokens, {name}", "ms_per_token": ms[name]}
            for name in sides] + [{"bench": "peft", "what": "generation speed: tinygpt / transformers", "ratio":
                                   ms["transformers"] / ms["tinygpt"], "result": f"same tokens: {same}"}]


# ----------------------------------------------------------------------------- one side, in its own process

def ours(warmup: int, argv: list[str]) -> float:
    """train.py's own LoRA steps: ms per step from its log, after `warmup` steps."""
    cfg = load_config(argv)
    quiet(train.main, cfg)
    records = json.loads((Path(cfg.training.out_dir) / "train_log.json").read_text())["train"]
    return statistics.median(r["ms_per_step"] for r in records[warmup:])


def peft(warmup: int, argv: list[str]) -> float:
    """The plain loop: transformers' model from the same folder, PEFT's LoRA on the same projections, the
    same batches, AdamW (fused) with gradient clipping, autocast at the same precision."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = load_config(argv)
    t, device = cfg.training, cfg.training.device if cfg.training.device != "auto" else "cpu"
    model = AutoModelForCausalLM.from_pretrained(t.init_from, dtype=torch.float32).to(device)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                             target_modules=targets)).train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=t.learning_rate, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay,
                                  fused=True)
    folder, meta = quiet(prepare.ensure_prepared, cfg.data, hf_tokenizer_meta(t.init_from))  # what ours trained on
    tokens = load_tokens(folder, "train", meta)
    times = []
    for step in range(t.max_iters):
        start = time.perf_counter()
        x, y = get_batch(tokens, cfg.model.block_size, t.batch_size, ("train", t.seed, step), device)
        with autocast(torch.device(device).type, t.precision):
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[warmup:])


if __name__ == "__main__":
    restart_peak_rss()
    side, warmup, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    ms = {"ours": ours, "peft": peft}[side](warmup, args)
    print("result: " + json.dumps({"ms_per_step": ms, "peak_rss": peak_rss()}))
