"""training.task: at every evaluation, the share of a task's examples answered exactly, printed, logged
(train_log.json and TensorBoard's scalars) and plotted; the same number eval.py --task gives for the same
weights, run another way."""

from __future__ import annotations

import json

import pytest
import torch

import eval as evaluate
import plot
import prepare
import train
from checkpoint import load_weights
from config import DataConfig
from errors import DataError
from model import GPT
from test_records import write_jsonl
from test_train_metrics import read_log, tiny

# A task a tiny model learns in a few steps (the answer is the first digit again), so that the accuracy moves.
ECHO = [{"prompt": f"{a}{b}=", "completion": f"{a}\n"} for a in range(10) for b in range(10)] * 2


@pytest.fixture(scope="module")
def sums(tmp_path_factory):
    root = tmp_path_factory.mktemp("sums")
    write_jsonl(root / "train.jsonl", ECHO[:150])
    write_jsonl(root / "test.jsonl", ECHO[150:])
    prepare.prepare(DataConfig(input=str(root / "train.jsonl"), processed_dir=str(root / "p")), progress=False)
    return root


def test_the_task_is_checked_at_each_evaluation_as_eval_py_checks_it(sums, tmp_path, capsys):
    cfg = tiny(tmp_path / "run", sums / "p", "--training.task", str(sums / "test.jsonl"), "--training.task_examples",
               "20", "--training.save_best", "false", "--training.max_iters", "200", "--training.eval_interval", "100",
               "--training.learning_rate", "1e-2", "--training.save_interval", "100")
    train.main(cfg)
    out = capsys.readouterr().out
    evals = read_log(tmp_path / "run")["evals"]
    assert [e["step"] for e in evals] == [0, 100, 200] and evals[-1]["task_accuracy"] > evals[0]["task_accuracy"]
    assert f", task {evals[-1]['task_accuracy']:.4f}" in out
    for ckpt, logged in (("ckpt_000100.pt", evals[1]), ("ckpt_last.pt", evals[2])):  # 0.5 and 1.0 when written
        assert evaluate.main(["--ckpt", str(tmp_path / "run" / ckpt), "--task", str(sums / "test.jsonl"),
                              "--limit", "20", "--json", "--device", "cpu"]) == 0
        assert json.loads(capsys.readouterr().out)["accuracy"] == logged["task_accuracy"]
        assert by_hand(tmp_path / "run" / ckpt, ECHO[150:170]) == logged["task_accuracy"]
    # The task reads the weights and nothing else: the run trains exactly as without it.
    train.main(tiny(tmp_path / "plain", sums / "p", "--training.save_best", "false", "--training.max_iters", "200",
                    "--training.eval_interval", "100", "--training.learning_rate", "1e-2"))
    plain = load_weights(tmp_path / "plain" / "ckpt_last.pt").state_dict
    assert all(torch.equal(v, plain[k]) for k, v in load_weights(tmp_path / "run" / "ckpt_last.pt").state_dict.items())
    assert [e["val_loss"] for e in read_log(tmp_path / "plain")["evals"]] == [e["val_loss"] for e in evals]
    fig = plot.plot_logs({"run": plot.load_log(tmp_path / "run" / "train_log.json")}, None)
    (panel,) = [ax for ax in fig.axes if ax.get_ylabel() == "task accuracy"]
    assert list(panel.get_lines()[0].get_ydata()) == [e["task_accuracy"] for e in evals]


def by_hand(ckpt, examples: list[dict]) -> float:
    """The accuracy computed another way: the whole prompt through the model at each step (no KV cache, no
    generate.py), the most likely character appended, as many characters as the answer has."""
    weights = load_weights(ckpt)
    model = GPT.from_state_dict(weights.model, weights.state_dict).eval()
    chars, right = weights.meta["chars"], 0
    for example in examples:
        ids = [chars.index(c) for c in example["prompt"]]
        for _ in example["completion"]:
            with torch.no_grad():
                ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
        answer = "".join(chars[i] for i in ids[len(example["prompt"]):])
        right += answer.strip() == example["completion"].strip()
    return right / len(examples)


def test_a_task_of_texts_is_refused_before_the_run_starts(sums, tmp_path):
    write_jsonl(tmp_path / "texts.jsonl", [{"text": "12+3=15"}] * 5)
    cfg = tiny(tmp_path / "run", sums / "p", "--training.task", str(tmp_path / "texts.jsonl"))
    with pytest.raises(DataError, match="training.task .* holds texts"):
        train.main(cfg)
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("ckpt_*"))
