"""Every setting: typed dataclass sections, each field with a default, a one-line doc and its allowed
values (`choices`, or an interval `within`), and the rules that involve several fields.

`--help` and docs/configuration.md's reference are generated from these fields (options.py reads presets
and the command line into them), so they cannot drift, and every rule about a setting is checked
here, once: `validate`. Precedence: command line > TOML preset > the defaults here.

    python train.py --config configs/cpu/smoke.toml --training.max_iters=50
    python train.py --help
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from errors import UserError


def doc(text: str, default, choices: tuple | None = None, within: str | None = None,
        positional: bool = False):
    """A dataclass field with a one-line doc and its allowed values: `choices`, or an interval such
    as "[0, 1)" or "[1, inf)". `positional`: a list option that takes the arguments without a flag."""
    meta = {"doc": text, "choices": choices, "within": within, "positional": positional}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def inputs_of(input_path: str) -> list[str]:
    """data.input's inputs: one, or several separated by commas (a mixture: data.weights). A file whose
    name holds a comma is one input."""
    if "," not in input_path or Path(input_path).exists():
        return [input_path]
    return [p.strip() for p in input_path.split(",") if p.strip()] or [input_path]


@dataclass
class DataConfig:
    input: str = doc("what to train on: a text file, records (.jsonl, .json, .parquet: docs/records.md), or a folder "
                     "or glob pattern of either; several, separated by commas: mixed (data.weights)",
                     "data/shakespeare/input.txt")
    weights: str = doc("several inputs of records: each one's share of the train split's records, e.g. \"3, 1\" "
                       "(a smaller input's records repeat); empty: each record once", "")
    processed_dir: str = doc("where prepared data lives; empty: data/processed/<corpus>_<tokenizer>", "")
    tokenizer: str = doc("char: one token per character; bpe: a tiktoken encoding; hf: the tokenizer.json of a "
                         "Hugging Face model (data.tokenizer_path); train-bpe: a byte-level BPE learned from the "
                         "input",
                         "char", choices=("char", "bpe", "hf", "train-bpe"))
    vocab_size: int = doc("tokenizer = train-bpe: the vocabulary to learn (the 256 bytes, an end-of-text token, "
                          "ChatML's two markers, and merges)", 4096, within="[259, inf)")
    tokenizer_path: str = doc("tokenizer = hf: the folder holding tokenizer.json, or a GGUF file (training.init_from's "
                              "goes without saying)", "")
    bpe_encoding: str = doc("tiktoken encoding name used when tokenizer = bpe", "gpt2")
    val_fraction: float = doc("fraction of the corpus held out for validation", 0.1, within="(0, 1)")
    format: str = doc("bin: memory-mapped token files; txt: text splits, tokenized when loaded", "bin",
                      choices=("bin", "txt"))
    loss_on: str = doc("records of prompt and completion, or conversations: answers trains on the completions and the "
                       "assistant's turns only, all on every token", "answers", choices=("answers", "all"))
    long_records: str = doc("pairs and conversations longer than model.block_size: cut (their start: trained on "
                            "their last block_size tokens, where the answer is) or drop (never drawn)", "cut",
                            choices=("cut", "drop"))
    doc_mask: bool = doc("attend only within a document: text up to an end-of-text token (bpe, hf), or a record of "
                         "prompts or conversations", False)

    def weight_list(self) -> list[float]:
        """data.weights as numbers ([]: none given); ValueError names one that is not a number."""
        return [float(w) for w in self.weights.split(",")] if self.weights.strip() else []

    def problems(self) -> list[str]:
        if not self.weights.strip():
            return []
        n_inputs = len(inputs_of(self.input))
        try:
            weights = self.weight_list()
        except ValueError:
            return [f"data.weights = {self.weights!r} is not a list of numbers; give one per input, e.g. \"3, 1\""]
        if n_inputs == 1:
            return [f"data.weights = {self.weights!r} mixes several inputs, and data.input names one; leave it empty, "
                    "or give data.input several, separated by commas"]
        if len(weights) != n_inputs or not all(0 < w < math.inf for w in weights):
            return [f"data.weights = {self.weights!r} must be {n_inputs} number{'s' * (n_inputs > 1)} greater "
                    f"than 0, one per input of data.input ({n_inputs} given there, separated by commas)"]
        return []


@dataclass
class ModelConfig:
    n_layer: int = doc("number of transformer blocks", 6, within="[1, inf)")
    n_head: int = doc("attention heads per block (query heads)", 6, within="[1, inf)")
    n_kv_head: int = doc("key/value heads; 0: n_head. Fewer: each is shared by n_head / n_kv_head query heads "
                         "(grouped-query attention; 1: multi-query), a smaller KV cache", 0, within="[0, inf)")
    head_dim: int = doc("width of each head; 0: n_embd / n_head (which must then divide)", 0, within="[0, inf)")
    n_embd: int = doc("width of the residual stream", 384, within="[1, inf)")
    block_size: int = doc("context length in tokens", 256, within="[1, inf)")
    dropout: float = doc("dropout on embeddings and residual branches in training (0 disables it)", 0.2,
                         within="[0, 1)")
    attn_dropout: float = doc("dropout on attention weights; > 0 makes sdpa use its slower unfused path",
                              0.0, within="[0, 1)")
    attention: str = doc("attention backend", "sdpa", choices=("eager", "sdpa", "flex"))
    vocab_size: int = doc("vocabulary size; 0: taken from the prepared data", 0, within="[0, inf)")
    pad_vocab_multiple: int = doc("pad the embedding table to a multiple of this (1: no padding)", 1,
                                  within="[1, inf)")
    # The architecture: arch is shorthand for the four switches after it (see ARCHS).
    arch: str = doc("sets position, norm, mlp and bias: gpt2 (learned, LayerNorm, GELU, biases) or llama "
                    "(rope, RMSNorm, SwiGLU, none); a switch set beside it or later wins", "gpt2",
                    choices=("gpt2", "llama"))
    position: str = doc("learned: a table of position vectors added to the tokens; rope: rotary, "
                        "queries and keys rotated by their position", "learned", choices=("learned", "rope"))
    norm: str = doc("layernorm: subtract the mean, divide by the std; rmsnorm: divide by the root mean "
                    "square", "layernorm", choices=("layernorm", "rmsnorm"))
    mlp: str = doc("gelu (GPT-2), swiglu (Llama: a SiLU gate times a second projection), relu2 "
                   "(ReLU squared)", "gelu", choices=("gelu", "swiglu", "relu2"))
    bias: bool = doc("biases in Linear layers and LayerNorm (RMSNorm never has one), as in GPT-2", True)
    qkv_bias: bool = doc("biases on the query, key and value projections even with bias = false (Qwen2)", False)
    # Settings usable with either arch.
    rope_theta: float = doc("rotary base: channel pair i of a head turns by position * theta^(-2i / "
                            "head size); larger is slower (position = rope)", 10000.0, within="(0, inf)")
    rope_scaling: str = doc("stretch rotary positions for a longer context than the model learned: linear "
                            "divides every angle by rope_factor; llama3 only the slow pairs (Llama 3.1 and later)",
                            "none", choices=("none", "linear", "llama3"))
    rope_factor: float = doc("rope_scaling's stretch", 1.0, within="[1, inf)")
    rope_low_freq_factor: float = doc("llama3: pairs slower than rope_original_context / this are stretched fully",
                                      1.0, within="(0, inf)")
    rope_high_freq_factor: float = doc("llama3: pairs faster than rope_original_context / this are kept", 4.0,
                                       within="(0, inf)")
    rope_original_context: int = doc("llama3: the context the model was first trained with", 8192,
                                     within="[1, inf)")
    norm_eps: float = doc("epsilon added to the variance in every norm", 1e-5, within="(0, 1)")
    mlp_hidden: int = doc("width of the MLP's hidden layer; 0: 4 * n_embd, or for swiglu 8/3 * n_embd "
                          "rounded up to a multiple of 8 (about the same number of weights)", 0,
                          within="[0, inf)")
    tie_embeddings: bool = doc("the output layer reuses the token embedding matrix; false: its own matrix",
                               True)
    qk_norm: bool = doc("RMSNorm on each head's queries and keys before attention", False)
    logit_softcap: float = doc("squash the logits into (-cap, cap) with cap * tanh(logits / cap); "
                               "0: off", 0.0, within="[0, inf)")

    def head_size(self) -> int:
        """hd, the width of one attention head: head_dim, or the n_embd channels split between the heads."""
        return self.head_dim or self.n_embd // self.n_head

    def kv_heads(self) -> int:
        """The key/value heads: n_kv_head, or one per query head."""
        return self.n_kv_head or self.n_head

    def padded_vocab_size(self) -> int:
        """The rows of the embedding table and the output layer: vocab_size rounded up to a multiple of
        pad_vocab_multiple (a multiple of 64 makes the big output matmul faster on GPUs). The extra rows
        are never looked up, and are sliced off the logits."""
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    def problems(self) -> list[str]:
        """Rules that involve more than one field (one-field rules are in the field metadata)."""
        out = []
        if self.n_head > 0 and not self.head_dim and self.n_embd % self.n_head != 0:
            out.append(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head}), or set "
                       "model.head_dim")
        elif self.position == "rope" and self.n_head > 0 and self.head_size() % 2:
            sizes = (f"model.head_dim = {self.head_dim}" if self.head_dim else
                     f"model.n_embd / model.n_head = {self.n_embd} / {self.n_head} = {self.head_size()}")
            out.append(f'model.position = "rope" needs an even head size, but {sizes}: rotary embeddings '
                       "turn channels in pairs")
        if self.n_kv_head and self.n_head % self.n_kv_head:
            out.append(f"model.n_kv_head ({self.n_kv_head}) must divide model.n_head ({self.n_head}): each key/value "
                       "head serves the same number of query heads")
        if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            out.append(f"model.rope_high_freq_factor ({self.rope_high_freq_factor}) must be greater than "
                       f"model.rope_low_freq_factor ({self.rope_low_freq_factor})")
        if self.attn_dropout > 0 and self.attention == "flex":
            out.append("model.attn_dropout > 0 is not supported by flex attention: use 0, or "
                       'model.attention = "sdpa" or "eager"')
        return out


@dataclass
class TrainingConfig:
    device: str = doc("where to train", "auto", choices=("auto", "cpu", "cuda", "mps"))
    threads: int = doc("CPU threads of this process; 0: the cores it may use (1 under torchrun, which sets "
                       "OMP_NUM_THREADS=1). Lower it when other work keeps cores busy: threads that wait for a busy "
                       "core stall every step", 0, within="[0, inf)")
    precision: str = doc("fp32, or autocast in fp16/bf16 (fp16 uses a GradScaler)", "fp32",
                         choices=("fp32", "fp16", "bf16"))
    batch_size: int = doc("sequences per micro-batch", 64, within="[1, inf)")
    grad_accum_steps: int = doc("micro-batches per optimizer step (global, across all processes)", 1,
                                within="[1, inf)")
    max_iters: int = doc("optimizer steps to run", 5000, within="[1, inf)")
    learning_rate: float = doc("peak learning rate", 1e-3, within="(0, inf)")
    min_lr: float = doc("learning rate at the end of the decay", 1e-4, within="[0, inf)")
    warmup_iters: int = doc("steps of linear warmup from 0 to learning_rate", 100, within="[0, inf)")
    warmup_frac: float = doc("the warmup as a fraction of max_iters, instead of warmup_iters", 0.0,
                             within="[0, 1]")
    lr_schedule: str = doc("after warmup: cosine or linear decay to min_lr over the rest of the run; "
                           "constant; wsd: constant, then a linear decay to min_lr at the end",
                           "cosine", choices=("cosine", "linear", "constant", "wsd"))
    decay_frac: float = doc("wsd: the decay's share of max_iters", 0.2, within="[0, 1]")
    decay_iters: int = doc("wsd: the decay's length in steps, instead of decay_frac", 0, within="[0, inf)")
    optimizer: str = doc("adamw, or muon: Muon for the matrices inside the blocks, AdamW for the rest",
                         "adamw", choices=("adamw", "muon"))
    muon_lr: float = doc("peak learning rate of the Muon matrices (optimizer = muon)", 0.02, within="(0, inf)")
    weight_decay: float = doc("weight decay, applied to matrices only", 0.1, within="[0, inf)")
    beta1: float = doc("AdamW beta1", 0.9, within="[0, 1)")
    beta2: float = doc("AdamW beta2", 0.99, within="[0, 1)")
    grad_clip: float = doc("clip the global gradient norm to this (0 disables)", 1.0, within="[0, inf)")
    eval_interval: int = doc("evaluate every this many steps (and at the last step)", 250, within="[1, inf)")
    eval_batches: int = doc("batches per split in each evaluation", 200, within="[1, inf)")
    log_interval: int = doc("print a log line every this many steps", 10, within="[1, inf)")
    seed: int = doc("seed for weights and batches", 1337, within="[0, 18446744073709551616)")  # torch's: 64 bits
    compile: bool = doc("torch.compile the model", False)
    parallel: str = doc("under torchrun: ddp, every process holds the whole model; fsdp, each holds a shard of "
                        "the weights, gradients and optimizer state", "ddp", choices=("ddp", "fsdp"))
    activation_checkpointing: bool = doc("recompute each block's activations in the backward pass instead of "
                                         "keeping them: less memory, more time", False)
    early_stopping: bool = doc("stop when val loss stops improving", False)
    early_stopping_patience: int = doc("evaluations without improvement before stopping", 5, within="[1, inf)")
    early_stopping_min_delta: float = doc("smallest val-loss decrease that counts as improvement", 0.0,
                                          within="[0, inf)")
    save_best: bool = doc("write ckpt_best.pt whenever val loss improves", True)
    save_interval: int = doc("also keep a numbered checkpoint, ckpt_000500.pt, every this many steps; 0: only last "
                             "and best", 0, within="[0, inf)")
    keep_last: int = doc("numbered checkpoints to keep: a new one deletes the oldest beyond these (never last or "
                         "best)", 3, within="[0, inf)")
    out_dir: str = doc("folder for checkpoints, train_log.json and config.toml", "checkpoints")
    resume: str = doc("auto: continue the run in out_dir from its newest checkpoint if it holds one, else start "
                      "afresh; true: continue it (--resume); false: start afresh", "auto",
                      choices=("auto", "true", "false"))
    overwrite: bool = doc("start afresh in an out_dir that holds a run, replacing it (else that is refused)",
                          False)
    tensorboard: bool = doc("also write the log as TensorBoard events to <out_dir>/tensorboard (pip install "
                            "tensorboard)", False)
    init_from: str = doc("start from these weights (checkpoint, run folder or export); empty: random", "")
    sample_tokens: int = doc("at each evaluation, sample this many tokens from sample_prompt, printed and "
                             "logged; 0: no samples", 0, within="[0, inf)")
    sample_prompt: str = doc("the text those samples continue; empty: the start of a text", "")
    task: str = doc("records of prompts and answers (as for eval.py --task): at each evaluation, the share of them "
                    "answered exactly, printed, logged and plotted; empty: none", "")
    task_examples: int = doc("training.task: check its first N examples; 0: all of them", 100, within="[0, inf)")
    profile_start_step: int = doc("torch.profiler records the optimizer steps from this step on", 0,
                                  within="[0, inf)")
    profile_end_step: int = doc("... up to this step (0 and 0: no profiling)", 0, within="[0, inf)")
    profile_dir: str = doc("folder for the profiler's trace; empty: <out_dir>/profile", "")

    # Not a setting: lifecycle.check_run sets it when out_dir holds a run for resume = auto to continue.
    run_found = False

    @property
    def resuming(self) -> bool:
        """Whether this run continues the one in out_dir: resume = true, or auto with a run found there."""
        return self.resume == "true" or self.resume == "auto" and self.run_found

    def warmup_steps(self) -> int:
        return self.warmup_iters or round(self.warmup_frac * self.max_iters)  # steps, or a fraction of the run

    def decay_steps(self) -> int:
        return self.decay_iters or round(self.decay_frac * self.max_iters)  # wsd's decay, the same way

    def problems(self) -> list[str]:
        out = []
        if self.min_lr > self.learning_rate:
            out.append(f"training.min_lr ({self.min_lr}) must not exceed training.learning_rate "
                       f"({self.learning_rate})")
        if self.save_interval and not self.keep_last:
            out.append(f"training.keep_last = 0 would delete every numbered checkpoint that training.save_interval "
                       f"= {self.save_interval} writes: keep at least 1, or set save_interval = 0")
        start, end = self.profile_start_step, self.profile_end_step
        if (start or end) and end <= start:
            out.append(f"training.profile_end_step ({end}) must be greater than training.profile_start_step "
                       f"({start}); set both to 0 for no profiling")
        elif end > self.max_iters:
            out.append(f"training.profile_end_step ({end}) is after the run's last step (training.max_iters = "
                       f"{self.max_iters}); choose a window within the run")
        for steps, frac in (("warmup_iters", "warmup_frac"), ("decay_iters", "decay_frac")):
            if getattr(self, steps) > 0 and getattr(self, frac) > 0:
                out.append(f"training.{steps} ({getattr(self, steps)}) and training.{frac} "
                           f"({getattr(self, frac)}) both set a length: set the other one to 0")
        return out


@dataclass
class LoraConfig:
    rank: int = doc("rank r of the LoRA adapters (see lora.py); 0: no LoRA, every weight trains", 0,
                    within="[0, inf)")
    alpha: float = doc("the adapters' output is scaled by alpha / rank", 16.0, within="(0, inf)")
    dropout: float = doc("dropout on the adapters' input in training", 0.0, within="[0, 1)")
    targets: str = doc("comma-separated linear layers of each block to adapt (attn.c_attn, attn.c_proj, "
                       "mlp.c_fc, mlp.c_proj), or all", "all")
    save: str = doc("what checkpoints hold: the adapters (the base weights are referenced), or the full "
                    "model too", "adapters", choices=("adapters", "full"))

    def target_list(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    def problems(self) -> list[str]:
        # Which names exist depends on the model: lora.add_adapters checks them against its layers.
        return [] if self.target_list() else ['lora.targets is empty: name the layers to adapt, e.g. '
                                              '"attn.c_attn,attn.c_proj", or "all"']


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self):
        self.explicit: set[str] = set()  # "section.key" names set by a preset or the command line
        self.preset: str | None = None  # the --config file
        self.overrides: list[str] = []  # the command line's config arguments, to apply to other presets
        self.argv: list[str] = []  # the whole command line, to print how to continue a run

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step: the effective batch, all processes together."""
        return self.training.batch_size * self.training.grad_accum_steps * self.model.block_size

    def problems(self) -> list[str]:
        """Rules that involve more than one section, or that depend on what was chosen."""
        t, out = self.training, []
        if t.overwrite and (t.resume == "true" or "training.resume" in self.explicit and t.resume == "auto"):
            # Left at its default, auto gives way to overwrite: replacing the run is what was asked.
            out.append(f"training.resume = {t.resume} and training.overwrite contradict each other: resume "
                       "continues the run in out_dir, overwrite replaces it; drop one of them")
        if self.data.processed_dir and os.path.realpath(self.data.processed_dir) == os.path.realpath(t.out_dir):
            out.append(f"training.out_dir and data.processed_dir are the same folder ({t.out_dir!r}): the run's "
                       "files and the data each need a folder of their own")
        if self.lora.rank > 0 and not t.init_from and t.resume != "true":
            # Only the adapters train: on random base weights the model would stay mostly random.
            out.append(f"lora.rank = {self.lora.rank} needs pretrained weights to adapt: set training.init_from "
                       "to a checkpoint, run folder or export, or lora.rank = 0 to train every weight")
        return out


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}


class ConfigError(UserError):
    """One or more problems with settings, one per line, each naming the setting."""


# ----------------------------------------------------------------------------- settings that imply others

# model.arch is shorthand for these switch values, written where the arch is written (a preset or
# the command line). ModelConfig's own defaults are gpt2's. A switch written in the same place wins,
# so arch = "llama" with mlp = "gelu" is Llama with GPT-2's MLP; and, as always, the command line wins
# over the preset. model.py reads the switches only, never the arch.
ARCHS = {
    "gpt2": {"position": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True},
    "llama": {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False},
}
# Lengths that can be given two ways: writing one turns the other off (0) in the same place, unless
# both are written there (then TrainingConfig.problems() reports them, when both are non-zero).
ALTERNATIVES = {"warmup_iters": ("warmup_frac", 0.0), "warmup_frac": ("warmup_iters", 0),
                "decay_iters": ("decay_frac", 0.0), "decay_frac": ("decay_iters", 0)}


def apply_implied(cfg: Config, values: dict, sections: tuple[str, ...] = tuple(SECTIONS)) -> None:
    """Set what the settings in `values` (one preset, or the command line, already applied) imply,
    except the settings that `values` gives itself."""
    given = {(s, k) for s, keys in values.items() if s in sections and isinstance(keys, dict) for k in keys}
    implied = {}
    if ("model", "arch") in given:
        implied |= {("model", k): v for k, v in ARCHS.get(cfg.model.arch, {}).items()}
    for key, (other, off) in ALTERNATIVES.items():
        if ("training", key) in given:
            implied[("training", other)] = off
    for (section, key), value in implied.items():
        if (section, key) not in given:
            setattr(getattr(cfg, section), key, value)


# ----------------------------------------------------------------------------- values

@functools.cache
def fields_of(cls) -> dict[str, dataclasses.Field]:
    """{name: Field} of a dataclass, each field's type resolved from its annotation."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def value_problem(name: str, f: dataclasses.Field, value) -> str | None:
    """The rule a single value breaks (its choices or its interval), or None."""
    choices, within = f.metadata["choices"], f.metadata["within"]
    if choices and value not in choices:
        return f"{name} = {value!r} is not one of: {', '.join(choices)}"
    if within is None:
        return None
    lo, hi = (float(x) for x in within[1:-1].split(","))
    if (lo < value if within[0] == "(" else lo <= value) and (value < hi if within[-1] == ")" else value <= hi):
        return None
    return f"{name} = {value} must be {interval_words(within)}"


def interval_words(within: str) -> str:
    """"[1, inf)" -> "at least 1", "(0, inf)" -> "greater than 0", "[0, 1)" -> "in [0, 1)"."""
    lo, hi = within[1:-1].split(",")
    if hi.strip() != "inf":
        return f"in {within}"
    return f"{'at least' if within[0] == '[' else 'greater than'} {lo}"


def validate(obj, sections: tuple[str, ...] = tuple(SECTIONS)) -> list[str]:
    """Every broken rule of a Config (its `sections`) or of a script's options, all at once."""
    if isinstance(obj, Config):
        out = [p for section in sections for p in validate_section(getattr(obj, section), section + ".")]
        return out + (obj.problems() if set(sections) == set(SECTIONS) else [])
    return validate_section(obj, "--")


def validate_section(obj, prefix: str) -> list[str]:
    """The broken rules of one section (prefix "model.") or of a script's options (prefix "--")."""
    out = []
    for key, f in fields_of(type(obj)).items():
        name = prefix + (key if prefix.endswith(".") else key.replace("_", "-"))
        problem = value_problem(name, f, getattr(obj, key))
        if problem:
            out.append(problem)
    return out + (obj.problems() if hasattr(obj, "problems") else [])


