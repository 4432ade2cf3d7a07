"""Several inputs mixed with data.weights (docs/records.md#mixing-inputs): each input's share of the train
split's records, its smaller inputs repeated evenly and none left out, each split on its own, and batches
that draw each input as often as its share says."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

import prepare
from config import DataConfig
from data import Data, load_mask, load_meta, load_starts, load_tokens
from errors import DataError
from records import copies_of, mixture
from tokenizer import tokenizer_from_meta


def pairs(path, name: str, n: int) -> list[str]:
    """Writes n pairs "<name><i>=" -> "<i>;" to path; returns their prompts."""
    path.write_text("".join(json.dumps({"prompt": f"{name}{i}=", "completion": f"{i};"}) + "\n" for i in range(n)))
    return [f"{name}{i}=" for i in range(n)]


def records_of(folder, split: str) -> list[str]:
    """The prompts of a prepared split's records, in order, read back from its tokens and starts."""
    meta = load_meta(folder)
    tok = tokenizer_from_meta(meta)
    ids = np.fromfile(folder / f"{split}.bin", dtype=meta["dtype"])
    starts = list(np.fromfile(folder / f"{split}.starts", dtype=np.int64)) + [len(ids)]
    return [tok.decode(ids[a:b].tolist()).split("=")[0] + "=" for a, b in zip(starts, starts[1:])]


@pytest.fixture
def two_inputs(tmp_path):
    a, b = pairs(tmp_path / "a.jsonl", "a", 60), pairs(tmp_path / "b.jsonl", "b", 20)
    return tmp_path, a, b


def test_weights_set_each_inputs_share_and_no_record_is_left_out(two_inputs):
    tmp, a, b = two_inputs
    d = DataConfig(input=f"{tmp / 'a.jsonl'}, {tmp / 'b.jsonl'}", weights="2, 1.5", processed_dir=str(tmp / "out"))
    meta = prepare.prepare(d, progress=False)
    train, val = Counter(records_of(tmp / "out", "train")), records_of(tmp / "out", "val")
    # Each input split on its own: its last tenth to val, once each, in order.
    assert val == a[54:] + b[18:]
    # a has the most records for its weight (54 / 2 > 18 / 1.5): once each; b up to 1.5 / 2 of a's 54.
    assert [train[p] for p in a[:54]] == [1] * 54 and not set(a[54:]) & set(train)
    copies = [train[p] for p in b[:18]]
    assert sum(copies) == round(54 * 1.5 / 2) == 40 and set(copies) == {2, 3} and not set(b[18:]) & set(train)
    assert meta["records"]["train"] == 94 and meta["records"]["inputs"][1] == {
        "input": str(tmp / "b.jsonl"), "train": 18, "val": 2, "train_copies": 40}
    # Copies come in rounds (b0..b17, b0..b17, then every third or so): never two of one record side by side,
    # where a window would hold the answer just before the same question.
    order = records_of(tmp / "out", "train")
    assert order[54:72] == b[:18] == order[72:90] and all(x != y for x, y in zip(order, order[1:]))


@pytest.mark.parametrize("weights, message", [("2", "data.input names one"), ("1, 1000", "repeat each record"),
                                              ("1, x", "not a list of numbers")])
def test_weights_that_mix_nothing_or_would_fill_the_disk_are_refused(two_inputs, weights, message, capsys):
    tmp, _, _ = two_inputs
    inputs = str(tmp / "a.jsonl") if weights == "2" else f"{tmp / 'a.jsonl'}, {tmp / 'b.jsonl'}"
    assert prepare.main(["--data.input", inputs, "--data.weights", weights, "--data.processed_dir",
                         str(tmp / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: data.weights") and message in err, err
    assert not (tmp / "out" / "meta.json").exists()


def test_copies_are_spread_evenly():
    for n, total in ((18, 40), (7, 7), (5, 23), (3, 1000)):
        copies = [copies_of(j, n, total) for j in range(n)]
        assert sum(copies) == total and max(copies) - min(copies) <= 1 and min(copies) >= 1
    assert mixture([54, 18], []) == [54, 18]  # no weights: each record once
    assert mixture([10, 1000], [1, 1]) == [1000, 1000]  # the small input repeated up to the large one


def test_batches_draw_each_input_by_its_share(two_inputs):
    tmp, a, b = two_inputs
    d = DataConfig(input=f"{tmp / 'a.jsonl'}, {tmp / 'b.jsonl'}", weights="1, 3", processed_dir=str(tmp / "out"))
    prepare.prepare(d, progress=False)
    folder, meta = tmp / "out", load_meta(tmp / "out")
    tokens = load_tokens(folder, "train", meta)
    data = Data(folder, meta, tokens, tokens, masks={"train": load_mask(folder, "train", meta, len(tokens))},
                starts={"train": load_starts(folder, "train", meta, len(tokens))})
    tok = tokenizer_from_meta(meta)
    firsts = Counter()
    for step in range(40):
        x, _, _ = data.batch("train", 12, 32, (0, step, 0, 0))
        firsts.update(tok.decode([int(t)])[0] for t in x[:, 0])  # each window starts at a record: "a..." or "b..."
    assert abs(firsts["b"] / (firsts["a"] + firsts["b"]) - 0.75) < 0.05, firsts


def test_other_weights_prepare_the_default_folder_again(two_inputs, monkeypatch):
    tmp, _, _ = two_inputs
    monkeypatch.chdir(tmp)
    d = DataConfig(input="a.jsonl, b.jsonl", weights="1, 1")
    folder, meta = prepare.ensure_prepared(d)
    meta = load_meta(folder)
    assert folder.name == "a+b_char" and meta["weights"] == "1, 1"
    assert prepare.ensure_prepared(DataConfig(input="a.jsonl, b.jsonl", weights="1.0,1"))[1] == meta  # same weights
    _, again = prepare.ensure_prepared(DataConfig(input="a.jsonl, b.jsonl", weights="1, 2"))
    assert (meta["records"]["train"], again["records"]["train"]) == (54 + 54, 54 + 108)
    with pytest.raises(DataError, match="data.weights: '1, 2' there, '1, 3' now"):
        prepare.ensure_prepared(DataConfig(input="a.jsonl, b.jsonl", weights="1, 3", processed_dir=str(folder)),
                                explicit={"data.weights"})
