"""prepare.py and data.py: tokenizers, both formats, batches, and every bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import tokenizer
import prepare
from conftest import CORPUS, ROOT
from config import DataConfig
from data import DataError

TEXT = CORPUS.read_text(encoding="utf-8")


def prep(tmp_path, name="out", input_path=CORPUS, force=False, chars=None, **settings):
    d = DataConfig(input=str(input_path), processed_dir=str(tmp_path / name), **settings)
    model_meta = {"tokenizer": "char", "chars": chars, "vocab_size": len(chars)} if chars is not None else None
    return prepare.prepare(d, force=force, model_meta=model_meta, progress=False)


def read_all(folder, meta):
    return np.concatenate([data.load_tokens(folder, s, meta) for s in ("train", "val")])


# ----------------------------------------------------------------------------- tokenizers

def test_char_round_trip_and_vocabulary(tmp_path):
    meta = prep(tmp_path)
    assert meta["chars"] == "".join(sorted(set(TEXT)))
    assert meta["vocab_size"] == 65 and meta["dtype"] == "uint16"
    tok = tokenizer.tokenizer_from_meta(data.load_meta(tmp_path / "out"))
    tokens = read_all(tmp_path / "out", meta)
    assert tok.decode(tokens.tolist()) == TEXT
    assert tok.encode("To be") == [tok.chars.index(c) for c in "To be"]
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == len(TEXT)


def test_a_given_character_vocabulary_is_used_as_is(tmp_path):
    """A model's characters (vocab) encode a new text with the model's ids; unknown ones are named."""
    text = tmp_path / "new.txt"
    text.write_text("a cab, a bead.\n" * 20, encoding="utf-8")
    vocab = "zyx.,\n edcba"  # deliberately not sorted: the ids are the model's, not a re-sorting
    meta = prep(tmp_path, input_path=str(text), chars=vocab)
    assert meta["chars"] == vocab and meta["vocab_size"] == len(vocab)
    assert read_all(tmp_path / "out", meta).tolist() == [vocab.index(c) for c in "a cab, a bead.\n" * 20]
    other = tmp_path / "other.txt"
    other.write_text("Q cab! " * 20, encoding="utf-8")
    with pytest.raises(DataError, match=r"has characters the model does not know: '!', 'Q'; remove them"):
        prep(tmp_path, "other", input_path=str(other), chars=vocab)
    assert not (tmp_path / "other").exists()
    with pytest.raises(DataError, match=r"other characters \(12 there, 9 now\)"):
        prep(tmp_path, input_path=str(text))  # its own characters: refused without --force


def test_char_unknown_character_is_named(tmp_path):
    tok = tokenizer.CharTokenizer("abc ")
    with pytest.raises(DataError, match="'é'"):
        tok.encode("a café")


def test_gpt2_bpe_offline_hello_world(gpt2_tokenizer):
    assert gpt2_tokenizer.encode("Hello world") == [15496, 995]
    assert gpt2_tokenizer.vocab_size == 50257


def test_bpe_prepare_round_trips_corpus(tmp_path, gpt2_tokenizer):
    meta = prep(tmp_path, tokenizer="bpe")
    tokens = read_all(tmp_path / "out", meta)
    assert tokens[-1] == gpt2_tokenizer.eot_token  # one document, one end-of-text after it
    assert gpt2_tokenizer.decode(tokens[:-1].tolist()) == TEXT
    # Encoding in chunks gives exactly the tokens of encoding the whole text at once.
    assert tokens[:-1].tolist() == gpt2_tokenizer.enc.encode_ordinary(TEXT)


def test_bpe_small_chunks_are_exact(tmp_path, monkeypatch, gpt2_tokenizer):
    monkeypatch.setattr(prepare, "ENCODE_CHARS", 20_000)
    monkeypatch.setattr(data, "READ_BYTES", 7_777)
    text = TEXT[:200_000] + "\n\n  odd  \n spacing\n\nend"
    src = tmp_path / "in.txt"
    src.write_text(text)
    meta = prep(tmp_path, input_path=str(src), tokenizer="bpe", val_fraction=0.25)
    n_train = int(len(text) * 0.75)  # the split is at a character, like text[:n], text[n:]
    enc = gpt2_tokenizer.enc
    train, val = (data.load_tokens(tmp_path / "out", s, meta).tolist() for s in ("train", "val"))
    assert train == enc.encode_ordinary(text[:n_train])
    assert val == enc.encode_ordinary(text[n_train:]) + [enc.eot_token]


def test_folder_of_documents(tmp_path, gpt2_tokenizer):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("First document.\n" * 50)
    (docs / "b.txt").write_text("Second one.\n" * 50)
    (docs / "notes.md").write_text("ignored: not a .txt file")
    meta = prep(tmp_path, input_path=str(docs), tokenizer="bpe", val_fraction=0.3)
    assert meta["source"]["documents"] == 2
    tokens = read_all(tmp_path / "out", meta)
    eot = gpt2_tokenizer.eot_token
    assert (tokens == eot).sum() == 2
    parts = gpt2_tokenizer.decode([t if t != eot else 0 for t in tokens.tolist()])
    assert "First document." in parts and "Second one." in parts and "ignored" not in parts
    char_meta = prep(tmp_path, "chars", input_path=str(docs))
    assert tokenizer.CharTokenizer(char_meta["chars"]).decode(read_all(tmp_path / "chars", char_meta)) == \
        (docs / "a.txt").read_text() + (docs / "b.txt").read_text()


def test_uint32_for_a_vocabulary_beyond_uint16(tmp_path):
    assert data.token_dtype(50257) == "uint16" and data.token_dtype(100277) == "uint32"
    # A real corpus with 70,000 distinct characters must be stored as uint32.
    text = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 20000))
    text += "".join(chr(c) for c in range(0x20000, 0x20000 + 50000))
    src = tmp_path / "wide.txt"
    src.write_text(text * 2, encoding="utf-8")
    meta = prep(tmp_path, input_path=str(src))
    assert meta["vocab_size"] == 70000 and meta["dtype"] == "uint32"
    tokens = read_all(tmp_path / "out", meta)
    assert tokens.dtype == np.uint32 and tokens.max() == 69999
    assert tokenizer.CharTokenizer(meta["chars"]).decode(tokens.tolist()) == text * 2


# ----------------------------------------------------------------------------- formats and batches

@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_txt_and_bin_give_identical_batches(tmp_path, tokenizer, request):
    if tokenizer == "bpe":
        request.getfixturevalue("gpt2_tokenizer")
    m_bin = prep(tmp_path, "bin", tokenizer=tokenizer, format="bin")
    m_txt = prep(tmp_path, "txt", tokenizer=tokenizer, format="txt")
    assert (tmp_path / "txt" / "train.txt").exists() and not (tmp_path / "txt" / "train.bin").exists()
    for split in ("train", "val"):
        a = data.load_tokens(tmp_path / "bin", split, m_bin)
        b = data.load_tokens(tmp_path / "txt", split, m_txt)
        assert isinstance(a, np.memmap)
        assert np.array_equal(a, b)
        key = (split, 7, 3, 0)
        for xa, xb in zip(data.get_batch(a, 32, 4, key), data.get_batch(b, 32, 4, key)):
            assert torch.equal(xa, xb)
    assert m_bin["tokens"] == m_txt["tokens"]


def test_batch_is_a_pure_function_of_its_key(tmp_path):
    meta = prep(tmp_path)
    tokens = data.load_tokens(tmp_path / "out", "train", meta)
    x, y = data.get_batch(tokens, 16, 8, ("train", 1, 5))
    assert x.shape == (8, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one token
    x2, _ = data.get_batch(tokens, 16, 8, ("train", 1, 5))
    x3, _ = data.get_batch(tokens, 16, 8, ("train", 1, 6))
    x4, _ = data.get_batch(tokens, 16, 8, ("train", 2, 5))
    assert torch.equal(x, x2) and not torch.equal(x, x3) and not torch.equal(x, x4)
    # Each row is a real window of the data.
    haystack = np.asarray(tokens).tobytes()
    assert all(row.numpy().astype(tokens.dtype).tobytes() in haystack for row in x)


def test_micro_batches_are_slices_of_the_step_batch(tmp_path):
    meta = prep(tmp_path)
    tokens = data.load_tokens(tmp_path / "out", "train", meta)
    whole_x, whole_y = data.get_batch(tokens, 16, 8, ("train", 1, 5))
    halves = [data.get_batch(tokens, 16, 4, ("train", 1, 5), part=p, parts=2) for p in (0, 1)]
    assert torch.equal(torch.cat([h[0] for h in halves]), whole_x)
    assert torch.equal(torch.cat([h[1] for h in halves]), whole_y)


def test_document_ids():
    x = torch.tensor([[5, 9, 0, 5, 9, 0, 7]])
    assert data.document_ids(x, eot_token=0).tolist() == [[0, 0, 0, 1, 1, 1, 2]]


def test_bin_layout_rule(tmp_path):
    (tmp_path / "processed").mkdir()
    (tmp_path / "train.bin").write_bytes(b"\0\0")
    assert data.resolve_bin_dir(tmp_path / "processed") == tmp_path
    (tmp_path / "processed" / "train.bin").write_bytes(b"\0\0")
    assert data.resolve_bin_dir(tmp_path / "processed") == tmp_path / "processed"
    assert data.resolve_bin_dir(tmp_path / "other") == tmp_path / "other"


# ----------------------------------------------------------------------------- bad input

def test_missing_and_empty_input(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prep(tmp_path, input_path=str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        prep(tmp_path, input_path=str(tmp_path / "empty.txt"))
    assert not (tmp_path / "out").exists()


def test_not_utf8(tmp_path):
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        prep(tmp_path, input_path=str(tmp_path / "latin.txt"))


def test_val_split_shorter_than_block(tmp_path):
    src = tmp_path / "short.txt"
    src.write_text("hello there, a short text\n" * 4)
    meta = prep(tmp_path, input_path=str(src))
    splits = {s: data.load_tokens(tmp_path / "out", s, meta) for s in ("train", "val")}
    with pytest.raises(DataError, match="val split .* fewer than block_size \\+ 1 = 65"):
        data.check_split_lengths(splits, 64, tmp_path / "out")


def test_meta_missing_corrupt_or_newer(tmp_path):
    with pytest.raises(DataError, match="meta.json is missing; run: python prepare.py"):
        data.load_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt.*--force"):
        data.load_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"format_version": data.META_VERSION + 1}))
    with pytest.raises(DataError, match="newer than this code"):
        data.load_meta(tmp_path)


def test_unknown_encoding_and_offline_encoding(monkeypatch):
    with pytest.raises(DataError, match="unknown bpe encoding 'gpt5'; valid: .*cl100k_base"):
        tokenizer.load_tiktoken("gpt5")
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(DataError, match="TIKTOKEN_CACHE_DIR"):
        tokenizer.load_tiktoken("cl100k_base")


def test_refuses_to_mix_settings_unless_forced(tmp_path):
    prep(tmp_path)
    with pytest.raises(DataError, match="val_fraction: 0.1 there, 0.2 now.*--force"):
        prep(tmp_path, val_fraction=0.2)
    assert data.load_meta(tmp_path / "out")["val_fraction"] == 0.1  # untouched
    meta = prep(tmp_path, val_fraction=0.2, force=True)
    assert data.load_meta(tmp_path / "out")["val_fraction"] == 0.2
    assert meta["tokens"]["val"] == len(TEXT) - int(len(TEXT) * 0.8)


def test_failure_midway_leaves_previous_data_intact(tmp_path, monkeypatch):
    prep(tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def broken(tokenizer, pieces):
        raise DataError("simulated failure while encoding")

    monkeypatch.setattr(prepare, "encode_chunks", broken)
    with pytest.raises(DataError, match="simulated"):
        prep(tmp_path, val_fraction=0.3, force=True)
    after = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert after == before  # no temporary files left, old data complete and unchanged


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    for args, needle in [(["--data.input", str(tmp_path / "missing.txt")], "does not exist"),
                         (["--tokenizer", "words"], "data.tokenizer = 'words' is not one of: char, bpe"),
                         (["--data.val_fraction", "1.5"], "data.val_fraction = 1.5 must be in (0, 1)"),
                         (["--input", "x.txt"], "unknown option --input"),
                         (["--model.n_layer", "2"], "--model.n_layer is not a setting of prepare.py")]:
        r = subprocess.run([sys.executable, "prepare.py", "--data.processed_dir", str(tmp_path / "o"), *args],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2
        assert "Traceback" not in r.stderr and needle in r.stderr
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


def test_cli_default_run_and_help(tmp_path):
    r = subprocess.run([sys.executable, "prepare.py", "--data.processed_dir", str(tmp_path / "d")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "train 1,003,854 tokens, val 111,540 tokens, vocab 65 (char)" in r.stdout
    r = subprocess.run([sys.executable, "prepare.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "--data.val_fraction FLOAT" in r.stdout and "default 0.1" in r.stdout
    assert "--force BOOL" in r.stdout and "--model." not in r.stdout


def test_a_preset_prepares_the_data_it_trains_on(tmp_path):
    """prepare.py takes train.py's [data] settings, from a preset too; its other sections are checked (a typo
    there is reported now, not after the data is prepared), not used."""
    preset = tmp_path / "p.toml"
    preset.write_text(f'[data]\nprocessed_dir = "{tmp_path / "d"}"\nval_fraction = 0.25\n[model]\nn_layer = 2\n')
    r = subprocess.run([sys.executable, "prepare.py", "--config", str(preset)], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert data.load_meta(tmp_path / "d")["val_fraction"] == 0.25
    preset.write_text(f'[data]\nprocessed_dir = "{tmp_path / "e"}"\n[model]\nn_layr = 2\n[trianing]\nmax_iters = 9\n')
    r = subprocess.run([sys.executable, "prepare.py", "--config", str(preset)], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "e").exists()
    assert "unknown key model.n_layr (did you mean model.n_layer?)" in r.stderr
    assert "unknown section [trianing] (did you mean training?); valid: data, model, training, lora" in r.stderr


def test_ensure_prepared_never_uses_a_split_the_config_does_not_describe(tmp_path, monkeypatch, capsys):
    """meta.json records the settings and the input's fingerprint: a default folder made otherwise is
    prepared again (and says so); a folder the user named is refused with the command that fixes it."""
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT[:20_000], encoding="utf-8")
    d = DataConfig(input=str(text))
    folder, meta = prepare.ensure_prepared(d)
    assert str(folder) == "data/processed/corpus_char" and "preparing it from" in capsys.readouterr().out
    assert prepare.ensure_prepared(d)[1] == data.load_meta(folder)  # the same settings: used as it is
    assert capsys.readouterr().out == ""
    d.val_fraction = 0.2
    assert prepare.ensure_prepared(d)[1]["val_fraction"] == 0.2
    assert "(data.val_fraction: 0.1 there, 0.2 now): preparing it again" in capsys.readouterr().out
    text.write_text(TEXT[:20_000].upper(), encoding="utf-8")  # same name, other contents
    meta = prepare.ensure_prepared(d)[1]
    assert "data.input: " in capsys.readouterr().out and "e" not in meta["chars"]
    # A folder the user named: settings left at their defaults are taken from how it was made...
    named = DataConfig(processed_dir=str(folder))
    assert prepare.ensure_prepared(named)[0] == folder and named.val_fraction == 0.2 and named.input == str(text)
    # ...and one the user chose that differs is refused, with the command that fixes it.
    named = DataConfig(input=str(text), processed_dir=str(folder), val_fraction=0.3)
    with pytest.raises(DataError, match=r"data.val_fraction: 0.2 there, 0.3 now\); prepare it again: "
                                        r"python prepare.py .* --data.val_fraction 0.3 --force"):
        prepare.ensure_prepared(named, explicit={"data.val_fraction"})
    assert data.load_meta(folder)["val_fraction"] == 0.2  # untouched
    text.unlink()  # no input any more: the prepared folder is used as it is
    assert prepare.ensure_prepared(DataConfig(input=str(text), val_fraction=0.2))[0] == folder


def test_a_named_folder_of_bpe_tokens_is_used_without_naming_its_tokenizer_again(tmp_path):
    """data.processed_dir alone names the data: its tokenizer (GPT-2's BPE, with its encoding) comes from
    the folder, as its other settings do (it was refused for want of data.bpe_encoding)."""
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT[:20_000], encoding="utf-8")
    prepare.prepare(DataConfig(input=str(text), tokenizer="bpe", processed_dir=str(tmp_path / "p")), progress=False)
    named = DataConfig(input=str(text), processed_dir=str(tmp_path / "p"))
    assert prepare.ensure_prepared(named)[1]["encoding"] == "gpt2" and named.tokenizer == "bpe"


def test_a_second_preparation_of_a_folder_in_use_waits_and_uses_what_the_first_made(tmp_path):
    """Two trainings that prepare the same default data at once: the second waits (saying so) instead of
    failing, and finds the data the first prepared from the same text, which it leaves as it is."""
    import files

    text = tmp_path / "my.txt"
    text.write_text(CORPUS.read_text(encoding="utf-8")[:50_000], encoding="utf-8")
    first, out = tmp_path / "first", tmp_path / "out"
    prepare.prepare(DataConfig(input=str(text), processed_dir=str(first)), progress=False)
    with files.lock(files.make_folder(out, "x") / ".lock", "the first preparation"):
        second = subprocess.Popen([sys.executable, "prepare.py", "--data.input", str(text), "--data.processed_dir",
                                   str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = second.stderr.readline()
        assert line == f"data.processed_dir = {str(out)!r} is in use by another process (PID {os.getpid()}): " \
                       "waiting for it to finish\n"
        for name in ("train.bin", "val.bin", "meta.json"):  # what the first one writes, as it ends
            (out / name).write_bytes((first / name).read_bytes())
        made = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"}
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 0, stderr
    assert stderr == f"{out} was prepared by the other process in the meantime, from the same text: using it\n"
    assert stdout.startswith(f"prepared {out}: train ")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == made  # nothing written again

    # The one waited for prepared it otherwise (another val_fraction): refused, as without waiting.
    other = tmp_path / "other"
    prepare.prepare(DataConfig(input=str(text), processed_dir=str(first), val_fraction=0.2), progress=False,
                    force=True)
    with files.lock(files.make_folder(other, "x") / ".lock", "the first preparation"):
        second = subprocess.Popen([sys.executable, "prepare.py", "--data.input", str(text), "--data.processed_dir",
                                   str(other)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert "waiting for it to finish" in second.stderr.readline()
        for name in ("train.bin", "val.bin", "meta.json"):
            (other / name).write_bytes((first / name).read_bytes())
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 2 and stderr == (
        f"error: {other} already holds data prepared differently (data.val_fraction: 0.2 there, 0.1 now); set "
        "data.processed_dir to another folder, or pass --force to replace it\n")


def test_sigterm_during_preparation_is_one_line_and_leaves_no_temporary_file(tmp_path):
    """SIGTERM (a scheduler, `timeout`) while prepare.py encodes: exit 143 with one line, its temporary
    split files removed, the folder left as it was (no data, since none was there)."""
    import signal

    big = tmp_path / "big.txt"
    big.write_text(CORPUS.read_text(encoding="utf-8") * 40, encoding="utf-8")  # 45 MB: encoding takes seconds
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "prepare.py", "--data.input", str(big), "--data.processed_dir", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("prepare: encoding: "):
            proc.send_signal(signal.SIGTERM)
            break
    stderr = "".join(lines) + proc.stderr.read()
    assert proc.wait(timeout=60) == 143, stderr
    assert stderr.endswith("\nterminated (SIGTERM)\n") and "Traceback" not in stderr
    assert sorted(p.name for p in out.iterdir()) == []  # no .tmp split, no lock, no meta.json


def test_splits_an_interrupted_preparation_left_do_not_block_the_next(tmp_path):
    """kill -9 during a preparation leaves its temporary splits (train.bin.tmp): prepare.py's own, so the
    next preparation of the folder goes on; a file of the user's there is refused."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train.bin.tmp").write_bytes(b"\0" * 100)
    prep(tmp_path)
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "notes.md").write_text("mine")
    with pytest.raises(DataError, match=r"holds files that prepare.py did not write \(notes.md\)"):
        prepare.prepare(DataConfig(input=str(CORPUS), processed_dir=str(tmp_path / "o2")))


def test_a_stray_nul_is_text_and_utf16_is_not(tmp_path):
    """A NUL here and there (web dumps have them) is a character; UTF-16 without a BOM, half NULs, is refused."""
    (tmp_path / "a.txt").write_text("abc\0" + "d" * 100, encoding="utf-8")
    assert "".join(data.text_chunks(tmp_path / "a.txt")) == "abc\0" + "d" * 100
    (tmp_path / "b.txt").write_bytes("hello world\n".encode("utf-16-le"))
    with pytest.raises(DataError, match="NUL bytes in many of its characters: UTF-16, or not text"):
        list(data.text_chunks(tmp_path / "b.txt"))
