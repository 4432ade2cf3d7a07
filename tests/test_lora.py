"""LoRA (lora.py): adapters start as the base model, train alone, resume exactly, merge, and load in PEFT."""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers and peft must never try the network here
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import export  # noqa: E402
import lora  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from checkpoint import CheckpointError, load_weights, save_checkpoint  # noqa: E402
from config import ARCHS, ConfigError, LoraConfig, ModelConfig, TrainingConfig  # noqa: E402
from options import load_config  # noqa: E402
from conftest import ROOT, run_killed_after_checkpoint  # noqa: E402
from test_train import tiny  # noqa: E402
from model import GPT  # noqa: E402
from muon import make_optimizer  # noqa: E402
from tiny_models import TINY  # noqa: E402

FEW = ["--num-samples", "1", "--max-new-tokens", "30"]


def with_lora(out_dir, data_dir, base, *extra):
    """A LoRA run on `base`, with a learning rate high enough that the adapters clearly change the model."""
    return tiny(out_dir, data_dir, "--training.init_from", str(base), "--lora.rank", "4",
                "--training.learning_rate", "1e-2", "--training.min_lr", "1e-3", *extra)


@pytest.fixture(scope="module")
def base(tmp_path_factory, char_data):
    """A tiny char model after 20 steps, the weights the LoRA runs start from: its run folder."""
    out = tmp_path_factory.mktemp("base") / "run"
    train.main(tiny(out, char_data))
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, char_data, base):
    out = tmp_path_factory.mktemp("lora") / "run"
    train.main(with_lora(out, char_data, base))
    return out


def adapted(src) -> GPT:
    """The unmerged model of a LoRA checkpoint, as training had it: base weights plus adapters."""
    model = GPT(src.model)
    lora.add_adapters(model, src.lora.config)
    model.load_state_dict(src.lora.state_dict)
    return model.eval()


def plain(src) -> GPT:
    model = GPT(src.model)
    model.load_state_dict(src.state_dict)
    return model.eval()


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0] if isinstance(model, GPT) else model(idx).logits


IDX = torch.randint(65, (2, 16), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- the layer

def test_adapters_start_as_the_base_model_and_only_they_train():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    idx = torch.randint(37, (2, 16))
    before = logits(model, idx)
    lora.add_adapters(model, LoraConfig(rank=4, dropout=0.1))
    # B = 0: the base model at step 0 (up to the rounding of other kernels for its products: lora.linear)
    torch.testing.assert_close(logits(model.eval(), idx), before, rtol=0, atol=1e-6)
    layers = [n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)]
    assert layers == [f"transformer.h.{i}.{name}" for i in range(2)
                      for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    # The base weights keep their names; the adapters add theirs.
    assert "transformer.h.0.attn.c_attn.weight" in model.state_dict()
    assert model.transformer.h[0].attn.c_attn.lora_A.shape == (4, 16)  # (r, in)
    assert model.transformer.h[0].attn.c_attn.lora_B.shape == (48, 4)  # (out, r)
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapters == {f"{layer}.lora_{x}" for layer in layers for x in "AB"}
    for name in ("adamw", "muon"):  # frozen weights are in no optimizer group
        optimizer = make_optimizer(model, TrainingConfig(weight_decay=0.1, optimizer=name), "cpu")
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
        # A and B are matrices: weight decay pulls them, and so the change B A, towards zero.
        assert all(g["weight_decay"] == 0.1 for g in optimizer.param_groups if g["params"])
    _, loss = model.train()(idx, idx)
    loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    assert model.transformer.h[0].attn.c_attn.lora_B.grad.abs().sum() > 0  # A random: B learns at once


def test_a_base_stored_in_bf16_trains_as_autocast_casts_it():
    """store_base_in keeps the adapted layers' frozen weights in bf16 (embeddings, norms, adapters stay fp32).
    Under bf16 autocast the loss and every adapter's gradient are exactly those of the fp32 base, which
    autocast casts to the same numbers; outside autocast (a run's samples and task answers) each adapted
    layer gives what it gives under autocast."""
    torch.manual_seed(0)
    fp32 = GPT(ModelConfig(**TINY, arch="llama", **ARCHS["llama"], qkv_bias=True))
    lora.add_adapters(fp32, LoraConfig(rank=4))
    with torch.no_grad():
        for p in lora.adapter_state(fp32).values():
            p.normal_(0.0, 0.3)  # B != 0: A gets gradients too
    half = copy.deepcopy(fp32)
    lora.store_base_in(half, torch.bfloat16)
    layers = [m for m in half.modules() if isinstance(m, lora.LoRALinear)]
    assert layers and all(m.weight.dtype == torch.bfloat16 and m.lora_A.dtype == torch.float32 for m in layers)
    assert half.transformer.wte.weight.dtype == torch.float32
    idx = torch.randint(37, (2, 16))
    losses = []
    for model in (fp32, half):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(model(idx, idx)[1])
        losses[-1].backward()
    assert torch.equal(*losses)
    grads = [{n: p.grad for n, p in model.named_parameters() if p.requires_grad} for model in (fp32, half)]
    assert len(grads[0]) == 4 * 4 and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    for a, b in zip((m for m in fp32.modules() if isinstance(m, lora.LoRALinear)), layers):
        x = torch.randn(3, a.in_features)  # fp32, outside autocast: each adapted layer computes as autocast would
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            expected = a(x)
        assert b(x).dtype == torch.float32 and torch.equal(b(x), expected.float())
    torch.testing.assert_close(logits(half.eval(), idx), logits(fp32.eval(), idx), atol=0.1, rtol=0.05)


def test_layer_computes_w_x_plus_scaled_b_a_x_and_merges_into_w():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora.add_adapters(model, LoraConfig(rank=4, alpha=8, targets="attn.c_attn, mlp.c_fc"))
    layer = model.transformer.h[1].mlp.c_fc
    with torch.no_grad():
        for p in lora.adapter_state(model).values():
            p.normal_(0.0, 0.3)  # a trained-looking update
    x = torch.randn(3, 16)
    expected = x @ layer.weight.T + layer.bias + (8 / 4) * x @ layer.lora_A.T @ layer.lora_B.T
    assert torch.allclose(layer(x), expected, atol=1e-6)
    idx = torch.randint(37, (2, 16))
    unmerged = logits(model.eval(), idx)
    assert not torch.allclose(unmerged, logits(plain_gpt(base), idx), atol=1e-3)  # the adapters matter

    lora.merge(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    assert type(model.transformer.h[1].mlp.c_fc) is nn.Linear and model.state_dict().keys() == base.keys()
    assert torch.allclose(logits(model, idx), unmerged, atol=1e-5)

    model = plain_gpt(base)
    lora.add_adapters(model, LoraConfig(rank=4))
    with torch.no_grad():
        for p in lora.adapter_state(model).values():
            p.normal_(0.0, 0.3)
    lora.remove(model)
    assert all(torch.equal(model.state_dict()[k], base[k]) for k in base)  # the base, untouched


def plain_gpt(state) -> GPT:
    model = GPT(ModelConfig(**TINY))
    model.load_state_dict(state)
    return model.eval()


# ----------------------------------------------------------------------------- settings

@pytest.mark.parametrize("extra, message", [
    (["--lora.rank", "4"], "lora.rank = 4 needs pretrained weights to adapt: set training.init_from to a "
                           "checkpoint, run folder or export, or lora.rank = 0 to train every weight"),
    (["--lora.alpha", "0"], "lora.alpha = 0.0 must be greater than 0"),
    (["--lora.rank", "-1"], "lora.rank = -1 must be at least 0"),
    (["--lora.targets", " , "], 'lora.targets is empty: name the layers to adapt, e.g. "attn.c_attn,attn.c_proj", '
                                'or "all"'),
    (["--lora.save", "merged"], "lora.save = 'merged' is not one of: adapters, full"),
])
def test_bad_lora_settings_are_refused_when_parsed(extra, message):
    with pytest.raises(ConfigError) as e:
        load_config(extra)
    assert e.value.problems == [message]


@pytest.mark.parametrize("extra, message", [
    (["--lora.targets", "attn.c_attn,attn.c_fc"],
     "lora.targets: attn.c_fc is not a linear layer of a block (did you mean mlp.c_fc?); they are: attn.c_attn, "
     "attn.c_proj, mlp.c_fc, mlp.c_proj (or all)"),
    (["--lora.targets", "c_attn"],
     "lora.targets: c_attn is not a linear layer of a block (did you mean attn.c_attn?)"),
    (["--lora.rank", "40"], "lora.rank = 40 is larger than the width of attn.c_attn (32), attn.c_proj (32), "
                            "mlp.c_fc (32), mlp.c_proj (32); use at most 32"),
])
def test_targets_and_rank_are_checked_against_the_model(base, tmp_path, char_data, extra, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        train.main(with_lora(tmp_path, char_data, base, *extra))


def test_a_bad_target_is_one_line_on_the_command_line(base, tmp_path, char_data):
    r = subprocess.run([sys.executable, "train.py", "--data.processed_dir", char_data, "--device", "cpu",
                        "--training.out_dir", str(tmp_path), "--training.init_from", str(base), "--lora.rank", "4",
                        "--lora.targets", "attn.qkv"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: lora.targets: attn.qkv is not a linear layer of a block")


# ----------------------------------------------------------------------------- training

def test_a_lora_run_starts_at_the_base_and_trains_only_the_adapters(base, lora_run):
    log = json.loads((lora_run / "train_log.json").read_text())
    base_weights = load_weights(base)
    # B = 0: the first evaluation is the base model's own, to the last bit (same batches, same weights).
    assert log["evals"][0]["val_loss"] == base_weights.val_loss
    assert log["evals"][-1]["val_loss"] < log["evals"][0]["val_loss"]
    assert log["run"]["n_trainable"] == 2048 and log["run"]["n_params"] == 17408
    src = load_weights(lora_run / "ckpt_last.pt")
    # Only the adapters moved: every base weight is still the base's.
    assert all(torch.equal(src.lora.state_dict[k], v) for k, v in base_weights.state_dict.items())
    assert src.lora.config.rank == 4 and src.format == "checkpoint"


def test_the_run_prints_its_trainable_share(base, tmp_path, char_data, capsys):
    train.main(with_lora(tmp_path, char_data, base, "--max-iters", "1"))
    out = capsys.readouterr().out
    assert (f"lora: rank 4, alpha 16, targets all | trainable: 2,048 of 17,408 parameters (11.76%) | base: "
            f"{base / 'ckpt_best.pt'}") in out


def test_a_lora_checkpoint_holds_the_adapters_and_a_reference_to_the_base(base, lora_run):
    ckpt = torch.load(lora_run / "ckpt_last.pt", weights_only=True)
    assert set(ckpt["model"]) == {f"transformer.h.0.{layer}.lora_{x}" for layer in
                                  ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj") for x in "AB"}
    assert ckpt["lora_base"]["path"] == str(base / "ckpt_best.pt") and len(ckpt["lora_base"]["digest"]) == 64
    assert json.loads((lora_run / "ckpt_last.json").read_text())["lora_base"] == ckpt["lora_base"]
    assert (lora_run / "ckpt_last.pt").stat().st_size < 0.3 * (base / "ckpt_last.pt").stat().st_size


def test_resume_is_bit_identical(base, tmp_path, char_data, monkeypatch):
    extra = ("--lora.dropout", "0.1", "--training.grad_accum_steps", "2",  # dropout draws from the RNG
             "--training.max_iters", "10", "--training.eval_interval", "5")
    train.main(with_lora(tmp_path / "full", char_data, base, *extra))
    run_killed_after_checkpoint(monkeypatch, with_lora(tmp_path / "cut", char_data, base, *extra), step=5)
    # --resume alone: the LoRA settings come from the checkpoint, as the model shape does.
    train.main(tiny(tmp_path / "cut", char_data, "--training.learning_rate", "1e-2", "--training.min_lr", "1e-3",
                    *extra, "--resume"))
    full, cut = (torch.load(tmp_path / run / "ckpt_last.pt", weights_only=True) for run in ("full", "cut"))
    assert full["model"].keys() == cut["model"].keys()
    assert all(torch.equal(full["model"][k], cut["model"][k]) for k in full["model"])
    losses = [[r["loss"] for r in json.loads((tmp_path / run / "train_log.json").read_text())["train"]]
              for run in ("full", "cut")]
    assert losses[0] == losses[1]
    # A resumed run cannot change the adapters' shape.
    with pytest.raises(CheckpointError, match="lora.rank: 4 in the weights, 8 in the config"):
        train.main(tiny(tmp_path / "cut", char_data, "--lora.rank", "8", "--resume"))


def test_gradient_accumulation_and_bf16(base, tmp_path, char_data, monkeypatch):
    one_step = ("--training.max_iters", "1")
    train.main(with_lora(tmp_path / "a", char_data, base, *one_step, "--training.batch_size", "8"))
    train.main(with_lora(tmp_path / "b", char_data, base, *one_step, "--training.grad_accum_steps", "2"))
    a, b = (torch.load(tmp_path / run / "ckpt_last.pt", weights_only=True)["model"] for run in "ab")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if k.endswith("lora_B"))  # the step did something
    stored_in = []  # the dtype the adapted layers' base is kept in, for each run that keeps it in another
    monkeypatch.setattr(train, "store_base_in", lambda model, dtype: lora.store_base_in(model, dtype) or
                        stored_in.append(dtype))
    train.main(with_lora(tmp_path / "bf16", char_data, base, "--training.precision", "bf16"))
    log = json.loads((tmp_path / "bf16" / "train_log.json").read_text())
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert log["run"]["precision"] == ("bf16" if bf16 else "fp32")
    assert log["evals"][-1]["val_loss"] < log["evals"][0]["val_loss"]
    assert stored_in == ([torch.bfloat16] if bf16 else [])
    train.main(with_lora(tmp_path / "full", char_data, base, *one_step, "--training.precision", "bf16",
                         "--lora.save", "full"))
    assert stored_in == ([torch.bfloat16] if bf16 else [])  # a full save keeps the base it read, in fp32


# ----------------------------------------------------------------------------- the base weights

def test_a_relative_base_path_is_found_from_any_folder(tmp_path, char_data, base, capsys, monkeypatch):
    """training.init_from given relative to the folder train.py ran in: the run records where that is, so
    sample.py finds the base from anywhere else."""
    shutil.copytree(base, tmp_path / "work" / "base")
    monkeypatch.chdir(tmp_path / "work")
    train.main(with_lora(tmp_path / "run", char_data, "base", "--max-iters", "2"))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert sample.main(["--ckpt", str(tmp_path / "run"), *FEW]) == 0
    assert load_weights(tmp_path / "run").lora.base["path"] == str(tmp_path / "work" / "base" / "ckpt_best.pt")


def test_the_base_must_be_there_and_unchanged(tmp_path, char_data, base, capsys):
    shutil.copytree(base, tmp_path / "base")  # our own copy, to move and to change
    train.main(with_lora(tmp_path / "run", char_data, tmp_path / "base", "--max-iters", "10"))
    capsys.readouterr()
    assert sample.main(["--ckpt", str(tmp_path / "run"), *FEW]) == 0
    text = capsys.readouterr().out

    (tmp_path / "base").rename(tmp_path / "moved")
    assert sample.main(["--ckpt", str(tmp_path / "run"), *FEW]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds LoRA adapters for the base weights" in err
    assert f"{tmp_path / 'base' / 'ckpt_best.pt'}, which are gone (moved or deleted); put them back at" in err
    with pytest.raises(CheckpointError, match="which are gone"):
        train.main(tiny(tmp_path / "run", char_data, "--max-iters", "12", "--resume"))

    (tmp_path / "moved").rename(tmp_path / "base")
    ckpt = torch.load(tmp_path / "base" / "ckpt_best.pt", weights_only=True)
    original = ckpt["model"]["transformer.ln_f.bias"].clone()
    ckpt["model"]["transformer.ln_f.bias"][0] += 1e-3  # the base trained on, or replaced: any change
    save_checkpoint(tmp_path / "base" / "ckpt_best.pt", ckpt)
    assert export.main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "ex")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "which have changed since (their digest differs); put the original" in err
    with pytest.raises(CheckpointError, match="which have changed since"):
        train.main(tiny(tmp_path / "run", char_data, "--max-iters", "12", "--resume"))

    ckpt["model"]["transformer.ln_f.bias"] = original
    save_checkpoint(tmp_path / "base" / "ckpt_best.pt", ckpt)
    assert sample.main(["--ckpt", str(tmp_path / "run"), *FEW]) == 0
    assert capsys.readouterr().out == text


@pytest.mark.parametrize("fmt, out", [("native", "exports/small"), ("gguf", "exports/small.gguf")])
def test_export_force_never_replaces_a_lora_runs_base(tmp_path, char_data, base, monkeypatch, capsys, fmt, out):
    """The new user's path: export the small model, start a LoRA run from the export, retrain the small
    model and export it again over the first export with --force. That would have broken the LoRA run
    (its adapters need the weights they were trained on): refused, naming the run, and the command it
    suggests works. The same weights again, or another --out, are fine."""
    monkeypatch.chdir(tmp_path)
    if fmt == "gguf":  # GGUF holds the Llama family: a small Llama instead of the GPT-2 base
        train.main(tiny(tmp_path / "small", char_data, "--model.arch", "llama"))
    else:
        shutil.copytree(base, tmp_path / "small")
    assert export.main(["--ckpt", "small", "--out", out, "--format", fmt]) == 0
    data = ["--data.processed_dir", "gguf_data", "--data.input", str(ROOT / "data/shakespeare/input.txt")] \
        if fmt == "gguf" else []  # a GGUF file brings its own tokenizer: the text is prepared with it
    train.main(with_lora(Path("checkpoints/lora"), char_data, Path(out), "--max-iters", "4", *data))
    capsys.readouterr()
    assert sample.main(["--ckpt", "checkpoints/lora", *FEW]) == 0
    text = capsys.readouterr().out
    train.main(tiny(tmp_path / "small", char_data, "--max-iters", "30", "--resume"))  # other weights
    assert export.main(["--ckpt", "small", "--out", out, "--format", fmt, "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out} holds the base weights of the LoRA run checkpoints/lora" in err
    assert sample.main(["--ckpt", "checkpoints/lora", *FEW]) == 0 and capsys.readouterr().out == text
    assert export.main(["--ckpt", "small", "--out", "exports/other", "--format", "native"]) == 0  # another --out
    # The suggested way: keep the run whole, remove it, then replace the base.
    assert export.main(["--ckpt", "checkpoints/lora", "--out", "checkpoints/lora_merged"]) == 0
    shutil.rmtree("checkpoints/lora")
    assert export.main(["--ckpt", "small", "--out", out, "--format", fmt, "--force"]) == 0
    assert sample.main(["--ckpt", "checkpoints/lora_merged", *FEW]) == 0


def test_export_force_of_the_same_weights_keeps_a_lora_runs_base(tmp_path, char_data, base, monkeypatch):
    """The same weights again keep the run working; a run that saves its whole weights (lora.save = full)
    needs no base, so other weights may replace it."""
    monkeypatch.chdir(tmp_path)
    assert export.main(["--ckpt", str(base), "--out", "exports/small", "--format", "hf"]) == 0
    train.main(with_lora(Path("checkpoints/lora"), char_data, Path("exports/small"), "--max-iters", "2"))
    assert export.main(["--ckpt", str(base), "--out", "exports/small", "--format", "hf", "--force"]) == 0
    assert sample.main(["--ckpt", "checkpoints/lora", *FEW]) == 0
    shutil.rmtree("checkpoints/lora")
    train.main(with_lora(Path("checkpoints/full"), char_data, Path("exports/small"), "--max-iters", "2",
                         "--lora.save", "full"))
    shutil.copytree(base, tmp_path / "other")
    train.main(tiny(tmp_path / "other", char_data, "--max-iters", "24", "--resume"))  # other weights
    assert export.main(["--ckpt", str(tmp_path / "other"), "--out", "exports/small", "--format", "hf", "--force"]) == 0
    assert sample.main(["--ckpt", "checkpoints/full", *FEW]) == 0


def test_save_full_needs_no_base(tmp_path, char_data, base, lora_run):
    shutil.copytree(base, tmp_path / "base")
    train.main(with_lora(tmp_path / "run", char_data, tmp_path / "base", "--lora.save", "full"))
    shutil.rmtree(tmp_path / "base")
    src = load_weights(tmp_path / "run" / "ckpt_last.pt")
    same = load_weights(lora_run / "ckpt_last.pt")  # the same run with lora.save = adapters
    assert src.lora.state_dict.keys() == same.lora.state_dict.keys()
    assert all(torch.equal(src.lora.state_dict[k], v) for k, v in same.lora.state_dict.items())
    assert all(torch.equal(src.state_dict[k], v) for k, v in same.state_dict.items())


# ----------------------------------------------------------------------------- sampling and export

def test_sample_runs_a_lora_checkpoint(lora_run, tmp_path, capsys):
    assert sample.main(["--ckpt", str(lora_run / "ckpt_last.pt"), "--start", "ROMEO:", *FEW]) == 0
    out, err = capsys.readouterr()
    assert "(checkpoint, step 20, char tokenizer)" in err and out.count("ROMEO:") == 1
    merged = export.export(lora_run / "ckpt_last.pt", tmp_path / "merged")
    assert sample.main(["--ckpt", str(merged), "--start", "ROMEO:", *FEW]) == 0
    assert capsys.readouterr().out == out


@pytest.mark.parametrize("fmt", ["native", "hf"])
def test_the_merged_export_computes_what_the_adapters_do(lora_run, base, tmp_path, fmt):
    src = load_weights(lora_run)
    unmerged = logits(adapted(src), IDX)
    assert (unmerged - logits(plain(load_weights(base)), IDX)).abs().max() > 0.05  # the adapters matter
    out = export.export(lora_run, tmp_path / fmt, fmt)
    assert torch.allclose(logits(plain(load_weights(out)), IDX), unmerged, atol=1e-5)
    if fmt == "hf":
        from transformers import GPT2LMHeadModel
        hf = GPT2LMHeadModel.from_pretrained(out).eval()
        assert (logits(hf, IDX) - unmerged).abs().max() < 1e-4


def test_peft_loads_the_adapters_onto_the_hf_export_of_the_base(lora_run, base, tmp_path, capsys):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import GPT2LMHeadModel

    base_hf = export.export(base, tmp_path / "base_hf", "hf")
    assert export.main(["--ckpt", str(lora_run), "--out", str(tmp_path / "adapters"), "--adapters-only",
                        "--base", str(base_hf)]) == 0
    assert "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(" in capsys.readouterr().out
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 16 and config["fan_in_fan_out"] is True
    assert config["base_model_name_or_path"] == str(base_hf)
    src = load_weights(lora_run)
    ours = logits(adapted(src), IDX)
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base_hf), tmp_path / "adapters").eval()
    assert (logits(peft_model, IDX) - ours).abs().max() < 1e-4
    # PEFT finds the base by itself from adapter_config.json.
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapters").eval()
    assert (logits(auto, IDX) - ours).abs().max() < 1e-4
    assert (logits(plain(load_weights(base)), IDX) - ours).abs().max() > 0.05  # which the base alone is not


def test_adapters_only_errors(lora_run, base, tmp_path, capsys):
    def fails(*args) -> str:
        assert export.main(["--out", str(tmp_path / "x"), "--adapters-only", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        return err

    assert "is not a LoRA run, it has no adapters; export the whole model without --adapters-only" in \
        fails("--ckpt", base)
    err = fails("--ckpt", lora_run)  # the base is a checkpoint: PEFT cannot load adapters onto it
    assert (f"the base {base / 'ckpt_best.pt'} is not one (checkpoint); export it first (python export.py --ckpt "
            f"{base / 'ckpt_best.pt'} --out exports/{base.name}_hf --format hf), then add --base exports/"
            f"{base.name}_hf") in err
    other = export.export(lora_run, tmp_path / "other_hf", "hf")  # a GPT-2 folder, but other weights
    assert f"--base {other} holds other weights than those the adapters were trained on" in \
        fails("--ckpt", lora_run, "--base", other)
    assert not (tmp_path / "x").exists()


def test_adapters_of_a_run_started_from_a_hugging_face_folder_need_no_base(base, tmp_path, char_data, capsys):
    """A LoRA run on a Hugging Face GPT-2 folder: --adapters-only finds that folder by itself, and PEFT,
    given nothing but the adapters' folder, loads them onto it with our logits."""
    from peft import AutoPeftModelForCausalLM

    base_hf = export.export(base, tmp_path / "base_hf", "hf")
    train.main(with_lora(tmp_path / "run", char_data, base_hf))
    assert export.main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "adapters"), "--adapters-only"]) == 0
    capsys.readouterr()
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapters").eval()
    ours = logits(adapted(load_weights(tmp_path / "run")), IDX)
    assert (logits(auto, IDX) - ours).abs().max() < 1e-4
    assert (logits(plain(load_weights(base)), IDX) - ours).abs().max() > 0.05


def test_eval_scores_a_lora_run_as_transformers_scores_its_merged_export(lora_run, tmp_path, capsys):
    """eval.py reads a LoRA checkpoint (adapters on their base); transformers, on the Hugging Face export of
    the merged model, gives the same mean loss for a text within one window."""
    import eval as eval_py
    from transformers import GPT2LMHeadModel

    text = "ROMEO: I will."  # 14 characters after the start token: 15 tokens, within one 16-token window
    (tmp_path / "t.txt").write_text(text)
    assert eval_py.main(["--json", "--ckpt", str(lora_run), "--text", str(tmp_path / "t.txt")]) == 0
    ours = json.loads(capsys.readouterr().out)["mean_loss"]
    chars = load_weights(lora_run).meta["chars"]
    ids = torch.tensor([[chars.index(c) for c in "\n" + text]])  # a newline starts a text
    hf = GPT2LMHeadModel.from_pretrained(export.export(lora_run, tmp_path / "hf", "hf")).eval()
    with torch.no_grad():
        expected = hf(ids, labels=ids).loss.item()
    assert ours == pytest.approx(expected, rel=1e-5)
    assert eval_py.main(["--json", "--ckpt", load_weights(lora_run).lora.base["path"], "--text",
                         str(tmp_path / "t.txt")]) == 0
    assert abs(json.loads(capsys.readouterr().out)["mean_loss"] - ours) > 1e-3  # the adapters were scored
