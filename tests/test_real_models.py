"""The small models people fine-tune, checked against transformers itself: random models with the head
layouts of SmolLM2, Qwen2.5, Qwen3, Llama 3.2 and TinyLlama (transformers' own config classes, two
layers), saved by transformers and read here; their logits, greedy continuations, exports, LoRA adapters
(loaded by PEFT onto the original folder) and losses, and their tokenizers (a tokenizer.json made here,
read by AutoTokenizer). tests/test_smollm2.py runs the same checks on the real SmolLM2-135M."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import checkpoint
import eval as eval_py
import export
import sample
import train
from checkpoint import CheckpointError, load_weights
from conftest import CORPUS
from config import LoraConfig
from generate import generate
from lora import LoRALinear, add_adapters
from model import GPT
from options import load_config
from tokenizer import hf_tokenizer_meta, tokenizer_from_meta

VOCAB, CONTEXT = 96, 64
# The head layouts that matter (heads / key-value heads, head size), scaled down to two layers.
SHAPES = {
    "smollm2": ("LlamaConfig", dict(hidden_size=48, intermediate_size=128, num_attention_heads=6, num_key_value_heads=2,
                                    tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e5})),
    "qwen2.5": ("Qwen2Config", dict(hidden_size=56, intermediate_size=96, num_attention_heads=7, num_key_value_heads=1,
                                    tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3": ("Qwen3Config", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=16, tie_word_embeddings=True)),
    "qwen3-128": ("Qwen3Config", dict(hidden_size=64, intermediate_size=96, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=128, tie_word_embeddings=True)),  # Qwen3's own
    "llama3.2": ("LlamaConfig", dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                                     tie_word_embeddings=True, rope_parameters={
                                         "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                         "rope_theta": 5e5})),
    "tinyllama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=1,
                                      tie_word_embeddings=False)),
    "linear-rope": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4})),
}
CLASSES = {"LlamaConfig": "LlamaForCausalLM", "Qwen2Config": "Qwen2ForCausalLM", "Qwen3Config": "Qwen3ForCausalLM"}


def saved_by_transformers(folder, shape: str, vocab: int = VOCAB, seed: int = 0):
    """A random model of `shape`, saved by transformers, with weights larger than its init so that a
    wrong layout shows in the logits. Returns it, in eval mode."""
    import transformers

    config_class, settings = SHAPES[shape]
    config = getattr(transformers, config_class)(vocab_size=vocab, num_hidden_layers=2, max_position_embeddings=CONTEXT,
                                                 bos_token_id=None, eos_token_id=None, **settings)
    torch.manual_seed(seed)
    model = getattr(transformers, CLASSES[config_class])(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.2)
    model.save_pretrained(folder)
    return model


def ours(src) -> GPT:
    model = GPT(src.model)
    model.load_state_dict(src.state_dict)
    return model.eval()


def ids(n: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, n, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=list(SHAPES))
def shape(request) -> str:
    return request.param


# ----------------------------------------------------------------------------- the models

def test_logits_and_greedy_continuation_equal_transformers(tmp_path, shape):
    theirs = saved_by_transformers(tmp_path / "hf", shape)
    src = load_weights(tmp_path / "hf")
    cfg = theirs.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert src.model.kv_heads() == cfg.num_key_value_heads and src.model.head_size() == head_dim
    x = ids(VOCAB, 40)
    with torch.no_grad():
        torch.testing.assert_close(ours(src)(x)[0], theirs(x).logits, atol=1e-4, rtol=1e-4)
    prompt = x[:, :4]
    expected = theirs.generate(prompt, max_new_tokens=30, min_new_tokens=30, do_sample=False)
    assert torch.equal(generate(ours(src), prompt, 30, temperature=0), expected)
    assert torch.equal(generate(ours(src).decode_layout(), prompt, 30, temperature=0), expected)  # as sample.py


def test_folder_to_tinygpt_to_folder_keeps_every_tensor(tmp_path, shape):
    """An export of a model read from a folder holds the very tensors of that folder, under the same names,
    and transformers loads it as the same class with the same logits."""
    import transformers

    theirs = saved_by_transformers(tmp_path / "hf", shape)
    out = export.export(tmp_path / "hf", tmp_path / "again", "hf")
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as a, safe_open(out / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [type(theirs).__name__]
    again = getattr(transformers, type(theirs).__name__).from_pretrained(out).eval()
    x = ids(VOCAB, 24)
    with torch.no_grad():
        assert torch.equal(again(x).logits, theirs(x).logits)


def test_the_kv_cache_holds_only_the_key_value_heads(tmp_path):
    """Grouped-query attention's point: the cache of a model with 6 query heads and 2 key/value heads is
    a third of what 6 key/value heads would need, and generation gives the tokens it gives uncached."""
    from attention import KVCache

    saved_by_transformers(tmp_path / "hf", "smollm2")
    model = ours(load_weights(tmp_path / "hf"))
    caches = [KVCache(CONTEXT) for _ in model.transformer.h]
    with torch.no_grad():
        model(ids(VOCAB, 10), caches=caches)
    k = caches[0].k
    assert (k.size(0), k.size(1), k.size(3)) == (2, 2, 8)  # (B, nkv, room, hd): 2 of the 6 heads
    prompt = ids(VOCAB, 5)
    assert torch.equal(generate(model, prompt, 20, temperature=0), generate(model, prompt, 20, temperature=0,
                                                                          use_cache=False))


@pytest.mark.parametrize("shape", ["smollm2", "qwen2.5", "qwen3"])
def test_lora_adapters_load_in_peft_onto_the_original_folder(tmp_path, char_data, shape, capsys):
    """A LoRA run started from a folder saved by transformers: --adapters-only writes PEFT's adapters with
    the model's own module names (q_proj ... down_proj), and PEFT, given the adapters' folder alone, loads
    them onto that original folder with our logits and our greedy continuation. eval.py's loss of the
    run equals the PEFT model's on the same tokens."""
    from peft import AutoPeftModelForCausalLM

    saved_by_transformers(tmp_path / "hf", shape)
    train.main(load_config(["--training.init_from", str(tmp_path / "hf"), "--data.processed_dir", char_data,
                            "--lora.rank", "2", "--training.learning_rate", "2e-2", "--max-iters", "6",
                            "--training.warmup_iters", "0", "--training.batch_size", "4", "--model.block_size", "32",
                            "--training.eval_interval", "6", "--training.eval_batches", "1", "--device", "cpu",
                            "--training.out_dir", str(tmp_path / "run")]))
    assert export.main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "adapters"), "--adapters-only"]) == 0
    adapter_config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                                                "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    peft = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapters").eval()
    run = load_weights(tmp_path / "run")
    x = ids(65, 30)
    with torch.no_grad():
        mine = ours(run)(x)[0]
        assert (peft(x).logits - mine).abs().max() < 1e-4
        assert (ours(load_weights(tmp_path / "hf"))(x)[0] - mine).abs().max() > 1e-3  # the adapters did change it
    prompt = x[:, :4]
    assert torch.equal(peft.generate(input_ids=prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False),
                       generate(ours(run), prompt, 20, temperature=0))
    text = "ROMEO: I will go."
    (tmp_path / "t.txt").write_text(text)
    capsys.readouterr()
    assert eval_py.main(["--json", "--ckpt", str(tmp_path / "run"), "--text", str(tmp_path / "t.txt")]) == 0
    loss = json.loads(capsys.readouterr().out)["mean_loss"]
    tokens = torch.tensor([[run.meta["chars"].index(c) for c in "\n" + text]])  # a newline starts a text
    with torch.no_grad():  # the model scores 96 ids, the 65 characters are all a char model can spell (load_model)
        logits = peft(tokens).logits[0, :-1, :65]
    assert abs(torch.nn.functional.cross_entropy(logits, tokens[0, 1:]).item() - loss) < 1e-4


@pytest.mark.parametrize("shape", ["smollm2", "qwen2.5"])
def test_lora_loss_and_gradients_equal_peft(tmp_path, shape):
    """Our adapters (one LoRALinear per stacked layer: c_attn holds q, k and v, c_fc gate and up) and
    PEFT's (one per projection), holding the same numbers, give the same loss and the same gradients."""
    import peft
    import hf

    theirs = saved_by_transformers(tmp_path / "hf", shape)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=2, lora_alpha=6, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    mine = ours(load_weights(tmp_path / "hf"))
    add_adapters(mine, LoraConfig(rank=2, alpha=6, targets="all"))
    pairs = []  # (our adapted layer, PEFT's layers of the projections it stacks)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, layer in mine.named_modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.normal_(0, 0.1)  # B = 0 at the start would hide a wrong B
                peft_layers = [theirs.base_model.model.get_submodule(m) for m in hf.module_names(mine.config, name)]
                for peft_layer, A, B in zip(peft_layers, layer.lora_A.split(2), layer.lora_B.split(layer.parts)):
                    peft_layer.lora_A["default"].weight.copy_(A), peft_layer.lora_B["default"].weight.copy_(B)
                pairs.append((layer, peft_layers))
    x, y = ids(VOCAB, 24), ids(VOCAB, 24, seed=2)
    mine.train()
    _, loss = mine(x, y)
    loss.backward()
    their_loss = torch.nn.functional.cross_entropy(theirs(input_ids=x).logits.flatten(0, 1), y.flatten())
    their_loss.backward()
    assert abs(loss.item() - their_loss.item()) < 1e-5
    for layer, peft_layers in pairs:
        grads = zip(peft_layers, layer.lora_A.grad.split(2), layer.lora_B.grad.split(layer.parts), strict=True)
        for peft_layer, grad_A, grad_B in grads:
            assert torch.allclose(grad_A, peft_layer.lora_A["default"].weight.grad, atol=1e-6, rtol=1e-4)
            assert torch.allclose(grad_B, peft_layer.lora_B["default"].weight.grad, atol=1e-6, rtol=1e-4)
    assert sum(len(peft_layers) for _, peft_layers in pairs) == 2 * 7  # the 7 projections of the 2 blocks


# ----------------------------------------------------------------------------- fitting the machine

def tiny_run(folder, data, out, *extra):
    return load_config(["--training.init_from", str(folder), "--data.processed_dir", data, "--max-iters", "2",
                        "--training.batch_size", "2", "--training.eval_batches", "1", "--device", "cpu",
                        "--training.out_dir", str(out), *extra])


def test_the_context_comes_from_the_settings_bounded_by_the_folders(tmp_path, char_data):
    """A folder's max_position_embeddings (64 here; 8,192 for SmolLM2) is a bound, not the context a run
    trains with: the default (256) is cut to it, a shorter choice kept, a longer one refused."""
    saved_by_transformers(tmp_path / "hf", "smollm2")
    cfg = tiny_run(tmp_path / "hf", char_data, tmp_path / "a")
    train.main(cfg)
    assert cfg.model.block_size == CONTEXT
    cfg = tiny_run(tmp_path / "hf", char_data, tmp_path / "b", "--model.block_size", "16")
    train.main(cfg)
    assert cfg.model.block_size == 16
    with pytest.raises(CheckpointError, match="model.block_size = 128 is longer than the 64 tokens the weights "
                                              r"learned .*; use at most 64"):
        train.main(tiny_run(tmp_path / "hf", char_data, tmp_path / "c", "--model.block_size", "128"))


def test_a_step_that_cannot_fit_is_refused_before_it_starts(tmp_path, char_data, monkeypatch):
    import lifecycle

    saved_by_transformers(tmp_path / "hf", "smollm2")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt_last.pt").write_text("a run that --training.overwrite would replace")
    monkeypatch.setattr(lifecycle, "available_memory", lambda device: 2**20)  # 1 MiB free
    with pytest.raises(lifecycle.TrainError, match=r"this run needs at least \d+ MiB more for its first step and cpu "
                                                   r"has 1 MiB available: lower model.block_size \(64\) or "
                                                   r"training.batch_size \(64, .*activation_checkpointing = true"):
        train.main(tiny_run(tmp_path / "hf", char_data, tmp_path / "run", "--training.batch_size", "64",
                            "--training.overwrite"))
    assert (tmp_path / "run" / "ckpt_last.pt").read_text().startswith("a run")  # refused before anything is replaced


def test_the_memory_estimate_is_a_lower_bound_of_a_step(tmp_path):
    """What lifecycle.step_memory counts is allocated by a real step (forward, backward, optimizer), and it
    is not a small part of it: measured with torch.profiler's record of every allocation."""
    from benchmarks.memory import peak_allocated_mb
    from config import Config
    from lifecycle import step_memory
    from muon import make_optimizer
    from runtime import profiler

    cfg = Config()
    cfg.model.__dict__.update(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=512, dropout=0.0)
    cfg.training.batch_size = 8
    model = GPT(cfg.model)
    optimizer = make_optimizer(model, cfg.training, "cpu")
    x = ids(512, 65)
    with profiler("cpu", memory=True) as prof:
        _, loss = model(x[:, :-1].repeat(4, 1), x[:, 1:].repeat(4, 1))
        loss.backward()
        optimizer.step()
    measured = peak_allocated_mb(prof, "cpu") * 2**20
    assert 0.3 * measured < step_memory(model, cfg, "fp32", 1) < measured


# ----------------------------------------------------------------------------- reading folders as they come

def test_sharded_folders_load_and_a_missing_shard_is_named(tmp_path):
    theirs = saved_by_transformers(tmp_path / "whole", "tinyllama")
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a, b = load_weights(tmp_path / "whole"), load_weights(tmp_path / "sharded")
    assert a.model == b.model and all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names {shard.name}, which is not in the folder; download the missing"):
        load_weights(tmp_path / "sharded")


def test_bf16_folders_are_read_as_stored(tmp_path):
    theirs = saved_by_transformers(tmp_path / "fp32", "smollm2")
    theirs.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    src = load_weights(tmp_path / "bf16")
    assert src.dtype == "bf16" and src.state_dict["transformer.wte.weight"].dtype == torch.float32
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        stored = f.get_tensor("model.layers.0.self_attn.k_proj.weight")
    assert torch.equal(src.state_dict["transformer.h.0.attn.c_attn.weight"][48:64], stored.float())


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
def test_loaded_weights_leave_the_file_unmapped(tmp_path):
    """The weights read from a folder are copies: once read, no tensor keeps the memory-mapped file (and its
    pages, resident beside the model's own copy) alive."""
    saved_by_transformers(tmp_path / "hf", "smollm2")
    src = load_weights(tmp_path / "hf")
    gc.collect()
    assert src.state_dict and str(tmp_path / "hf" / "model.safetensors") not in Path("/proc/self/maps").read_text()


def test_weights_that_disagree_with_config_json_are_named(tmp_path):
    """A shard whose tensors are not the shapes config.json gives, and a config.json whose sizes are
    hostile: one error each, before a model is built from them."""
    saved_by_transformers(tmp_path / "hf", "smollm2")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config | {"num_key_value_heads": 3}))
    with pytest.raises(CheckpointError, match=r"the weights do not fit their model settings .*c_attn.weight"):
        load_weights(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config | {"hidden_size": 10**9}))
    with pytest.raises(CheckpointError, match=r"model.n_embd = 1000000000 but the weights have 48"):
        load_weights(tmp_path / "hf")


# ----------------------------------------------------------------------------- tokenizers

def hf_tokenizer(folder, prefix: bool = False) -> None:
    """A byte-level BPE tokenizer.json of 300 tokens learned from the shipped corpus, with ChatML's special
    tokens, saved as transformers saves one; `prefix`: it puts <|im_start|> before every text, as Llama 3
    puts <|begin_of_text|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS.read_text(encoding="utf-8")[:200_000]], trainer)
    if prefix:
        tok.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                            unk_token="<|endoftext|>").save_pretrained(folder)


TEXT = "Héllo  wörld\n\n\t tabs  <|im_end|> and 日本語, an emoji 🙂<|im_start|>x   \n"


@pytest.mark.parametrize("prefix", [False, True])
def test_token_ids_equal_auto_tokenizers(tmp_path, prefix):
    from transformers import AutoTokenizer

    hf_tokenizer(tmp_path, prefix)
    meta = hf_tokenizer_meta(tmp_path)
    tok = tokenizer_from_meta(meta)
    expected = AutoTokenizer.from_pretrained(tmp_path)(TEXT).input_ids
    assert tok.encode(TEXT) == expected and tok.decode(expected[prefix:]) == TEXT
    assert meta["eot_token"] == 2 and tok.prefix == ([1] if prefix else [])


def model_with_tokenizer(folder, prefix: bool = False):
    saved_by_transformers(folder, "smollm2", vocab=320)
    hf_tokenizer(folder, prefix)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))


def test_prepare_train_sample_and_export_with_a_folders_tokenizer(tmp_path, capsys):
    """train.py from a folder that holds a tokenizer.json prepares the text with it (by itself), sample.py
    reads the folder as it is, and the export carries the tokenizer's files: AutoTokenizer loads it."""
    from transformers import AutoTokenizer

    model_with_tokenizer(tmp_path / "hf", prefix=True)
    text = tmp_path / "text.txt"
    text.write_text(CORPUS.read_text(encoding="utf-8")[:30_000])
    summary = train.main(load_config(["--training.init_from", str(tmp_path / "hf"), "--data.input", str(text),
                                      "--data.processed_dir", str(tmp_path / "data"), "--max-iters", "2",
                                      "--training.batch_size", "2", "--model.block_size", "32",
                                      "--training.eval_batches", "1", "--device", "cpu",
                                      "--training.out_dir", str(tmp_path / "run")]))
    assert summary["step"] == 2
    prepared = json.loads((tmp_path / "data" / "meta.json").read_text())
    run = load_weights(tmp_path / "run")
    assert run.meta["tokenizer"] == prepared["tokenizer"] == "hf"
    assert run.meta["sha256"] == prepared["sha256"] == hf_tokenizer_meta(tmp_path / "hf")["sha256"]
    assert sample.main(["--ckpt", str(tmp_path / "hf"), "--start", "ROMEO:", "--num-samples", "1",
                        "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert "ROMEO:" in capsys.readouterr().out
    out = export.export(tmp_path / "run", tmp_path / "exported", "hf")
    assert AutoTokenizer.from_pretrained(out)(TEXT).input_ids == AutoTokenizer.from_pretrained(tmp_path / "hf")(
        TEXT).input_ids


def test_prepare_reads_a_tokenizer_path(tmp_path):
    import prepare
    from config import DataConfig

    hf_tokenizer(tmp_path / "tok", prefix=True)
    text = tmp_path / "t.txt"
    text.write_text("First doc.\n")
    meta = prepare.prepare(DataConfig(input=str(text), processed_dir=str(tmp_path / "out"), tokenizer="hf",
                                      tokenizer_path=str(tmp_path / "tok"), val_fraction=0.5), progress=False)
    tok = tokenizer_from_meta(meta)
    import numpy as np
    train_ids = np.fromfile(tmp_path / "out" / "train.bin", dtype=meta["dtype"]).tolist()
    assert train_ids[0] == 1 and train_ids == tok.encode("First")[:len(train_ids)]  # the prefix, then the text
    with pytest.raises(prepare.DataError, match="data.tokenizer = hf needs data.tokenizer_path"):
        prepare.prepare(DataConfig(input=str(text), processed_dir=str(tmp_path / "o2"), tokenizer="hf"))


def test_a_stop_token_ends_a_sample(tmp_path, capsys, monkeypatch):
    """generation_config.json's end-of-sequence ids end sample.py's sample (here the model is made to say
    token 0, one of them, after three tokens)."""
    import generate as generate_module

    model_with_tokenizer(tmp_path / "hf")
    real = generate_module.sample_next_token
    calls = []

    def stop_on_the_fourth(logits, *args):
        calls.append(1)
        return torch.zeros((1, 1), dtype=torch.long) if len(calls) == 4 else real(logits, *args)

    monkeypatch.setattr(generate_module, "sample_next_token", stop_on_the_fourth)
    assert sample.main(["--ckpt", str(tmp_path / "hf"), "--start", "a", "--num-samples", "1",
                        "--max-new-tokens", "50"]) == 0
    assert len(calls) == 4


def test_a_tokenizer_with_more_ids_than_embedding_rows_is_refused(tmp_path):
    saved_by_transformers(tmp_path / "hf", "smollm2", vocab=96)
    hf_tokenizer(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="its tokenizer has 300 tokens, more than the model's 96 embedding rows"):
        checkpoint.load_weights(tmp_path / "hf")
