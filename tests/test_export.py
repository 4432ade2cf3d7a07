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
from checkpoint import SHAPE_KEYS, CheckpointError, Weights, load_weights, save_checkpoint  # noqa: E402
from generate import generate  # noqa: E402
from hf import GPT2_META  # noqa: E402
from config import ARCHS, Config  # noqa: E402
from options import load_config  # noqa: E402
from conftest import CORPUS, ROOT, prepare_text  # noqa: E402
from model import GPT  # noqa: E402

CHARS = "\n !'.:;?" + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CHAR_META = {"tokenizer": "char", "chars": CHARS, "vocab_size": len(CHARS)}  # 60 characters
LLAMA = dict(arch="llama", **ARCHS["llama"])  # what model.arch = "llama" sets


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny char model after 20 training steps: ckpt_best.pt in its run folder."""
    root = tmp_path_factory.mktemp("trained")
    prepare_text(CORPUS, root / "data")
    train.main(load_config(["--data.processed_dir", str(root / "data"), "--model.n_layer", "1",
                            "--model.n_head", "2", "--model.n_embd", "32", "--model.block_size", "16",
                            "--model.dropout", "0", "--training.batch_size", "4", "--training.max_iters",
                            "20", "--training.eval_interval", "10", "--training.eval_batches", "2",
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
    assert back.transformer.wte.weight.shape[0] == 64 and back.transformer.ln_f.bias is None
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
    capsys.readouterr()
    assert export.main(["--ckpt", str(trained), "--out", out]) == 0
    step = load_weights(trained).step  # what a running training saved last: said, not guessed
    assert capsys.readouterr().out.startswith(f"exported {trained} at step {step} as native (fp32, ")
    assert export.main(["--ckpt", str(trained), "--out", out, "--dtype", "bf16"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert export.main(["--ckpt", str(trained), "--out", out, "--dtype", "bf16", "--force"]) == 0
    assert json.loads((tmp_path / "ex" / "config.json").read_text())["dtype"] == "bf16"
    # Readable by others, as any file meant to be shared (safetensors and mkdtemp make theirs private).
    umask = os.umask(0)
    os.umask(umask)
    for p in [tmp_path / "ex", *(tmp_path / "ex").iterdir()]:
        assert p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666) & ~umask, p
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ex", "notes"]  # no staging folder, no lock file left
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
    with pytest.raises(CheckpointError, match="model.n_embd = '32' is a str, expected an int"):
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


# ----------------------------------------------------------------------------- Llama

def llama_from(folder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("settings", [dict(), dict(tie_embeddings=False, bias=True, pad_vocab_multiple=64,
                                                     rope_theta=500.0, norm_eps=1e-6)], ids=["plain", "untied"])
def test_llama_export_matches_transformers(tmp_path, settings):
    ckpt = make_checkpoint(tmp_path / "ckpt.pt", **(LLAMA | settings))
    out = export.export(ckpt, tmp_path / "hf", "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    with safe_open(out / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) == ("tie_embeddings" in settings)  # a tied head is stored once
        assert f.get_tensor("model.layers.1.mlp.gate_proj.weight").shape == (88, 32)  # 8/3 * 32 -> 88
    hf = llama_from(out)
    tied = hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert tied == ("tie_embeddings" not in settings)
    ours = model_from(load_weights(ckpt))
    idx = tokens(len(CHARS), 16)
    with torch.no_grad():
        theirs = hf(idx).logits
    torch.testing.assert_close(theirs, logits_of(ours, idx), atol=1e-4, rtol=1e-4)
    prompt = idx[:, :4]  # 4 + 12 new tokens fit in block_size = 16, where ours never slides its window
    greedy = hf.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert torch.equal(greedy, generate(ours, prompt, 12, temperature=0))
    back = load_weights(out)  # our settings ride along under "tinygpt": an exact round trip
    assert back.model == load_weights(ckpt).model
    assert torch.equal(logits_of(model_from(back), idx), logits_of(ours, idx))


def transformers_llama(folder, tie: bool, vocab_size: int = 80):
    """A small random Llama saved by transformers itself, with weights larger than its init so that
    any wrong layout shows in the logits. Returns the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64,
                                      tie_word_embeddings=tie)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    hf.save_pretrained(folder)
    return hf


@pytest.mark.parametrize("tie", [True, False])
def test_llama_saved_by_transformers_loads(tmp_path, tie):
    hf = transformers_llama(tmp_path / "hf", tie)
    src = load_weights(tmp_path / "hf")
    assert src.format == "hf" and src.meta is None and src.config is None
    m = src.model
    assert (m.arch, m.position, m.norm, m.mlp, m.bias) == ("llama", "rope", "rmsnorm", "swiglu", False)
    assert m.tie_embeddings == tie
    assert (m.mlp_hidden, m.norm_eps, m.rope_theta, m.block_size) == (64, 1e-6, 10000.0, 64)  # transformers' defaults
    idx = tokens(80, 24)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model_from(src), idx), hf(idx).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("change, message", [
    ({"num_key_value_heads": 3}, r"num_key_value_heads = 3 \(it must divide num_attention_heads\)"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}},
     r"rope_type = 'yarn' \(we support default, linear and llama3\)"),
    ({"hidden_act": "gelu"}, r"hidden_act = 'gelu' \(we support 'silu'\)"),
    ({"model_type": "qwen2", "use_sliding_window": True}, r"use_sliding_window = True \(sliding-window attention"),
    ({"model_type": "mixtral"}, r"model_type 'mixtral' \(mixture of experts\) cannot be read; we read gpt2, llama"),
    ({"model_type": "gemma2"}, r"model_type 'gemma2' \(Gemma's own layout\)"),
])
def test_variants_model_py_lacks_are_refused_by_name(tmp_path, change, message):
    """A folder's config.json asks for what model.py does not compute: one error naming the setting."""
    transformers_llama(tmp_path / "hf", tie=True)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config | change))
    with pytest.raises(CheckpointError, match=message):
        load_weights(tmp_path / "hf")


def test_hf_export_names_the_switches_transformers_lacks(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt.pt", **(LLAMA | {"mlp": "relu2"}), logit_softcap=30.0)
    assert export.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --format hf: transformers' LlamaForCausalLM") and len(err.splitlines()) == 1
    assert 'model.mlp = "relu2", model.logit_softcap = 30.0' in err and "--format native" in err
    qk_norm = make_checkpoint(tmp_path / "qk.pt", **LLAMA, qk_norm=True, logit_softcap=30.0)
    with pytest.raises(export.ExportError, match=r"Qwen3ForCausalLM .* no model.logit_softcap = 30.0"):
        export.export(qk_norm, tmp_path / "hf3", "hf")  # qk_norm is Qwen3's, the soft-cap nobody's
    assert not (tmp_path / "hf").exists()
    gpt2_with_rope = make_checkpoint(tmp_path / "rope.pt", position="rope", mlp="relu2")
    with pytest.raises(export.ExportError, match=r'GPT2LMHeadModel .* no model.position = "rope", model.mlp = "relu2"'):
        export.export(gpt2_with_rope, tmp_path / "hf2", "hf")
    # The native format keeps every switch: an exact round trip, untied head included.
    full = make_checkpoint(tmp_path / "full.pt", **LLAMA, qk_norm=True, logit_softcap=30.0, tie_embeddings=False)
    src = load_weights(export.export(full, tmp_path / "native"))
    assert src.model == load_weights(full).model
    idx = tokens(len(CHARS), 16)
    assert torch.equal(logits_of(model_from(src), idx), logits_of(model_from(load_weights(full)), idx))


def test_gpt2_variants_export_to_gpt2(tmp_path):
    """GPT-2's config has an MLP width, an epsilon and untied embeddings too: they export exactly."""
    from transformers import GPT2LMHeadModel

    ckpt = make_checkpoint(tmp_path / "ckpt.pt", tie_embeddings=False, mlp_hidden=48, norm_eps=1e-6)
    out = export.export(ckpt, tmp_path / "hf", "hf")
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    idx = tokens(len(CHARS), 16)
    ours = model_from(load_weights(ckpt))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, logits_of(ours, idx), atol=1e-4, rtol=1e-4)
    config = json.loads((out / "config.json").read_text())
    del config["tinygpt"]  # as if saved elsewhere: our settings come from GPT-2's config
    (out / "config.json").write_text(json.dumps(config))
    assert torch.equal(logits_of(model_from(load_weights(out)), idx), logits_of(ours, idx))


def test_a_llama_from_transformers_fine_tunes_and_samples(tmp_path, char_data, capsys):
    """The workflow of a Llama from elsewhere: init_from its folder starts from exactly its weights
    (the first evaluation is transformers' own loss on the same batches), and sample.py reads it
    once a tokenizer meta is there."""
    import sample
    from data import get_batch, load_meta, load_tokens

    hf = transformers_llama(tmp_path / "hf", tie=True, vocab_size=80)  # more ids than the 65 characters
    assert sample.main(["--ckpt", str(tmp_path / "hf"), "--max-new-tokens", "5"]) == 2
    assert "has no tokenizer (neither tokenizer.json nor tokenizer_meta.json)" in capsys.readouterr().err
    cfg = load_config(["--data.processed_dir", char_data, "--training.out_dir", str(tmp_path / "run"), "--device",
                       "cpu", "--max-iters", "4", "--training.eval_interval", "10", "--training.eval_batches", "2",
                       "--training.batch_size", "4", "--model.block_size", "16", "--model.dropout", "0",
                       "--training.init_from", str(tmp_path / "hf")])
    assert train.main(cfg)["step"] == 4
    assert (cfg.model.arch, cfg.model.vocab_size, cfg.model.mlp_hidden, cfg.model.norm_eps) == ("llama", 80, 64, 1e-6)
    val = load_tokens(char_data, "val", load_meta(char_data))
    losses = []
    for k in range(2):  # train.evaluate's batches
        x, y = get_batch(val, 16, 4, ("eval", "val", cfg.training.seed, k), "cpu")
        with torch.no_grad():
            losses.append(torch.nn.functional.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item())
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["evals"][0]["val_loss"] == pytest.approx(sum(losses) / 2, abs=1e-4)
    assert sample.main(["--ckpt", str(tmp_path / "run"), "--max-new-tokens", "50", "--num-samples", "1"]) == 0
    (tmp_path / "hf" / "tokenizer_meta.json").write_text(json.dumps(load_meta(char_data)))
    capsys.readouterr()
    assert sample.main(["--ckpt", str(tmp_path / "hf"), "--max-new-tokens", "200", "--num-samples", "1",
                        "--temperature", "2"]) == 0  # wild: without the cut, ids 65-79 would come up
    assert len(capsys.readouterr().out.split("sample 1/1")[1].strip("- \n")) > 0
