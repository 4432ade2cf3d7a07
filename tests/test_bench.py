"""bench.py: its arguments, config overrides, the training table and the profile (tiny model, CPU)."""

import json

import bench

TINY = ["--config", "configs/cpu/smoke.toml", "--device", "cpu", "--steps", "1", "--warmup", "1",
        "--model.n_layer", "1", "--model.n_embd", "32", "--model.n_head", "2", "--training.batch_size", "2"]


def test_overrides_reach_the_trainer_and_the_json(tmp_path, char_data, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--what", "train", *TINY, "--data.processed_dir", char_data, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "--model.n_embd" in result["overrides"] and "32" in result["overrides"]
    rows = {r["what"]: r for r in result["results"]}
    assert "trainer fp32" in rows and "plain eager loop fp32" in rows
    # smoke.toml is 64 tokens long per sequence: 2 x 64 tokens per step with the batch override.
    fp32 = rows["trainer fp32"]
    assert fp32["tokens_per_s"] == 2 * 64 * 1000 / fp32["ms_per_step"]
    assert "configs/cpu/smoke.toml --model.n_layer 1" in capsys.readouterr().out


def test_profile_prints_the_top_operators(capsys):
    assert bench.main(["--what", "profile", *TINY]) == 0
    out = capsys.readouterr().out
    assert "profile: 1 steps, fp32, configs/cpu/smoke.toml" in out
    assert "aten::mm" in out and "Self CPU time total" in out


def test_bad_arguments_are_one_line_errors(capsys):
    assert bench.main(["--what", "train,nope"]) == 2
    assert "error: --what nope is not one of: train, sample, prepare, speedrun, profile" in capsys.readouterr().err
    assert bench.main(["--what", "train", "--stpes", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--stpes" in err and len(err.strip().splitlines()) == 1
