"""GGUF in and out (gguf_format.py), checked against transformers' own GGUF reader: exports of random Llama,
Qwen2 and Qwen3 models that it reads with our logits and greedy text, round trips that keep every tensor,
and files we refuse, each in one line. tests/test_smollm2.py reads the real SmolLM2 file."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

import export
from checkpoint import CheckpointError, load_weights
from generate import generate
from test_real_models import hf_tokenizer, ids, ours, saved_by_transformers
from tokenizer import tokenizer_from_meta

TEXT = "Héllo  wörld\n\n\t tabs  <|im_end|> and 日本語, an emoji 🙂<|im_start|>x   \n"


def with_tokenizer(folder, shape: str) -> None:
    saved_by_transformers(folder, shape, vocab=320)
    hf_tokenizer(folder)


def transformers_reads(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def without_end(model):
    """transformers' generate with no end-of-sequence token: every continuation as long as ours."""
    model.generation_config.eos_token_id = None
    return model


# transformers' GGUF reader (5.25) reads neither Qwen3's attention.key_length (it takes a head size of 128,
# Qwen3's) nor Llama 3's rope_freqs, which llama.cpp reads: other head sizes and Llama 3's scaling are
# checked by reading the file back here.
@pytest.mark.parametrize("shape", ["smollm2", "qwen2.5", "qwen3-128", "tinyllama"])
def test_an_export_reads_in_transformers_with_our_logits(tmp_path, shape):
    """A GGUF export (fp32) of a random model of each architecture: transformers' GGUF reader gives our
    logits, our greedy continuation and our token ids; read here again, it is the same model."""
    with_tokenizer(tmp_path / "hf", shape)
    out = export.export(tmp_path / "hf", tmp_path / "model.gguf", "gguf")
    theirs, tokenizer = transformers_reads(out)
    src = load_weights(tmp_path / "hf")
    x = ids(320, 40)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(src)(x)[0], atol=1e-4, rtol=1e-4)
    prompt = x[:, :4]
    expected = without_end(theirs).generate(prompt, max_new_tokens=30, do_sample=False)
    assert torch.equal(generate(ours(src), prompt, 30, temperature=0), expected)
    assert tokenizer(TEXT).input_ids == tokenizer_from_meta(src.meta).encode(TEXT)
    read_back_is_the_same(out, src)


def read_back_is_the_same(path, src) -> None:
    """The GGUF file read here is the model it was written from: its settings (norm_eps to float32, as GGUF
    stores it) and every tensor, exactly."""
    back = load_weights(path)
    assert back.format == "gguf" and back.model == dataclasses.replace(src.model, norm_eps=back.model.norm_eps)
    assert back.model.norm_eps == pytest.approx(src.model.norm_eps, rel=1e-6)
    assert all(torch.equal(back.state_dict[k], src.state_dict[k]) for k in src.state_dict)


@pytest.mark.parametrize("shape", ["qwen3", "llama3.2", "linear-rope"])
def test_what_transformers_does_not_read_reads_back_here(tmp_path, shape):
    """A head size of its own (Qwen3), Llama 3's rotary scaling (rope_freqs) and linear scaling: the file,
    read here, is the same model with the same logits."""
    with_tokenizer(tmp_path / "hf", shape)
    src = load_weights(tmp_path / "hf")
    read_back_is_the_same(export.export(tmp_path / "hf", tmp_path / "model.gguf", "gguf"), src)


def test_gguf_to_tinygpt_to_gguf_keeps_the_tensors(tmp_path):
    """An fp16 GGUF file read here and written again in fp16: the same tensors, bit for bit (llama's q and
    k rows go through llama.cpp's order and back)."""
    from gguf import GGUFReader

    with_tokenizer(tmp_path / "hf", "smollm2")
    first = export.export(tmp_path / "hf", tmp_path / "a.gguf", "gguf", "fp16")
    again = export.export(first, tmp_path / "b.gguf", "gguf", "fp16")
    a, b = ({t.name: t for t in GGUFReader(path).tensors} for path in (first, again))
    assert set(a) == set(b) and "blk.0.attn_q.weight" in a
    assert all(a[k].tensor_type == b[k].tensor_type and np.array_equal(a[k].data, b[k].data) for k in a)


def test_q8_0_is_a_quarter_of_fp32_and_close(tmp_path):
    saved_by_transformers(tmp_path / "hf", "llama3.2")  # hidden size 64: whole blocks of 32
    full = export.export(tmp_path / "hf", tmp_path / "f32.gguf", "gguf")
    small = export.export(tmp_path / "hf", tmp_path / "q8.gguf", "gguf", "q8_0")
    assert small.stat().st_size < 0.35 * full.stat().st_size
    x = ids(96, 20)
    with torch.no_grad():
        a, b = ours(load_weights(small))(x)[0], ours(load_weights(full))(x)[0]
    assert (a - b).abs().mean() < 0.05 * b.abs().mean()  # 8-bit blocks: within a few percent


def test_prepare_takes_a_gguf_files_tokenizer(tmp_path):
    """prepare.py --tokenizer hf --data.tokenizer_path FILE.gguf: the tokenizer inside the file, which
    tokenizes the text as the folder's tokenizer.json (AutoTokenizer's) does."""
    import prepare
    from config import DataConfig

    with_tokenizer(tmp_path / "hf", "smollm2")
    gguf_file = export.export(tmp_path / "hf", tmp_path / "model.gguf", "gguf")
    (tmp_path / "t.txt").write_text(TEXT * 4)
    tokens = {}
    for name, path in (("folder", tmp_path / "hf"), ("gguf", gguf_file)):
        d = DataConfig(input=str(tmp_path / "t.txt"), processed_dir=str(tmp_path / name), tokenizer="hf",
                       tokenizer_path=str(path), val_fraction=0.5)
        meta = prepare.prepare(d, progress=False)
        tokens[name] = [np.fromfile(tmp_path / name / f"{split}.bin", dtype=meta["dtype"]).tolist()
                        for split in ("train", "val")]
    assert tokens["gguf"] == tokens["folder"] and len(tokens["gguf"][0]) > 20


# ----------------------------------------------------------------------------- files we refuse

def write_gguf(path, arch: str = "llama", tensor_type: str = "F32", block_count: int = 1) -> None:
    """A small GGUF file of one layer written with gguf's own writer, to spoil one thing of it."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    w = GGUFWriter(path, arch)
    for key, value in (("block_count", block_count), ("context_length", 16), ("embedding_length", 32),
                       ("feed_forward_length", 64), ("attention.head_count", 4), ("attention.head_count_kv", 4)):
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32(f"{arch}.vocab_size", 64)
    qtype = GGMLQuantizationType[tensor_type]
    for name, shape in (("token_embd.weight", (64, 32)), ("output_norm.weight", (32,)),
                        ("blk.0.attn_norm.weight", (32,)), ("blk.0.ffn_norm.weight", (32,)),
                        ("blk.0.attn_q.weight", (32, 32)), ("blk.0.attn_k.weight", (32, 32)),
                        ("blk.0.attn_v.weight", (32, 32)), ("blk.0.attn_output.weight", (32, 32)),
                        ("blk.0.ffn_gate.weight", (64, 32)), ("blk.0.ffn_up.weight", (64, 32)),
                        ("blk.0.ffn_down.weight", (32, 64))):
        data = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        if len(shape) == 2 and tensor_type != "F32":
            data = quants.quantize(data, qtype)
        w.add_tensor(name, data, raw_dtype=qtype if len(shape) == 2 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_force_replaces_only_a_gguf_file_exported_here(tmp_path):
    """export --force replaces a GGUF file of ours (its general.name), never one from elsewhere."""
    with_tokenizer(tmp_path / "hf", "smollm2")
    first = export.export(tmp_path / "hf", tmp_path / "a.gguf", "gguf", "fp16")
    assert export.export(tmp_path / "hf", first, "gguf", "q8_0", force=True) == first
    write_gguf(tmp_path / "m.gguf")  # written by the gguf library alone: a model from elsewhere
    before = (tmp_path / "m.gguf").read_bytes()
    with pytest.raises(export.ExportError, match="m.gguf is not a GGUF file exported by tinygpt, so --force"):
        export.export(tmp_path / "hf", tmp_path / "m.gguf", "gguf", force=True)
    assert (tmp_path / "m.gguf").read_bytes() == before


def test_a_small_gguf_reads(tmp_path):
    write_gguf(tmp_path / "m.gguf")
    src = load_weights(tmp_path / "m.gguf")
    assert (src.model.n_layer, src.model.n_embd, src.model.vocab_size, src.meta) == (1, 32, 64, None)
    shutil.copy(tmp_path / "m.gguf", tmp_path / "model.bin")  # renamed: known by its first bytes
    assert load_weights(tmp_path / "model.bin").model == src.model


@pytest.mark.parametrize("spoil, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:2000]), r"m.gguf cannot be read as a GGUF file \(.*\); it is damaged"),
    (lambda p: write_gguf(p, tensor_type="Q5_0"), r"holds tensors of type Q5_0, which are not read; we read F32, F16"),
    (lambda p: write_gguf(p, arch="gemma"), r"general.architecture = 'gemma' cannot be read; we read llama, qwen2"),
    (lambda p: write_gguf(p, block_count=3), r"model.n_layer = 3 but the weights have 1"),
])
def test_files_we_cannot_read_are_named(tmp_path, spoil, message):
    write_gguf(tmp_path / "m.gguf")
    spoil(tmp_path / "m.gguf")
    with pytest.raises(CheckpointError, match=message):
        load_weights(tmp_path / "m.gguf")


def test_what_gguf_cannot_hold_is_refused(tmp_path, char_data, capsys):
    import train
    from options import load_config

    train.main(load_config(["--data.processed_dir", char_data, "--max-iters", "1", "--model.n_layer", "1",
                            "--model.n_embd", "32", "--model.n_head", "2", "--training.eval_batches", "1",
                            "--device", "cpu", "--training.out_dir", str(tmp_path / "gpt2")]))
    assert export.main(["--ckpt", str(tmp_path / "gpt2"), "--out", str(tmp_path / "m.gguf"), "--format", "gguf"]) == 2
    assert "--format gguf writes llama, qwen2, qwen3 models, and this one is model.arch = 'gpt2'" in \
        capsys.readouterr().err
    saved_by_transformers(tmp_path / "hf", "smollm2")
    assert export.main(["--ckpt", str(tmp_path / "hf"), "--out", str(tmp_path / "m"), "--format", "gguf"]) == 2
    assert "give --out a name ending in .gguf" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.gguf").exists()
    shutil.rmtree(tmp_path / "hf")
