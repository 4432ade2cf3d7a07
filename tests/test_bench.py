"""bench.py: its arguments, config overrides, the training table and the profile (tiny model, CPU)."""

import json

import pytest

import bench
import train
from benchmarks import common, gpu, speed
from lora import add_adapters
from options import load_config
from conftest import ROOT

TINY = ["--config", str(ROOT / "configs/cpu/smoke.toml"), "--device", "cpu", "--steps", "1", "--warmup", "1",
        "--model.n_layer", "1", "--model.n_embd", "32", "--model.n_head", "2", "--training.batch_size", "2"]


def test_overrides_reach_the_trainer_and_the_json(tmp_path, char_data, monkeypatch, capsys):
    seen = []
    real_main = train.main

    def recording_main(cfg):
        seen.append(cfg)
        return real_main(cfg)

    monkeypatch.setattr(train, "main", recording_main)
    out = tmp_path / "bench.json"
    assert bench.main(["--what", "train", *TINY, "--data.processed_dir", char_data, "--json", str(out)]) == 0
    assert [c.training.precision for c in seen] == [p for p in ("fp32", "bf16") if p in common.precisions("cpu")]
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


def test_the_profile_of_a_lora_config_has_its_adapters(tmp_path, char_data, capsys, monkeypatch):
    adapted = []
    monkeypatch.setattr(speed, "add_adapters", lambda model, cfg: adapted.append(cfg.rank) or add_adapters(model, cfg))
    base = ["--data.processed_dir", char_data, "--model.block_size", "16"]
    train.main(load_config([*TINY[:4], *TINY[8:], *base, "--max-iters", "1", "--training.out_dir", str(tmp_path)]))
    lora = ["--training.init_from", str(tmp_path), "--lora.rank", "2"]
    assert bench.main(["--what", "profile", *TINY, *base, *lora]) == 0
    # one plain loop per precision this CPU has (bf16 where it is supported), each with its adapters
    assert adapted == [2] * len(common.precisions("cpu")) and "profile: 1 steps, fp32," in capsys.readouterr().out


def test_bad_arguments_are_one_line_errors(capsys):
    assert bench.main(["--what", "train,nope"]) == 2
    assert "error: --what nope is not one of: train, sample, prepare, records, profile, speedrun, ablation, lora, peft, memory, gpu" in \
        capsys.readouterr().err
    assert bench.main(["--what", "train", "--stpes", "3"]) == 2
    assert capsys.readouterr().err == "error: command line: unknown option --stpes (did you mean --steps?); see --help\n"
    assert bench.main(["--what", "train", "--training.stpes", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "training.stpes" in err and len(err.strip().splitlines()) == 1


def test_gpu_check_without_cuda_is_one_line(tmp_path):
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU; the one-line refusal is for machines without one")
    r = subprocess.run([sys.executable, "bench.py", "--what", "gpu"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: --what gpu needs a CUDA GPU, and this torch (") and r.stderr.count("\n") == 1


def test_gpu_checks_run_on_a_cpu_where_they_can(tmp_path, char_data, monkeypatch):
    """The code of four GPU checks, run on the CPU: fp16 falls back to fp32 there, so this shows that
    the resume comparison, LoRA's comparisons and the projection work, not what they find on a GPU
    (someone with one runs python bench.py --what gpu)."""
    monkeypatch.setattr(gpu, "GPU_TINY", gpu.GPU_TINY + ["--model.n_embd", "32", "--model.block_size", "16",
                                                             "--training.batch_size", "4"])
    opts, cfg = bench.parse([*TINY, "--data.processed_dir", char_data], common.BenchOptions, program="bench.py",
                            preset="configs/base/base.toml")
    row = gpu.gpu_fp16_resume(opts, cfg, "cpu", tmp_path / "fp16")
    assert row["result"].startswith("resumed run bit-identical (weights True, optimizer True, scaler True); fp32")
    assert not row["ok"]  # no fp16 on a CPU: the check only passes where fp16 really ran
    row = gpu.gpu_bf16(opts, cfg, "cpu", tmp_path / "bf16")
    assert row["ok"] == ("bf16" in common.precisions("cpu")) and "val loss" in row["result"]
    row = gpu.gpu_projection(opts, cfg, "cpu", tmp_path / "projection")
    assert row["ok"] and "100 steps projected at" in row["result"] and row["ms_per_step"] > 0
    assert "smoke.toml" in row["what"]
    row = gpu.gpu_lora(opts, cfg, "cpu", tmp_path / "lora")
    assert not row["ok"] and row["result"].startswith("fp32: val loss ")  # no fp16 on a CPU
    # The rest of the check holds: the adapters learn, and merging them changes no logit.
    assert row["best_val_loss"] < row["val_start"] and row["max_diff"] < 1e-4


@pytest.mark.slow  # a torchrun job of 2 processes
def test_the_fsdp_gpu_check_runs_on_a_cpu_with_gloo(tmp_path, char_data, monkeypatch):
    """On a CPU its 2 processes talk through gloo, in bf16 where the CPU has it: the check's comparison
    with one process and its reading of the checkpoint work (on CUDA it needs 2 GPUs)."""
    monkeypatch.setattr(gpu, "GPU_TINY", gpu.GPU_TINY + ["--model.n_embd", "32", "--model.block_size", "16",
                                                             "--training.batch_size", "4"])
    opts, cfg = bench.parse([*TINY, "--data.processed_dir", char_data], common.BenchOptions, program="bench.py",
                            preset="configs/base/base.toml")
    row = gpu.gpu_fsdp(opts, cfg, "cpu", tmp_path)
    assert row["ok"], row
    assert row["what"] == f"FSDP2, 2 processes, {common.low_precision('cpu')}"
    assert "checkpoint read in one process at step 20" in row["result"]


@pytest.mark.slow  # two fresh processes, each importing torch
def test_lora_against_a_full_fine_tune_in_fresh_processes(tmp_path, char_data, capsys):
    config_only = [a for i, a in enumerate(TINY) if a not in ("--steps", "--warmup") and TINY[i - 1] not in (
        "--steps", "--warmup")]  # the same model, trained by train.py: the base weights
    train.main(load_config([*config_only, "--data.processed_dir", char_data, "--max-iters", "2",
                            "--training.eval_batches", "1", "--training.out_dir", str(tmp_path / "base")]))
    out = tmp_path / "bench.json"
    assert bench.main(["--what", "lora", *TINY, "--data.processed_dir", char_data, "--max-iters", "3",
                       "--training.eval_batches", "1", "--training.init_from", str(tmp_path / "base"),
                       "--lora.rank", "2", "--json", str(out)]) == 0
    lora, full = json.loads(out.read_text())["results"]
    assert lora["what"].startswith("LoRA, ") and full["what"].startswith("full fine-tune, ")
    assert lora["val_start"] == full["val_start"]  # the same weights at step 0
    assert 0 < lora["trained_share"] < 0.2 and full["trained_share"] == 1.0
    for row in (lora, full):
        assert 50 < row["start_rss_mb"] < row["peak_rss_mb"] and row["ms_per_step"] > 0
    assert "peak RSS" in capsys.readouterr().out
    assert bench.main(["--what", "lora", *TINY]) == 2  # a config without LoRA: nothing to compare
    assert "--what lora compares a LoRA run with a full fine-tune" in capsys.readouterr().err


def test_an_architecture_is_measured_as_set(char_data, monkeypatch):
    """bench.py applies model overrides to what it times: --model.arch llama times a Llama."""
    seen = []
    real_main = train.main
    monkeypatch.setattr(train, "main", lambda cfg: seen.append(cfg) or real_main(cfg))
    assert bench.main(["--what", "train", *TINY, "--data.processed_dir", char_data, "--model.arch", "llama"]) == 0
    assert seen and all((c.model.position, c.model.norm, c.model.mlp) == ("rope", "rmsnorm", "swiglu") for c in seen)
    assert common.model_for(seen[0]).rotary is not None  # the plain loop's model too


@pytest.mark.slow  # two torchrun jobs of 2 processes, then a few forward and backward passes
def test_memory_fsdp_holds_half_per_process_and_checkpointing_cuts_activations(tmp_path, char_data):
    """Counted from the tensors each process holds: a DDP process holds the whole model's parameters,
    gradients and AdamW state (two numbers per parameter); each of 2 FSDP processes holds its part of
    them, about half (dim 0 of each weight cut in two, the first part a row longer when it is odd), and
    the two parts make the whole. Checkpointing 4 blocks lowers the peak of a forward and backward pass."""
    out = tmp_path / "bench.json"
    assert bench.main(["--what", "memory", *TINY, "--model.n_layer", "4", "--data.processed_dir", char_data,
                       "--json", str(out)]) == 0
    rows = {r["what"]: r for r in json.loads(out.read_text())["results"]}
    ddp, fsdp = ([rows[f"{p}, process {rank} of 2: what it holds"] for rank in (0, 1)] for p in ("ddp", "fsdp"))
    n_params = common.model_for(load_config(["--config", TINY[1], "--model.n_layer", "4", "--model.n_embd", "32",
                                            "--model.n_head", "2", "--data.processed_dir", char_data])).num_params()
    whole = {"params_mb": 4 * n_params / 2**20, "grads_mb": 4 * n_params / 2**20, "optimizer_mb": 8 * n_params / 2**20}
    for kind, mb in whole.items():  # fp32; AdamW's one-number step count per tensor is left to the 1%
        assert ddp[0][kind] == ddp[1][kind] == pytest.approx(mb, rel=0.01), kind
        assert fsdp[0][kind] + fsdp[1][kind] == pytest.approx(mb, rel=0.01), kind
        assert all(0.45 < part[kind] / mb < 0.55 for part in fsdp), kind
    plain, checkpointed = rows["activations, no checkpointing, fp32"], rows["activations, with checkpointing, fp32"]
    assert 0 < checkpointed["peak_mb"] < 0.7 * plain["peak_mb"]


def test_records_preparation_is_timed_and_its_memory_measured():
    """--what records on one copy of the pairs (3 MB; 200 MB in bench.py): prepare.py in a process of its own,
    timed, its peak RSS."""
    from benchmarks.speed import bench_records

    [row] = bench_records(None, None, "cpu", target_mb=1)
    assert row["what"] == "prepare.py, 3 MB of JSONL pairs, bpe" and row["seconds"] > 0
    assert 50 < row["peak_rss_mb"] < 2000  # torch and tiktoken loaded: tens of MB at least


def test_peft_sides_take_turns_and_each_turn_is_a_ratio(monkeypatch, tmp_path):
    """The two sides' processes alternate (A B A B A B), and the speed-up is the median of the turns' ratios,
    so that a slow spell of the machine, which slows both sides of a turn, cancels out."""
    from benchmarks import peers

    calls = []
    times = {"ours": [100, 200, 300], "peft": [150, 200, 390]}  # turns: 1.5x, 1.0x, 1.3x

    def one_side(side, name, warmup, argv):
        calls.append(side)
        return {"ms_per_step": times[side][calls.count(side) - 1], "peak_rss": 2**20 * len(calls)}

    monkeypatch.setattr(peers, "one_side", one_side)
    monkeypatch.setattr(peers.export, "export", lambda *args: tmp_path)
    monkeypatch.setattr(peers, "generation", lambda opts, folder, device: [])
    monkeypatch.setattr(peers, "precisions", lambda device_type: ["fp32"])
    opts, cfg = bench.parse(["--lora.rank", "2", "--training.init_from", str(tmp_path)], common.BenchOptions,
                            program="bench.py", preset="configs/finetune/smollm2_lora.toml")
    ours, theirs, speed_up = peers.bench_peft(opts, cfg, "cpu")
    assert calls == ["ours", "peft"] * 3
    assert (ours["ms_per_step"], theirs["ms_per_step"]) == (200, 200)  # medians: 1.0x between them
    assert (ours["peak_rss_mb"], theirs["peak_rss_mb"]) == (5, 6)  # the largest of each side's turns
    assert speed_up["ratio"] == 1.3 and speed_up["result"] == "each turn: 1.50x, 1.00x, 1.30x"
