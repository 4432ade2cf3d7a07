"""Records (JSONL, JSON, Parquet) and conversations: the chat template renders as transformers'
apply_chat_template does, the answers' mask is transformers' assistant mask, and the loss on it is
transformers' loss with labels = -100 outside the assistant's turns; batches, resume and the three kinds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import prepare
import train
from checkpoint import load_weights
from config import DataConfig, ModelConfig
from conftest import ROOT
from data import Data, load_meta, trained_windows
from errors import DataError
from templates import ChatTemplate, chat_template
from test_real_models import hf_tokenizer, ours, saved_by_transformers
from tokenizer import hf_tokenizer_meta, tokenizer_from_meta

# ChatML as SmolLM2 writes it: a default system turn when the conversation has none.
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# In the manner of Qwen2.5's: whitespace control, a default system prompt, trimmed content, tojson, bos_token.
QWEN_STYLE = """{{- bos_token if bos_token else '' -}}
{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a careful assistant. ' + {"lang": "ünï"} | tojson + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) or message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# ChatML whose answers are marked for transformers' return_assistant_tokens_mask: an independent mask.
MARKED = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
          "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
          "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo  wörld\n\n\t 日本語 🙂"},
     {"role": "assistant", "content": "  Hi there.  \n"}, {"role": "user", "content": "again"},
     {"role": "assistant", "content": "Hi again, <|im_end|> is only text here"}],
    [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}, {"role": "assistant", "content": ""}],
]


def tokenizer_folder(folder, template: str, model: bool = False):
    """A Hugging Face folder with our test tokenizer and `template` (and a random SmolLM2-shaped model)."""
    if model:
        saved_by_transformers(folder, "smollm2", vocab=300)  # as many rows as tokens: generate picks among tokens
    hf_tokenizer(folder)
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    return folder


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("template", [CHATML, QWEN_STYLE, MARKED], ids=["chatml", "qwen-style", "marked"])
def test_templates_render_byte_for_byte_as_transformers(tmp_path, template):
    from transformers import AutoTokenizer

    folder = tokenizer_folder(tmp_path, template)
    theirs, ours_ = AutoTokenizer.from_pretrained(folder), chat_template(hf_tokenizer_meta(folder))
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            assert ours_.render(messages, prompt) == theirs.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt)


def test_smollm2s_own_template_renders_as_transformers(smollm2, smollm2_reference):
    from gguf_format import read_gguf

    template = chat_template(read_gguf(smollm2, "cpu")[3])
    for messages in CONVERSATIONS:
        assert template.render(messages, True) == smollm2_reference[1].apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)


def test_answers_mask_is_transformers_assistant_mask(tmp_path):
    """Our answers are found by rendering with a mark; transformers' by the template's {% generation %}
    blocks: the same tokens, the same mask (each answer's content and its <|im_end|>)."""
    from transformers import AutoTokenizer

    folder = tokenizer_folder(tmp_path, MARKED)
    theirs, meta = AutoTokenizer.from_pretrained(folder), hf_tokenizer_meta(folder)
    for messages in CONVERSATIONS:
        ids, mask, _ = chat_template(meta).encode(tokenizer_from_meta(meta), messages)
        out = theirs.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert ids.tolist() == out["input_ids"]
        assert mask.tolist() == out["assistant_masks"]
        assert mask.sum() > 0 or messages[-1]["content"] == ""


def test_loss_on_the_answers_is_transformers_loss_with_labels(tmp_path):
    """A conversation prepared by prepare.py: the model's loss on its masked targets equals transformers'
    loss on the same model with labels = -100 outside the assistant's turns (transformers' own mask)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tokenizer_folder(tmp_path / "hf", MARKED, model=True)
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."},
                {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6!"}]  # fits its 64 positions
    d = DataConfig(input=write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}] * 10), tokenizer="hf",
                   tokenizer_path=str(folder), processed_dir=str(tmp_path / "p"))
    meta = prepare.prepare(d, progress=False)
    out = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    n = len(out["input_ids"])
    tokens = np.fromfile(tmp_path / "p" / "train.bin", dtype=meta["dtype"]).astype(np.int64)
    mask = np.fromfile(tmp_path / "p" / "train.mask", dtype=np.uint8)
    assert tokens[:n].tolist() == out["input_ids"] and tokens[n] == meta["eot_token"] and mask[n] == 0
    ids = torch.tensor(tokens[:n])[None]
    labels = torch.where(torch.tensor(out["assistant_masks"])[None].bool(), ids, -100)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = ours(load_weights(folder))
    with torch.no_grad():
        expected = reference(input_ids=ids, labels=labels).loss
        y = torch.where(torch.tensor(mask[1:n]).bool(), ids[0, 1:], -1)[None]
        _, loss = model(ids[:, :-1], y)
    assert torch.allclose(loss, expected, atol=1e-5), (loss, expected)


def test_the_three_kinds_and_three_file_formats(tmp_path, gpt2_tokenizer):
    """text: every token trained (no mask); pairs: the completion and the end-of-text after it; the same
    records as .jsonl, .json, .parquet, a folder and a glob prepare to the same bytes."""
    pairs = [{"prompt": f"{a}+{a}=", "completion": f"{2 * a}"} for a in range(40)]
    inputs = {"jsonl": write_jsonl(tmp_path / "pairs.jsonl", pairs)}
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    inputs["json"] = str(tmp_path / "pairs.json")
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (optional) is not installed")
    import pyarrow
    pq.write_table(pyarrow.Table.from_pylist(pairs), tmp_path / "pairs.parquet")
    inputs["parquet"] = str(tmp_path / "pairs.parquet")
    (tmp_path / "folder").mkdir()
    shutil.copy(tmp_path / "pairs.jsonl", tmp_path / "folder" / "a.jsonl")
    inputs["folder"], inputs["glob"] = str(tmp_path / "folder"), str(tmp_path / "folder" / "*.jsonl")
    made = {}
    for name, path in inputs.items():
        out = tmp_path / f"p_{name}"
        meta = prepare.prepare(DataConfig(input=path, tokenizer="bpe", processed_dir=str(out)), progress=False)
        made[name] = [(out / f).read_bytes() for f in ("train.bin", "train.mask", "val.bin", "val.mask")]
        assert meta["records"] == {"kind": "pair", "train": 36, "val": 4, "dropped": 0}
    assert all(v == made["jsonl"] for v in made.values())
    tokens = np.frombuffer(made["jsonl"][0], dtype=np.uint16)
    mask = np.frombuffer(made["jsonl"][1], dtype=np.uint8)
    first = len(gpt2_tokenizer.encode("0+0=0")) + 1
    assert gpt2_tokenizer.decode(tokens[:first].tolist()) == "0+0=0<|endoftext|>"
    assert gpt2_tokenizer.decode(tokens[:first][mask[:first] == 1].tolist()) == "0<|endoftext|>"
    texts = [{"text": f"document {i}"} for i in range(20)]
    meta = prepare.prepare(DataConfig(input=write_jsonl(tmp_path / "t.jsonl", texts), tokenizer="bpe",
                                      processed_dir=str(tmp_path / "t")), progress=False)
    assert "trained" not in meta and not (tmp_path / "t" / "train.mask").exists()
    assert gpt2_tokenizer.decode(np.fromfile(tmp_path / "t" / "val.bin", dtype=np.uint16).tolist()) == \
        "document 18<|endoftext|>document 19<|endoftext|>"


def test_conversations_without_an_answer_are_dropped_and_counted(tmp_path, capsys):
    folder = tokenizer_folder(tmp_path / "hf", CHATML)
    records = [{"messages": CONVERSATIONS[0]}] * 9 + [{"messages": CONVERSATIONS[0][:1]}] * 3
    d = DataConfig(input=write_jsonl(tmp_path / "c.jsonl", records), tokenizer="hf", tokenizer_path=str(folder),
                   processed_dir=str(tmp_path / "p"))
    meta = prepare.prepare(d, progress=False)
    assert meta["records"] == {"kind": "messages", "train": 8, "val": 1, "dropped": 3}
    d.loss_on, d.processed_dir = "all", str(tmp_path / "all")
    meta = prepare.prepare(d, progress=False)
    assert meta["records"]["dropped"] == 0 and "trained" not in meta and meta["loss_on"] == "all"


def test_a_template_that_escapes_its_sandbox_or_fails_is_refused():
    escape = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}", {}, [])
    with pytest.raises(DataError, match="sandbox"):
        escape.render(CONVERSATIONS[0])
    refusing = ChatTemplate("{{ raise_exception('only user turns') }}", {}, [])
    with pytest.raises(DataError, match="only user turns"):
        refusing.render(CONVERSATIONS[0])


def test_batches_train_only_on_the_answers_and_split_as_one_batch():
    """Targets outside the mask are -1; every window has an answer in it; two halves of a batch are the
    rows of the whole (so DDP's processes see one process's batch), a pure function of the key."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, 5000).astype(np.uint16)
    mask = np.zeros(5000, dtype=np.uint8)
    for start in range(100, 5000, 400):
        mask[start:start + 20] = 1
    windows = trained_windows(mask, 32, "split")
    assert len(windows) == sum(mask[s + 1:s + 33].any() for s in range(5000 - 32))
    data = Data("f", {}, tokens, tokens, masks={"train": mask})
    x, y, docs = data.batch("train", 32, 8, ("train", 1, 3))
    assert docs is None  # (data.doc_mask is off)
    starts = [int(np.flatnonzero((np.lib.stride_tricks.sliding_window_view(tokens, 32) == row.numpy()).all(1))[0])
              for row in x]
    for row, s in zip(y, starts):
        trained = mask[s + 1:s + 33].astype(bool)
        assert trained.any() and (row[~torch.tensor(trained)] == -1).all()
        assert (row[torch.tensor(trained)].numpy() == tokens[s + 1:s + 33][trained]).all()
    halves = [data.batch("train", 32, 4, ("train", 1, 3), part=p, parts=2) for p in (0, 1)]
    assert torch.equal(torch.cat([h[0] for h in halves]), x)
    assert torch.equal(torch.cat([h[1] for h in halves]), y)
    with pytest.raises(DataError, match="no token to train on"):
        trained_windows(np.zeros(100, dtype=np.uint8), 32, "split")


def test_windows_start_where_records_start_and_keep_them_whole(tmp_path):
    """Pairs of many lengths, prepared: every window starts at a record, and every target trained on is in a
    record that ends within the window (the record cut by the window's end is not trained on); a record
    that fits is trained on whole."""
    from data import load_mask, load_starts, load_tokens

    pairs = [{"prompt": "q" * (i % 7) + "?", "completion": "a" * (1 + i % 11) + "."} for i in range(300)]
    d = DataConfig(input=write_jsonl(tmp_path / "p.jsonl", pairs), processed_dir=str(tmp_path / "p"))
    meta = prepare.prepare(d, progress=False)
    tokens = load_tokens(tmp_path / "p", "train", meta)
    data = Data(tmp_path / "p", meta, tokens, tokens, masks={"train": load_mask(tmp_path / "p", "train", meta, len(tokens))},
                starts={"train": load_starts(tmp_path / "p", "train", meta, len(tokens))})
    bounds, mask = data.starts["train"], data.masks["train"]
    x, y, _ = data.batch("train", 24, 64, ("train", 0, 0))
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(tokens), 24)
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        s = next(int(b) for b in bounds[:-1] if (windows[b] == row_x).all())  # the record it starts at
        last = bounds[bounds <= s + 25].max()  # the last record boundary within the window
        trained = np.flatnonzero(row_y >= 0) + s + 1  # positions of the targets trained on
        assert len(trained) and trained.max() < last, (s, last, trained)
        expected = [p for p in range(s + 1, last) if mask[p]]  # every answer token of the whole records
        assert trained.tolist() == expected


def test_packed_records_do_not_attend_to_each_other(tmp_path):
    """data.doc_mask with records: a window packs several, and each token's document is its record (the
    end-of-text token is not needed: a char model has none): a record's logits in the packed window are
    its logits alone."""
    from data import load_mask, load_starts, load_tokens
    from model import GPT

    pairs = [{"prompt": f"{a}+{a}=", "completion": f"{2 * a}."} for a in range(60)]
    meta = prepare.prepare(DataConfig(input=write_jsonl(tmp_path / "p.jsonl", pairs), processed_dir=str(tmp_path / "p")),
                           progress=False)
    tokens = load_tokens(tmp_path / "p", "train", meta)
    data = Data(tmp_path / "p", meta, tokens, tokens, doc_mask=True,
                masks={"train": load_mask(tmp_path / "p", "train", meta, len(tokens))},
                starts={"train": load_starts(tmp_path / "p", "train", meta, len(tokens))})
    x, y, docs = data.batch("train", 32, 4, ("train", 0, 0))
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=meta["vocab_size"],
                            dropout=0.0, position="rope")).eval()  # rotary: a record's logits do not depend on where it is
    with torch.no_grad():
        packed, _ = model(x, doc_ids=docs)
        for row in range(len(x)):
            ids = docs[row].unique()
            assert len(ids) > 1  # several records in each window
            second = (docs[row] == ids[1]).nonzero().flatten()
            alone, _ = model(x[row:row + 1, second])
            assert torch.allclose(packed[row, second], alone[0], atol=1e-5)


def test_records_longer_than_a_window_are_cut_or_dropped():
    """Records of 5, 25, 4 and 6 tokens, windows of 8 + 1: the 25 is drawn by default, cut at its start (its
    window ends where it ends, at 30), never with data.long_records = drop; a window must start early enough
    to be whole (before 40 - 8)."""
    starts = np.array([0, 5, 30, 34, 40])
    assert trained_windows(None, 8, "split", starts, 40).tolist() == [0, 21, 30]
    assert trained_windows(None, 8, "split", starts, 40, drop_long=True).tolist() == [0, 30]
    with pytest.raises(DataError, match="no token to train on"):
        trained_windows(None, 3, "split", np.array([0, 10, 20]), 20, drop_long=True)


def test_resume_with_masks_is_exact(tmp_path):
    """A run on pairs stopped at step 6 and run again to 12 ends with the weights of a run straight to 12."""
    pairs = [{"prompt": f"{a} reversed is ", "completion": str(a)[::-1] + "."} for a in range(100, 400)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    args = ["--config", str(ROOT / "configs/cpu/smoke.toml"), "--data.input", data,
            "--data.processed_dir", str(tmp_path / "p"),
            "--model.block_size", "32", "--training.eval_interval", "4", "--training.eval_batches", "2",
            "--model.dropout", "0.1", "--training.sample_tokens", "0", "--device", "cpu"]
    assert train.cli([*args, "--training.out_dir", str(tmp_path / "full"), "--max-iters", "12"]) == 0
    assert train.cli([*args, "--training.out_dir", str(tmp_path / "cut"), "--max-iters", "6"]) == 0
    assert train.cli([*args, "--training.out_dir", str(tmp_path / "cut"), "--max-iters", "12", "--resume"]) == 0
    assert load_meta(tmp_path / "p")["trained"]["train"] > 0
    full, cut = (torch.load(tmp_path / r / "ckpt_last.pt", weights_only=True)["model"] for r in ("full", "cut"))
    assert all(torch.equal(full[k], cut[k]) for k in full)


# ----------------------------------------------------------------------------- eval.py on records

def test_eval_on_conversations_is_transformers_loss_on_the_answers(tmp_path, capsys):
    """eval.py --text on records: each record scored from its start, as training sees it; the mean loss over
    the answers is transformers' with labels = -100 elsewhere."""
    import eval as evaluate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tokenizer_folder(tmp_path / "hf", MARKED, model=True)
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."}]
    write_jsonl(tmp_path / "one.jsonl", [{"messages": messages}])
    capsys.readouterr()
    assert evaluate.main(["--ckpt", str(folder), "--text", str(tmp_path / "one.jsonl"), "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    out = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = torch.tensor([[*out["input_ids"], 2]])  # the conversation and its end-of-text token
    labels = torch.where(torch.tensor([[*out["assistant_masks"], 0]]).bool(), ids, -100)
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(input_ids=ids, labels=labels).loss
    assert result["records"] == 1 and result["tokens"] == sum(out["assistant_masks"]) and result["bits_per_byte"] is None
    assert result["mean_loss"] == pytest.approx(expected.item(), abs=1e-5)


def test_eval_task_counts_exact_answers(tmp_path, capsys):
    """--task: answers equal to transformers' greedy continuation count, others do not."""
    import eval as evaluate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tokenizer_folder(tmp_path / "hf", MARKED, model=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    records = []
    for i, question in enumerate(["2+2?", "Hi", "Name a colour.", "1, 2, 3?"]):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        new = reference.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=[2], pad_token_id=2)[0, ids.size(1):]
        answer = tokenizer.decode([t for t in new.tolist() if t != 2]) if i < 3 else "not what it says"
        records.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    write_jsonl(tmp_path / "task.jsonl", records)
    capsys.readouterr()
    assert evaluate.main(["--ckpt", str(folder), "--task", str(tmp_path / "task.jsonl"), "--max-new-tokens", "6",
                          "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["examples"], result["correct"], result["accuracy"]) == (4, 3, 0.75)


def test_an_empty_completion_trains_the_end_of_text_after_it(tmp_path):
    """A pair whose answer is nothing: the model learns to stop at once (the end-of-text token is its target)."""
    d = DataConfig(input=write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Say nothing:", "completion": ""}] * 10),
                   tokenizer="bpe", processed_dir=str(tmp_path / "out"))
    meta = prepare.prepare(d, progress=False)
    tokens = np.fromfile(tmp_path / "out" / "train.bin", dtype=meta["dtype"])
    mask = np.fromfile(tmp_path / "out" / "train.mask", dtype=np.uint8)
    assert meta["trained"]["train"] == 9 and mask[tokens == meta["eot_token"]].tolist() == [1] * 9


@pytest.mark.parametrize("kind", ["bpe", "hf"])
def test_records_encode_in_batches_as_their_tokenizer_encodes_each(tmp_path, kind):
    """Records are tokenized BATCH_RECORDS at a time; across the batches' edges every record's tokens, mask
    and start are those of its tokenizer's own encoding of its prompt and completion, one record at a time:
    tiktoken's for GPT-2 BPE; transformers' AutoTokenizer for a Hugging Face tokenizer that puts a token
    before every text, with a special token inside the prompts."""
    from records import BATCH_RECORDS

    n = 2 * BATCH_RECORDS + 250  # the train split (90%) crosses two edges
    pairs = [{"prompt": f"Q{i}: héllo  wörld 🙂<|im_end|>{'x' * (i % 7)}\n", "completion": f" {i % 13}日本\n\n"}
             for i in range(n)]
    d = DataConfig(input=write_jsonl(tmp_path / "p.jsonl", pairs), tokenizer=kind, processed_dir=str(tmp_path / "out"))
    if kind == "bpe":
        import tiktoken

        enc = tiktoken.get_encoding("r50k_base")  # GPT-2's tokens (the file the offline cache holds)
        first, encode, end = [], enc.encode_ordinary, enc.eot_token
    else:
        from transformers import AutoTokenizer

        hf_tokenizer(tmp_path / "hf", prefix=True)
        d.tokenizer_path = str(tmp_path / "hf")
        auto = AutoTokenizer.from_pretrained(tmp_path / "hf")
        first = auto("a").input_ids[:-len(auto("a", add_special_tokens=False).input_ids)]
        encode, end = (lambda text: auto(text, add_special_tokens=False).input_ids), auto.eos_token_id
        assert first == [auto.bos_token_id]
    meta = prepare.prepare(d, progress=False)
    tokens, mask, starts = [], [], []
    for p in pairs[:meta["records"]["train"]]:
        prompt, completion = first + encode(p["prompt"]), encode(p["completion"])
        starts.append(len(tokens))
        tokens += prompt + completion + [end]
        mask += [0] * len(prompt) + [1] * (len(completion) + 1)
    assert len(starts) > 2 * BATCH_RECORDS
    assert np.fromfile(tmp_path / "out" / "train.bin", dtype=meta["dtype"]).tolist() == tokens
    assert np.fromfile(tmp_path / "out" / "train.mask", dtype=np.uint8).tolist() == mask
    assert np.fromfile(tmp_path / "out" / "train.starts", dtype=np.int64).tolist() == starts


def test_a_character_outside_the_vocabulary_is_named_with_its_record(tmp_path):
    """A char model's vocabulary lacks a character of record 600 (in the second batch): the error names that
    line, not the batch."""
    from records import encoded_records
    from tokenizer import CharTokenizer

    texts = [{"text": "abc"}] * 599 + [{"text": "abz"}] + [{"text": "cab"}] * 100
    path = write_jsonl(tmp_path / "t.jsonl", texts)
    with pytest.raises(DataError, match=r"t\.jsonl:600: characters not in the vocabulary: 'z'"):
        list(encoded_records([Path(path)], "text", None, "all", CharTokenizer("abc")))
