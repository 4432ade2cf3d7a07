"""The other files tinygpt reads, each field mutated one at a time (missing, null, of the wrong type,
zero, negative, huge, NaN, a fraction, a list, an object): a Hugging Face folder's config.json (every key
hf.py reads, for each architecture), its tokenizer files, a prepared folder's meta.json. Each mutation
ends in one error line naming the file, or reads a model that computes what transformers computes from
the same file. Checkpoints and train logs: tests/test_checks.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import checks
import sample
import train
from checkpoint import load_weights
from conftest import CORPUS, prepare_text
from errors import UserError
from model import GPT
from test_real_models import CLASSES, SHAPES, VOCAB, hf_tokenizer, model_with_tokenizer, saved_by_transformers
from test_runs import tiny_argv
from tokenizer import hf_tokenizer_meta

DROP = object()
MUTATIONS = {"missing": DROP, "null": None, "text": "7", "bool": True, "zero": 0, "negative": -7, "huge": 10 ** 12,
             "nan": float("nan"), "float": 2.5, "list": [1], "object": {"a": 1}}
# Where our reading differs from transformers' on purpose (docs/huggingface.md): a config.json without
# tie_word_embeddings is tied when its weights have no lm_head (transformers would leave lm_head random).
TIED_BY_WEIGHTS = {("tie_word_embeddings", "missing"), ("tie_word_embeddings", "null")}
IDS = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))


def logits_of(folder) -> torch.Tensor:
    weights = load_weights(folder)
    model = GPT(weights.model)
    model.load_state_dict(weights.state_dict)
    with torch.no_grad():
        return model.eval()(IDS)[0][..., :VOCAB]


def transformers_logits(folder) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(IDS).logits


def mutate(config: dict, key: tuple[str, ...], value) -> dict:
    config = json.loads(json.dumps(config))
    inner = config
    for k in key[:-1]:
        inner = inner[k]
    if value is DROP:
        inner.pop(key[-1], None)
    else:
        inner[key[-1]] = value
    return config


def with_config(src, folder, key: tuple[str, ...], value):
    """A copy of the Hugging Face folder `src` whose config.json has `key` set to `value`."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(src, folder)
    config = json.loads((src / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(mutate(config, key, value)))
    return folder


def named_in_one_line(e: UserError, where) -> bool:
    """A refusal as the command line prints it: one line, naming the file or folder at fault."""
    return "\n" not in str(e) and str(where) in str(e)


@pytest.fixture(scope="module")
def gpt2_shape():
    SHAPES.setdefault("gpt2", ("GPT2Config", dict(n_embd=32, n_head=4)))
    CLASSES.setdefault("GPT2Config", "GPT2LMHeadModel")
    yield
    SHAPES.pop("gpt2"), CLASSES.pop("GPT2Config")


@pytest.mark.parametrize("shape", ["llama3.2", "qwen2.5", "qwen3", "gpt2"])
def test_each_key_of_a_hf_config_mutated_is_named_or_read_as_transformers_reads_it(tmp_path, gpt2_shape, shape):
    saved_by_transformers(tmp_path / "original", shape)
    config = json.loads((tmp_path / "original" / "config.json").read_text())
    original = logits_of(tmp_path / "original")
    keys = [(k,) for k in config if k in checks.HF_FIELDS]
    keys += [("rope_parameters", k) for k in config.get("rope_parameters") or {} if k in checks.ROPE_FIELDS]
    folder, wrong, read = tmp_path / "m", [], 0
    for key in keys:
        for kind, value in MUTATIONS.items():
            with_config(tmp_path / "original", folder, key, value)
            case = f"{'.'.join(key)} {kind}"
            try:
                ours = logits_of(folder)
            except UserError as e:
                if not named_in_one_line(e, folder):
                    wrong.append(f"{case}: {e}")
                continue
            read += 1
            if (key[-1], kind) in TIED_BY_WEIGHTS:
                reference = original
            else:  # null reads as absent: transformers' reading of the file without the key
                if value is None:
                    (folder / "config.json").write_text(json.dumps(mutate(config, key, DROP)))
                reference = transformers_logits(folder)
            if not torch.allclose(ours, reference, atol=1e-4, rtol=1e-4):
                wrong.append(f"{case}: read, and its logits differ from transformers' by "
                             f"{(ours - reference).abs().max():.3g}")
    assert not wrong, "\n".join(wrong)
    assert read >= len(keys)  # a float, a null or an absent key reads for most keys: the comparison ran


# ----------------------------------------------------------------------------- tokenizer files

def transformers_stops(folder) -> set[int]:
    """The ids that end a generation in transformers: the tokenizer's eos and generation_config's."""
    from transformers import AutoTokenizer, GenerationConfig

    eos = AutoTokenizer.from_pretrained(folder).eos_token_id
    try:
        generation = GenerationConfig.from_pretrained(folder).eos_token_id
    except OSError:  # no generation_config.json
        generation = None
    return {eos, *(generation if isinstance(generation, list) else [generation])} - {None}


TOKENIZER_KEYS = [("tokenizer_config.json", "eos_token"), ("tokenizer_config.json", "chat_template"),
                  ("generation_config.json", "eos_token_id")]


def test_tokenizer_files_that_are_not_text_are_named():
    assert checks.tokenizer_files_problems({"tokenizer_config.json": None}, 10) == ["tokenizer_config.json is not text"]


def test_each_key_of_the_tokenizer_files_mutated_is_named_or_read_as_transformers_reads_it(tmp_path, capsys):
    """sample.py on a folder whose tokenizer_config.json or generation_config.json is mutated: one error
    line naming the folder, or samples that stop where transformers' generation would."""
    model_with_tokenizer(tmp_path / "original")
    (tmp_path / "original" / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    folder, wrong, read = tmp_path / "m", [], 0
    cases = [(name, key, kind, value) for name, key in TOKENIZER_KEYS for kind, value in MUTATIONS.items()]
    cases += [(name, None, kind, text) for name in ("tokenizer_config.json", "generation_config.json", "tokenizer.json")
              for kind, text in (("not JSON", "{oops"), ("a list", "[1]"), ("empty", ""))]
    for name, key, kind, value in cases:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(tmp_path / "original", folder)
        path = folder / name
        path.write_text(value if key is None else json.dumps(mutate(json.loads(path.read_text()), (key,), value)))
        capsys.readouterr()
        code = sample.main(["--ckpt", str(folder), "--max-new-tokens", "2", "--num-samples", "1"])
        err = capsys.readouterr().err
        case = f"{name} {key} {kind}"
        if code == 2 and err.count("\n") == 1 and err.startswith("error: ") and str(folder) in err:
            continue
        if code != 0 or "error" in err or "Traceback" in err:  # stderr holds a notice of what is sampled
            wrong.append(f"{case}: exit {code}, {err!r}")
            continue
        read += 1
        if set(hf_tokenizer_meta(folder)["stop_tokens"]) != transformers_stops(folder):
            wrong.append(f"{case}: read with stop tokens {hf_tokenizer_meta(folder)['stop_tokens']}, "
                         f"transformers stops at {sorted(transformers_stops(folder))}")
    assert not wrong, "\n".join(wrong)
    assert read >= len(TOKENIZER_KEYS) * 2  # at least missing and null of each key read


# ----------------------------------------------------------------------------- meta.json

# Fields of meta.json that may be missing, and what takes their place: folders prepared before bytes
# were recorded report no bits per byte (docs/data.md).
META_OPTIONAL = {"bytes"}


@pytest.mark.parametrize("tokenizer", ["char", "bpe", "hf"])
def test_each_field_of_a_prepared_meta_json_mutated_is_named(tmp_path, capsys, tokenizer):
    """train.py on a prepared folder whose meta.json has one field mutated: one error line naming the
    folder, or (a documented default) the run goes on."""
    text = tmp_path / "t.txt"
    text.write_text(CORPUS.read_text(encoding="utf-8")[:50_000])
    settings = ["--data.input", str(text), "--data.tokenizer", tokenizer]
    if tokenizer == "hf":
        hf_tokenizer(tmp_path / "tok")
        settings += ["--data.tokenizer_path", str(tmp_path / "tok")]
    original = tmp_path / "original"
    prepare_text(text, original, tokenizer=tokenizer, **({"tokenizer_path": str(tmp_path / "tok")}
                                                        if tokenizer == "hf" else {}))
    meta = json.loads((original / "meta.json").read_text())
    folder, wrong = tmp_path / "data", []
    for key in meta:
        for kind, value in MUTATIONS.items():
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(tmp_path / "run", ignore_errors=True)
            shutil.copytree(original, folder)
            (folder / "meta.json").write_text(json.dumps(mutate(meta, (key,), value)))
            capsys.readouterr()
            code = train.cli(tiny_argv(tmp_path / "run", folder, "--max-iters", "2", *settings))
            err = capsys.readouterr().err
            named = code == 2 and err.count("\n") == 1 and err.startswith("error: ") and str(folder) in err
            if not (named or (code == 0 and err == "" and kind == "missing" and key in META_OPTIONAL)):
                wrong.append(f"{key} {kind}: exit {code}, {err!r}")
    assert not wrong, "\n".join(wrong)


# ----------------------------------------------------------------------------- GGUF metadata

class Field:
    """A GGUF reader's field, holding a value of our choosing."""

    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


def reading_mutated(monkeypatch, key: str, value) -> None:
    """Make gguf's reader see `key` as `value` (DROP: absent) in any file it reads."""
    import gguf

    class Reader(gguf.GGUFReader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.fields = {k: v for k, v in self.fields.items() if k != key}
            if value is not DROP:
                self.fields[key] = Field(value)

    monkeypatch.setattr(gguf, "GGUFReader", Reader)


@pytest.mark.parametrize("shape", ["smollm2", "llama3.2"])
def test_each_setting_of_a_gguf_file_mutated_is_named_or_read_the_same(tmp_path, monkeypatch, shape):
    """A GGUF export whose metadata has one setting mutated (as gguf's reader returns it): one error line
    naming the file, or the same model as the file unchanged."""
    import export
    from gguf import GGUFReader

    saved_by_transformers(tmp_path / "hf", shape, vocab=320)
    hf_tokenizer(tmp_path / "hf")
    path = export.export(tmp_path / "hf", tmp_path / "model.gguf", "gguf")
    original = logits_of(path)
    arch = GGUFReader(path).fields["general.architecture"].contents()
    keys = ["general.architecture"] + [f"{arch}.{k}" for k in checks.GGUF_FIELDS] + [
        f"tokenizer.{k}" for k in checks.GGUF_TOKENIZER]
    present = set(GGUFReader(path).fields)
    wrong = []
    for key in [k for k in keys if k in present]:
        for kind, value in MUTATIONS.items():
            with monkeypatch.context() as m:
                reading_mutated(m, key, value)
                try:
                    ours = logits_of(path)
                except UserError as e:
                    if not named_in_one_line(e, path):
                        wrong.append(f"{key} {kind}: {e}")
                    continue
            reference = original
            if key.endswith(".rope.freq_base"):  # any base is a model: the same as config.json's rope_theta
                theta = 1e4 if value in (DROP, None) else value  # absent: llama.cpp's default, as transformers'
                key_theta = ("rope_parameters", "rope_theta")
                reference = logits_of(with_config(tmp_path / "hf", tmp_path / "theta", key_theta, theta))
            if not torch.allclose(ours, reference, atol=1e-5, rtol=1e-5):
                wrong.append(f"{key} {kind}: read, and its logits differ by {(ours - reference).abs().max():.3g}")
    assert not wrong, "\n".join(wrong)


# ----------------------------------------------------------------------------- the index of shards

def test_each_part_of_a_shard_index_mutated_is_named(tmp_path):
    """A sharded folder (model.safetensors.index.json, as transformers saves it) whose index is mutated:
    one error line naming the folder; a shard named outside the folder is never read, even when it is
    there and holds the right tensors."""
    model = saved_by_transformers(tmp_path / "hf", "smollm2")
    model.save_pretrained(tmp_path / "original", max_shard_size="20KB")
    index = json.loads((tmp_path / "original" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    first = next(iter(index["weight_map"]))
    shutil.copy(tmp_path / "original" / shards[0], tmp_path / "outside.safetensors")
    mutations = {
        "not an object": [1], "no weight_map": {"metadata": {}}, "empty weight_map": {"weight_map": {}},
        "weight_map a list": {"weight_map": [1]},
        "a shard outside": mutate(index, ("weight_map", first), "../outside.safetensors"),
        "an absolute path": mutate(index, ("weight_map", first), str(tmp_path / "outside.safetensors")),
        "a shard not there": mutate(index, ("weight_map", first), "model-00009-of-00009.safetensors"),
        "a number": mutate(index, ("weight_map", first), 7),
        "the wrong shard": mutate(index, ("weight_map", first), shards[-1]),
        "a tensor left out": mutate(index, ("weight_map", first), DROP),
    }
    original = logits_of(tmp_path / "original")
    assert torch.allclose(original, logits_of(tmp_path / "hf"), atol=1e-5)
    folder, wrong = tmp_path / "m", []
    for kind, value in mutations.items():
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(tmp_path / "original", folder)
        (folder / "model.safetensors.index.json").write_text(json.dumps(value))
        try:
            logits_of(folder)
            wrong.append(f"{kind}: read")
        except UserError as e:
            if not named_in_one_line(e, folder):
                wrong.append(f"{kind}: {e}")
    assert not wrong, "\n".join(wrong)


# ----------------------------------------------------------------------------- a native export's config.json

def test_each_field_of_a_native_export_mutated_is_named_or_read(tmp_path, char_data):
    """Our own export's config.json (its model settings, and the keys around them) and tokenizer_meta.json,
    one field mutated at a time: one error line naming the folder, or a model that computes finite logits."""
    import export

    assert train.cli(tiny_argv(tmp_path / "run", char_data, "--max-iters", "2")) == 0
    original = export.export(tmp_path / "run", tmp_path / "original")
    files = {name: json.loads((original / name).read_text()) for name in ("config.json", "tokenizer_meta.json")}
    keys = [(name, (k,)) for name, values in files.items() for k in values]
    keys += [("config.json", ("model", k)) for k in files["config.json"]["model"]]
    folder, wrong = tmp_path / "m", []
    for name, key in keys:
        for kind, value in MUTATIONS.items():
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(original, folder)
            (folder / name).write_text(json.dumps(mutate(files[name], key, value)))
            try:
                weights = load_weights(folder)
                model = GPT(weights.model)
                model.load_state_dict(weights.state_dict)
                with torch.no_grad():
                    ok = bool(torch.isfinite(model.eval()(IDS % weights.model.vocab_size)[0]).all())
                if not ok:
                    wrong.append(f"{name} {'.'.join(key)} {kind}: read, with logits that are not finite")
            except UserError as e:
                if not named_in_one_line(e, folder):
                    wrong.append(f"{name} {'.'.join(key)} {kind}: {e}")
            except Exception as e:  # noqa: BLE001 (the test reports what escaped, with its case)
                wrong.append(f"{name} {'.'.join(key)} {kind}: {type(e).__name__}: {e}")
    assert not wrong, "\n".join(wrong)
