"""Export a checkpoint as safetensors weights: a "native" folder, or a Hugging Face folder.

    python export.py --ckpt checkpoints/small --out exports/small                 # native
    python export.py --ckpt checkpoints/small --out exports/small_hf --format hf  # transformers
    python export.py --ckpt checkpoints/small --out exports/small_fp16 --dtype fp16

native: model.safetensors (our names; a tied lm_head.weight is left out: it is wte), config.json
    ({"format": "tinygpt-native", "model": ..., "config": the training config}), tokenizer_meta.json
hf: what transformers reads with from_pretrained(folder): GPT2LMHeadModel for model.arch = "gpt2",
    LlamaForCausalLM for "llama". model.safetensors (their names; GPT-2's Conv1D layout, i.e. Linear
    weights transposed; Llama's q/k/v and gate/up matrices split apart), config.json (theirs; ours
    under "tinygpt"), tokenizer_meta.json, and for GPT-2 BPE models its tokenizer files (vocab.json,
    merges.txt, tokenizer_config.json). A switch neither class has (qk_norm, a logit soft-cap, ...)
    is refused, by name.
safetensors holds no pickle: loading runs no code. This file only writes; checkpoint.load_weights
reads either kind back in our names, for sample.py, training.init_from and export.py itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from checkpoint import CONV1D, HF_DTYPES, META_FILE, NATIVE, Weights, is_export, llama_names, load_weights
from config import ARCHS, ModelConfig, doc, parse
from data import EOT_TEXT, load_tiktoken
from errors import UserError, command
from model import mlp_hidden

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ExportError(UserError):
    """An export that cannot be written; the message says why and what to do."""


# ----------------------------------------------------------------------------- Hugging Face layout

# The transformers class each arch exports to. It has its arch's switches (config.ARCHS; with biases
# or without, both export) and none of the optional ones. Sizes, norm_eps, rope_theta, mlp_hidden and
# tied or untied embeddings have counterparts in both.
HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def check_hf_exportable(cfg: ModelConfig) -> None:
    """Refuse a model that its arch's transformers class cannot represent, naming each switch."""
    has = {k: v for k, v in ARCHS[cfg.arch].items() if k != "bias"} | {"qk_norm": False, "logit_softcap": 0.0}
    wrong = [f"model.{k} = {json.dumps(getattr(cfg, k))}" for k, v in has.items() if getattr(cfg, k) != v]
    if wrong:
        raise ExportError(f"--format hf: transformers' {HF_CLASSES[cfg.arch]} (model.arch = "
                          f"{json.dumps(cfg.arch)}) has no {', '.join(wrong)}; export with --format native, "
                          "which keeps every setting")


def to_hf(state: dict, cfg: ModelConfig) -> dict:
    """Our state dict -> GPT-2's or Llama's (model.arch), without the vocabulary's padding rows."""
    state = {k: v[:cfg.vocab_size] if k in ("transformer.wte.weight", "lm_head.weight") else v
             for k, v in state.items() if not (k == "lm_head.weight" and cfg.tie_embeddings)}  # tied: stored once
    if cfg.arch == "llama":  # split c_attn into q, k, v and c_fc into gate, up
        return {theirs: part for ours, names in llama_names(cfg).items()
                for theirs, part in zip(names, state[ours].chunk(len(names)))}
    # GPT-2 has the same names as ours, biases everywhere, and stores Linear weights as Conv1D (in, out).
    for name, w in list(state.items()):
        # bias = false is the same model as zero biases, so the export is exact.
        if (name.startswith("transformer.h.") and name.endswith(".weight")) or name == "transformer.ln_f.weight":
            state.setdefault(name[:-len("weight")] + "bias", torch.zeros(w.shape[0], dtype=w.dtype))
    return {k: v.t() if k.endswith(CONV1D) else v for k, v in state.items()}


def hf_config(src: Weights, dtype: str) -> dict:
    cfg, eot = src.model, (src.meta or {}).get("eot_token")
    if cfg.arch == "llama":
        theirs = {"model_type": "llama", "hidden_size": cfg.n_embd,
                  "intermediate_size": mlp_hidden(cfg), "num_hidden_layers": cfg.n_layer,
                  "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_head,
                  "head_dim": cfg.n_embd // cfg.n_head, "hidden_act": "silu",
                  "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
                  # rope_parameters: transformers >= 5; rope_theta: earlier versions
                  "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                  "rope_theta": cfg.rope_theta, "attention_bias": cfg.bias, "mlp_bias": cfg.bias,
                  "attention_dropout": cfg.attn_dropout}
    else:
        theirs = {"model_type": "gpt2", "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
                  "n_positions": cfg.block_size,
                  "n_ctx": cfg.block_size, "n_inner": cfg.mlp_hidden or None,  # None: 4 * n_embd
                  "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
                  "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.attn_dropout}
    return theirs | {
        "architectures": [HF_CLASSES[cfg.arch]], "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": eot, "eos_token_id": eot,
        "torch_dtype": HF_DTYPES[dtype],
        "tinygpt": {"format_version": 1, "tokenizer": (src.meta or {}).get("tokenizer"),
                    "note": "exported by tinygpt; our tokenizer is in tokenizer_meta.json",
                    "model": dataclasses.asdict(cfg), "config": src.config,
                    "source": {"step": src.step, "val_loss": src.val_loss}}}


# ----------------------------------------------------------------------------- GPT-2 tokenizer files

def byte_to_char() -> dict[int, str]:
    """GPT-2's vocab.json/merges.txt spell every byte as a visible character: printable Latin-1
    bytes stand for themselves, the others (space, control bytes...) move to chr(256) and up."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(moved)}


def gpt2_tokenizer_files(enc) -> tuple[dict[str, int], list[str]]:
    """vocab.json and merges.txt from tiktoken's ranks. Token rank r was made by one merge of two
    tokens of lower rank; replaying BPE on its bytes with only those merges finds the pair."""
    ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i != enc.eot_token}
    char = byte_to_char()

    def spell(token: bytes) -> str:
        return "".join(char[b] for b in token)

    merges = [" ".join(map(spell, merge_of(token, rank, ranks)))
              for token, rank in sorted(ranks.items(), key=lambda item: item[1]) if len(token) > 1]
    return {spell(b): r for b, r in ranks.items()} | {EOT_TEXT: enc.eot_token}, merges


def merge_of(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two tokens whose merge made `token`: BPE on its bytes, using only lower ranks."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, i = min((ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
        if best >= rank:
            raise ExportError(f"token {token!r} is not the result of one merge; cannot write merges.txt")
        parts[i:i + 2] = [parts[i] + parts[i + 1]]  # merge the lowest-ranked adjacent pair
    return parts[0], parts[1]


# ----------------------------------------------------------------------------- writing

def write_export(src: Weights, out: Path, fmt: str, dtype: str) -> None:
    """Write all files into `out` (a fresh staging folder; export() publishes it)."""
    state = to_hf(src.state_dict, src.model) if fmt == "hf" else {
        k: v for k, v in src.state_dict.items() if not (k == "lm_head.weight" and src.model.tie_embeddings)}
    # contiguous: transposed views and slices must be laid out as stored; "pt": transformers wants it.
    save_file({k: v.to("cpu", DTYPES[dtype]).contiguous() for k, v in state.items()},
              out / "model.safetensors", metadata={"format": "pt"})
    config = hf_config(src, dtype) if fmt == "hf" else {
        "format": NATIVE, "format_version": 1, "dtype": dtype, "model": dataclasses.asdict(src.model),
        "config": src.config, "source": {"step": src.step, "val_loss": src.val_loss}}
    write_json(out / "config.json", config)
    if src.meta is not None:
        write_json(out / META_FILE, src.meta)
    if fmt == "hf" and (src.meta or {}).get("encoding") in ("gpt2", "r50k_base"):
        vocab, merges = gpt2_tokenizer_files(load_tiktoken("gpt2"))
        write_json(out / "vocab.json", vocab)
        (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        write_json(out / "tokenizer_config.json", {"tokenizer_class": "GPT2Tokenizer",
                                                   "model_max_length": src.model.block_size})


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export(ckpt: str | Path, out: str | Path, fmt: str = "native", dtype: str = "fp32",
           force: bool = False) -> Path:
    """Export weights (a checkpoint, run folder or export) to `out`. The files are written to a
    staging folder that is renamed into place: a kill never leaves a half-written export behind."""
    out = Path(out)
    if out.exists() and (out.is_file() or any(out.iterdir())):
        if not force:
            raise ExportError(f"{out} exists and is not empty; choose another --out, or add --force "
                              "to replace an earlier export")
        if not is_export(out):
            raise ExportError(f"{out} is not an export, so --force will not delete it; choose another --out")
    src = load_weights(ckpt)
    if fmt == "hf":
        check_hf_exportable(src.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Names of this process's own: cleaning up never touches a folder it did not make.
    staging, old = (out.with_name(f".{out.name}.{os.getpid()}.{kind}") for kind in ("tmp", "old"))
    staging.mkdir()
    try:
        write_export(src, staging, fmt, dtype)
    except BaseException:
        shutil.rmtree(staging)
        raise
    if out.exists():
        os.replace(out, old)  # rename(2) cannot replace a non-empty folder: move the old one aside
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- command line

@dataclass
class ExportOptions:
    ckpt: str = doc("checkpoint file, run folder or export folder to export", "checkpoints/small")
    out: str = doc("folder to create (required)", "")
    format: str = doc("native: for this code; hf: for transformers (GPT2LMHeadModel or LlamaForCausalLM)",
                      "native", choices=("native", "hf"))
    dtype: str = doc("fp16/bf16 halve the file", "fp32", choices=tuple(DTYPES))
    force: bool = doc("replace an earlier export in --out", False)


@command
def main(argv: list[str] | None = None) -> int:
    opts, _ = parse(argv, ExportOptions, sections=(), program="export.py", about=__doc__)
    if not opts.out:
        raise ExportError("--out is required: the folder to write the export to, e.g. --out exports/small")
    out = export(opts.ckpt, opts.out, opts.format, opts.dtype, opts.force)
    size = (out / "model.safetensors").stat().st_size
    hf_class = json.loads((out / "config.json").read_text()).get("architectures", [""])[0]
    print(f"exported {opts.format} ({opts.dtype}, {size / 1e6:.1f} MB) to {out}\nnext: " +
          (f"{hf_class}.from_pretrained({str(out)!r}) in transformers" if opts.format == "hf" else
           f"python sample.py --ckpt {out}, or training.init_from = {str(out)!r} to fine-tune"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
