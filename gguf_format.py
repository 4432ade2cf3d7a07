"""GGUF files, the format llama.cpp, Ollama and LM Studio run: read, tensor by tensor (dequantized),
with the tokenizer and chat template from the file's metadata.

A GGUF file names its tensors and settings as llama.cpp does. TENSORS and CONFIG below map those
names to Hugging Face's, and hf.py maps Hugging Face's to ours, so a GGUF file reads as a Hugging Face
folder would: checkpoint.load_weights takes either.

    config, shapes, get, meta = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "cpu")

Two layouts differ from Hugging Face's. For `llama` files, llama.cpp reorders the rows of each head of
the q and k projections (its rotary pairs are neighbouring channels, 2i and 2i + 1, where Hugging Face
and model.py pair channel i with i + hd/2): unpermute() puts them back. And Llama 3's scaled rotary
frequencies are a tensor (rope_freqs.weight) instead of settings: rope_llama3() finds the settings
that give it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from checks import gguf_problems
from errors import UserError
from tokenizer import hf_meta

# GGUF's general.architecture -> the Hugging Face model_type it reads as (hf.ARCHITECTURES).
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
EXPORT_NAME = "tinygpt export"  # general.name of the files written here
READ_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
# llama.cpp's tensor names -> Hugging Face's ({i}: the layer).
TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
           "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
           "blk.{i}.attn_q": "model.layers.{i}.self_attn.q_proj", "blk.{i}.attn_k": "model.layers.{i}.self_attn.k_proj",
           "blk.{i}.attn_v": "model.layers.{i}.self_attn.v_proj",
           "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
           "blk.{i}.attn_q_norm": "model.layers.{i}.self_attn.q_norm",
           "blk.{i}.attn_k_norm": "model.layers.{i}.self_attn.k_norm",
           "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
           "blk.{i}.ffn_gate": "model.layers.{i}.mlp.gate_proj", "blk.{i}.ffn_up": "model.layers.{i}.mlp.up_proj",
           "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj"}
# llama.cpp's settings ({arch}.key) -> config.json's.
CONFIG = {"block_count": "num_hidden_layers", "context_length": "max_position_embeddings",
          "embedding_length": "hidden_size", "feed_forward_length": "intermediate_size",
          "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
          "attention.key_length": "head_dim", "attention.layer_norm_rms_epsilon": "rms_norm_eps"}


class GGUFError(UserError):
    """A GGUF file that cannot be read; the message names the file and why."""


def hf_name(gguf_name: str) -> str | None:
    """Hugging Face's name for a tensor of a GGUF file ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.
    q_proj.weight"), or None for one we do not know."""
    stem, _, kind = gguf_name.rpartition(".")
    parts = stem.split(".")
    layer = parts[1] if parts[0] == "blk" and len(parts) > 1 and parts[1].isdigit() else None
    template = "blk.{i}." + ".".join(parts[2:]) if layer is not None else stem
    theirs = TENSORS.get(template)
    return None if theirs is None else theirs.format(i=layer) + "." + kind


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of a q or k projection (rows: heads x hd): within each head, row pairs
    (2i, 2i + 1) go back to rows (i, i + hd/2)."""
    hd = w.shape[0] // heads
    return w.reshape(heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_llama3(freqs: np.ndarray, theta: float, head_dim: int, context: int, path: Path) -> dict:
    """Llama 3's rotary settings from the per-pair divisors a GGUF file stores (rope_freqs.weight): the
    stretch is the largest divisor, the original context rope.scaling.original_context_length (8192 when
    the file does not say), the two frequency bounds Llama 3.1's and 3.2's (1 and 4), all checked by
    computing the divisors again from them."""
    from config import ModelConfig
    from model import rope_scaled

    if 2 * len(freqs) != head_dim:
        raise GGUFError(f"{path}: its rope_freqs.weight has {len(freqs)} values, and heads of {head_dim} need "
                        f"{head_dim // 2}; its head settings are wrong: download or export it again")
    settings = {"rope_type": "llama3", "factor": float(freqs.max()), "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": context}
    cfg = ModelConfig(head_dim=head_dim, rope_theta=theta, rope_scaling="llama3", rope_factor=settings["factor"],
                      rope_original_context=context)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    if not np.allclose((inv_freq / rope_scaled(inv_freq, cfg)).numpy(), freqs, rtol=1e-4):
        raise GGUFError(f"{path}: its rope_freqs.weight is not Llama 3's rotary scaling with factor "
                        f"{settings['factor']:g}, 1, 4 and {context}; it cannot be read")
    return settings


def read_gguf(path: Path, device: str | torch.device) -> tuple[dict, dict, Callable[[str], torch.Tensor], dict]:
    """A GGUF file as a Hugging Face folder would read: (config.json's settings, {their tensor name:
    shape}, get(their name) -> the tensor dequantized to fp32 on `device`, the tokenizer meta)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:  # not GGUF, or cut short
        raise GGUFError(f"{path} cannot be read as a GGUF file ({type(e).__name__}: {e}); it is damaged or not "
                        "GGUF: download it again") from None
    meta = {name: value for name, field in reader.fields.items() if (value := field.contents()) is not None}
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: general.architecture = {arch!r} cannot be read; we read "
                        f"{', '.join(ARCHITECTURES)}")
    problems = gguf_problems(meta, arch)
    if problems:
        raise GGUFError(f"{path}: {'; '.join(problems)}; it is damaged: download or export it again")
    tensors = {t.name: t for t in reader.tensors}
    unread = sorted({t.tensor_type.name for t in tensors.values()} - set(READ_TYPES))
    if unread:
        raise GGUFError(f"{path} holds tensors of type {', '.join(unread)}, which are not read; we read "
                        f"{', '.join(READ_TYPES)}")
    config = {"model_type": ARCHITECTURES[arch], "tie_word_embeddings": "output.weight" not in tensors,
              **{theirs: meta[f"{arch}.{key}"] for key, theirs in CONFIG.items() if f"{arch}.{key}" in meta}}
    config["vocab_size"] = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    rope = {"rope_type": "default", "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 1e4))}
    if meta.get(f"{arch}.rope.scaling.type") not in (None, "none") and "rope_freqs.weight" not in tensors:
        rope |= {"rope_type": meta[f"{arch}.rope.scaling.type"], "factor": meta.get(f"{arch}.rope.scaling.factor")}
    if "rope_freqs.weight" in tensors:
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        context = meta.get(f"{arch}.rope.scaling.original_context_length", 8192)
        rope |= rope_llama3(np.asarray(tensors["rope_freqs.weight"].data), rope["rope_theta"], head_dim, context,
                            path)
    config["rope_parameters"] = rope
    names = {hf_name(k): k for k in tensors if k != "rope_freqs.weight"}
    if None in names:
        unknown = sorted(k for k in tensors if hf_name(k) is None and k != "rope_freqs.weight")
        raise GGUFError(f"{path} has tensors a {arch} model does not ({', '.join(unknown[:3])}); it cannot be read")
    shapes = {name: tuple(int(n) for n in reversed(tensors[k].shape)) for name, k in names.items()}  # ggml: (in, out)

    def get(name: str) -> torch.Tensor:
        from gguf import quants
        t = tensors[names[name]]
        w = torch.from_numpy(np.array(quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        w = w.reshape(shapes[name])
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads"] if "q_proj" in name else config.get("num_key_value_heads")
            heads = heads or config["num_attention_heads"]
            if len(w) % (2 * heads):  # a head count that does not fit the weights; their shapes are checked later
                raise GGUFError(f"{path}: {names[name]} has {len(w)} rows, which {heads} heads cannot share; "
                                "its attention.head_count or head_count_kv is wrong: download or export it again")
            w = unpermute(w, heads)
        return w.to(device)

    return config, shapes, get, tokenizer_meta(meta, path)


def tokenizer_meta(meta: dict, path: Path) -> dict | None:
    """The tokenizer a GGUF file describes (a byte-level BPE: its tokens and merges; llama.cpp's
    "gpt2"), as a tokenizer.json, with its special tokens and chat template: the meta of tokenizer.py."""
    if "tokenizer.ggml.tokens" not in meta:
        return None
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model = {meta.get('tokenizer.ggml.model')!r} is not read; we read "
                        "byte-level BPE tokenizers ('gpt2')")
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens, kinds = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges") or []]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                               continuing_subword_prefix="", end_of_word_suffix=""))
    split = SPLITS.get(meta.get("tokenizer.ggml.pre"))  # how the text is cut before the merges, if not GPT-2's way
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, kinds) if kind == 3])  # 3: a control token
    if meta.get("tokenizer.ggml.add_bos_token") and "tokenizer.ggml.bos_token_id" in meta:  # e.g. Llama 3's
        bos = tokens[meta["tokenizer.ggml.bos_token_id"]]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, meta["tokenizer.ggml.bos_token_id"])])
    special = {name: tokens[meta[f"tokenizer.ggml.{key}"]] for name, key in (
        ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id")) if f"tokenizer.ggml.{key}" in meta}
    config = special | {"add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                        "tokenizer_class": "PreTrainedTokenizerFast"}
    files = {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(config, indent=2)}
    if meta.get("tokenizer.chat_template"):
        files["chat_template.jinja"] = meta["tokenizer.chat_template"]
    return hf_meta(files)



# ----------------------------------------------------------------------------- writing

WRITE_TYPES = ("fp32", "fp16", "bf16", "q8_0")  # export.py --dtype for --format gguf
# llama.cpp's file types (general.file_type), and the tensor type of each for a weight matrix.
FILE_TYPES = {"fp32": (0, "F32"), "fp16": (1, "F16"), "bf16": (32, "BF16"), "q8_0": (7, "Q8_0")}
# Pre-tokenizers whose text split is not GPT-2's (tokenizer.ggml.pre), by the split pattern their
# tokenizer.json gives (the Llama 3 and Qwen2 patterns, which differ in how many digits a piece holds).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
SPLITS = {"llama-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}


def gguf_name(hf: str) -> str:
    """llama.cpp's name for a Hugging Face tensor name (the inverse of hf_name)."""
    stem, _, kind = hf.rpartition(".")
    parts = stem.split(".")
    layer = parts[2] if stem.startswith("model.layers.") else None
    template = "model.layers.{i}." + ".".join(parts[3:]) if layer is not None else stem
    ours = {theirs: gguf for gguf, theirs in TENSORS.items()}[template]
    return ours.format(i=layer) + "." + kind


def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's order of a q or k projection's rows (the inverse of unpermute)."""
    hd = w.shape[0] // heads
    return w.reshape(heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def write_gguf(path: Path, tensors: dict[str, torch.Tensor], config: dict, meta: dict | None, dtype: str) -> None:
    """A GGUF file at `path` from Hugging Face's tensors and config.json (hf.to_hf, hf.write_config) and our
    tokenizer meta. Matrices are written in `dtype` (q8_0 where a row is whole blocks of 32, else fp16);
    norms and biases in fp32, as llama.cpp writes them."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    arch = {v: k for k, v in ARCHITECTURES.items()}[config["model_type"]]
    file_type, matrix_type = FILE_TYPES[dtype]
    writer = GGUFWriter(path, arch)
    writer.add_string("general.name", EXPORT_NAME)
    writer.add_uint32("general.file_type", file_type)
    for key, theirs in CONFIG.items():
        value = config[theirs]
        (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(f"{arch}.{key}", value)
    writer.add_uint32(f"{arch}.attention.value_length", config["head_dim"])
    writer.add_uint32(f"{arch}.rope.dimension_count", config["head_dim"])
    writer.add_uint32(f"{arch}.vocab_size", config["vocab_size"])
    rope = config["rope_parameters"]
    writer.add_float32(f"{arch}.rope.freq_base", rope["rope_theta"])
    if rope["rope_type"] == "linear":
        writer.add_string(f"{arch}.rope.scaling.type", "linear")
        writer.add_float32(f"{arch}.rope.scaling.factor", rope["factor"])
    for name, w in tensors.items():
        w = w.detach().float().cpu()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = permute(w, config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"])
        kind = matrix_type if w.dim() == 2 else "F32"
        if kind == "Q8_0" and w.shape[1] % 32:
            kind = "F16"  # Q8_0 packs blocks of 32 values of a row
        qtype, array = GGMLQuantizationType[kind], w.numpy()
        data = array.astype(np.float16) if kind == "F16" else array if kind == "F32" else quants.quantize(array, qtype)
        writer.add_tensor(gguf_name(name), data, raw_dtype=qtype)  # quantized: its bytes, the shape follows
    if rope["rope_type"] == "llama3":  # llama.cpp takes Llama 3's scaling as each pair's divisor
        from config import ModelConfig
        from model import rope_scaled
        hd = config["head_dim"]
        cfg = ModelConfig(head_dim=hd, rope_theta=rope["rope_theta"], rope_scaling="llama3", rope_factor=rope["factor"],
                          rope_low_freq_factor=rope["low_freq_factor"], rope_high_freq_factor=rope["high_freq_factor"],
                          rope_original_context=rope["original_max_position_embeddings"])
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
        writer.add_tensor("rope_freqs.weight", (inv_freq / rope_scaled(inv_freq, cfg)).numpy())
        writer.add_float32(f"{arch}.rope.scaling.factor", rope["factor"])
        writer.add_uint32(f"{arch}.rope.scaling.original_context_length", rope["original_max_position_embeddings"])
    write_tokenizer(writer, meta)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_tokenizer(writer, meta: dict | None) -> None:
    """The tokenizer as llama.cpp's metadata: a byte-level BPE's tokens, merges and special tokens, and
    the chat template. A Hugging Face tokenizer.json of that kind, and GPT-2's BPE, are written; a char
    tokenizer becomes one of bytes without merges (each character one byte: ASCII)."""
    if meta is None:
        return
    tokens, merges, special, config, template = tokenizer_parts(meta)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    split = json.dumps(json.loads(meta["files"]["tokenizer.json"]).get("pre_tokenizer")) if meta["tokenizer"] == "hf" \
        else ""
    writer.add_string("tokenizer.ggml.pre", next((pre for pre, s in SPLITS.items() if json.dumps(s)[1:-1] in split),
                                                 "default"))
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", [3 if t in special else 1 for t in tokens])
    writer.add_array("tokenizer.ggml.merges", merges)
    ids = {t: i for i, t in enumerate(tokens)}
    for key, name in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"), ("padding_token_id", "pad_token"),
                      ("unknown_token_id", "unk_token")):
        token = config.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        if token in ids:
            writer.add_uint32(f"tokenizer.ggml.{key}", ids[token])
    writer.add_bool("tokenizer.ggml.add_bos_token", bool(config.get("add_bos_token")))
    if template:
        writer.add_string("tokenizer.chat_template", template)


def tokenizer_parts(meta: dict) -> tuple[list[str], list[str], set[str], dict, str | None]:
    """(tokens by id, merges "a b", special tokens, tokenizer_config, chat template) of a tokenizer meta."""
    if meta["tokenizer"] == "hf":
        spec = json.loads(meta["files"]["tokenizer.json"])
        if (spec.get("model") or {}).get("type") != "BPE":
            raise GGUFError("--format gguf writes byte-level BPE tokenizers, and this model's tokenizer.json is "
                            f"{(spec.get('model') or {}).get('type')!r}; export with --format hf")
        vocab = dict(spec["model"]["vocab"]) | {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
        special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
        config = json.loads(meta["files"].get("tokenizer_config.json", "{}"))
        config["add_bos_token"] = bool(tokenizer_prefix(meta))
        template = meta["files"].get("chat_template.jinja") or config.get("chat_template")
        if isinstance(template, list):  # named templates (transformers'): GGUF holds the default one
            template = next((t["template"] for t in template if t["name"] == "default"), None)
    elif meta["tokenizer"] == "bpe":
        from hf import gpt2_tokenizer_files
        from tokenizer import EOT_TEXT, load_tiktoken
        vocab, merges = gpt2_tokenizer_files(load_tiktoken(meta["encoding"]))
        special, template = {EOT_TEXT}, None
        config = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT}
    else:
        from hf import byte_to_char
        if any(ord(c) > 127 for c in meta["chars"]):
            raise GGUFError("--format gguf writes a char model's characters as bytes, and this one has characters "
                            "beyond ASCII; export with --format hf or native")
        spell = byte_to_char()
        vocab, merges, special, config, template = {spell[ord(c)]: i for i, c in enumerate(meta["chars"])}, [], set(), \
            {}, None
    if meta.get("markers"):  # ChatML's, as the tokenizer numbers them (after its own ids)
        from tokenizer import CHATML, tokenizer_from_meta
        vocab |= tokenizer_from_meta(meta).markers
        special, template = special | set(meta["markers"]), CHATML
    tokens = [""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        tokens[i] = token
    return tokens, merges, special, config, template


def tokenizer_prefix(meta: dict) -> list[int]:
    from tokenizer import tokenizer_from_meta
    return tokenizer_from_meta(meta).prefix


def is_gguf_file(path: Path) -> bool:
    """Whether `path` starts as a GGUF file does (its magic bytes)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:  # unreadable: whoever reads it next says why
        return False


def read_as_gguf(path: Path) -> bool:
    """Whether `path` is a file to read as GGUF: its name ends in .gguf, or it starts with GGUF's magic bytes
    whatever its name (a file named .gguf that is not one is then named as damaged, not as a missing folder)."""
    return path.is_file() and (path.suffix == ".gguf" or is_gguf_file(path))


def exported_here(path: Path) -> bool:
    """Whether `path` is a GGUF file that write_gguf wrote (its general.name), which export --force may replace:
    not a model downloaded from elsewhere."""
    from gguf import GGUFReader

    if not is_gguf_file(path):
        return False
    try:
        name = GGUFReader(path).fields.get("general.name")
    except (ValueError, OSError, IndexError, KeyError):  # unreadable, cut short or damaged: not one to replace
        return False
    return name is not None and name.contents() == EXPORT_NAME
