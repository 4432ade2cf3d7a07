"""What train.py shows besides the loss: validation bits per byte, gradient norms and clipping, samples
at each evaluation, and a profiler window (tiny models, CPU)."""

import json
import math

import pytest
import torch

import sample
import train
from checkpoint import load_weights
from config import ConfigError
from options import load_config
from conftest import prepare_text
from data import get_batch, load_tokens
from model import GPT

# Non-ASCII on purpose: bits per byte must count bytes, not characters.
TEXT = "Où est le café, mon ami? Très loin d'ici — là-bas.\n" * 300


def tiny(out_dir, data_dir, *extra):
    return load_config(["--data.processed_dir", str(data_dir), "--model.n_layer", "1", "--model.n_head", "2",
                        "--model.n_embd", "32", "--model.block_size", "16", "--model.dropout", "0",
                        "--training.batch_size", "4", "--training.max_iters", "6", "--training.eval_interval", "3",
                        "--training.eval_batches", "2", "--training.log_interval", "1", "--training.warmup_iters", "2",
                        "--training.device", "cpu", "--training.out_dir", str(out_dir), *extra])


def read_log(out_dir) -> dict:
    return json.loads((out_dir / "train_log.json").read_text())


@pytest.fixture(scope="module")
def accented(tmp_path_factory):
    """TEXT prepared as bin and as txt (whose val.txt holds the val split's text itself)."""
    root = tmp_path_factory.mktemp("accented")
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    prepare_text(root / "text.txt", root / "txt", format="txt")
    return prepare_text(root / "text.txt", root / "bin"), root


def test_prepare_counts_each_splits_bytes(accented):
    meta, root = accented
    assert sum(meta["bytes"].values()) == len(TEXT.encode("utf-8")) > len(TEXT)
    txt_meta = json.loads((root / "txt" / "meta.json").read_text())
    assert txt_meta["bytes"] == meta["bytes"]
    assert meta["bytes"]["val"] == (root / "txt" / "val.txt").stat().st_size  # the val split's own text


def test_val_bits_per_byte_is_the_val_loss_per_byte(accented, tmp_path, capsys):
    meta, root = accented
    train.main(tiny(tmp_path, root / "bin", "--data.input", str(root / "text.txt")))
    evals = read_log(tmp_path)["evals"]
    val_bytes = (root / "txt" / "val.txt").stat().st_size
    for e in evals:  # loss per token x tokens / bytes / ln 2
        assert e["val_bpb"] == pytest.approx(e["val_loss"] * meta["tokens"]["val"] / val_bytes / math.log(2))
    assert meta["tokens"]["val"] < val_bytes  # so bits per byte is below bits per token
    assert f"val {evals[-1]['val_loss']:.4f} = {evals[-1]['val_bpb']:.4f} bits/byte" in capsys.readouterr().out


def test_data_prepared_without_byte_counts_logs_no_bits_per_byte(accented, tmp_path):
    meta, root = accented
    old = tmp_path / "old"
    prepare_text(root / "text.txt", old)
    stored = json.loads((old / "meta.json").read_text())
    del stored["bytes"]  # as prepare.py wrote it before it counted bytes
    (old / "meta.json").write_text(json.dumps(stored))
    train.main(tiny(tmp_path / "run", old, "--data.input", str(root / "text.txt")))
    assert all(e["val_bpb"] is None for e in read_log(tmp_path / "run")["evals"])


def test_grad_norm_is_measured_before_clipping(char_data, tmp_path):
    """The logged norm of step 1 equals the norm of the gradients computed here from the starting
    weights (the seed's) and the same batch; clipping at 1e-3 clips every step, at 1e3 none."""
    cfg = tiny(tmp_path / "a", char_data, "--training.grad_clip", "1e-3", "--max-iters", "4")
    train.main(cfg)
    torch.manual_seed(cfg.training.seed)
    model = GPT(cfg.model)  # the weights train.py starts from
    x, y = get_batch(load_tokens(char_data, "train", load_weights(tmp_path / "a").meta), 16, 4,
                     ("train", cfg.training.seed, 0))
    model(x, y)[1].backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    records = read_log(tmp_path / "a")["train"]
    assert records[0]["grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert expected > 1e-3 and [r["clipped"] for r in records] == [1.0] * 4
    train.main(tiny(tmp_path / "b", char_data, "--training.grad_clip", "1e3", "--max-iters", "4",
                    "--training.log_interval", "2"))
    records = read_log(tmp_path / "b")["train"]
    assert [r["step"] for r in records] == [2, 4] and [r["clipped"] for r in records] == [0.0, 0.0]
    # Without clipping the norm is still measured at each log line, and nothing is clipped.
    train.main(tiny(tmp_path / "c", char_data, "--training.grad_clip", "0", "--max-iters", "4"))
    records = read_log(tmp_path / "c")["train"]
    assert records[0]["grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert all(r["clipped"] == 0 and r["grad_norm"] > 0 for r in records)


def test_samples_at_each_evaluation_leave_training_unchanged(char_data, tmp_path, capsys):
    """The sample is sample.py's (same seed, temperature 0.8) from the checkpoint of that step, and a
    run with samples trains exactly like one without (dropout on: they draw on no shared RNG)."""
    extra = ("--model.dropout", "0.1")
    train.main(tiny(tmp_path / "plain", char_data, *extra))
    train.main(tiny(tmp_path / "samples", char_data, *extra, "--training.sample_tokens", "24",
                    "--training.sample_prompt", "ROMEO:"))
    plain, samples = read_log(tmp_path / "plain"), read_log(tmp_path / "samples")
    assert [r["loss"] for r in samples["train"]] == [r["loss"] for r in plain["train"]]
    assert "sample" not in plain["evals"][0]
    texts = [e["sample"] for e in samples["evals"]]
    assert len(texts) == 3 and all(t.startswith("ROMEO:") and len(t) == 6 + 24 for t in texts)
    out = capsys.readouterr().out
    assert f"sample at step 6:\n{texts[-1]}\n" in out
    assert sample.main(["--ckpt", str(tmp_path / "samples" / "ckpt_last.pt"), "--start", "ROMEO:", "--num-samples",
                        "1", "--max-new-tokens", "24", "--temperature", "0.8", "--seed", "1337"]) == 0
    assert capsys.readouterr().out.endswith(f"\n{texts[-1]}\n")


def test_a_sample_prompt_the_model_cannot_read_is_refused_before_training(char_data, tmp_path):
    with pytest.raises(ConfigError, match="training.sample_prompt has characters not in the vocabulary: 'é'"):
        train.main(tiny(tmp_path, char_data, "--training.sample_tokens", "5", "--training.sample_prompt", "café"))
    assert not (tmp_path / "train_log.json").exists()


def test_profile_window_writes_a_trace_of_its_steps(char_data, tmp_path, capsys):
    train.main(tiny(tmp_path, char_data, "--training.profile_start_step", "2", "--training.profile_end_step", "5",
                    "--training.eval_interval", "6"))
    trace = tmp_path / "profile" / "trace_steps_2-5.json"
    events = json.loads(trace.read_text())["traceEvents"]
    ops = [e["name"] for e in events if e.get("cat") == "cpu_op"]
    assert "aten::mm" in ops and "aten::_fused_adamw_" in ops
    # Exactly the three optimizer steps of the window.
    assert sum(name.startswith("Optimizer.step#") for name in (e.get("name", "") for e in events)) == 3
    out = capsys.readouterr().out
    assert f"profile of steps 2 to 5: {trace}" in out and "Self CPU time total" in out
    assert [p.name for p in (tmp_path / "profile").iterdir()] == [trace.name]  # no temporary file left


@pytest.mark.parametrize("start, end, message", [
    ("5", "3", "training.profile_end_step (3) must be greater than training.profile_start_step (5)"),
    ("4", "0", "training.profile_end_step (0) must be greater than training.profile_start_step (4)"),
    ("2", "7", "training.profile_end_step (7) is after the run's last step (training.max_iters = 6)"),
])
def test_profile_window_outside_the_run_or_reversed_is_refused(tmp_path, start, end, message):
    with pytest.raises(ConfigError) as e:
        tiny(tmp_path / "run", tmp_path / "data", "--training.profile_start_step", start, "--training.profile_end_step", end)
    assert e.value.problems == [message + ("; set both to 0 for no profiling" if "greater" in message else
                                           "; choose a window within the run")]
