"""sample.py: reproducible samples, streaming, prompts, exports, and clear errors (tiny models, CPU)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import export
import sample
import train
from checkpoint import load_weights, save_checkpoint
from config import Config
from options import load_config
from conftest import CORPUS, ROOT, prepare_text
from generate import TextStream, generate
from model import GPT
from tokenizer import MARKERS

FEW = ["--num-samples", "2", "--max-new-tokens", "40"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny char model after 20 training steps. Its data folder is deleted afterwards: sampling
    must get the tokenizer from the checkpoint, as on a machine the checkpoint was copied to."""
    root = tmp_path_factory.mktemp("sample")
    data = root / "data"
    prepare_text(CORPUS, data)
    train.main(load_config(["--data.processed_dir", str(data), "--model.n_layer", "1", "--model.n_head", "2",
                            "--model.n_embd", "32", "--model.block_size", "16", "--model.dropout", "0",
                            "--training.batch_size", "4", "--training.max_iters", "20",
                            "--training.eval_interval", "10", "--training.eval_batches", "2",
                            "--training.device", "cpu", "--training.out_dir", str(root / "run")]))
    shutil.rmtree(data)
    return root / "run"


def run(capsys, *args) -> tuple[int, str, str]:
    code = sample.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def samples(out: str) -> list[str]:
    """The texts between the `---------- sample i/n ----------` lines."""
    lines, texts = out.split("\n"), []
    for line in lines[:-1]:
        if line.startswith("---------- sample "):
            texts.append("")
        else:
            texts[-1] += line + "\n"
    return texts


def test_same_seed_same_text(run_dir, capsys):
    code, first, err = run(capsys, "--ckpt", run_dir, "--start", "ROMEO:", *FEW)
    assert code == 0 and "ckpt_best.pt" in err  # a run folder means its best checkpoint
    assert "---------- sample 1/2 ----------" in first and "---------- sample 2/2 ----------" in first
    texts = samples(first)
    assert len(texts) == 2 and all(t.startswith("ROMEO:") and len(t) > 40 for t in texts)
    assert texts[0] != texts[1]  # one generator for all samples: each continues from the last
    assert run(capsys, "--ckpt", run_dir, "--start", "ROMEO:", *FEW)[1] == first
    assert run(capsys, "--ckpt", run_dir, "--start", "ROMEO:", *FEW, "--seed", "7")[1] != first


def test_stream_prints_the_same_text(run_dir, capsys):
    plain = run(capsys, "--ckpt", run_dir, "--start", "ROMEO:", *FEW, "--top-k", "10", "--top-p", "0.9")
    streamed = run(capsys, "--ckpt", run_dir, "--start", "ROMEO:", *FEW, "--top-k", "10", "--top-p", "0.9",
                   "--stream")
    assert plain[0] == streamed[0] == 0 and streamed[1] == plain[1]


def test_prompt_from_file_and_empty_prompt(run_dir, tmp_path, capsys):
    (tmp_path / "prompt.txt").write_text("ROMEO:\n")
    from_file = run(capsys, "--ckpt", run_dir, "--start", f"FILE:{tmp_path / 'prompt.txt'}", *FEW)[1]
    assert from_file == run(capsys, "--ckpt", run_dir, "--start", "ROMEO:\n", *FEW)[1]
    # An empty prompt starts after a newline: the same tokens as --start "\n", without printing it.
    empty = samples(run(capsys, "--ckpt", run_dir, "--start", "", *FEW)[1])
    newline = samples(run(capsys, "--ckpt", run_dir, "--start", "\n", *FEW)[1])
    assert [t.startswith("\n") for t in newline] == [True, True] and empty == [t[1:] for t in newline]


def test_unknown_characters_are_named(run_dir):
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", str(run_dir), "--start", "héllo wörld"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: the prompt has characters not in "
                                                              "the vocabulary: 'é', 'ö'")


def test_long_prompt_is_cropped_with_a_notice(run_dir, capsys):
    prompt = CORPUS.read_text()[:100]
    code, out, err = run(capsys, "--ckpt", run_dir, "--start", prompt, *FEW)
    assert code == 0 and "the prompt is 100 tokens" in err and "its last 16 tokens" in err
    assert samples(out)[0].startswith(prompt)


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "-1", "--temperature = -1.0 must be >= 0"),
    ("--top-k", "-1", "--top-k = -1 must be at least 0"),  # 0: all tokens
    ("--temperature", "nan", "--temperature = nan is not a finite number"),
    ("--top-p", "0", "--top-p = 0.0 must be in (0, 1]"),
    ("--top-p", "1.5", "--top-p = 1.5 must be in (0, 1]"),
    ("--num-samples", "0", "--num-samples = 0 must be at least 1"),
    ("--top-k", "many", "--top-k = 'many' is not an int")])
def test_bad_sampling_settings(run_dir, capsys, flag, value, message):
    code, out, err = run(capsys, "--ckpt", run_dir, flag, value)
    assert code == 2 and out == "" and err.startswith("error: ") and message in err


def test_missing_and_corrupt_checkpoints(tmp_path, capsys):
    code, _, err = run(capsys, "--ckpt", tmp_path / "nope.pt")
    assert code == 2 and "nope.pt does not exist" in err
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint at all")
    code, _, err = run(capsys, "--ckpt", tmp_path / "bad.pt")
    assert code == 2 and "cannot be read" in err and "corrupt" in err
    code, _, err = run(capsys, "--ckpt", tmp_path)  # a folder with neither checkpoints nor an export
    assert code == 2 and "no ckpt_best.pt or ckpt_last.pt" in err


def test_default_checkpoint_is_the_readme_run(run_dir, tmp_path, monkeypatch, capsys):
    """Without --ckpt: checkpoints/small, the run the README's first command makes."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *FEW)
    assert code == 2 and "checkpoints/small does not exist" in err
    (tmp_path / "checkpoints" / "small").mkdir(parents=True)
    code, _, err = run(capsys, *FEW)
    assert code == 2 and "no checkpoint in checkpoints/small/" in err
    shutil.copy(run_dir / "ckpt_last.pt", tmp_path / "checkpoints" / "small")
    code, _, err = run(capsys, *FEW)
    assert code == 0 and "checkpoints/small/ckpt_last.pt" in err
    shutil.copy(run_dir / "ckpt_best.pt", tmp_path / "checkpoints" / "small")
    code, _, err = run(capsys, *FEW)
    assert code == 0 and "checkpoints/small/ckpt_best.pt" in err
    code, _, err = run(capsys, "--ckpt", "checkpoints", *FEW)  # the parent: the runs in it are named
    assert code == 2 and "runs found: checkpoints/small" in err


@pytest.mark.parametrize("fmt", ["native", "hf"])
def test_exported_folder_samples_the_same_text(run_dir, tmp_path, capsys, fmt):
    folder = export.export(run_dir / "ckpt_best.pt", tmp_path / fmt, fmt)
    code, out, err = run(capsys, "--ckpt", folder, "--start", "ROMEO:", *FEW)
    assert code == 0 and f"({fmt}, step 20, char tokenizer)" in err
    assert out == run(capsys, "--ckpt", run_dir, "--start", "ROMEO:", *FEW)[1]


def test_data_folder_is_not_needed(run_dir, capsys):
    processed_dir = load_weights(run_dir / "ckpt_best.pt").config["data"]["processed_dir"]
    assert processed_dir and not Path(processed_dir).exists()  # the fixture deleted it
    model, tokenizer, info = sample.load_for_sampling(run_dir / "ckpt_best.pt")
    assert tokenizer.kind == "char" and tokenizer.vocab_size == 65 and not model.training
    assert info["format"] == "checkpoint" and info["step"] == 20
    assert run(capsys, "--ckpt", run_dir, *FEW)[0] == 0


def test_bpe_model_streams_the_same_text(tmp_path, capsys, gpt2_tokenizer):
    # A random model over GPT-2's first 512 tokens: the 256 single bytes (halves of UTF-8 characters
    # among them) and the first merges. At temperature 2 it samples byte soup, and the incremental
    # decoder must print exactly what decoding the whole list gives. (512, not 50257: fast to sample.)
    cfg = Config()
    settings = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, dropout=0.0, vocab_size=512)
    for key, value in settings.items():
        setattr(cfg.model, key, value)
    torch.manual_seed(0)
    meta = {"tokenizer": "bpe", "encoding": "gpt2", "eot_token": 50256, "vocab_size": 50257}
    save_checkpoint(tmp_path / "ckpt.pt", {"version": 1, "model": GPT(cfg.model).state_dict(),
                                           "config": cfg.to_dict(), "meta": meta, "step": 0})
    args = ["--ckpt", tmp_path / "ckpt.pt", "--start", "a", *FEW, "--temperature", "2"]
    plain, streamed = run(capsys, *args), run(capsys, *args, "--stream")
    assert plain[0] == 0 and streamed[1] == plain[1] and "\ufffd" in plain[1]  # some broken characters
    # The same as decoding each sample's whole token list at once (same seed, same generator).
    model, tokenizer, _ = sample.load_for_sampling(tmp_path / "ckpt.pt")
    generator = torch.Generator().manual_seed(1337)
    prompt = torch.tensor([tokenizer.encode("a")])
    expected = ["a" + tokenizer.decode(generate(model, prompt, 40, 2.0, generator=generator)[0, 1:].tolist())
                + "\n" for _ in range(2)]
    assert samples(plain[1]) == expected
    assert sample.encode_prompt("", gpt2_tokenizer, 32, 50257) == [50256]  # empty prompt: end-of-text
    with pytest.raises(sample.DataError, match="token 50256, outside this model's vocabulary of 512"):
        sample.encode_prompt("", gpt2_tokenizer, 32, 512)
    ids = gpt2_tokenizer.encode("naïve café 🙂 日本")
    stream = TextStream(gpt2_tokenizer)
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == "naïve café 🙂 日本" and "\ufffd" not in "".join(pieces)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_a_model_trained_on_conversations_samples_its_markers_as_text(tmp_path, capsys, kind, gpt2_tokenizer):
    """ChatML's markers are ids of their own after the text's (char and GPT-2 BPE prepared from
    conversations): sample.py prints them as their text, as decoding the whole token list does."""
    cfg = Config()
    if kind == "char":
        meta = {"tokenizer": "char", "chars": "ab\n", "vocab_size": 5, "markers": list(MARKERS)}
        vocab, markers, likely = 5, [3, 4], [0, 1, 2]
    else:  # a model over GPT-2's first 256 tokens and the two markers, which sit after all 50,257
        meta = {"tokenizer": "bpe", "encoding": "gpt2", "eot_token": 50256, "vocab_size": 50259,
                "markers": list(MARKERS)}
        vocab, markers, likely = 50259, [50257, 50258], [97, 98, 10]  # a, b, newline
    settings = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, dropout=0.0, vocab_size=vocab)
    for key, value in settings.items():
        setattr(cfg.model, key, value)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():  # logits 30 for the markers and a few tokens, 0 for the rest: samples of markers
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()[0] = 30.0  # every position's final vector: (30, 0, 0, ...)
        model.lm_head.weight.zero_()[markers + likely, 0] = 1.0
    save_checkpoint(tmp_path / "ckpt.pt", {"version": 1, "model": model.state_dict(), "config": cfg.to_dict(),
                                           "meta": meta, "step": 0})
    code, out, err = run(capsys, "--ckpt", tmp_path / "ckpt.pt", "--start", "a", *FEW, "--temperature", "2")
    assert code == 0, err
    model, tokenizer, _ = sample.load_for_sampling(tmp_path / "ckpt.pt")
    generator = torch.Generator().manual_seed(1337)
    prompt = torch.tensor([tokenizer.encode("a")])
    ids = [generate(model, prompt, 40, 2.0, generator=generator)[0, 1:].tolist() for _ in range(2)]
    assert all(set(markers) & set(i) for i in ids)
    assert samples(out) == ["a" + tokenizer.decode(i) + "\n" for i in ids] and MARKERS[1] in out


@pytest.mark.parametrize("temperature", [1e-4, 1e-45, 1e-300])
def test_a_tiny_temperature_samples_the_most_likely_token(temperature):
    """Dividing logits by 1e-45 overflows float32 (inf, then NaN probabilities): such temperatures sample
    the most likely token, as the limit of a smaller and smaller temperature does."""
    from generate import sample_next_token

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 30
    chosen = sample_next_token(logits, temperature, None, None, torch.Generator().manual_seed(1))
    assert torch.equal(chosen, logits.argmax(dim=-1, keepdim=True))
