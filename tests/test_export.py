"""export.py: native and Hugging Face folders, exact round trips, half precision, GPT-2 tokenizer files."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must never try the network here
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import export  # noqa: E402
import train  # noqa: E402
from checkpoint import GPT2_META, SHAPE_KEYS, CheckpointError, Weights, load_weights, save_checkpoint  # noqa: E402
from config import Config, load_config  # noqa: E402
from conftest import CORPUS, ROOT, prepare_text  # noqa: E402
from model import GPT  # noqa: E402

CHARS = "\n !'.:;?" + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CHAR_META = {"tokenizer": "char", "chars": CHARS, "vocab_size": len(CHARS)}  # 60 characters


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny char model after 20 training steps: ckpt_best.pt in its run folder."""
    root = tmp_path_factory.mktemp("trained")
    prepare_text(CORPUS, root / "data")
    train.main(load_config(["--data.processed_dir", str(root / "data"), "--model.n_layer", "1",
                            "--model.n_head", "2", "--model.n_embd", "32", "--model.block_size", "16",
                            "--model.dropout", "0", "--training.batch_size", "4", "--training.max_iters",
                            "20", "--training.eval_interval", "10", "--training.eval_iters", "2",
                            "--training.device", "cpu", "--training.out_dir", str(root / "run")]))
    return root / "run" / "ckpt_best.pt"


def make_checkpoint(path, meta=CHAR_META, **model):
    """A checkpoint with random weights, larger than the usual init so that any wrong transpose or
    missing bias shows in the logits. Much faster than training, and any model setting works."""
    cfg = Config()
    settings = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0, vocab_size=meta["vocab_size"])
    for key, value in (settings | model).items():
        setattr(cfg.model, key, value)
    torch.manual_seed(0)
    gpt = GPT(cfg.model)
    with torch.no_grad():
        for p in gpt.parameters():
            p.normal_(0.0, 0.3)
    save_checkpoint(path, {"version": 1, "model": gpt.state_dict(), "config": cfg.to_dict(), "meta": meta,
                           "step": 7, "val_loss": 1.5})
    return path


def model_from(src: Weights) -> GPT:
    """Our model from load_weights, exactly as train.py's init_from and sample.py build it."""
    model = GPT(src.model)
    model.load_state_dict(src.state_dict)  # strict: every name must match
    return model.eval()


def tokens(vocab_size: int, block_size: int) -> torch.Tensor:
    return torch.randint(vocab_size, (2, block_size), generator=torch.Generator().manual_seed(1))


def logits_of(model, idx):
    with torch.no_grad():
        return model(idx)[0]


def hf_logits(folder, idx):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # still tied
    with torch.no_grad():
        return hf(idx).logits


@pytest.mark.parametrize("fmt", ["native", "hf"])
def test_load_export_round_trip_is_exact(trained, tmp_path, fmt):
    ckpt = load_weights(trained)
    out = export.export(trained, tmp_path / "out", fmt)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied to wte: stored once
    src = load_weights(out)
    assert src.format == fmt and src.model == ckpt.model and src.training is None
    assert src.meta == ckpt.meta and src.config == ckpt.config
    assert src.state_dict.keys() == ckpt.state_dict.keys()
    assert all(torch.equal(src.state_dict[k], ckpt.state_dict[k]) for k in ckpt.state_dict)
    model = model_from(src)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied again after loading
    idx = tokens(65, 16)
    assert torch.equal(logits_of(model, idx), logits_of(model_from(ckpt), idx))


def test_hf_export_matches_transformers(trained, tmp_path):
    out = export.export(trained, tmp_path / "hf", "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_positions"] == config["n_ctx"] == 16
    assert config["tinygpt"]["tokenizer"] == "char" and config["bos_token_id"] is None
    assert not (out / "vocab.json").exists()  # HF has no char tokenizer; ours is in tokenizer_meta.json
    idx = tokens(65, 16)
    ours = logits_of(model_from(load_weights(trained)), idx)
    assert (hf_logits(out, idx) - ours).abs().max() < 1e-4


def test_no_biases_and_padded_vocabulary_export_exactly(tmp_path):
    # GPT-2 has biases everywhere and no padding rows: zero biases and sliced rows are the same model.
    ckpt = make_checkpoint(tmp_path / "ckpt.pt", bias=False, pad_vocab_multiple=64)
    out = export.export(ckpt, tmp_path / "hf", "hf")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("transformer.wte.weight").shape == (60, 32)  # the 4 padding rows are gone
        assert not f.get_tensor("transformer.h.0.attn.c_attn.bias").any()
        assert f.get_tensor("transformer.h.0.mlp.c_fc.weight").shape == (32, 128)  # Conv1D: (in, out)
    idx = tokens(len(CHARS), 16)
    ours = model_from(load_weights(ckpt))
    assert (hf_logits(out, idx) - logits_of(ours, idx)).abs().max() < 1e-4
    back = model_from(load_weights(out))  # biases dropped and padding restored
    assert back.padded_vocab_size == 64 and back.transformer.ln_f.bias is None
    assert torch.equal(logits_of(back, idx), logits_of(ours, idx))


@pytest.mark.parametrize("dtype, tolerance", [("fp16", 0.05), ("bf16", 0.3)])
def test_half_precision_halves_the_file_and_loads(tmp_path, dtype, tolerance):
    ckpt = make_checkpoint(tmp_path / "ckpt.pt", n_embd=64)
    full = export.export(ckpt, tmp_path / "fp32") / "model.safetensors"
    half = export.export(ckpt, tmp_path / dtype, dtype=dtype) / "model.safetensors"
    assert 0.45 < half.stat().st_size / full.stat().st_size < 0.55
    src = load_weights(half.parent)
    assert src.dtype == dtype and src.state_dict["transformer.wte.weight"].dtype == torch.float32
    idx = tokens(len(CHARS), 16)
    a, b = logits_of(model_from(src), idx), logits_of(model_from(load_weights(full.parent)), idx)
    assert not torch.equal(a, b) and (a - b).abs().max() < tolerance  # rounded, but close


def test_gpt2_bpe_export_has_working_tokenizer_files(tmp_path, gpt2_tokenizer):
    from transformers import AutoTokenizer, GPT2Tokenizer

    meta = {"tokenizer": "bpe", "encoding": "gpt2", "eot_token": 50256, "vocab_size": 50257}
    ckpt = make_checkpoint(tmp_path / "ckpt.pt", meta, n_layer=1, n_embd=16)
    out = export.export(ckpt, tmp_path / "hf", "hf")
    assert (out / "merges.txt").read_text().count("\n") == 50001  # the header and 50,000 merges
    text = "Hello world! Ünïcödé, emoji 🙂, tabs\tand  spaces\n\nnew lines; it's 2024."
    for tok in (GPT2Tokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(out)):
        assert tok.encode("Hello world") == [15496, 995]
        assert tok.encode(text) == gpt2_tokenizer.encode(text)
        assert tok.decode(gpt2_tokenizer.encode(text)) == text
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 50256
    idx = tokens(50257, 16)
    ours = logits_of(model_from(load_weights(ckpt)), idx)
    assert (hf_logits(out, idx) - ours).abs().max() < 1e-4
    # A GPT-2 folder from elsewhere has neither our meta nor our settings: both are inferred.
    (out / "tokenizer_meta.json").unlink()
    config = json.loads((out / "config.json").read_text())
    del config["tinygpt"]
    (out / "config.json").write_text(json.dumps(config))
    src = load_weights(out)
    assert src.meta == GPT2_META and src.config is None
    assert torch.equal(logits_of(model_from(src), idx), ours)


def test_folder_saved_by_transformers_loads(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()
    hf.save_pretrained(tmp_path / "hf")
    src = load_weights(tmp_path / "hf")
    assert src.meta is None and src.model.block_size == 32
    idx = tokens(100, 32)
    with torch.no_grad():
        assert (logits_of(model_from(src), idx) - hf(idx).logits).abs().max() < 1e-4


def test_output_folder_rules(trained, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    for extra in ([], ["--force"]):  # never written into, never deleted: it is not an export
        assert export.main(["--ckpt", str(trained), "--out", str(tmp_path / "notes"), *extra]) == 2
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    assert "--force will not delete it" in capsys.readouterr().err
    out = str(tmp_path / "ex")
    assert export.main(["--ckpt", str(trained), "--out", out]) == 0
    assert export.main(["--ckpt", str(trained), "--out", out, "--dtype", "bf16"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert export.main(["--ckpt", str(trained), "--out", out, "--dtype", "bf16", "--force"]) == 0
    assert json.loads((tmp_path / "ex" / "config.json").read_text())["dtype"] == "bf16"
    # Readable by others, as any file meant to be shared (safetensors and mkdtemp make theirs private).
    umask = os.umask(0)
    os.umask(umask)
    for p in [tmp_path / "ex", *(tmp_path / "ex").iterdir()]:
        assert p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666) & ~umask, p
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".lock") == ["ex", "notes"]  # no staging left
    # Exporting an export (here bf16 -> native fp32) works too: it is a source like a checkpoint.
    assert export.main(["--ckpt", out, "--out", str(tmp_path / "again"), "--format", "hf"]) == 0


def test_bad_sources_fail_clearly(tmp_path):
    r = subprocess.run([sys.executable, "export.py", "--ckpt", str(tmp_path / "nope.pt"), "--out",
                        str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "nope.pt does not exist" in r.stderr
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_weights(tmp_path)
    out = export.export(make_checkpoint(tmp_path / "c.pt"), tmp_path / "ex")
    (out / "model.safetensors").write_bytes(b"\x00" * 10)  # truncated
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_weights(out)


def test_an_export_whose_config_does_not_fit_its_weights_fails_before_building_a_model(tmp_path):
    """A config.json that describes an enormous model is refused from the weights' own shapes."""
    out = export.export(make_checkpoint(tmp_path / "c.pt"), tmp_path / "ex")
    config = json.loads((out / "config.json").read_text())
    config["model"]["n_layer"] = 1_000_000
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model.n_layer = 1000000 but the weights have 2"):
        load_weights(out)
    config["model"] |= {"n_layer": 2, "n_embd": "32"}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model.n_embd = '32' is a str, expected a int"):
        load_weights(out)
    config["model"] |= {"n_embd": 32, "n_heads": 2}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unknown key model.n_heads \(did you mean model.n_head\?\)"):
        load_weights(out)


def test_finetune_preset_takes_its_shape_from_the_export():
    # The model shape comes from the export, so the preset must not pin any of it.
    small = load_config(["--config", str(ROOT / "configs/cpu/small.toml")])
    tune = load_config(["--config", str(ROOT / "configs/finetune/shakespeare_finetune.toml")])
    assert tune.training.init_from == "exports/small" and tune.training.out_dir == "checkpoints/finetune"
    assert not {f"model.{k}" for k in SHAPE_KEYS} & tune.explicit
    assert tune.training.learning_rate < small.training.learning_rate
    assert (ROOT / "configs/finetune/shakespeare_finetune.toml").read_text().startswith("#")
