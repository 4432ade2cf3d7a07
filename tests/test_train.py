"""train.py: the loop, checkpoints, exact resume, early stopping, and its errors (tiny models, CPU)."""

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint
import lifecycle
import train
from checkpoint import CheckpointError
from config import ConfigError
from options import load_config
from data import DataError
from conftest import CORPUS, ROOT, prepare_text, run_killed_after_checkpoint


def tiny(out_dir, data_dir, *extra):
    """A config small enough that a run of a few dozen steps takes a second or two."""
    return load_config(["--data.processed_dir", str(data_dir), "--model.n_layer", "1", "--model.n_head", "2",
                        "--model.n_embd", "32", "--model.block_size", "16", "--model.dropout", "0",
                        "--training.batch_size", "4", "--training.max_iters", "20",
                        "--training.eval_interval", "10", "--training.eval_batches", "2",
                        "--training.log_interval", "1", "--training.warmup_iters", "2",
                        "--training.device", "cpu", "--training.out_dir", str(out_dir), *extra])


def weights(path):
    return checkpoint.load_weights(path).state_dict


def stored(path) -> dict:
    """The whole checkpoint: weights, optimizer and loop state."""
    return checkpoint.load_weights(path).training


def read_log(out_dir):
    return json.loads((out_dir / "train_log.json").read_text())


def test_a_short_run_writes_everything(tmp_path, char_data, capsys):
    summary = train.main(tiny(tmp_path, char_data))
    assert summary["step"] == 20 and summary["status"] == "finished"
    for name in ("ckpt_last.pt", "ckpt_best.pt", "ckpt_last.json", "train_log.json", "config.toml"):
        assert (tmp_path / name).exists(), name
    log = read_log(tmp_path)
    assert [e["step"] for e in log["evals"]] == [0, 10, 20]
    assert [r["step"] for r in log["train"]] == list(range(1, 21))
    assert log["evals"][-1]["val_loss"] < log["evals"][0]["val_loss"]
    assert log["config"]["model"]["vocab_size"] == 65 and log["run"]["status"] == "finished"
    assert set(log["evals"][0]) >= {"step", "train_loss", "val_loss", "lr", "tokens", "elapsed_s"}
    ckpt = stored(tmp_path / "ckpt_last.pt")
    assert ckpt["step"] == 20 and ckpt["config"] == log["config"] and ckpt["meta"]["tokenizer"] == "char"
    assert json.loads((tmp_path / "ckpt_last.json").read_text())["step"] == 20
    out = capsys.readouterr().out
    assert "effective batch: 4 x 1 accumulation = 4 sequences = 64 tokens per step" in out
    assert "python sample.py --ckpt" in out and "best val loss" in out
    assert load_config(["--config", str(tmp_path / "config.toml")]).to_dict() == log["config"] | {
        "model": log["config"]["model"]}


def test_grad_accumulation_2x4_equals_1x8(tmp_path, char_data):
    train.main(tiny(tmp_path / "a", char_data, "--training.batch_size", "8", "--training.max_iters", "1"))
    train.main(tiny(tmp_path / "b", char_data, "--training.batch_size", "4", "--training.grad_accum_steps",
                    "2", "--training.max_iters", "1"))
    a, b = weights(tmp_path / "a" / "ckpt_last.pt"), weights(tmp_path / "b" / "ckpt_last.pt")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    evals = read_log(tmp_path / "a")["evals"]
    assert evals[1]["val_loss"] != evals[0]["val_loss"]  # the step really changed the weights


def test_lr_schedule():
    t = load_config(["--training.learning_rate", "1e-3", "--training.min_lr", "1e-4",
                     "--training.warmup_iters", "10", "--training.max_iters", "110"]).training
    assert train.get_lr(0, t) == pytest.approx(1e-4)       # warmup starts at lr / warmup
    assert train.get_lr(9, t) == pytest.approx(1e-3)
    assert train.get_lr(60, t) == pytest.approx(5.5e-4)    # cosine halfway: the mean of lr and min_lr
    assert train.get_lr(110, t) == pytest.approx(1e-4)
    t.lr_schedule = "linear"
    assert train.get_lr(35, t) == pytest.approx(1e-3 - 0.25 * 9e-4)
    t.lr_schedule = "constant"
    assert train.get_lr(100, t) == pytest.approx(1e-3)


def test_wsd_schedule_and_lengths_as_fractions():
    # warmup 10% of 200 steps = 20, stable at the peak, then the last 25% (50 steps) decay linearly.
    t = load_config(["--training.learning_rate", "1e-3", "--training.min_lr", "1e-4", "--training.max_iters", "200",
                     "--training.lr_schedule", "wsd", "--training.warmup_frac", "0.1",
                     "--training.decay_frac", "0.25"]).training
    assert t.warmup_iters == 0  # warmup_frac given: the default warmup_iters (100) is turned off
    lrs = [train.get_lr(s, t) for s in range(201)]
    assert lrs[0] == pytest.approx(1e-3 / 20) and lrs[19] == pytest.approx(1e-3)
    assert lrs[20:151] == [pytest.approx(1e-3)] * 131  # stable until step 150
    assert lrs[175] == pytest.approx(1e-3 - 0.5 * 9e-4)  # halfway through the decay
    assert lrs[200] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(lrs[150:], lrs[151:]))  # strictly decreasing in the decay
    # The same lengths as step counts: the same schedule.
    steps = load_config(["--training.learning_rate", "1e-3", "--training.min_lr", "1e-4", "--training.max_iters",
                         "200", "--training.lr_schedule", "wsd", "--training.warmup_iters", "20",
                         "--training.decay_iters", "50"]).training
    assert steps.decay_frac == 0.0 and [train.get_lr(s, steps) for s in range(201)] == lrs
    # A warmup as a fraction works for cosine too: the decay starts where the warmup ends.
    cos = load_config(["--training.max_iters", "100", "--training.warmup_frac", "0.2"]).training
    assert train.get_lr(19, cos) == pytest.approx(cos.learning_rate) and train.get_lr(20, cos) == pytest.approx(
        cos.learning_rate)
    assert train.get_lr(60, cos) == pytest.approx((cos.learning_rate + cos.min_lr) / 2)


def test_a_length_given_both_ways_is_refused(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(["--training.warmup_iters", "10", "--training.warmup_frac", "0.1",
                     "--training.decay_iters", "5", "--training.decay_frac", "0.3"])
    assert e.value.problems == [
        "training.warmup_iters (10) and training.warmup_frac (0.1) both set a length: set the other one to 0",
        "training.decay_iters (5) and training.decay_frac (0.3) both set a length: set the other one to 0"]
    # Given in different places, the command line wins over the preset, as for any setting.
    preset = tmp_path / "p.toml"
    preset.write_text("[training]\nwarmup_iters = 50\ndecay_frac = 0.3\n")
    t = load_config(["--config", str(preset), "--training.warmup_frac", "0.1", "--training.decay_iters", "7"]).training
    assert (t.warmup_iters, t.warmup_frac, t.decay_iters, t.decay_frac) == (0, 0.1, 7, 0.0)
    t = load_config(["--config", str(preset), "--training.warmup_iters", "9"]).training
    assert (t.warmup_iters, t.warmup_frac, t.decay_iters, t.decay_frac) == (9, 0.0, 0, 0.3)


def test_early_stopping_and_best_checkpoint(tmp_path, char_data, capsys):
    # A min_delta no improvement can reach: the first eval is the best, then patience runs out.
    cfg = tiny(tmp_path, char_data, "--training.early_stopping", "true", "--training.early_stopping_patience",
               "2", "--training.early_stopping_min_delta", "100", "--training.max_iters", "100")
    summary = train.main(cfg)
    assert summary["status"] == "early_stopped" and summary["step"] == 20
    log = read_log(tmp_path)
    assert log["run"]["early_stop_step"] == 20 and "early stopping" in log["run"]["stop_reason"]
    assert not (tmp_path / "ckpt_best.pt").exists()  # step 0 is logged, never saved: nothing beat it
    assert json.loads((tmp_path / "ckpt_last.json").read_text())["step"] == 20
    out = capsys.readouterr().out
    assert "early stopping: val loss has not improved" in out
    assert "no evaluation improved on step 0 (val " in out and "so there is no ckpt_best.pt" in out
    assert f"python sample.py --ckpt {tmp_path}\n" in out  # which takes ckpt_last.pt when there is no best


def test_resume_is_bit_identical(tmp_path, char_data, monkeypatch):
    extra = ("--model.dropout", "0.1", "--training.grad_accum_steps", "2")  # dropout draws from the RNG
    train.main(tiny(tmp_path / "full", char_data, *extra))

    run_killed_after_checkpoint(monkeypatch, tiny(tmp_path / "cut", char_data, *extra), step=10)
    train.main(tiny(tmp_path / "cut", char_data, *extra, "--resume"))

    full, cut = read_log(tmp_path / "full"), read_log(tmp_path / "cut")
    assert [r["loss"] for r in cut["train"]] == [r["loss"] for r in full["train"]]
    assert [r["step"] for r in cut["evals"]] == [0, 10, 20]  # no repeated steps after the resume
    a, b = weights(tmp_path / "full" / "ckpt_last.pt"), weights(tmp_path / "cut" / "ckpt_last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_raising_max_iters_on_resume_extends_the_run(tmp_path, char_data):
    train.main(tiny(tmp_path, char_data))
    summary = train.main(tiny(tmp_path, char_data, "--training.max_iters", "30", "--resume"))
    assert summary["step"] == 30
    assert [e["step"] for e in read_log(tmp_path)["evals"]] == [0, 10, 20, 30]


def test_kill_during_a_checkpoint_write_leaves_loadable_files(tmp_path, char_data, monkeypatch):
    train.main(tiny(tmp_path, char_data, "--training.max_iters", "10"))
    before = weights(tmp_path / "ckpt_last.pt")
    real_save = torch.save

    def dies_halfway(obj, f):
        real_save(obj, f)
        f.file.truncate(100)  # the process dies with half a file written
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        train.main(tiny(tmp_path, char_data, "--training.max_iters", "20", "--resume"))
    monkeypatch.undo()
    after = weights(tmp_path / "ckpt_last.pt")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert read_log(tmp_path)["evals"][-1]["step"] == 20  # valid JSON; it may run ahead of the checkpoint
    train.main(tiny(tmp_path, char_data, "--training.max_iters", "20", "--resume"))
    assert [e["step"] for e in read_log(tmp_path)["evals"]] == [0, 10, 20]  # trimmed, then continued


def test_mismatched_checkpoint_is_refused(tmp_path, char_data):
    train.main(tiny(tmp_path, char_data, "--training.max_iters", "10"))
    with pytest.raises(CheckpointError, match="model.n_layer: 1 in the weights, 2 in the config; "
                                              "model.n_embd: 32 in the weights, 64 in the config"):
        train.main(tiny(tmp_path, char_data, "--model.n_layer", "2", "--model.n_embd", "64", "--resume"))
    r = subprocess.run([sys.executable, "train.py", "--data.processed_dir", char_data, "--model.n_layer", "1",
                        "--model.n_head", "2", "--model.n_embd", "32", "--model.block_size", "32",
                        "--training.out_dir", str(tmp_path), "--device", "cpu", "--resume"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "model.block_size: 16 in the weights, 32 in the config" in r.stderr


def test_resume_takes_the_model_shape_from_the_checkpoint(tmp_path, char_data, capsys):
    train.main(tiny(tmp_path, char_data, "--training.max_iters", "10"))
    cfg = load_config(["--data.processed_dir", char_data, "--training.out_dir", str(tmp_path), "--device",
                       "cpu", "--max-iters", "12", "--training.eval_batches", "2", "--resume"])
    assert cfg.model.n_layer == 6  # the default, not chosen by the user
    assert train.main(cfg)["step"] == 12
    assert cfg.model.n_layer == 1 and cfg.model.n_embd == 32 and cfg.model.block_size == 16


def test_init_from_starts_a_new_run_from_weights(tmp_path, char_data, capsys):
    train.main(tiny(tmp_path / "a", char_data, "--training.max_iters", "10"))
    summary = train.main(tiny(tmp_path / "b", char_data, "--training.max_iters", "10",
                              "--training.init_from", str(tmp_path / "a" / "ckpt_last.pt")))
    assert summary["step"] == 10
    log_a, log_b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert log_b["evals"][0]["val_loss"] == pytest.approx(log_a["evals"][-1]["val_loss"])


def test_a_char_model_fine_tunes_on_a_text_with_fewer_characters(tmp_path, char_data, capsys):
    """Another text is prepared with the model's characters, so a char model can go on training on it."""
    train.main(tiny(tmp_path / "a", char_data, "--training.max_iters", "4"))
    model_chars = stored(tmp_path / "a" / "ckpt_last.pt")["meta"]["chars"]
    text = tmp_path / "mine.txt"
    text.write_text("the cat sat on the mat. " * 400, encoding="utf-8")  # 11 of the model's 65 characters
    start = ["--training.init_from", str(tmp_path / "a" / "ckpt_last.pt"), "--training.max_iters", "4"]
    cfg = tiny(tmp_path / "b", tmp_path / "data_b", *start, "--data.input", str(text))
    assert train.main(cfg)["step"] == 4
    assert f"preparing it from {text} with the model's tokenizer" in capsys.readouterr().out
    meta = json.loads((tmp_path / "data_b" / "meta.json").read_text())
    assert meta["chars"] == model_chars and cfg.model.vocab_size == 65
    # The same text prepared on its own has its 11 characters: a folder the user named is not replaced.
    prepare_text(text, tmp_path / "own")
    with pytest.raises(DataError, match=r"other characters \(11 there, 65 now\)\); set data.processed_dir to a "
                                        "new folder"):
        train.main(tiny(tmp_path / "c", tmp_path / "own", *start, "--data.input", str(text)))
    text.write_text("the café sat on the mat. " * 400, encoding="utf-8")
    with pytest.raises(DataError, match="has characters the model does not know: 'é'"):
        train.main(tiny(tmp_path / "d", tmp_path / "data_d", *start, "--data.input", str(text)))


def test_a_model_on_data_of_another_tokenizer_names_the_setting(tmp_path, char_data, gpt2_tokenizer):
    train.main(tiny(tmp_path / "a", char_data, "--training.max_iters", "2"))
    prepare_text(CORPUS, tmp_path / "bpe", tokenizer="bpe")
    with pytest.raises(CheckpointError, match=r"does not match this run: data.tokenizer: 'char' in the weights, "
                                              r"'bpe' in the config; the model reads text with its own tokenizer: "
                                              r"drop data.tokenizer, and train.py prepares the data with it$"):
        train.main(tiny(tmp_path / "b", tmp_path / "bpe", "--data.tokenizer", "bpe",
                        "--training.init_from", str(tmp_path / "a" / "ckpt_last.pt")))


def test_non_finite_loss_stops_with_the_step(tmp_path, char_data, monkeypatch):
    real_forward = train.GPT.forward
    calls = {"n": 0}

    def nan_at_step_5(self, idx, targets=None, doc_ids=None):
        logits, loss = real_forward(self, idx, targets, doc_ids)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 5:
                loss = loss * math.nan
        return logits, loss

    train.main(tiny(tmp_path, char_data, "--training.max_iters", "10"))  # a good checkpoint at step 10
    good = weights(tmp_path / "ckpt_last.pt")
    monkeypatch.setattr(train.GPT, "forward", nan_at_step_5)
    with pytest.raises(lifecycle.TrainError, match="the loss became nan at step 15"):
        train.main(tiny(tmp_path, char_data, "--resume"))
    after = weights(tmp_path / "ckpt_last.pt")
    assert all(torch.equal(good[k], after[k]) for k in good)
    assert read_log(tmp_path)["run"]["status"] == "diverged"


def test_data_is_prepared_on_first_use_and_never_mixed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "input.txt").write_text(CORPUS.read_text()[:50_000])
    cfg = tiny(tmp_path / "run", "", "--data.input", "corpus/input.txt", "--training.max_iters", "2")
    train.main(cfg)
    assert "no prepared data in data/processed/corpus_char: preparing it from corpus/input.txt" \
        in capsys.readouterr().out
    # The same folder, asked for with the other tokenizer, is refused rather than used.
    cfg = tiny(tmp_path / "run2", "data/processed/corpus_char", "--data.input", "corpus/input.txt",
               "--tokenizer", "bpe")
    with pytest.raises(DataError, match="data.tokenizer: 'char' there, 'bpe' now"):
        train.main(cfg)


def test_no_gpu_for_device_cuda(tmp_path, char_data):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the error is for machines without one")
    r = subprocess.run([sys.executable, "train.py", "--data.processed_dir", char_data, "--device", "cuda",
                        "--training.out_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "training.device = cuda, but this torch" in r.stderr and "sees no CUDA GPU; use cpu" in r.stderr


@pytest.mark.parametrize("fmt", ["native", "hf"])
def test_init_from_an_exported_folder(tmp_path, char_data, fmt):
    import export

    train.main(tiny(tmp_path / "a", char_data, "--training.max_iters", "10"))
    export.export(str(tmp_path / "a" / "ckpt_last.pt"), str(tmp_path / "exp"), fmt=fmt)
    # No model settings given: the shape comes from the export.
    cfg = load_config(["--data.processed_dir", char_data, "--training.out_dir", str(tmp_path / "b"),
                       "--device", "cpu", "--max-iters", "2", "--training.eval_interval", "10",
                       "--training.eval_batches", "2", "--training.batch_size", "4",
                       "--training.init_from", str(tmp_path / "exp")])
    train.main(cfg)
    start_loss = read_log(tmp_path / "b")["evals"][0]["val_loss"]
    assert start_loss == pytest.approx(read_log(tmp_path / "a")["evals"][-1]["val_loss"], abs=1e-5)
    # A conflicting choice is reported, not silently overridden.
    cfg = load_config(["--data.processed_dir", char_data, "--training.out_dir", str(tmp_path / "c"),
                       "--device", "cpu", "--model.n_embd", "48", "--training.init_from", str(tmp_path / "exp")])
    with pytest.raises(CheckpointError, match="model.n_embd: 32 in the weights, 48 in the config"):
        train.main(cfg)
    # --resume continues out_dir's own run: where there is none, it says so.
    cfg = load_config(["--data.processed_dir", char_data, "--training.out_dir", str(tmp_path / "d"),
                       "--device", "cpu", "--resume"])
    with pytest.raises(CheckpointError, match=r"holds no checkpoint \(ckpt_last.pt\); train without --resume first"):
        train.main(cfg)


def test_resume_is_bit_identical_with_muon(tmp_path, char_data, monkeypatch):
    extra = ("--training.optimizer", "muon")
    train.main(tiny(tmp_path / "full", char_data, *extra))
    run_killed_after_checkpoint(monkeypatch, tiny(tmp_path / "cut", char_data, *extra), step=10)
    train.main(tiny(tmp_path / "cut", char_data, *extra, "--resume"))
    a, b = weights(tmp_path / "full" / "ckpt_last.pt"), weights(tmp_path / "cut" / "ckpt_last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


FAULTS = """
import resource, sys, torch
from runtime import start_process
if sys.argv[1] == "trainer":
    start_process("cpu")
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # a run's first steps: the heap grows to what a step needs (a small object may split it)
    torch.ones(2**25)  # 128 MiB, freed at once, as a step's logits are
before = faults()
torch.ones(2**25)
print(faults() - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="runtime.reuse_freed_memory tunes Linux's C library only")
def test_a_cpu_run_reuses_freed_memory_without_mapping_it_again():
    """A tensor made again after others of its size were freed: by default the C library maps its pages
    afresh from the kernel, one page fault per 4 KiB; in a training process (start_process on a CPU) it
    reuses them."""
    def faults(how: str) -> int:
        return int(subprocess.run([sys.executable, "-c", FAULTS, how], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout)
    plain, trainer = faults("plain"), faults("trainer")
    assert trainer * 10 < plain, (plain, trainer)


def test_precision_on_cpu(tmp_path, char_data, capsys):
    # fp16 autocast is a GPU feature: on CPU the run says so and trains in fp32.
    train.main(tiny(tmp_path / "fp16", char_data, "--training.precision", "fp16", "--max-iters", "2"))
    assert "notice: fp16 autocast is not used on CPU; training in fp32" in capsys.readouterr().out
    assert read_log(tmp_path / "fp16")["run"]["precision"] == "fp32"
    # bf16 autocast runs where the CPU supports it, and the loss still goes down.
    train.main(tiny(tmp_path / "bf16", char_data, "--training.precision", "bf16"))
    log = read_log(tmp_path / "bf16")
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert log["run"]["precision"] == "bf16"
    else:
        assert log["run"]["precision"] == "fp32" and "no bf16 support" in capsys.readouterr().out
    assert log["evals"][-1]["val_loss"] < log["evals"][0]["val_loss"]


@pytest.mark.slow
@pytest.mark.skipif(not any(map(shutil.which, ("c++", "g++", "clang++"))),
                    reason="torch.compile on CPU needs a C++ compiler, and none is installed")
def test_compiled_training_matches_eager_and_saves_plain_weights(tmp_path, char_data):
    """training.compile = true (inductor on CPU; needs a C compiler) trains the same model as eager:
    the same losses up to kernel rounding, and checkpoints that load into an uncompiled GPT."""
    steps = ["--training.max_iters", "6", "--training.eval_interval", "3"]
    train.main(tiny(tmp_path / "eager", char_data, *steps))
    train.main(tiny(tmp_path / "compiled", char_data, *steps, "--training.compile", "true"))
    eager, compiled = read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")
    assert len(compiled["train"]) == 6
    for a, b in zip(eager["train"], compiled["train"]):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4), a["step"]
    assert compiled["evals"][-1]["val_loss"] == pytest.approx(eager["evals"][-1]["val_loss"], abs=1e-4)
    a, b = weights(tmp_path / "eager" / "ckpt_last.pt"), weights(tmp_path / "compiled" / "ckpt_last.pt")
    assert a.keys() == b.keys()  # no "_orig_mod." prefixes: the uncompiled model was saved
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), k


def test_a_llama_run_fine_tunes_from_its_export_with_its_settings(tmp_path, char_data):
    import export

    train.main(tiny(tmp_path / "a", char_data, "--model.arch", "llama", "--training.max_iters", "10"))
    export.export(str(tmp_path / "a" / "ckpt_last.pt"), str(tmp_path / "exp"), fmt="hf")  # LlamaForCausalLM

    def start_from_export(out: str, *extra: str):
        return load_config(["--data.processed_dir", char_data, "--training.out_dir", str(tmp_path / out),
                            "--device", "cpu", "--max-iters", "2", "--training.eval_interval", "10",
                            "--training.eval_batches", "2", "--training.batch_size", "4",
                            "--training.init_from", str(tmp_path / "exp"), *extra])
    cfg = start_from_export("b")  # no model settings: all of them come from the export
    train.main(cfg)
    assert (cfg.model.arch, cfg.model.position, cfg.model.mlp, cfg.model.bias) == ("llama", "rope", "swiglu", False)
    start_loss = read_log(tmp_path / "b")["evals"][0]["val_loss"]
    assert start_loss == pytest.approx(read_log(tmp_path / "a")["evals"][-1]["val_loss"], abs=1e-5)
    # Another architecture is refused, every conflicting choice named at once.
    with pytest.raises(CheckpointError, match=r"model.arch: 'llama' in the weights, 'gpt2' in the config; "
                                              r"model.mlp: 'swiglu' in the weights, 'relu2' in the config$"):
        train.main(start_from_export("c", "--model.arch", "gpt2", "--model.mlp", "relu2"))
    # Rotary positions have no table: a rope model trains with another context length.
    assert train.main(start_from_export("d", "--model.block_size", "8"))["step"] == 2


def test_the_finetune_presets_improve_on_their_start(tmp_path, char_data, capsys):
    """configs/finetune/shakespeare_finetune.toml and shakespeare_lora.toml, run briefly on a model
    trained to the end of its schedule (as exports/small is), must beat the starting weights at their
    evaluations, and the summary says by how much."""
    import export

    train.main(tiny(tmp_path / "base", char_data, "--max-iters", "600", "--training.learning_rate", "3e-3",
                    "--training.min_lr", "3e-4", "--training.eval_interval", "600", "--training.eval_batches", "20",
                    "--training.batch_size", "32", "--training.log_interval", "100"))
    export.export(tmp_path / "base", tmp_path / "exp")
    for preset in ("shakespeare_finetune", "shakespeare_lora"):
        capsys.readouterr()
        cfg = load_config(["--config", str(ROOT / f"configs/finetune/{preset}.toml"),
                           "--training.init_from", str(tmp_path / "exp"), "--data.processed_dir", char_data,
                           "--training.out_dir", str(tmp_path / preset), "--max-iters", "100",
                           "--training.eval_interval", "50"])
        summary = train.main(cfg)
        evals = read_log(tmp_path / preset)["evals"]
        assert [e["step"] for e in evals] == [0, 50, 100]
        assert all(e["val_loss"] < evals[0]["val_loss"] for e in evals[1:]), (preset, [e["val_loss"] for e in evals])
        assert summary["best_step"] == 100 and (tmp_path / preset / "ckpt_best.pt").exists()
        start, best = evals[0]["val_loss"], evals[-1]["val_loss"]
        assert (f"best val loss {best:.4f} at step 100 ({best - start:+.4f} from {start:.4f} at the start)"
                in capsys.readouterr().out)
