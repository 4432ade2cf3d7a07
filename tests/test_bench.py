"""bench.py: its arguments, config overrides, the training table and the profile (tiny model, CPU)."""

import json

import bench
from conftest import ROOT

TINY = ["--config", str(ROOT / "configs/cpu/smoke.toml"), "--device", "cpu", "--steps", "1", "--warmup", "1",
        "--model.n_layer", "1", "--model.n_embd", "32", "--model.n_head", "2", "--training.batch_size", "2"]


def test_overrides_reach_the_trainer_and_the_json(tmp_path, char_data, monkeypatch, capsys):
    seen = []
    real_main = bench.train.main

    def recording_main(cfg):
        seen.append(cfg)
        return real_main(cfg)

    monkeypatch.setattr(bench.train, "main", recording_main)
    out = tmp_path / "bench.json"
    assert bench.main(["--what", "train", *TINY, "--data.processed_dir", char_data, "--json", str(out)]) == 0
    assert [c.training.precision for c in seen] == [p for p in ("fp32", "bf16") if p in bench.precisions("cpu")]
    for cfg in seen:
        assert cfg.model.n_embd == 32 and cfg.training.batch_size == 2 and cfg.data.processed_dir == char_data
    result = json.loads(out.read_text())
    assert result["overrides"] == ["--device", "cpu", *TINY[8:], "--data.processed_dir", char_data]
    assert {r["what"] for r in result["results"]} >= {"trainer fp32", "plain eager loop fp32"}
    assert "smoke.toml --device cpu --model.n_layer 1" in capsys.readouterr().out


def test_profile_prints_the_top_operators(capsys):
    assert bench.main(["--what", "profile", *TINY]) == 0
    out = capsys.readouterr().out
    assert "profile: 1 steps, fp32," in out
    assert "aten::mm" in out and "Self CPU time total" in out


def test_bad_arguments_are_one_line_errors(capsys):
    assert bench.main(["--what", "train,nope"]) == 2
    assert "error: --what nope is not one of: train, sample, prepare, speedrun, profile" in capsys.readouterr().err
    assert bench.main(["--what", "train", "--stpes", "3"]) == 2
    assert capsys.readouterr().err == "error: command line: unknown option --stpes (did you mean --steps?); see --help\n"
    assert bench.main(["--what", "train", "--training.stpes", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "training.stpes" in err and len(err.strip().splitlines()) == 1


def test_an_architecture_is_measured_as_set(char_data, monkeypatch):
    """bench.py applies model overrides to what it times: --model.arch llama times a Llama."""
    seen = []
    real_main = bench.train.main
    monkeypatch.setattr(bench.train, "main", lambda cfg: seen.append(cfg) or real_main(cfg))
    assert bench.main(["--what", "train", *TINY, "--data.processed_dir", char_data, "--model.arch", "llama"]) == 0
    assert seen and all((c.model.position, c.model.norm, c.model.mlp) == ("rope", "rmsnorm", "swiglu") for c in seen)
    assert bench.model_for(seen[0]).rotary is not None  # the plain loop's model too
