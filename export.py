"""Export a checkpoint: a "native" or a Hugging Face folder of safetensors weights, or a GGUF file.

    python export.py --ckpt checkpoints/small --out exports/small                 # native
    python export.py --ckpt checkpoints/small --out exports/small_hf --format hf  # transformers
    python export.py --ckpt checkpoints/small --out exports/small_fp16 --dtype fp16
    python export.py --ckpt checkpoints/lora --out exports/lora_adapters --adapters-only --base exports/small_hf
    python export.py --ckpt checkpoints/smollm2_lora --out exports/smollm2.gguf --format gguf --dtype q8_0

native: model.safetensors (our names; a tied lm_head.weight is left out: it is wte), config.json
    ({"format": "tinygpt-native", "model": ..., "config": the training config}), tokenizer_meta.json
hf: what transformers reads with from_pretrained(folder): GPT2LMHeadModel for model.arch = "gpt2",
    LlamaForCausalLM for "llama" (Qwen2ForCausalLM, Qwen3ForCausalLM for models read from those).
    model.safetensors (their names; GPT-2's Conv1D layout, i.e. Linear weights transposed; Llama's q/k/v and gate/up matrices split apart), config.json (theirs; ours
    under "tinygpt"), tokenizer_meta.json, and for GPT-2 BPE models its tokenizer files (vocab.json,
    merges.txt, tokenizer_config.json). A switch neither class has (qk_norm, a logit soft-cap, ...)
    is refused, by name.
gguf: one file for llama.cpp and Ollama (gguf_format.py), Llama, Qwen2 and Qwen3 models.
A LoRA run exports as the merged model (W + (alpha / r) B A, see lora.py), in either format. With
--adapters-only, only its adapters are written, in Hugging Face PEFT's layout (adapter_config.json,
adapter_model.safetensors), for PEFT to load onto the Hugging Face export of the base weights.
safetensors holds no pickle: loading runs no code. This file only writes; checkpoint.load_weights
reads either kind back in our names, for sample.py, training.init_from and export.py itself.
"""

from __future__ import annotations

# Before torch, which takes seconds to load: a Ctrl-C meanwhile ends in one line (errors.py).
from errors import UserError, command

import dataclasses
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

import gguf_format
import hf
from checkpoint import META_FILE, NATIVE, Weights, digest, is_export, load_weights
from config import doc
from templates import ChatML, answer_stops
from tokenizer import CHATML, load_tiktoken, tokenizer_from_meta
from options import parse
from files import atomic_file, atomic_write_text, lock, make_folder, staging_folder, sync_folder, write_json
from lora import is_adapter

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ADAPTER_CONFIG = "adapter_config.json"  # with adapter_model.safetensors: PEFT's adapter folder


class ExportError(UserError):
    """An export that cannot be written; the message says why and what to do."""


# ----------------------------------------------------------------------------- writing

def write_safetensors(path: Path, tensors: dict, dtype: str) -> None:
    """Tensors in `dtype` as safetensors ("pt": transformers wants it), written like every file that
    matters (files.atomic_file): flushed to disk, and a full disk is a one-line error.
    contiguous: transposed views and slices must be laid out as stored."""
    data = safetensors_bytes({k: v.to("cpu", DTYPES[dtype]).contiguous() for k, v in tensors.items()},
                             metadata={"format": "pt"})
    with atomic_file(path) as f:
        f.write(data)


def write_export(src: Weights, out: Path, fmt: str, dtype: str) -> None:
    """Write all files into `out` (a fresh staging folder; export() publishes it)."""
    state = hf.to_hf(src.state_dict, src.model) if fmt == "hf" else {
        k: v for k, v in src.state_dict.items() if not (k == "lm_head.weight" and src.model.tie_embeddings)}
    write_safetensors(out / "model.safetensors", state, dtype)
    source = {"step": src.step, "val_loss": src.val_loss}
    if fmt == "hf":
        config = hf.write_config(src.model, (src.meta or {}).get("eot_token"), dtype) | {
            "tinygpt": {"format_version": 1, "tokenizer": (src.meta or {}).get("tokenizer"),
                        "note": f"exported by tinygpt; our tokenizer is in {META_FILE}",
                        "model": dataclasses.asdict(src.model), "config": src.config, "source": source}}
    else:
        config = {"format": NATIVE, "format_version": 1, "dtype": dtype, "model": dataclasses.asdict(src.model),
                  "config": src.config, "source": source}
    write_json(out / "config.json", config)
    if src.meta is not None:
        write_json(out / META_FILE, src.meta)
    for name, text in (src.meta or {}).get("files", {}).items():  # a Hugging Face tokenizer's own files
        atomic_write_text(out / name, text)
    tokenizer = tokenizer_from_meta(src.meta) if fmt == "hf" and (src.meta or {}).get("markers") else None
    markers = tokenizer.markers if tokenizer else {}
    if markers:  # a model trained on conversations (ChatML): transformers' generate ends an answer where we do
        write_json(out / "generation_config.json", {"eos_token_id": sorted(answer_stops(tokenizer, ChatML()))})
    if fmt == "hf" and (src.meta or {}).get("encoding") in ("gpt2", "r50k_base"):
        vocab, merges = hf.gpt2_tokenizer_files(load_tiktoken("gpt2"))
        write_json(out / "vocab.json", vocab)
        atomic_write_text(out / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
        added = {str(i): {"content": m, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                          "single_word": False} for m, i in markers.items()}
        write_json(out / "tokenizer_config.json", {"tokenizer_class": "GPT2Tokenizer",
                                                   "model_max_length": src.model.block_size}
                   | ({"added_tokens_decoder": added, "chat_template": CHATML} if added else {}))


# ----------------------------------------------------------------------------- LoRA adapters for PEFT

def hf_base(src: Weights, given: str) -> Path:
    """The Hugging Face folder of the weights under `src`'s adapters, which PEFT loads them onto: `given`
    (--base), else the base the run started from; either must hold those very weights."""
    path = Path(given or src.lora.base["path"])
    base = load_weights(path)
    if base.format != "hf":
        name = path.parent.name if path.is_file() else path.name
        raise ExportError(f"--adapters-only: PEFT loads adapters onto a Hugging Face model, and the base "
                          f"{path} is not one ({base.format}); export it first (python export.py --ckpt {path} "
                          f"--out exports/{name}_hf --format hf), then add --base exports/{name}_hf")
    if digest(base.state_dict, base.model) != src.lora.base["digest"]:
        raise ExportError(f"--base {path} holds other weights than those the adapters were trained on "
                          f"({src.lora.base['path']}); pass the Hugging Face export of that one")
    return path


def write_adapters(src: Weights, out: Path, dtype: str, base: Path) -> None:
    """adapter_model.safetensors and adapter_config.json, as PEFT's save_pretrained writes them.

    PEFT names a module's adapters base_model.model.<module>.lora_A.weight, (r, in), and .lora_B.weight,
    (out, r), with the module names of the Hugging Face model (hf.module_names): our c_attn's adapters
    are three there, the q, k and v projections' of a Llama, or one, GPT-2's c_attn. GPT-2's layers
    are Conv1D, whose weight is (in, out) (fan_in_fan_out), but PEFT's A and B are ordinary Linear layers
    beside them, so nothing is transposed."""
    lora, cfg, state = src.lora.config, src.model, src.lora.state_dict
    tensors = {}
    for layer in sorted({k.rsplit(".", 1)[0] for k in state if is_adapter(k)}):  # transformer.h.0.attn.c_attn
        modules, B = hf.module_names(cfg, layer), state[layer + ".lora_B"]
        rows = hf.lora_parts(cfg).get(layer.split(".", 3)[3], [len(B)])  # "attn.c_attn": its projections' rows
        for module, A, B in zip(modules, state[layer + ".lora_A"].split(lora.rank), B.split(rows)):
            tensors[f"base_model.model.{module}.lora_A.weight"] = A
            tensors[f"base_model.model.{module}.lora_B.weight"] = B
    write_safetensors(out / "adapter_model.safetensors", tensors, dtype)
    # "model.layers.0.self_attn.q_proj" -> "self_attn.q_proj"; PEFT matches target_modules to the end of a name.
    targets = sorted({re.split(r"\.\d+\.", k.removeprefix("base_model.model."), maxsplit=1)[1].rsplit(".", 2)[0]
                      for k in tensors})
    write_json(out / ADAPTER_CONFIG, {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": targets,
        "fan_in_fan_out": bool(hf.architecture_of(cfg).transposed), "bias": "none", "inference_mode": True})
    if src.meta is not None:
        write_json(out / META_FILE, src.meta)


def export(ckpt: str | Path, out: str | Path, fmt: str = "native", dtype: str = "fp32",
           force: bool = False, adapters_only: bool = False, base: str = "") -> Path:
    """Export weights (a checkpoint, run folder or export) to `out`, or with `adapters_only` a LoRA run's
    adapters for PEFT (`base`: the HF export of its base weights)."""
    return export_weights(load_weights(ckpt), out, fmt, dtype, force, adapters_only, base)


def export_weights(src: Weights, out: str | Path, fmt: str, dtype: str, force: bool, adapters_only: bool,
                   base: str) -> Path:
    """export() of weights already read. The files are written to a staging folder that is renamed into
    place: a kill never leaves a half-written export behind."""
    out = Path(out)
    if out.resolve() == Path(src.path).resolve():  # --force would replace the weights being read
        raise ExportError(f"--out {out} is the --ckpt being exported; write the export to another --out")
    if adapters_only and fmt == "gguf":
        raise ExportError("--adapters-only writes PEFT's adapter folder, which has no GGUF form; export the whole "
                          "model as GGUF without --adapters-only, or the adapters without --format gguf")
    if fmt != "gguf" and out.suffix == ".gguf":
        raise ExportError(f"--out {out} ends in .gguf, but --format is {fmt} (a folder); add --format gguf, or "
                          "give --out a folder name")
    if adapters_only and src.lora is None:
        raise ExportError(f"--adapters-only: {src.path} is not a LoRA run, it has no adapters; export the "
                          "whole model without --adapters-only")
    base_folder = hf_base(src, base) if adapters_only else None
    if dtype in ("fp16", "q8_0"):  # q8_0 keeps its scales and small tensors in fp16
        check_fp16_range(src, dtype)
    if fmt in ("hf", "gguf") and not adapters_only:
        try:
            hf.check_exportable(src.model)
        except hf.FormatError as e:
            raise ExportError(e.problems) from None
    if fmt == "gguf":
        return export_gguf(src, out, dtype, force)
    if dtype == "q8_0":
        raise ExportError("--dtype q8_0 is for --format gguf (llama.cpp's 8-bit blocks); use fp32, fp16 or bf16")
    parent = make_folder(out.parent, "--out's folder")
    with lock(parent / f".{out.name}.lock", f"--out {out}"):
        if out.exists() and (out.is_file() or any(out.iterdir())):
            if not force:
                raise ExportError(f"{out} exists and is not empty; choose another --out, or add --force "
                                  "to replace an earlier export")
            if not exported_here(out):
                raise ExportError(f"{out} is not an export of tinygpt's, so --force will not delete it; choose "
                                  "another --out")
            check_not_a_lora_base(out, src, dtype)
        staging = staging_folder(out)  # this process's own: cleaning up never touches anything else
        try:
            if adapters_only:
                write_adapters(src, staging, dtype, base_folder)
            else:
                write_export(src, staging, fmt, dtype)
        except BaseException as e:  # incomplete: never published
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(e, OSError):
                raise ExportError(f"cannot write the export into {parent} ({e.strerror}); free some space or "
                                  "choose another --out") from None
            raise
        if out.exists():
            old = staging_folder(out)
            os.replace(out, old)  # rename(2) cannot replace a non-empty folder: move the old one aside
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
        sync_folder(parent)  # the rename survives a power cut
    return out


def exported_here(folder: Path) -> bool:
    """What --force may replace: a folder this script wrote (its config.json says so), or adapters for PEFT.
    Not a model downloaded from elsewhere, though it looks the same."""
    if (folder / ADAPTER_CONFIG).is_file():
        return True
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8")) if is_export(folder) else None
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and (config.get("format") == NATIVE or isinstance(config.get("tinygpt"), dict))


RUNS = Path("checkpoints")  # where train.py puts runs by default (training.out_dir): LoRA runs are looked for there


def check_not_a_lora_base(out: Path, src: Weights, dtype: str) -> None:
    """Refuse to replace an export that a LoRA run names as its base with other weights: its adapters need
    the weights they were trained on (their checkpoints keep only a digest of them). Runs are found by
    their readable checkpoint JSON in checkpoints/ and the folders in it."""
    runs = set()
    for path in [*RUNS.glob("ckpt_*.json"), *RUNS.glob("*/ckpt_*.json")]:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # not ours, or being written: not a run to keep
            continue
        base = record.get("lora_base") if isinstance(record, dict) else None
        config = record.get("config") if isinstance(record, dict) else None
        lora = config.get("lora") if isinstance(config, dict) else None
        full = isinstance(lora, dict) and lora.get("save") == "full"  # its checkpoints hold the base weights too
        if isinstance(base, dict) and not full and isinstance(base.get("path"), str) and \
                Path(base["path"]).resolve() == out.resolve():
            runs.add((str(path.parent), base.get("digest")))
    if not runs:
        return
    stored = DTYPES.get(dtype)  # q8_0 changes the weights in ways not computed here: never the same
    new = digest({k: v.to(stored) for k, v in src.state_dict.items()}, src.model) if stored else None
    needing = sorted(run for run, old in runs if old != new)
    if needing:
        run = needing[0]
        raise ExportError(f"{out} holds the base weights of the LoRA run {run}, whose adapters need them; export to "
                          f"another --out, or, to replace them anyway, first keep that run whole (python export.py "
                          f"--ckpt {run} --out {run}_merged) and remove {run}")


def check_fp16_range(src: Weights, dtype: str) -> None:
    """fp16 holds magnitudes up to 65,504: a weight beyond that would be written as inf, without a word."""
    limit = torch.finfo(torch.float16).max
    tensors = {t.data_ptr(): t for t in src.state_dict.values() if t.is_floating_point()}  # a tied one once
    over = sum(int((t.abs() > limit).sum()) for t in tensors.values())
    if over:
        raise ExportError(f"{over:,} weights of {src.path} are beyond fp16's range (+-65,504) and would be written "
                          f"as inf by --dtype {dtype}; export with --dtype bf16 or fp32, which hold them")


def export_gguf(src: Weights, out: Path, dtype: str, force: bool) -> Path:
    """One GGUF file (llama.cpp, Ollama), written to a temporary name and renamed into place."""
    if out.suffix != ".gguf":
        raise ExportError(f"--format gguf writes one file: give --out a name ending in .gguf, e.g. {out}.gguf")
    if hf.architecture_of(src.model).model_type not in gguf_format.ARCHITECTURES:
        raise ExportError(f"--format gguf writes {', '.join(gguf_format.ARCHITECTURES)} models, and this one is "
                          f"model.arch = {src.model.arch!r}; export with --format hf or native")
    parent = make_folder(out.parent, "--out's folder")
    with lock(parent / f".{out.name}.lock", f"--out {out}"):
        if out.exists() and not force:
            raise ExportError(f"{out} exists; choose another --out, or add --force to replace an earlier export")
        if out.exists() and (out.is_dir() or not gguf_format.exported_here(out)):
            raise ExportError(f"{out} is not a GGUF file exported by tinygpt, so --force will not replace it; "
                              "choose another --out")
        if out.exists():
            check_not_a_lora_base(out, src, dtype)
        tensors = hf.to_hf(src.state_dict, src.model)
        config = hf.write_config(src.model, (src.meta or {}).get("eot_token"), "fp32")
        with atomic_file(out) as f:
            try:
                gguf_format.write_gguf(Path(f.file.name), tensors, config, src.meta, dtype)
            except gguf_format.GGUFError as e:
                raise ExportError(e.problems) from None
    return out


# ----------------------------------------------------------------------------- command line

@dataclass
class ExportOptions:
    ckpt: str = doc("what to export: run folder, checkpoint, export, Hugging Face folder or GGUF file",
                    "checkpoints/small")
    out: str = doc("folder to create (required)", "")
    format: str = doc("native: for this code; hf: for transformers (its GPT-2, Llama, Qwen2 or Qwen3 class); gguf: "
                      "one file for llama.cpp and Ollama (--out NAME.gguf)", "native", choices=("native", "hf", "gguf"))
    dtype: str = doc("fp16/bf16 halve the file; q8_0 (gguf only) quarters it", "fp32", choices=(*DTYPES, "q8_0"))
    force: bool = doc("replace an earlier export in --out", False)
    adapters_only: bool = doc("a LoRA run's adapters alone, for Hugging Face PEFT (--format does not apply)",
                              False)
    base: str = doc("with --adapters-only: the Hugging Face export of the base weights; empty: the run's own "
                    "base, if it is one", "")


@command
def main(argv: list[str] | None = None) -> int:
    opts, _ = parse(argv, ExportOptions, sections=(), program="export.py", about=__doc__)
    if not opts.out:
        raise ExportError("--out is required: the folder to write the export to, e.g. --out exports/small")
    src = load_weights(opts.ckpt)
    out = export_weights(src, opts.out, opts.format, opts.dtype, opts.force, opts.adapters_only, opts.base)
    taken = f"{src.path}" + ("" if src.step is None else f" at step {src.step}")  # a running training's latest
    if opts.adapters_only:
        size = (out / "adapter_model.safetensors").stat().st_size
        base = json.loads((out / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
        print(f"exported the LoRA adapters of {taken} ({opts.dtype}, {size / 1e6:.2f} MB) to {out}\nnext: "
              f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {str(out)!r}) in peft")
        return 0
    if opts.format == "gguf":
        print(f"exported {taken} as gguf ({opts.dtype}, {out.stat().st_size / 1e6:.1f} MB) to {out}\nnext: "
              f"llama-cli -m {out}, or an Ollama Modelfile saying FROM {out}; python sample.py --ckpt {out} "
              "reads it too")
        return 0
    size = (out / "model.safetensors").stat().st_size
    hf_class = json.loads((out / "config.json").read_text()).get("architectures", [""])[0]
    print(f"exported {taken} as {opts.format} ({opts.dtype}, {size / 1e6:.1f} MB) to {out}\nnext: " +
          (f"{hf_class}.from_pretrained({str(out)!r}) in transformers" if opts.format == "hf" else
           f"python sample.py --ckpt {out}, or training.init_from = {str(out)!r} to fine-tune"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
