"""chat.py, scripted (stdin not a terminal: one message per line, one answer per line): its greedy answers
are transformers' generate on the same conversation rendered with the same template, turn after turn."""

from __future__ import annotations

import io

import torch

import chat
from test_records import CHATML, MARKED, tokenizer_folder


def scripted(monkeypatch, capsys, argv: list[str], lines: list[str]) -> tuple[list[str], str]:
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    capsys.readouterr()
    assert chat.main(argv) == 0
    out = capsys.readouterr()
    return out.out.splitlines(), out.err


def transformers_answers(model, tokenizer, messages: list[str], max_new_tokens: int, stops: list[int]) -> list[str]:
    """Each answer as transformers gives it: generate (greedy) on apply_chat_template's ids, cut at a stop."""
    conversation, answers = [], []
    for message in messages:
        conversation.append({"role": "user", "content": message})
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                             pad_token_id=stops[0])[0, ids.size(1):].tolist()
        out = out[:next((i for i, t in enumerate(out) if t in stops), len(out))]
        answers.append(tokenizer.decode(out))
        conversation.append({"role": "assistant", "content": answers[-1]})
    return answers


def test_greedy_answers_are_transformers_generate(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tokenizer_folder(tmp_path / "hf", MARKED, model=True)  # no default system turn: fits 64 positions
    messages = ["Hi", "2+2?"]
    lines, err = scripted(monkeypatch, capsys, ["--ckpt", str(folder), "--temperature", "0", "--max-new-tokens", "8",
                                                "--device", "cpu"], messages)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    expected = transformers_answers(reference, AutoTokenizer.from_pretrained(folder), messages, 8, [2])
    assert lines == [a.replace("\\", "\\\\").replace("\n", "\\n") for a in expected]
    assert "chatting with" in err and "notice" not in err  # the whole conversation fits


def test_smollm2_answers_as_transformers_does(smollm2, smollm2_reference, monkeypatch, capsys):
    model, tokenizer = smollm2_reference
    messages = ["What is the capital of France?", "And of Italy?"]
    lines, _ = scripted(monkeypatch, capsys, ["--ckpt", str(smollm2), "--temperature", "0", "--max-new-tokens", "30"],
                        messages)
    assert lines == transformers_answers(model, tokenizer, messages, 30, [tokenizer.eos_token_id])
    assert "Paris" in lines[0]


def test_the_oldest_turns_go_when_the_context_is_full_and_commands(tmp_path, monkeypatch, capsys):
    """block_size 64 (the test model's): a long exchange no longer fits, the oldest messages are dropped and
    it says so; /system and /reset start a new conversation, with and without the system message."""
    folder = tokenizer_folder(tmp_path / "hf", CHATML, model=True)
    argv = ["--ckpt", str(folder), "--temperature", "0", "--max-new-tokens", "4", "--device", "cpu"]
    lines, err = scripted(monkeypatch, capsys, argv, ["one two three four five six", "seven eight nine ten"] * 2)
    assert len(lines) == 4 and "notice: the conversation is longer than the model's context (64 tokens); dropped" in err
    meta = chat.load_model(folder)[1].meta
    tokenizer = chat.tokenizer_from_meta(meta)
    conversation = chat.Conversation(chat.chat_template(meta), tokenizer, 64, 4)
    conversation.system, conversation.messages = "Be brief.", [{"role": "user", "content": "hi"}]
    text = tokenizer.decode(conversation.prompt_ids()[0])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    lines, err = scripted(monkeypatch, capsys, argv, ["hi", "/system Be brief.", "hi", "", "/reset", "/help", "/system",
                                                      "hi", "/quit", "never"])
    assert len(lines) == 4 and lines[0] == lines[3] and lines[2] == "" and err.count("(a new conversation)") == 2
    # An unknown command, or /system without its text, is not sent to the model: a notice, no answer line.
    assert err.count("the commands are /reset, /system TEXT and /quit; nothing was sent") == 2


def test_a_model_without_a_chat_template_is_refused(tmp_path, monkeypatch, capsys):
    folder = tokenizer_folder(tmp_path / "hf", CHATML, model=True)
    (folder / "chat_template.jinja").unlink()
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    capsys.readouterr()
    assert chat.main(["--ckpt", str(folder), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no chat template" in err
