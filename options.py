"""Reading settings: TOML presets, the command line of every script, and stored configs.

    cfg = load_config(["--config", "configs/cpu/small.toml", "--max-iters", "50"])   # train.py's
    opts, cfg = parse(argv, SampleOptions, sections=())     # a script's own options, no config
    print(help_text("sample.py", __doc__, SampleOptions, sections=()))

Values from text are converted by their field's declared type (`bool("False")` would be True), and
every problem is collected and reported at once, with the nearest valid name suggested. A script's
options are a dataclass of config.doc fields, written `--num-samples 3`; the config's settings are
written `--section.key VALUE`, as in a TOML preset's [section] key = value.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import shlex
import sys
from pathlib import Path

from config import SECTIONS, Config, ConfigError, apply_implied, fields_of, interval_words, validate
from errors import HelpRequested

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

# Settings that were renamed: a preset or stored config.toml with the old name is told the new one.
RENAMED = {"training.eval_iters": "training.eval_batches"}
SHORT_FLAGS = {"--tokenizer": "data.tokenizer", "--max-iters": "training.max_iters",
               "--device": "training.device", "--resume": "training.resume"}


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
    problems, cli_values, overrides, chosen = [], {}, [], None
    for kind, key, value in scan(argv, options, sections, program, problems):
        if kind == "help":
            raise HelpRequested(help_text(program, about, options, sections, preset))
        if kind == "preset":
            if chosen is not None:  # presets do not layer: the second would silently replace the first
                problems.append(f"command line: --config given twice ({chosen}, {value}); give one preset, and "
                                "change its settings with --section.key VALUE")
            preset = chosen = value
        elif kind == "config":
            cli_values.setdefault(key[0], {})[key[1]] = value
            overrides += [key[2], value]
        elif kind == "positional":
            getattr(opts, key).append(value)
        else:
            try:
                setattr(opts, key, convert(f"--{key.replace('_', '-')}", fields_of(options)[key], value, True))
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
    if opts is not None and not any(p.startswith("command line: --") for p in problems):
        problems += validate(opts)  # not after an option was refused: it would be called missing too
    if problems:
        raise ConfigError(problems)
    cfg.preset, cfg.overrides, cfg.argv = preset, overrides, list(argv)
    return opts, cfg


def scan(argv: list[str], options, sections: tuple[str, ...], program: str, problems: list[str]):
    """The command line as (kind, key, text value) items: ("help", ..), ("preset", None, FILE),
    ("config", (section, key, flag), VALUE), ("option", name, VALUE) or ("positional", name, ARG);
    what cannot be read goes to `problems`."""
    own = fields_of(options) if options else {}
    positional = next((k for k, f in own.items() if f.metadata["positional"]), None)
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            yield "help", None, None
            continue
        if not arg.startswith("--"):
            if positional:
                yield "positional", positional, arg
            else:
                problems.append(f"command line: unexpected argument {arg!r}; options are --name VALUE")
            continue
        flag, has_eq, value = arg.partition("=")
        kind, key, f = resolve(flag, own, sections)
        if kind is None:
            if not has_eq and i < len(argv) and not argv[i].startswith("--"):
                i += 1  # its value, so that it is not reported as one more problem
            problems.append(unknown_flag(flag, own, positional, sections, program))
            continue
        if not has_eq:
            # A boolean flag alone means true (before a script's positional arguments, only a
            # following true/false is its value); any other flag takes the next argument.
            boolean = f is not None and takes_bool(f)
            if boolean and (i == len(argv) or argv[i].startswith("--") or
                            positional and argv[i].lower() not in ("true", "false")):
                value = "true"
            elif i < len(argv) and not argv[i].startswith("--"):
                value, i = argv[i], i + 1
            else:
                problems.append(f"command line: {flag} needs a value")
                continue
        yield kind, (*key, flag) if kind == "config" else key, value


def unknown_flag(flag: str, own: dict, positional: str | None, sections: tuple[str, ...], program: str) -> str:
    if flag[2:].split(".")[0] in SECTIONS:
        takes = ", ".join(f"--{s}.*" for s in sections) or "no config settings"
        return f"command line: {flag} is not a setting of {program}: it takes {takes}"
    known = ["--" + k.replace("_", "-") for k in own if k != positional]
    known += [f for f in SHORT_FLAGS if SHORT_FLAGS[f].split(".")[0] in sections]
    return f"command line: unknown option {flag}{suggest(flag, known)}; see --help"


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


def apply(cfg: Config, values: dict, from_text: bool, origin: str, problems: list[str],
          sections: tuple[str, ...] = tuple(SECTIONS)) -> None:
    """Set {section: {key: value}} on a Config, appending every problem found to `problems`. Every section is
    checked; only `sections` are set (a preset's others are for other scripts: prepare.py uses its [data]).

    The names set are recorded in cfg.explicit, so that a setting the user chose can be
    told apart from a default (a checkpoint's model shape replaces defaults, not choices).
    """
    fields = {s: fields_of(SECTIONS[s]) for s in SECTIONS}
    for section, keys in values.items():
        if not isinstance(keys, dict):  # a key above every [section] header
            homes = [f"[{s}]" for s in fields if section in fields[s]]
            problems.append(f"{origin}: {section} is outside any section; put it under "
                            f"{' or '.join(homes) or 'its section'} (see --help)")
            continue
        if section not in fields:
            problems.append(f"{origin}: unknown section [{section}]{suggest(section, list(fields))}; "
                            f"valid: {', '.join(fields)}")
            continue
        for key, value in keys.items():
            name = f"{section}.{key}"
            if key not in fields[section]:
                names = [f"{s}.{k}" for s in fields for k in fields[s]]
                hint = f" (renamed {RENAMED[name]})" if name in RENAMED else suggest(name, names)
                problems.append(f"{origin}: unknown key {name}{hint}")
                continue
            try:
                value = convert(name, fields[section][key], value, from_text)
            except ConfigError as e:
                problems.append(f"{origin}: {e}")
                continue
            if section in sections:
                setattr(getattr(cfg, section), key, value)
                cfg.explicit.add(name)


def takes_bool(f: dataclasses.Field) -> bool:
    """A boolean, or a choice that includes true and false (training.resume: auto, true, false)."""
    return f.type is bool or f.type is str and {"true", "false"} <= set(f.metadata["choices"] or ())


def convert(name: str, f: dataclasses.Field, value, from_text: bool):
    """Value for field `f`, converted by its declared type; raises ConfigError naming the setting."""
    typ = f.type
    if typ is str and takes_bool(f) and (isinstance(value, bool) or from_text):
        return str(value).lower()  # TOML's true, or the command line's True, is the choice "true"
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
        article = "an" if typ is int else "a"
        raise ConfigError(f"{name} = {value!r} is a {type(value).__name__}, expected {article} {typ.__name__}")
    if typ is float and not math.isfinite(value):
        raise ConfigError(f"{name} = {value} is not a finite number")
    if typ is str and not value.isascii():
        try:
            value.encode("utf-8")  # bytes that are not UTF-8 (a file name, a prompt) arrive as lone surrogates
        except UnicodeEncodeError:
            raise ConfigError(f"{name} = {value!r} is not UTF-8 text; rename the file, or give the text in "
                              "UTF-8") from None
    return value


def suggest(name: str, candidates: list[str]) -> str:
    """A ' (did you mean ...?)' hint: the same key in another section, else the closest name, or ''."""
    key = name.rsplit(".", 1)[-1]
    close = [c for c in candidates if "." in name and c.endswith("." + key)] or \
        difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


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
    """Every config field with its type, default and doc: the text of --help and of docs/configuration.md."""
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
    parts = [usage, intro(about)] if about else [usage]
    if options:
        parts.append("options:\n" + "\n".join(describe(fields_of(options), lambda k: "--" + k.replace("_", "-"))))
    if "training" in sections:
        parts.append("Presets (--config FILE), each a TOML file whose comments say more:\n" + "\n".join(
            f"  {path:<44} {summary}" for path, summary in presets().items()))
    if sections:
        parts.append("Settings come from the defaults below, then the TOML preset given by --config,\n"
                     "then the command line (--section.key VALUE or --section.key=VALUE; a boolean\n"
                     "alone means true). Short flags: "
                     + ", ".join(f"{k} (= --{v})" for k, v in SHORT_FLAGS.items() if v.split(".")[0] in sections)
                     + ".\n\n" + reference(sections))
    return "\n\n".join(parts)


def presets() -> dict[str, str]:
    """{path: what it is}, for every preset under configs/: its first comment line, up to a colon or a
    parenthesis."""
    root = Path(__file__).parent
    found = {}
    for path in sorted((root / "configs").glob("*/*.toml")):
        first = path.read_text(encoding="utf-8").split("\n", 1)[0].lstrip("# ")
        found[str(path.relative_to(root))] = re.split(r":| \(", first, maxsplit=1)[0]
    return found


def intro(about: str) -> str:
    """What --help shows of a script's docstring: its first paragraph, and the indented paragraphs
    (example commands, lists) right after it."""
    paragraphs = about.strip().split("\n\n")
    shown = [paragraphs[0]]
    for paragraph in paragraphs[1:]:
        if not paragraph.startswith("  "):
            break
        shown.append(paragraph)
    return "\n\n".join(shown)


def resume_command(cfg: Config, launcher: str = "python") -> str:
    """train.py's command line as cfg was parsed from it, without --training.overwrite: run again, it
    continues the run (training.resume = auto), or with --resume where a preset or the command line
    chose another training.resume."""
    args, drop = [], ("--resume", "--training.resume", "--training.overwrite")
    for i, arg in enumerate(cfg.argv):
        flag = arg.split("=")[0]
        if flag in drop or (i and cfg.argv[i - 1] in drop and not arg.startswith("--")):
            continue
        args.append(arg)
    return f"{launcher} train.py {shlex.join(args + (['--resume'] if 'training.resume' in cfg.explicit else []))}"
