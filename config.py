"""Typed configuration: dataclass sections with defaults, TOML presets, command-line overrides.

Every field has a type, a default and a one-line doc, and its allowed values (`choices`, or an
interval `within`); `--help` and the README's config reference are generated from them, so they
cannot drift, and every rule about one value is checked here, once.
Precedence: command line > TOML preset > defaults here.

    python train.py --config configs/cpu/smoke.toml --training.max_iters=50
    python train.py --help

The other scripts parse their own options with the same machinery (`parse`): an options dataclass
of `doc` fields, such as sample.py's SampleOptions, written `--num-samples 3` on the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import sys
import typing
from dataclasses import dataclass, field

from errors import HelpRequested, UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib


def doc(text: str, default, choices: tuple | None = None, within: str | None = None,
        positional: bool = False):
    """A dataclass field with a one-line doc and its allowed values: `choices`, or an interval such
    as "[0, 1)" or "[1, inf)". `positional`: a list option that takes the arguments without a flag."""
    meta = {"doc": text, "choices": choices, "within": within, "positional": positional}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    input: str = doc("text file or folder of text files to train on", "data/shakespeare/input.txt")
    processed_dir: str = doc("where prepared data lives; empty: data/processed/<corpus>_<tokenizer>", "")
    tokenizer: str = doc("char: one token per character; bpe: a tiktoken encoding", "char",
                         choices=("char", "bpe"))
    bpe_encoding: str = doc("tiktoken encoding name used when tokenizer = bpe", "gpt2")
    val_fraction: float = doc("fraction of the corpus held out for validation", 0.1, within="(0, 1)")
    format: str = doc("bin: memory-mapped token files; txt: text splits, tokenized when loaded", "bin",
                      choices=("bin", "txt"))
    doc_mask: bool = doc("attend only within a document (flex attention, bpe data with end-of-text)", False)


@dataclass
class ModelConfig:
    n_layer: int = doc("number of transformer blocks", 6, within="[1, inf)")
    n_head: int = doc("attention heads per block; must divide n_embd", 6, within="[1, inf)")
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
    # Settings usable with either arch.
    rope_theta: float = doc("rotary base: channel pair i of a head turns by position * theta^(-2i / "
                            "head size); larger is slower (position = rope)", 10000.0, within="(0, inf)")
    norm_eps: float = doc("epsilon added to the variance in every norm", 1e-5, within="(0, 1)")
    mlp_hidden: int = doc("width of the MLP's hidden layer; 0: 4 * n_embd, or for swiglu 8/3 * n_embd "
                          "rounded up to a multiple of 8 (about the same number of weights)", 0,
                          within="[0, inf)")
    tie_embeddings: bool = doc("the output layer reuses the token embedding matrix; false: its own matrix",
                               True)
    qk_norm: bool = doc("RMSNorm on each head's queries and keys before attention", False)
    logit_softcap: float = doc("squash the logits into (-cap, cap) with cap * tanh(logits / cap); "
                               "0: off", 0.0, within="[0, inf)")

    def problems(self) -> list[str]:
        """Rules that involve more than one field (one-field rules are in the field metadata)."""
        out = []
        if self.n_head > 0 and self.n_embd % self.n_head != 0:
            out.append(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        elif self.position == "rope" and self.n_head > 0 and self.n_embd // self.n_head % 2:
            out.append(f'model.position = "rope" needs an even head size, but model.n_embd / model.n_head = '
                       f"{self.n_embd} / {self.n_head} = {self.n_embd // self.n_head}: rotary embeddings "
                       "turn channels in pairs")
        if self.attn_dropout > 0 and self.attention == "flex":
            out.append("model.attn_dropout > 0 is not supported by flex attention: use 0, or "
                       'model.attention = "sdpa" or "eager"')
        return out


@dataclass
class TrainingConfig:
    device: str = doc("where to train", "auto", choices=("auto", "cpu", "cuda", "mps"))
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
    eval_iters: int = doc("batches per split in each evaluation", 200, within="[1, inf)")
    log_interval: int = doc("print a log line every this many steps", 10, within="[1, inf)")
    seed: int = doc("seed for weights and batches", 1337, within="[0, inf)")
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
    out_dir: str = doc("folder for checkpoints, train_log.json and config.toml", "checkpoints")
    resume: bool = doc("continue the run in out_dir from its ckpt_last.pt", False)
    overwrite: bool = doc("start afresh in an out_dir that holds a run, replacing it (else that is refused)",
                          False)
    init_from: str = doc("start from these weights (checkpoint, run folder or export); empty: random", "")
    sample_tokens: int = doc("at each evaluation, sample this many tokens from sample_prompt, printed and "
                             "logged; 0: no samples", 0, within="[0, inf)")
    sample_prompt: str = doc("the text those samples continue; empty: the start of a text", "")
    profile_start_step: int = doc("torch.profiler records the optimizer steps from this step on", 0,
                                  within="[0, inf)")
    profile_end_step: int = doc("... up to this step (0 and 0: no profiling)", 0, within="[0, inf)")
    profile_dir: str = doc("folder for the profiler's trace; empty: <out_dir>/profile", "")

    def problems(self) -> list[str]:
        out = []
        if self.min_lr > self.learning_rate:
            out.append(f"training.min_lr ({self.min_lr}) must not exceed training.learning_rate "
                       f"({self.learning_rate})")
        if self.resume and (self.init_from or self.overwrite):
            other = "training.init_from" if self.init_from else "training.overwrite"
            out.append(f"training.resume and {other} contradict each other: --resume continues the run in "
                       f"out_dir from its own checkpoint; drop one of them")
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

    def problems(self) -> list[str]:
        """Rules that involve more than one section."""
        if self.lora.rank > 0 and not self.training.init_from and not self.training.resume:
            # Only the adapters train: on random base weights the model would stay mostly random.
            return [f"lora.rank = {self.lora.rank} needs pretrained weights to adapt: set training.init_from "
                    "to a checkpoint, run folder or export, or lora.rank = 0 to train every weight"]
        return []


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}
SHORT_FLAGS = {"--tokenizer": "data.tokenizer", "--max-iters": "training.max_iters",
               "--device": "training.device", "--resume": "training.resume"}


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


def convert(name: str, f: dataclasses.Field, value, from_text: bool):
    """Value for field `f`, converted by its declared type; raises ConfigError naming the setting."""
    typ = f.type
    if from_text:
        if typ is bool:
            if value.lower() not in ("true", "false"):
                raise ConfigError(f"{name} = {value!r} is not a boolean: use true or false")
            return value.lower() == "true"
        try:
            value = typ(value)
        except ValueError:
            raise ConfigError(f"{name} = {value!r} is not a{'n' if typ is int else ''} {typ.__name__}") from None
    elif typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # TOML: an int where a float is expected
    elif type(value) is not typ:
        raise ConfigError(f"{name} = {value!r} is a {type(value).__name__}, expected a {typ.__name__}")
    if typ is float and not math.isfinite(value):
        raise ConfigError(f"{name} = {value} is not a finite number")
    return value


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


def apply(cfg: Config, values: dict, from_text: bool, origin: str, problems: list[str],
          sections: tuple[str, ...] = tuple(SECTIONS)) -> None:
    """Set {section: {key: value}} on a Config, appending every problem found to `problems`.

    The names set are recorded in cfg.explicit, so that a setting the user chose can be
    told apart from a default (a checkpoint's model shape replaces defaults, not choices).
    """
    fields = {s: fields_of(SECTIONS[s]) for s in sections}
    for section, keys in values.items():
        if section in SECTIONS and section not in sections:
            continue  # a preset's settings for other scripts (prepare.py reads only [data])
        if section not in fields or not isinstance(keys, dict):
            problems.append(f"{origin}: unknown section [{section}]{suggest(section, list(fields))}; "
                            f"valid: {', '.join(fields)}")
            continue
        for key, value in keys.items():
            name = f"{section}.{key}"
            if key not in fields[section]:
                names = [f"{s}.{k}" for s in fields for k in fields[s]]
                problems.append(f"{origin}: unknown key {name}{suggest(name, names)}")
                continue
            try:
                value = convert(name, fields[section][key], value, from_text)
            except ConfigError as e:
                problems.append(f"{origin}: {e}")
                continue
            setattr(getattr(cfg, section), key, value)
            cfg.explicit.add(name)


def suggest(name: str, candidates: list[str]) -> str:
    """A ' (did you mean ...?)' hint: the same key in another section, else the closest name, or ''."""
    key = name.rsplit(".", 1)[-1]
    close = [c for c in candidates if "." in name and c.endswith("." + key)] or \
        difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


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


# ----------------------------------------------------------------------------- command line

def parse(argv: list[str] | None, options=None, sections: tuple[str, ...] = tuple(SECTIONS),
          program: str = "train.py", about: str = "", preset: str | None = None):
    """Parse argv into (the script's options, Config). Raises ConfigError listing every problem.

    `options`: the script's options dataclass (flags `--name-with-dashes`), or None.
    `sections`: the config sections the script takes (`--section.key VALUE`, and `--config FILE`
    for a TOML preset; `preset` is the one used when none is given). The config's command-line
    arguments are kept in cfg.overrides, so that a script can apply them to other presets too.
    """
    argv = sys.argv[1:] if argv is None else argv
    opts = options() if options else None
    own = fields_of(options) if options else {}
    positional = next((k for k, f in own.items() if f.metadata["positional"]), None)
    problems, cli_values, overrides, i = [], {}, [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            raise HelpRequested(help_text(program, about, options, sections, preset))
        if not arg.startswith("--"):
            if positional:
                getattr(opts, positional).append(arg)
            else:
                problems.append(f"command line: unexpected argument {arg!r}; options are --name VALUE")
            continue
        flag, has_eq, value = arg.partition("=")
        kind, key, f = resolve(flag, own, sections)
        if kind is None:
            if not has_eq and i < len(argv) and not argv[i].startswith("--"):
                i += 1  # its value, so that it is not reported as one more problem
            if flag[2:].split(".")[0] in SECTIONS:
                takes = ", ".join(f"--{s}.*" for s in sections) or "no config settings"
                problems.append(f"command line: {flag} is not a setting of {program}: it takes {takes}")
                continue
            known = ["--" + k.replace("_", "-") for k in own if k != positional]
            known += [f for f in SHORT_FLAGS if SHORT_FLAGS[f].split(".")[0] in sections]
            problems.append(f"command line: unknown option {flag}{suggest(flag, known)}; see --help")
            continue
        if not has_eq:
            # A boolean flag alone means true (before a script's positional arguments, only a
            # following true/false is its value); any other flag takes the next argument.
            boolean = f is not None and f.type is bool
            if boolean and (i == len(argv) or argv[i].startswith("--") or
                            positional and argv[i].lower() not in ("true", "false")):
                value = "true"
            elif i < len(argv) and not argv[i].startswith("--"):
                value, i = argv[i], i + 1
            else:
                problems.append(f"command line: {flag} needs a value")
                continue
        if kind == "preset":
            preset = value
        elif kind == "config":
            cli_values.setdefault(key[0], {})[key[1]] = value
            overrides += [flag, value]
        else:
            try:
                setattr(opts, key, convert(flag, f, value, from_text=True))
            except ConfigError as e:
                problems.append(f"command line: {e}")
    cfg = Config()
    if sections:
        if preset is not None:
            values = read_preset(preset, problems)
            apply(cfg, values, False, preset, problems, sections)
            apply_implied(cfg, values, sections)
        apply(cfg, cli_values, True, "command line", problems, sections)
        apply_implied(cfg, cli_values, sections)
        problems += validate(cfg, sections)
    if opts is not None:
        problems += validate(opts)
    if problems:
        raise ConfigError(problems)
    cfg.preset, cfg.overrides, cfg.argv = preset, overrides, list(argv)
    return opts, cfg


def resolve(flag: str, own: dict, sections: tuple[str, ...]) -> tuple[str | None, object, object]:
    """What a flag sets: ("option", key, Field), ("config", (section, key), Field or None when
    unknown: apply() reports it as it does for a preset), ("preset", None, None), or (None, ...)."""
    key = flag[2:].replace("-", "_")
    if key in own and not own[key].metadata["positional"]:
        return "option", key, own[key]
    if not sections:
        return None, None, None
    if flag == "--config":
        return "preset", None, None
    name = SHORT_FLAGS.get(flag, flag[2:])
    if flag not in SHORT_FLAGS and "." not in name:
        return None, None, None
    section, _, k = name.partition(".")
    if section in SECTIONS and section not in sections:
        return None, None, None
    return "config", (section, k), fields_of(SECTIONS[section]).get(k) if section in SECTIONS else None


def read_preset(path: str, problems: list[str]) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        problems.append(f"--config {path}: no such file; presets are in configs/")
    except IsADirectoryError:
        problems.append(f"--config {path} is a folder; give a .toml file, e.g. configs/cpu/small.toml")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        problems.append(f"--config {path}: not valid TOML ({e})")
    except OSError as e:
        problems.append(f"--config {path}: cannot read it ({e.strerror})")
    return {}


def load_config(argv: list[str] | None = None) -> Config:
    """train.py's settings: defaults, then the TOML preset, then command-line values."""
    return parse(argv)[1]


def to_toml(cfg: Config) -> str:
    """The config as a TOML preset: `--config` on this file reproduces the run's settings."""
    lines = []
    for section in SECTIONS:
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in dataclasses.asdict(getattr(cfg, section)).items()]
        lines.append("")
    return "\n".join(lines)


def toml_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else json.dumps(value)


def config_changes(cfg: Config) -> str:
    """The settings that differ from the defaults, one line per section."""
    lines = []
    for section, cls in SECTIONS.items():
        default = dataclasses.asdict(cls())
        changed = [f"{k}={toml_value(v)}" for k, v in dataclasses.asdict(getattr(cfg, section)).items()
                   if v != default[k]]
        lines += [f"  [{section}] {' '.join(changed)}"] if changed else []
    return "\n".join(lines)


def describe(fields: dict[str, dataclasses.Field], flag) -> list[str]:
    """Two lines per field: its flag and type, then its doc, allowed values and default."""
    lines = []
    for key, f in fields.items():
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        default = str(default).lower() if isinstance(default, bool) else repr(default)
        allowed = f" ({' | '.join(f.metadata['choices'])})" if f.metadata["choices"] else \
            f" ({interval_words(f.metadata['within'])})" if f.metadata["within"] else ""
        typ = getattr(f.type, "__name__", str(f.type)).upper()
        lines.append(f"  {flag(key)} {typ}" if not f.metadata["positional"] else f"  {key.upper()} ...")
        lines.append(f"      {f.metadata['doc']}{allowed}; default {default}")
    return lines


def reference(sections: tuple[str, ...] = tuple(SECTIONS)) -> str:
    """Every config field with its type, default and doc: the text of --help and of the README."""
    lines = []
    for section in sections:
        lines.append(f"[{section}]")
        lines += describe(fields_of(SECTIONS[section]), lambda key: f"--{section}.{key}")
        lines.append("")
    return "\n".join(lines)


def help_text(program: str, about: str = "", options=None, sections: tuple[str, ...] = tuple(SECTIONS),
              preset: str | None = None) -> str:
    usage = f"usage: python {program}" + (" [options]" if options else "") + \
        (f" [--config FILE (default {preset})]" if preset else " [--config FILE]" if sections else "") + \
        (" [--section.key VALUE ...]" if sections else "")
    parts = [usage, about.strip().split("\n\n")[0]] if about else [usage]
    if options:
        parts.append("options:\n" + "\n".join(describe(fields_of(options), lambda k: "--" + k.replace("_", "-"))))
    if sections:
        parts.append("Settings come from the defaults below, then the TOML preset given by --config,\n"
                     "then the command line (--section.key VALUE or --section.key=VALUE; a boolean\n"
                     "alone means true). Short flags: "
                     + ", ".join(f"{k} (= --{v})" for k, v in SHORT_FLAGS.items() if v.split(".")[0] in sections)
                     + ".\n\n" + reference(sections))
    return "\n\n".join(parts)
