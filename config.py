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
import json
import sys
import typing
from dataclasses import dataclass, field

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
    dropout: float = doc("dropout on embeddings and residual branches in training (0 disables it)", 0.2,
                         minimum=0.0)
    attn_dropout: float = doc("dropout on attention weights; > 0 makes sdpa use its slower unfused path",
                              0.0, minimum=0.0)
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
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                out.append(f"model.{name} = {getattr(self, name)} is not allowed: use a value in [0, 1)")
        if self.attn_dropout > 0 and self.attention == "flex":
            out.append("model.attn_dropout > 0 is not supported by flex attention: use 0, or "
                       'model.attention = "sdpa" or "eager"')
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
    optimizer: str = doc("adamw, or muon: Muon for the matrices inside the blocks, AdamW for the rest",
                         "adamw", choices=("adamw", "muon"))
    muon_lr: float = doc("peak learning rate of the Muon matrices (optimizer = muon)", 0.02, positive=True)
    weight_decay: float = doc("weight decay, applied to matrices only", 0.1, minimum=0.0)
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

    def __post_init__(self):
        self.explicit: set[str] = set()  # "section.key" names set by a preset or the command line

    def problems(self) -> list[str]:
        return self.model.problems() + self.training.problems()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}
SHORT_FLAGS = {"--tokenizer": "data.tokenizer", "--max-iters": "training.max_iters",
               "--device": "training.device", "--resume": "training.resume"}


class ConfigError(Exception):
    """One or more problems with the configuration, one per line."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class HelpRequested(Exception):
    pass


def schema() -> dict[str, dict[str, dataclasses.Field]]:
    """{section: {key: Field}} with each field's type resolved from its annotation."""
    out = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        out[section] = {}
        for f in dataclasses.fields(cls):
            f.type = hints[f.name]
            out[section][f.name] = f
    return out


def suggest(section: str, key: str | None) -> str:
    """A ' (did you mean ...?)' hint for an unknown section or key, or ''."""
    if key is None:
        close = difflib.get_close_matches(section, SECTIONS, n=1)
    else:
        others = [f"{s}.{k}" for s, keys in schema().items() for k in keys]
        same_key = [name for name in others if name.endswith("." + key)]
        close = same_key or difflib.get_close_matches(f"{section}.{key}", others, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def convert(name: str, f: dataclasses.Field, value, from_text: bool):
    """Value for field `f`, converted by its declared type; raises ValueError naming the field."""
    typ = f.type
    if name == "training.resume" and isinstance(value, bool):  # TOML: resume = false / true
        value = "auto" if value else "false"
    if from_text:
        if typ is bool:
            if value.lower() not in ("true", "false"):
                raise ValueError(f"{name} = {value!r} is not a boolean: use true or false")
            return value.lower() == "true"
        try:
            return typ(value)
        except ValueError:
            raise ValueError(f"{name} = {value!r} is not a{'n' if typ is int else ''} "
                             f"{typ.__name__}") from None
    # From TOML the value is already typed: check it, accepting ints for floats.
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not typ:
        raise ValueError(f"{name} = {value!r} is a {type(value).__name__}, expected a {typ.__name__}")
    return value


def check_range(name: str, f: dataclasses.Field, value) -> str | None:
    meta = f.metadata
    if meta["choices"] and value not in meta["choices"]:
        return f"{name} = {value!r} is not one of: {', '.join(meta['choices'])}"
    if meta["positive"] and value <= 0:
        return f"{name} = {value} must be greater than 0"
    if meta["minimum"] is not None and value < meta["minimum"]:
        return f"{name} = {value} must be at least {meta['minimum']}"
    return None


def apply(cfg: Config, values: dict[str, dict], from_text: bool, origin: str, problems: list[str]) -> None:
    """Set {section: {key: value}} on cfg, appending every problem found to `problems`.

    The names set are recorded in cfg.explicit, so that a setting the user chose can be
    told apart from a default (a checkpoint's model shape replaces defaults, not choices).
    """
    fields = schema()
    for section, keys in values.items():
        if section not in fields or not isinstance(keys, dict):
            problems.append(f"{origin}: unknown section [{section}]{suggest(section, None)}; "
                            f"valid: {', '.join(fields)}")
            continue
        for key, value in keys.items():
            name = f"{section}.{key}"
            if key not in fields[section]:
                problems.append(f"{origin}: unknown key {name}{suggest(section, key)}")
                continue
            try:
                value = convert(name, fields[section][key], value, from_text)
            except ValueError as e:
                problems.append(f"{origin}: {e}")
                continue
            setattr(getattr(cfg, section), key, value)
            cfg.explicit.add(name)


def parse_cli(argv: list[str], problems: list[str]) -> tuple[str | None, dict[str, dict]]:
    """Split argv into (--config FILE, {section: {key: text value}})."""
    config_file, values, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            raise HelpRequested
        flag, has_eq, value = arg.partition("=")
        if not flag.startswith("--"):
            problems.append(f"command line: unexpected argument {arg!r}; use --section.key VALUE")
            continue
        if not has_eq:
            next_is_value = i < len(argv) and not argv[i].startswith("--")
            if flag == "--resume" and not next_is_value:
                value = "auto"  # bare --resume continues from out_dir/ckpt_last.pt
            elif next_is_value:
                value, i = argv[i], i + 1
            else:
                problems.append(f"command line: {flag} needs a value")
                continue
        if flag == "--config":
            config_file = value
            continue
        name = SHORT_FLAGS.get(flag, flag[2:].replace("-", "_"))
        section, _, key = name.partition(".")
        if not key:
            problems.append(f"command line: unknown option {flag}{suggest('training', section)}; "
                            "fields are set as --section.key VALUE (see --help)")
            continue
        values.setdefault(section, {})[key] = value
    return config_file, values


def load_config(argv: list[str] | None = None) -> Config:
    """Defaults, then the TOML preset, then command-line values; all problems raised together."""
    argv = sys.argv[1:] if argv is None else argv
    problems: list[str] = []
    config_file, cli_values = parse_cli(argv, problems)
    cfg = Config()
    if config_file is not None:
        try:
            with open(config_file, "rb") as f:
                apply(cfg, tomllib.load(f), from_text=False, origin=config_file, problems=problems)
        except FileNotFoundError:
            problems.append(f"--config {config_file}: no such file; presets are in configs/")
        except tomllib.TOMLDecodeError as e:
            problems.append(f"--config {config_file}: not valid TOML ({e})")
    apply(cfg, cli_values, from_text=True, origin="command line", problems=problems)
    problems += validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def validate(cfg: Config) -> list[str]:
    out = []
    for section, fields in schema().items():
        for key, f in fields.items():
            problem = check_range(f"{section}.{key}", f, getattr(getattr(cfg, section), key))
            if problem:
                out.append(problem)
    return out + cfg.problems()


def config_from_dict(values: dict) -> Config:
    """A Config from a dict stored in a checkpoint or log (as written by Config.to_dict)."""
    cfg, problems = Config(), []
    apply(cfg, values, from_text=False, origin="stored config", problems=problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def to_toml(cfg: Config) -> str:
    """The config as a TOML preset: `--config` on this file reproduces the run's settings."""
    lines = []
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            text = str(value).lower() if isinstance(value, bool) else json.dumps(value)
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)


def reference() -> str:
    """Every field with its type, default and doc: the text of --help and of the README."""
    lines = []
    for section, fields in schema().items():
        lines.append(f"[{section}]")
        for key, f in fields.items():
            default = str(f.default).lower() if isinstance(f.default, bool) else repr(f.default)
            choices = f" ({' | '.join(f.metadata['choices'])})" if f.metadata["choices"] else ""
            lines.append(f"  --{section}.{key} {f.type.__name__.upper()}")
            lines.append(f"      {f.metadata['doc']}{choices}; default {default}")
        lines.append("")
    return "\n".join(lines)


def help_text(program: str) -> str:
    return (f"usage: python {program} [--config FILE] [--section.key VALUE ...]\n\n"
            "Settings come from the defaults below, then the TOML preset given by --config,\n"
            "then the command line (--section.key VALUE or --section.key=VALUE).\n"
            "Short flags: " + ", ".join(f"{k} (= --{v})" for k, v in SHORT_FLAGS.items())
            + "; a bare --resume means --resume auto.\n\n" + reference())


def load_or_exit(program: str, argv: list[str] | None = None) -> Config:
    """load_config for scripts: --help prints and exits 0; problems print and exit 2."""
    try:
        return load_config(argv)
    except HelpRequested:
        print(help_text(program))
        sys.exit(0)
    except ConfigError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
