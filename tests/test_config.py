"""config.py: precedence, conversion by declared type, validation, --help, presets."""

import re
import subprocess
import sys

import pytest

import config
import options
from config import ConfigError
from options import load_config
from conftest import ROOT


def write(tmp_path, text, name="preset.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def problems(argv):
    with pytest.raises(ConfigError) as e:
        load_config(argv)
    return e.value.problems


def test_precedence_cli_over_preset_over_defaults(tmp_path):
    preset = write(tmp_path, "[model]\nn_layer = 3\nn_embd = 96\n[training]\nmax_iters = 50\n")
    cfg = load_config(["--config", preset, "--model.n_layer", "2", "--training.max_iters=7"])
    assert cfg.model.n_layer == 2          # command line wins
    assert cfg.model.n_embd == 96          # preset over default
    assert cfg.model.n_head == 6           # default
    assert cfg.training.max_iters == 7


def test_short_flags(tmp_path):
    cfg = load_config(["--tokenizer", "bpe", "--max-iters", "9", "--device", "cpu", "--resume"])
    assert (cfg.data.tokenizer, cfg.training.max_iters, cfg.training.device) == ("bpe", 9, "cpu")
    assert cfg.training.resume == "true"  # a boolean alone means true (resume: auto, true or false)
    assert load_config(["--resume", "--max-iters", "3"]).training.resume == "true"
    assert load_config(["--resume", "false"]).training.resume == "false"
    assert load_config(["--resume", "auto"]).training.resume == "auto" == load_config([]).training.resume
    assert load_config(["--model.bias", "--max-iters", "3"]).model.bias is True


def test_values_convert_by_declared_type(tmp_path):
    cfg = load_config(["--model.bias", "False", "--training.compile=true", "--training.learning_rate", "1",
                       "--model.dropout", "0"])
    assert cfg.model.bias is False  # not bool("False"), which is True
    assert cfg.training.compile is True
    assert cfg.training.learning_rate == 1.0 and isinstance(cfg.training.learning_rate, float)
    preset = write(tmp_path, "[training]\nlearning_rate = 1\nresume = false\n")
    cfg = load_config(["--config", preset])
    assert cfg.training.learning_rate == 1.0 and cfg.training.resume == "false"  # TOML's false is the choice
    assert load_config(["--config", write(tmp_path, '[training]\nresume = "auto"\n')]).training.resume == "auto"


def test_unknown_keys_suggest_the_nearest(tmp_path):
    preset = write(tmp_path, "[training]\nmax_iter = 5\nn_layer = 2\n[modle]\nn_head = 2\n")
    found = problems(["--config", preset, "--training.lerning_rate", "0.1"])
    assert any("unknown key training.max_iter (did you mean training.max_iters?)" in p for p in found)
    assert any("unknown key training.n_layer (did you mean model.n_layer?)" in p for p in found)
    assert any("unknown section [modle] (did you mean model?)" in p for p in found)
    assert any("training.lerning_rate (did you mean training.learning_rate?)" in p for p in found)
    assert len(found) == 4  # all problems at once


def test_type_and_range_errors_name_field_value_and_rule(tmp_path):
    preset = write(tmp_path, '[training]\nbatch_size = "64"\n')
    found = problems(["--config", preset, "--training.max_iters", "1.5", "--model.attention", "fast",
                      "--training.compile", "yes", "--model.n_embd", "100", "--model.n_head", "3",
                      "--training.eval_batches", "0", "--model.dropout", "1.0"])
    text = "\n".join(found)
    assert "training.batch_size = '64' is a str, expected an int" in text
    assert "training.max_iters = '1.5' is not an int" in text
    assert "model.attention = 'fast' is not one of: eager, sdpa, flex" in text
    assert "training.compile = 'yes' is not a boolean: use true or false" in text
    assert "model.n_embd (100) must be divisible by model.n_head (3)" in text
    assert "training.eval_batches = 0 must be at least 1" in text
    assert "model.dropout = 1.0 must be in [0, 1)" in text
    assert len(found) == 7


def test_bad_files_and_arguments():
    assert "no such file" in problems(["--config", "nope.toml"])[0]
    assert "needs a value" in problems(["--model.n_layer"])[0]
    assert "unexpected argument 'oops'" in problems(["oops"])[0]


def test_toml_syntax_error(tmp_path):
    assert "not valid TOML" in problems(["--config", write(tmp_path, "[training\n")])[0]


def test_cli_exit_code_and_no_traceback(tmp_path):
    preset = write(tmp_path, "[training]\nmax_iterz = 5\n")
    r = subprocess.run([sys.executable, "train.py", "--config", preset, "--model.n_head", "x"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)


def test_help_lists_every_field_from_the_schema():
    r = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0
    for section, cls in config.SECTIONS.items():
        for key, f in config.fields_of(cls).items():
            assert f"--{section}.{key} " in r.stdout
            assert f.metadata["doc"] in r.stdout
    assert "default 'sdpa'" in r.stdout and "(cosine | linear | constant | wsd)" in r.stdout


def test_every_preset_is_valid():
    presets = sorted((ROOT / "configs").rglob("*.toml"))
    assert len(presets) >= 5
    for preset in presets:
        load_config(["--config", str(preset)])
        assert preset.read_text().startswith("#"), f"{preset} must say what it is for in a comment"


def test_reference_preset_is_what_the_benchmark_expects():
    cfg = load_config(["--config", str(ROOT / "configs/cpu/reference.toml")])
    m, t = cfg.model, cfg.training
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout) == (4, 4, 128, 64, 0.0)
    assert (t.batch_size, t.learning_rate, t.min_lr, t.warmup_iters, t.lr_schedule, t.max_iters) == \
        (12, 1e-3, 1e-4, 100, "cosine", 2000)
    assert (t.precision, t.eval_interval, t.eval_batches) == ("fp32", 250, 20)


def test_to_toml_round_trips(tmp_path):
    cfg = load_config(["--model.n_layer", "3", "--training.resume", "--data.doc_mask", "true"])
    again = load_config(["--config", write(tmp_path, options.to_toml(cfg))])
    assert again == cfg


def test_every_script_parses_with_the_same_machinery_and_shows_defaults(capsys):
    """One parser for all scripts: generated --help with each option's default, and typos suggested."""
    import bench
    import chat
    import export
    import eval as eval_py
    import plot
    import prepare
    import sample
    import train

    for script in (train.cli, prepare.main, sample.main, export.main, plot.main, bench.main, eval_py.main, chat.main):
        assert script(["--help"]) == 0
        out = capsys.readouterr().out
        # It opens with the usage, one line on what the script does, and at least two example commands.
        usage, what, examples = out.split("\n\n")[:3]
        assert usage.startswith("usage: python ") and len(what.splitlines()) == 1, script.__module__
        assert sum(line.strip().startswith(("python ", "torchrun ")) for line in examples.splitlines()) >= 2
        options = [line for line in out.splitlines() if re.match(r"  (--|[A-Z]+ )", line)]  # positionals: LOGS ...
        descriptions = [line for line in out.splitlines() if line.startswith("      ")]
        assert options and len(descriptions) == len(options), script.__module__
        assert all("; default " in line for line in descriptions), script.__module__
    assert train.cli(["--help"]) == 0  # and train.py's lists every preset, with what it is for
    listed = re.findall(r"^  (configs/\S+\.toml) +(\S.*)$", capsys.readouterr().out, re.M)
    assert [path for path, _ in listed] == sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("configs/*/*.toml"))
    assert all(5 < len(what) <= 60 for _, what in listed), listed
    assert sample.main(["--num-sample", "2"]) == 2
    assert "unknown option --num-sample (did you mean --num-samples?)" in capsys.readouterr().err
    assert export.main(["--ckpt", "x"]) == 2
    assert "--out is required" in capsys.readouterr().err


def test_arch_sets_the_switches_you_did_not_set(tmp_path):
    assert {k: getattr(config.ModelConfig(), k) for k in config.ARCHS["gpt2"]} == config.ARCHS["gpt2"]  # defaults
    llama = load_config(["--model.arch", "llama"]).model
    assert (llama.position, llama.norm, llama.mlp, llama.bias) == ("rope", "rmsnorm", "swiglu", False)
    mixed = load_config(["--model.arch", "llama", "--model.mlp", "gelu"]).model  # your switch wins
    assert (mixed.position, mixed.mlp) == ("rope", "gelu")
    preset = write(tmp_path, '[model]\narch = "llama"\nbias = true\n')  # a switch beside the arch wins
    beside = load_config(["--config", preset]).model
    assert (beside.position, beside.bias) == ("rope", True)
    later = load_config(["--config", preset, "--model.arch", "gpt2"]).model  # the command line wins
    assert (later.position, later.norm, later.bias) == ("learned", "layernorm", True)
    cfg = load_config(["--config", preset, "--model.qk_norm", "--model.logit_softcap", "15"])
    snapshot = write(tmp_path, options.to_toml(cfg), "again.toml")  # a run's config.toml: every setting
    assert load_config(["--config", snapshot]) == cfg
    relabelled = load_config(["--config", snapshot, "--model.arch", "gpt2"]).model
    assert (relabelled.position, relabelled.mlp, relabelled.qk_norm) == ("learned", "gelu", True)


def test_arch_problems_are_reported_together():
    found = problems(["--model.arch", "llama", "--model.n_embd", "60", "--model.n_head", "12",
                      "--model.rope_theta", "-1", "--model.mlp", "swish"])
    assert found == ["model.mlp = 'swish' is not one of: gelu, swiglu, relu2",
                     "model.rope_theta = -1.0 must be greater than 0",
                     'model.position = "rope" needs an even head size, but model.n_embd / model.n_head = '
                     "60 / 12 = 5: rotary embeddings turn channels in pairs"]
