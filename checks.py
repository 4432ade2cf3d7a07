"""The fields of the files tinygpt reads, checked before anything is built from them: checkpoints, train
logs, a Hugging Face folder's config.json, its tokenizer files and index of shards, a GGUF file's settings
(meta.json's are data.meta_problems, a split's token ids data.load_tokens'). A damaged or edited file is
named with the field at fault, in one line, instead of a traceback (or, worse, a run that "resumes" from
step -7). Each function returns the problems found, as "FIELD is VALUE, expected WHAT"; the reader
(checkpoint.py, hf.py, gguf_format.py, tokenizer.py, lifecycle.restore) puts the file's name in front.
"""

from __future__ import annotations

import json
import math
import typing

if typing.TYPE_CHECKING:
    import torch

# A checkpoint's loop state (checkpoint.LoopState) and its other plain values: (allowed types, what).
INT, NUMBER = (int,), (int, float)
LOOP_FIELDS = {
    "step": (INT, "an integer >= 0"), "tokens": (INT, "an integer >= 0"), "bad_evals": (INT, "an integer >= 0"),
    "best_step": (INT + (type(None),), "an integer >= 0 or null"),
    "last_eval_step": (INT + (type(None),), "an integer >= 0 or null"),
    "best_val_loss": (NUMBER, "a number >= 0"), "elapsed_s": (NUMBER, "a number >= 0"),
    "start_val_loss": (NUMBER + (type(None),), "a number >= 0 or null"),
    "val_loss": (NUMBER + (type(None),), "a number >= 0 or null"),
    "run_id": ((str,), "a string"), "version": (INT, "an integer >= 0"),
}


def checkpoint_problems(ckpt: dict) -> list[str]:
    """What is wrong with a checkpoint's own fields: its loop state, its weights' dtypes, its RNG state."""
    import torch  # here, not above: plot.py checks train logs with this module and runs without torch

    out = []
    for key, (types, what) in LOOP_FIELDS.items():
        value = ckpt.get(key)
        if key not in ckpt or value is None and type(None) in types:
            continue
        wrong = isinstance(value, bool) or not isinstance(value, types)
        if not wrong and isinstance(value, (int, float)):
            # Counts and losses are never negative; best_val_loss is inf until a first evaluation.
            wrong = math.isnan(value) or (math.isinf(value) and key != "best_val_loss") or value < 0
        if wrong:
            out.append(f"{key} is {value!r}, expected {what}")
    for name, tensor in (ckpt.get("model") or {}).items():
        if not (torch.is_tensor(tensor) and tensor.is_floating_point()):
            out.append(f"weight {name} is {getattr(tensor, 'dtype', type(tensor).__name__)}, expected floating-point "
                       "numbers")
            break
    rng = ckpt.get("rng")
    if rng is not None:
        size = torch.get_rng_state().numel()
        cpu = rng.get("cpu") if isinstance(rng, dict) else None
        if not (torch.is_tensor(cpu) and cpu.dtype == torch.uint8 and cpu.numel() == size):
            out.append(f"rng is not the random generators' state (expected {size} bytes for the CPU's)")
    return out


def optimizer_problems(state, optimizer: torch.optim.Optimizer) -> list[str]:
    """What makes a checkpoint's optimizer state unfit for `optimizer`: another model's, or damaged."""
    import torch

    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not (isinstance(state, dict) and isinstance(state.get("state"), dict)
            and isinstance(state.get("param_groups"), list)):
        return ["optimizer is not an optimizer's state"]
    saved = sum(len(g.get("params", ())) for g in state["param_groups"] if isinstance(g, dict))
    if saved != len(params):
        return [f"optimizer holds the state of {saved} parameters, and this run trains {len(params)} (another "
                "model's, or other settings: lora, optimizer)"]
    for i, values in state["state"].items():
        for key, value in (values.items() if isinstance(values, dict) else ()):
            if not isinstance(i, int) or not 0 <= i < len(params):
                return [f"optimizer has state for parameter {i!r}, which this run does not have"]
            if torch.is_tensor(value) and value.dim() and value.shape != params[i].shape:
                return [f"optimizer's {key} of parameter {i} has shape {tuple(value.shape)}, the parameter "
                        f"{tuple(params[i].shape)} (another model's state)"]
    return []


# train_log.json (monitor.py writes it; plot.py and a resume read it): each record's fields that are read.
# A value that was not a finite number is written as null.
LOG_RECORDS = {"evals": {"step": INT, "train_loss": NUMBER, "val_loss": NUMBER, "lr": NUMBER, "tokens": INT,
                         "val_bpb": NUMBER, "task_accuracy": NUMBER},
               "train": {"step": INT, "loss": NUMBER, "lr": NUMBER, "tokens": INT, "grad_norm": NUMBER}}
LOG_OPTIONAL = {"val_bpb", "grad_norm", "task_accuracy"}  # absent from logs written before they existed (or no task)


# config.json keys that hf.py reads, of any architecture, and what each must be; a key set to null
# reads as absent (then its architecture's default: hf.Architecture.defaults). MAX_POSITIONS bounds the
# rotary and position tables that a context length allocates (a 4M-context Llama 3 fits).
MAX_POSITIONS = 1 << 24
KINDS = {"count": "an integer >= 1", "positions": f"an integer from 1 to {MAX_POSITIONS:,}",
         "positive": "a number > 0", "fraction": "a number >= 0 and < 1", "bool": "true or false",
         "text": "a string", "object": "an object", "names": "a list of strings",
         "counts": "a list of integers >= 0"}
HF_FIELDS = {
    **dict.fromkeys(("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "intermediate_size", "vocab_size", "n_layer", "n_head", "n_embd", "n_inner"), "count"),
    **dict.fromkeys(("max_position_embeddings", "n_positions"), "positions"),
    **dict.fromkeys(("rms_norm_eps", "layer_norm_epsilon", "rope_theta"), "positive"),
    **dict.fromkeys(("attention_dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop"), "fraction"),
    **dict.fromkeys(("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window",
                     "scale_attn_by_inverse_layer_idx", "add_cross_attention"), "bool"),
    **dict.fromkeys(("model_type", "hidden_act", "activation_function"), "text"),
    **dict.fromkeys(("rope_parameters", "rope_scaling"), "object"), "layer_types": "names"}
ROPE_FIELDS = {"rope_type": "text", "type": "text", "original_max_position_embeddings": "positions",
               **dict.fromkeys(("rope_theta", "factor", "low_freq_factor", "high_freq_factor",
                                "partial_rotary_factor"), "positive")}


def hf_config_problems(config: dict, required: tuple[str, ...]) -> list[str]:
    """What is wrong with the keys of a Hugging Face config.json that we read: `required` ones missing,
    any of the wrong type or out of range (its rotary settings too)."""
    out = [f"{k} is missing" for k in required if config.get(k) is None]
    rope = [(f"{key}.", config[key]) for key in ("rope_parameters", "rope_scaling")
            if isinstance(config.get(key), dict)]
    for prefix, values, table in [("", config, HF_FIELDS), *((p, v, ROPE_FIELDS) for p, v in rope)]:
        out += [f"{prefix}{k} is {json.dumps(v)}, expected {KINDS[kind]}" for k, kind in table.items()
                if (v := values.get(k)) is not None and not fits(v, kind)]
    return out


def fits(value, kind: str) -> bool:
    if kind in ("count", "positions"):
        return is_count(value) and value >= 1 and (kind == "count" or value <= MAX_POSITIONS)
    if kind in ("positive", "fraction"):
        return is_number(value) and math.isfinite(value) and (value > 0 if kind == "positive" else 0 <= value < 1)
    if kind in ("names", "counts"):
        return isinstance(value, list) and all(isinstance(v, str) if kind == "names" else is_count(v) for v in value)
    return isinstance(value, {"bool": bool, "text": str, "object": dict}[kind])


# The settings of a GGUF file that gguf_format.py reads ({arch}.KEY), and its tokenizer's (tokenizer.*).
GGUF_FIELDS = {**dict.fromkeys(("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                                "attention.head_count_kv", "attention.key_length", "vocab_size"), "count"),
               **dict.fromkeys(("context_length", "rope.scaling.original_context_length"), "positions"),
               **dict.fromkeys(("attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.scaling.factor"),
                               "positive"), "rope.scaling.type": "text"}
GGUF_TOKENIZER = {"ggml.tokens": "names", "ggml.merges": "names", "ggml.token_type": "counts", "ggml.model": "text",
                  "ggml.pre": "text", "ggml.add_bos_token": "bool", "chat_template": "text",
                  **dict.fromkeys(("ggml.bos_token_id", "ggml.eos_token_id", "ggml.unknown_token_id",
                                   "ggml.padding_token_id"), "token")}


def gguf_problems(meta: dict, arch: str) -> list[str]:
    """What is wrong with the metadata of a GGUF file (of `arch`) that we read."""
    tokens = meta.get("tokenizer.ggml.tokens")
    count = len(tokens) if isinstance(tokens, list) else 0
    fields = [(f"{arch}.{k}", kind) for k, kind in GGUF_FIELDS.items()] + [(f"tokenizer.{k}", kind)
                                                                       for k, kind in GGUF_TOKENIZER.items()]
    return [f"{k} is {json.dumps(v, default=str)}, expected "
            + (f"a token id below {count}" if kind == "token" else KINDS[kind]) for k, kind in fields
            if (v := meta.get(k)) is not None and not (is_count(v) and v < count if kind == "token" else fits(v, kind))]


def export_problems(config, native: str) -> list[str]:
    """What is wrong with our own keys in an export's config.json: those of a native export (format =
    `native`), or the "tinygpt" object of a Hugging Face export of ours (where the weights came from, the
    settings they were trained with); not an object at all."""
    if not isinstance(config, dict):
        return ["it is not a JSON object"]
    ours = config if config.get("format") == native else config.get("tinygpt")
    if ours is None:
        return []
    if not isinstance(ours, dict):
        return [f"tinygpt is {json.dumps(ours)}, expected an object"]
    source, model, out = ours.get("source"), ours.get("model"), []
    step, loss = (source.get("step"), source.get("val_loss")) if isinstance(source, dict) else (None, None)
    if source is not None and not (isinstance(source, dict) and (step is None or is_count(step))
                                   and (loss is None or is_number(loss))):
        out.append(f"source is {json.dumps(source)}, expected an object with a step and a val_loss")
    if ours.get("config") is not None and not isinstance(ours["config"], dict):
        out.append(f"config is {json.dumps(ours['config'])}, expected an object")
    if isinstance(model, dict) and not (is_count(model.get("vocab_size")) and model["vocab_size"] >= 1):
        out.append(f"model.vocab_size is {json.dumps(model.get('vocab_size'))}, expected the number of token ids")
    if config is ours and ours.get("dtype", "fp32") not in ("fp32", "fp16", "bf16"):
        out.append(f"dtype is {json.dumps(ours['dtype'])}, expected fp32, fp16 or bf16")
    return out


def shard_index_problems(index) -> list[str]:
    """What is wrong with a model.safetensors.index.json: its weight_map must name, for each tensor, a file
    of the index's own folder (a path elsewhere, ../x or /x, is never read)."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (isinstance(weight_map, dict) and weight_map):
        return ["it has no weight_map of tensor names to files"]
    return [f"weight_map names {json.dumps(v)}, not a file of its folder" for v in weight_map.values()
            if not (isinstance(v, str) and v not in ("", ".", "..") and "/" not in v and "\\" not in v)][:1]


# The keys we read in the files beside a tokenizer.json, and what each must be (null: left out).
TOKENIZER_FILES = {"tokenizer_config.json": {"eos_token": "a token's text, or an object with its content",
                                             "chat_template": "a template, or a list of named templates"},
                   "generation_config.json": {"eos_token_id": "a token id, or a list of token ids"}}


def tokenizer_files_problems(files: dict[str, str], vocab_size: int) -> list[str]:
    """What is wrong with the files beside a tokenizer.json (of `vocab_size` tokens), as "FILE: ..."."""
    out = []
    for name, keys in TOKENIZER_FILES.items():
        if not isinstance(files.get(name, ""), str):
            out.append(f"{name} is not text")
            continue
        try:
            values = json.loads(files.get(name, "{}"))
        except ValueError as e:
            out.append(f"{name} is not JSON ({e})")
            continue
        if not isinstance(values, dict):
            out.append(f"{name} is not a JSON object")
            continue
        out += [f"{name}: {key} is {json.dumps(v)}, expected {what}" for key, what in keys.items()
                if (v := values.get(key)) is not None and not token_field_fits(key, v, vocab_size)]
    return out


def token_field_fits(key: str, value, vocab_size: int) -> bool:
    if key == "eos_token":
        return isinstance(value, str) or (isinstance(value, dict) and isinstance(value.get("content"), str))
    if key == "chat_template":
        return isinstance(value, str) or (isinstance(value, list) and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
            for t in value))
    ids = value if isinstance(value, list) else [value]
    return all(is_count(i) and i < vocab_size for i in ids)


def log_problems(log) -> list[str]:
    """What is wrong with a train log's records (the first problem found), as "evals[3] has no val_loss"."""
    if not isinstance(log, dict) or any(k not in log for k in ("version", "run", "evals", "train")):
        return ["it needs the keys version, run, evals, train"]
    for kind, fields in LOG_RECORDS.items():
        if not isinstance(log[kind], list):
            return [f"{kind} is not a list of records"]
        for i, record in enumerate(log[kind]):
            if not isinstance(record, dict):
                return [f"{kind}[{i}] is not a record"]
            for key, types in fields.items():
                value = record.get(key)
                if key not in record and key not in LOG_OPTIONAL:
                    return [f"{kind}[{i}] has no {key}"]
                if value is None and key != "step":
                    continue
                if isinstance(value, bool) or not isinstance(value, types) or (types is INT and value < 0):
                    return [f"{kind}[{i}].{key} is {value!r}, expected "
                            + ("an integer >= 0" if types is INT else "a number or null")]
    return log_header_problems(log)


def log_header_problems(log: dict) -> list[str]:
    """The rest of a train log that plot.py reads: how the run went, its best step, its resumes."""
    run, best, resumes = log["run"], log.get("best"), log.get("resumes", [])
    if not isinstance(run, dict) or not isinstance(run.get("status", ""), str):
        return ["run is not an object with a status"]
    for key in ("tokens_per_step", "early_stop_step"):
        if (v := run.get(key)) is not None and not is_count(v):
            return [f"run.{key} is {v!r}, expected an integer >= 0"]
    if best is not None and not (isinstance(best, dict) and is_count(best.get("step")) and is_number(best.get("val_loss"))):
        return [f"best is {best!r}, expected null or a step and a val_loss"]
    if not (isinstance(resumes, list) and all(isinstance(r, dict) and is_count(r.get("step")) for r in resumes)):
        return ["resumes is not a list of records with a step"]
    training = log.get("config", {}).get("training", {}) if isinstance(log.get("config", {}), dict) else None
    if not isinstance(training, dict) or not is_number(training.get("grad_clip", 0)):
        return ["config.training.grad_clip is not a number"]
    return []


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_number(value) -> bool:
    return isinstance(value, NUMBER) and not isinstance(value, bool)
