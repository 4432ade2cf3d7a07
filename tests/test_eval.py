"""eval.py: loss, perplexity and bits per byte of a text, checked against transformers on the Hugging
Face export of the same model; the sliding window; and its errors (tiny random models, CPU)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must never try the network here
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import eval as eval_py  # noqa: E402  (eval.py, the script)
import export  # noqa: E402
from conftest import ROOT  # noqa: E402
from test_export import make_checkpoint  # noqa: E402

# Non-ASCII on purpose: 'é', '—' and '日' take 2, 3 and 3 bytes in UTF-8, so bytes and characters differ.
TEXT = "Où est le café? — Très loin, naïve amie… 日本.\nROMEO: Hélas!\n"
LONG = TEXT * 3  # 177 characters: many windows of a 16-token context
CHARS = "".join(sorted(set(TEXT) | set("abcdefghijklmnopqrstuvwxyz")))
BLOCK = 16


@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
    """(checkpoint, its Hugging Face export) of a random char model whose vocabulary holds TEXT's characters."""
    root = tmp_path_factory.mktemp("eval")
    (root / "run").mkdir()
    ckpt = make_checkpoint(root / "run" / "ckpt_best.pt", {"tokenizer": "char", "chars": CHARS, "vocab_size": len(CHARS)})
    return ckpt, export.export(ckpt, root / "hf", "hf")


def hf_model(folder):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(folder).eval()


def char_ids(text: str) -> list[int]:
    """TEXT's token ids with the start of a text (a newline) first, spelt out from the vocabulary."""
    return [CHARS.index("\n")] + [CHARS.index(c) for c in text]


def run_eval(capsys, *args) -> dict:
    assert eval_py.main(["--json", *map(str, args)]) == 0
    return json.loads(capsys.readouterr().out)


def write(tmp_path, text: str, name: str = "text.txt"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def test_window_plan_scores_every_token_once_with_enough_context():
    for n in (1, 5, 16, 17, 40, 100):
        for stride in (1, 3, 8, 16):
            ends = eval_py.window_ends(n, BLOCK, stride)
            scored = [p for i, e in enumerate(ends) for p in range((ends[i - 1] if i else 0) + 1, e + 1)]
            assert scored == list(range(1, n + 1)), (n, stride)  # each target once, in order
            for i, e in enumerate(ends):
                start = max(0, e - BLOCK)  # the window's first input
                first_new = (ends[i - 1] if i else 0) + 1
                # The least context a newly scored token gets: everything before it, or block - stride + 1.
                assert first_new - start >= min(first_new, BLOCK - stride + 1), (n, stride, e)
            assert ends[-1] == n and len(set(ends)) == len(ends)


def test_one_window_equals_the_transformers_loss(char_model, tmp_path, capsys):
    """A text that fits one window: our mean loss is transformers' own loss on the HF export, for every
    kind of weights eval.py reads (checkpoint, run folder, native and HF exports; a LoRA run:
    tests/test_lora.py)."""
    ckpt, hf_dir = char_model
    text = TEXT[:BLOCK - 1]  # the start token and 15 characters: 16 inputs
    ids = torch.tensor([char_ids(text)])
    with torch.no_grad():
        expected = hf_model(hf_dir)(ids, labels=ids).loss.item()  # mean over the 15 predicted tokens
    path = write(tmp_path, text)
    for source in (ckpt, ckpt.parent, export.export(ckpt, tmp_path / "native", "native"), hf_dir):
        result = run_eval(capsys, "--ckpt", source, "--text", path)
        assert result["tokens"] == len(text) == 15 and result["windows"] == 1
        assert result["mean_loss"] == pytest.approx(expected, rel=1e-5)
        assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert expected > 1  # random weights: far from a trivial loss


def test_stride_1_gives_every_token_its_full_context(char_model, tmp_path, capsys):
    """Many windows, stride 1: each token's loss given the block_size tokens before it (or all of them),
    computed one token at a time by transformers."""
    ckpt, hf_dir = char_model
    hf, seq = hf_model(hf_dir), char_ids(LONG)
    losses = []
    with torch.no_grad():
        for p in range(1, len(seq)):
            context = torch.tensor([seq[max(0, p - BLOCK):p]])
            losses.append(F.cross_entropy(hf(context).logits[0, -1], torch.tensor(seq[p])).item())
    result = run_eval(capsys, "--ckpt", ckpt, "--text", write(tmp_path, LONG), "--stride", "1", "--batch-size", "7")
    assert result["tokens"] == len(LONG) and result["windows"] == len(LONG) - BLOCK + 1
    assert result["loss_sum"] == pytest.approx(sum(losses), rel=1e-5)


@pytest.mark.parametrize("stride", [5, 16])
def test_strided_windows_match_transformers_logits(char_model, tmp_path, capsys, stride):
    """Each window through transformers, the targets an earlier window scored masked out (-100): the
    summed losses are ours."""
    ckpt, hf_dir = char_model
    hf, seq = hf_model(hf_dir), torch.tensor(char_ids(LONG))
    total, done = 0.0, 0
    with torch.no_grad():
        for end in eval_py.window_ends(len(LONG), BLOCK, stride):
            x, y = seq[end - BLOCK:end], seq[end - BLOCK + 1:end + 1].clone()  # inputs and their next tokens
            y[:BLOCK - (end - done)] = -100  # scored by an earlier window
            total += F.cross_entropy(hf(x[None]).logits[0], y, ignore_index=-100, reduction="sum").item()
            done = end
    result = run_eval(capsys, "--ckpt", ckpt, "--text", write(tmp_path, LONG), "--stride", stride)
    assert result["loss_sum"] == pytest.approx(total, rel=1e-5)
    assert result["tokens"] == len(LONG) and result["stride"] == stride


def test_bits_per_byte_of_a_char_and_a_bpe_model_count_bytes(tmp_path, capsys, gpt2_tokenizer):
    """Bits per byte = summed loss / UTF-8 bytes / ln 2, for a char model (a token per character) and a
    BPE model (several characters per token, or several tokens per character) on the same text, each
    against transformers' loss on its Hugging Face export."""
    path = write(tmp_path, TEXT)
    n_bytes = len(TEXT.encode("utf-8"))
    assert n_bytes > len(TEXT) + 5  # bytes, not characters
    char = make_checkpoint(tmp_path / "char.pt", {"tokenizer": "char", "chars": CHARS, "vocab_size": len(CHARS)},
                           block_size=64)
    bpe = make_checkpoint(tmp_path / "bpe.pt", {"tokenizer": "bpe", "encoding": "gpt2", "eot_token": 50256,
                                                "vocab_size": 50257}, block_size=64, n_embd=16)
    bpe_ids = [50256] + gpt2_tokenizer.encode(TEXT)  # end-of-text: the start of a text
    assert len(bpe_ids) - 1 < len(TEXT)
    for ckpt, ids in ((char, char_ids(TEXT)), (bpe, bpe_ids)):
        result = run_eval(capsys, "--ckpt", ckpt, "--text", path)
        tokens = torch.tensor([ids])  # one window: the text is shorter than the context
        with torch.no_grad():
            hf_sum = hf_model(export.export(ckpt, tmp_path / f"{ckpt.stem}_hf", "hf"))(tokens, labels=tokens).loss.item() \
                * (len(ids) - 1)
        assert result["tokens"] == len(ids) - 1 and result["windows"] == 1
        assert result["bytes"] == n_bytes and result["characters"] == len(TEXT)
        assert result["loss_sum"] == pytest.approx(hf_sum, rel=1e-5)
        assert result["bits_per_byte"] == pytest.approx(hf_sum / n_bytes / math.log(2), rel=1e-5)


@pytest.mark.parametrize("content, args, message", [
    ("café au lait, é, ü\n", [], "has characters not in the vocabulary: 'ü' (1 occurrence); use text made"),
    ("ÿÿ Ÿ ÿ\n", [], "'ÿ', 'Ÿ' (4 occurrences)"),
    ("", [], "is empty: there is nothing to score"),
    ("hello\n", ["--stride", "17"], "--stride 17 is larger than the model's context (block_size 16)"),
    (None, [], "cannot read it (No such file or directory)"),
    (b"\xff\xfe not utf-8", [], "is not UTF-8 text"),
])
def test_bad_input_is_a_one_line_error(char_model, tmp_path, capsys, content, args, message):
    path = tmp_path / "bad.txt"
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    assert eval_py.main(["--ckpt", str(char_model[0]), "--text", str(path), *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_missing_text_option_and_script_run(char_model, tmp_path):
    r = subprocess.run([sys.executable, "eval.py", "--ckpt", str(char_model[0])], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr == "error: nothing to do: give --text FILE (a text or records to score) or " \
                                             "--task FILE (prompts whose answers to check)\n"
    # As a user runs it: the result on stdout, the progress (more than 50 windows) on stderr.
    r = subprocess.run([sys.executable, "eval.py", "--ckpt", str(char_model[0]), "--text", str(write(tmp_path, LONG)),
                        "--stride", "2"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "scoring: 100% of 82 windows" in r.stderr and "(checkpoint, step 7, char tokenizer)" in r.stderr
    assert f"177 tokens, 177 characters, {len(LONG.encode())} bytes; context 16, stride 2: 82 windows" in r.stdout
    assert "bits per byte" in r.stdout and "Traceback" not in r.stderr


def test_weights_that_are_not_numbers_are_refused_not_scored(char_model, tmp_path, capsys):
    """NaN weights would score NaN (and --json print null, exit 0): they are named when read instead."""
    ckpt, _ = char_model
    state = torch.load(ckpt, weights_only=True)
    state["model"] = {k: torch.full_like(v, float("nan")) for k, v in state["model"].items()}
    torch.save(state, tmp_path / "nan.pt")
    assert eval_py.main(["--json", "--ckpt", str(tmp_path / "nan.pt"), "--text", str(write(tmp_path, TEXT))]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: {tmp_path / 'nan.pt'} holds weights that are not finite numbers (")
    assert err.count("\n") == 1
