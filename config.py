"""Typed configuration: dataclass sections with defaults, TOML presets, CLI overrides.

Every field has a type, a default and a one-line doc (the `doc` metadata); `--help`
and the README's config reference are generated from them, so they cannot drift.
Precedence: command line > TOML preset > defaults here.

    python train.py --config configs/cpu/smoke.toml --training.max_iters=50
    python train.py --help
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib


def doc(text: str, default, choices: tuple | None = None, minimum: float | None = None,
        positive: bool = False):
    """A dataclass field with a one-line doc and its allowed values."""
    return field(default=default, metadata={"doc": text, "choices": choices,
                                            "minimum": minimum, "positive": positive})


@dataclass
class DataConfig:
    input: str = doc("text file or folder of text files to train on", "data/shakespeare/input.txt")
    processed_dir: str = doc("where prepared data lives; empty: data/processed/<corpus>_<tokenizer>", "")
    tokenizer: str = doc("char: one token per character; bpe: a tiktoken encoding", "char",
                         choices=("char", "bpe"))
    bpe_encoding: str = doc("tiktoken encoding name used when tokenizer = bpe", "gpt2")
    val_fraction: float = doc("fraction of the corpus held out for validation", 0.1, minimum=0.0)
    doc_mask: bool = doc("attend only within a document (flex attention, bpe data with end-of-text)", False)


@dataclass
class ModelConfig:
    n_layer: int = doc("number of transformer blocks", 6, positive=True)
    n_head: int = doc("attention heads per block; must divide n_embd", 6, positive=True)
    n_embd: int = doc("width of the residual stream", 384, positive=True)
    block_size: int = doc("context length in tokens", 256, positive=True)
    dropout: float = doc("dropout probability in training (0 disables it)", 0.2, minimum=0.0)
    bias: bool = doc("biases in Linear and LayerNorm layers, as in GPT-2", True)
    attention: str = doc("attention backend", "sdpa", choices=("eager", "sdpa", "flex"))
    vocab_size: int = doc("vocabulary size; 0: taken from the prepared data", 0, minimum=0)
    pad_vocab_multiple: int = doc("pad the embedding table to a multiple of this (1: no padding)", 1,
                                  positive=True)

    def problems(self) -> list[str]:
        """Rules that involve more than one field (single-field rules live in the metadata)."""
        out = []
        if self.n_head > 0 and self.n_embd % self.n_head != 0:
            out.append(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"model.dropout = {self.dropout} is not allowed: use a value in [0, 1)")
        return out


@dataclass
class TrainingConfig:
    device: str = doc("where to train", "auto", choices=("auto", "cpu", "cuda", "mps"))
    precision: str = doc("fp32, or autocast in fp16/bf16 (fp16 uses a GradScaler)", "fp32",
                         choices=("fp32", "fp16", "bf16"))
    data_format: str = doc("txt: tokenize text splits at load; bin: memory-mapped token files", "bin",
                           choices=("txt", "bin"))
    batch_size: int = doc("sequences per micro-batch", 64, positive=True)
    grad_accum_steps: int = doc("micro-batches per optimizer step (global, across all processes)", 1,
                                positive=True)
    max_iters: int = doc("optimizer steps to run", 5000, positive=True)
    learning_rate: float = doc("peak learning rate", 1e-3, positive=True)
    min_lr: float = doc("learning rate at the end of the decay", 1e-4, minimum=0.0)
    warmup_iters: int = doc("steps of linear warmup from 0 to learning_rate", 100, minimum=0)
    lr_schedule: str = doc("decay after warmup", "cosine", choices=("cosine", "linear", "constant"))
    weight_decay: float = doc("AdamW weight decay, applied to matrices only", 0.1, minimum=0.0)
    beta1: float = doc("AdamW beta1", 0.9, minimum=0.0)
    beta2: float = doc("AdamW beta2", 0.99, minimum=0.0)
    grad_clip: float = doc("clip the global gradient norm to this (0 disables)", 1.0, minimum=0.0)
    eval_interval: int = doc("evaluate every this many steps (and at the last step)", 250, positive=True)
    eval_iters: int = doc("batches per split in each evaluation", 200, positive=True)
    log_interval: int = doc("print a log line every this many steps", 10, positive=True)
    seed: int = doc("seed for weights and batches", 1337, minimum=0)
    compile: bool = doc("torch.compile the model", False)
    early_stopping: bool = doc("stop when val loss stops improving", False)
    early_stopping_patience: int = doc("evaluations without improvement before stopping", 5, positive=True)
    early_stopping_min_delta: float = doc("smallest val-loss decrease that counts as improvement", 0.0,
                                          minimum=0.0)
    save_best: bool = doc("write ckpt_best.pt whenever val loss improves", True)
    out_dir: str = doc("folder for checkpoints, train_log.json and config.json", "checkpoints")
    resume: str = doc('continue a run: "false", "auto" (out_dir/ckpt_last.pt) or a checkpoint path', "false")
    init_from: str = doc("start from these weights (checkpoint or exported folder); empty: random", "")

    def problems(self) -> list[str]:
        out = []
        if self.min_lr > self.learning_rate:
            out.append(f"training.min_lr ({self.min_lr}) must not exceed training.learning_rate "
                       f"({self.learning_rate})")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            out.append(f"training.beta1/beta2 ({self.beta1}, {self.beta2}) must be in [0, 1)")
        return out


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def problems(self) -> list[str]:
        out = self.model.problems() + self.training.problems()
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}
