"""The real SmolLM2-135M-Instruct (its GGUF file, Q4_1), read here and by transformers' own GGUF reader:
the same tokens, logits and greedy text; its exports loaded by transformers and AutoTokenizer; LoRA on it,
loaded by PEFT. Slow (a 135M-parameter model on a CPU); skipped, saying why, without the file."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import eval as eval_py
import export
import sample
import train
from checkpoint import load_model, load_weights
from conftest import CORPUS
from generate import generate
from model import GPT
from options import load_config
from tokenizer import tokenizer_from_meta

pytestmark = pytest.mark.slow
TEXT = "Héllo  wörld\n\n\t tabs  <|im_end|> and 日本語, an emoji 🙂<|im_start|>x   \n"
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def ours(smollm2):
    return load_model(smollm2)


def test_read_as_transformers_reads_it(ours, smollm2_reference):
    """The same file, read by each: equal token ids, logits within 1e-4 (fp32) and 30 greedy tokens."""
    model, src = ours
    theirs, tokenizer = smollm2_reference
    assert src.format == "gguf" and (src.model.n_head, src.model.kv_heads(), src.model.n_layer) == (9, 3, 30)
    tok = tokenizer_from_meta(src.meta)
    assert tok.encode(TEXT) == tokenizer(TEXT).input_ids
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], theirs(ids).logits, atol=1e-4, rtol=1e-4)
    # No end of sequence for either (min_new_tokens would forbid the end-of-turn token, which ours may say).
    expected = theirs.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=None,
                               generation_config=theirs.generation_config.__class__(eos_token_id=None))
    assert torch.equal(generate(model, ids, 30, temperature=0), expected)


def test_sample_py_answers_as_transformers_does(smollm2, smollm2_reference, capsys):
    """sample.py on the GGUF file, greedy, stops at the model's end-of-turn token, as generate does."""
    theirs, tokenizer = smollm2_reference
    assert sample.main(["--ckpt", str(smollm2), "--start", PROMPT, "--temperature", "0", "--num-samples", "1",
                        "--max-new-tokens", "40"]) == 0
    out = capsys.readouterr().out
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    answer = theirs.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=2)[0, ids.size(1):]
    expected = tokenizer.decode(answer[answer != 2])
    assert out.split("----------\n", 1)[1] == PROMPT + expected + "\n"
    assert "Paris" in expected


def test_exports_load_in_transformers_and_keep_every_tensor(smollm2, smollm2_reference, tmp_path):
    """To a Hugging Face folder: transformers' LlamaForCausalLM and AutoTokenizer load it, with the reference's
    logits and ids; exported again from that folder, every tensor is the same, bit for bit."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    theirs, tokenizer = smollm2_reference
    out = export.export(smollm2, tmp_path / "hf", "hf")
    loaded = LlamaForCausalLM.from_pretrained(out).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)
    assert AutoTokenizer.from_pretrained(out)(TEXT).input_ids == tokenizer(TEXT).input_ids
    again = export.export(out, tmp_path / "again", "hf")
    with safe_open(out / "model.safetensors", "pt") as a, safe_open(again / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_lora_on_the_real_model_loads_in_peft(smollm2, tmp_path, capsys):
    """LoRA fine-tuning from the GGUF file on the shipped text, prepared with the model's own tokenizer;
    its adapters, in Llama's module names, load with PEFT onto the Hugging Face export of the file, with our
    logits; and eval.py's loss of the run is PEFT's on the same tokens."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    text = tmp_path / "plays.txt"
    text.write_text(CORPUS.read_text(encoding="utf-8")[:40_000])
    train.main(load_config(["--training.init_from", str(smollm2), "--data.input", str(text),
                            "--data.processed_dir", str(tmp_path / "data"), "--lora.rank", "4",
                            "--model.block_size", "32", "--model.dropout", "0", "--training.batch_size", "2",
                            "--training.learning_rate", "1e-2", "--training.warmup_iters", "0", "--max-iters", "3",
                            "--training.eval_interval", "3", "--training.eval_batches", "1", "--device", "cpu",
                            "--training.out_dir", str(tmp_path / "run")]))
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["tokenizer"] == "hf"
    base = export.export(smollm2, tmp_path / "base_hf", "hf")
    assert export.main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "adapters"), "--adapters-only",
                        "--base", str(base)]) == 0
    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), tmp_path / "adapters").eval()
    run = load_weights(tmp_path / "run")
    model = GPT.from_state_dict(run.model, run.state_dict).eval()
    tok = tokenizer_from_meta(run.meta)
    ids = torch.tensor([tok.encode("ROMEO: I will go.")])
    with torch.no_grad():
        assert (peft(ids).logits - model(ids)[0]).abs().max() < 1e-4
    (tmp_path / "t.txt").write_text("ROMEO: I will go.")
    capsys.readouterr()
    assert eval_py.main(["--json", "--ckpt", str(tmp_path / "run"), "--text", str(tmp_path / "t.txt")]) == 0
    loss = json.loads(capsys.readouterr().out)["mean_loss"]
    seq = torch.tensor([[tok.eot_token, *tok.encode("ROMEO: I will go.")]])  # a text starts after end-of-sequence
    with torch.no_grad():
        assert abs(peft(seq, labels=seq).loss.item() - loss) < 1e-4


def test_a_gguf_export_reads_in_transformers_as_the_original(smollm2, smollm2_reference, tmp_path):
    """Back to llama.cpp's format (fp32): transformers' GGUF reader reads our file with the logits, the greedy
    text and the token ids it reads the original with."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    theirs, tokenizer = smollm2_reference
    out = export.export(smollm2, tmp_path / "smollm2.gguf", "gguf")
    again = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)
    eos = theirs.generation_config.eos_token_id
    again.generation_config.eos_token_id = theirs.generation_config.eos_token_id = None  # 30 tokens each
    try:
        assert torch.equal(again.generate(ids, max_new_tokens=30, do_sample=False),
                           theirs.generate(ids, max_new_tokens=30, do_sample=False))
    finally:
        theirs.generation_config.eos_token_id = eos
    assert AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)(TEXT).input_ids == tokenizer(TEXT).input_ids
