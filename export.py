"""Export a checkpoint as safetensors weights: a "native" folder, or a Hugging Face GPT-2 folder.

    python export.py --ckpt checkpoints/small --out exports/small                 # native
    python export.py --ckpt checkpoints/small --out exports/small_hf --format hf  # transformers
    python export.py --ckpt checkpoints/small --out exports/small_fp16 --dtype fp16

native: model.safetensors (our names; lm_head.weight is left out: it is wte, tied), config.json
    ({"format": "tinygpt-native", "model": ..., "config": the training config}), tokenizer_meta.json
hf: what transformers' GPT2LMHeadModel.from_pretrained(folder) reads: model.safetensors (GPT-2's
    names and its Conv1D layout, i.e. Linear weights transposed), config.json (GPT-2's; ours under
    "tinygpt"), tokenizer_meta.json, and for GPT-2 BPE models its tokenizer files (vocab.json,
    merges.txt, tokenizer_config.json)
safetensors holds no pickle: loading runs no code. Our meta is not named tokenizer.json because
transformers reads that name as its own format. load_export(folder) reads either kind back in our
names; train.py (training.init_from) and sample.py use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from checkpoint import CheckpointError, load_checkpoint
from config import ModelConfig
from data import EOT_TEXT, DataError, load_tiktoken
from model import GPT

NATIVE = "tinygpt-native"
META_FILE = "tokenizer_meta.json"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HF_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_META = {"tokenizer": "bpe", "encoding": "gpt2", "eot_token": 50256, "vocab_size": 50257}


class ExportError(Exception):
    """An export that cannot be written or read; the message says why and what to do."""


# ----------------------------------------------------------------------------- finding weights

def find_checkpoint(path: str | None) -> Path:
    """A checkpoint file or export folder: `path` itself, or ckpt_best.pt / ckpt_last.pt in a run
    folder (checkpoints/ when no path is given)."""
    if path and not Path(path).exists():
        raise CheckpointError(f"{path} does not exist; pass a checkpoint (ckpt_*.pt), a run folder "
                              "or an export folder")
    folder = Path(path or "checkpoints")
    if folder.is_file() or is_export(folder):
        return folder
    for name in ("ckpt_best.pt", "ckpt_last.pt"):
        if (folder / name).is_file():
            return folder / name
    runs = sorted({str(p.parent) for p in Path("checkpoints").glob("*/ckpt_*.pt")})
    hint = f" (runs found: {', '.join(runs)})" if runs and not path else ""
    raise CheckpointError(f"no checkpoint in {folder}/: no ckpt_best.pt or ckpt_last.pt; train first, or "
                          f"pass --ckpt with a checkpoint, run folder or export folder{hint}")


def is_export(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def load_weights(path: str | Path, device: str = "cpu") -> dict:
    """load_export's dict for a checkpoint file or an export folder, plus its step and val_loss,
    and "checkpoint": the whole checkpoint (optimizer and loop state too), or None for an export."""
    if is_export(Path(path)):
        return load_export(path, device) | {"checkpoint": None}
    ckpt = load_checkpoint(path, device)
    return {"model_config": ckpt["config"]["model"], "state_dict": ckpt["model"], "meta": ckpt.get("meta"),
            "config": ckpt["config"], "format": "checkpoint", "dtype": "fp32",
            "step": ckpt.get("step"), "val_loss": ckpt.get("val_loss"), "checkpoint": ckpt}


def model_config_from_dict(values: dict) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ExportError(f"model settings {', '.join(unknown)} are unknown to this code (written by a "
                          "newer version?); update the code")
    return ModelConfig(**values)


# ----------------------------------------------------------------------------- Hugging Face layout

def hf_problems(cfg: ModelConfig) -> list[str]:
    """Settings GPT-2 has no equivalent for. getattr: these fields may not exist (yet)."""
    out = []
    if getattr(cfg, "pos_emb", "learned") != "learned":
        out.append(f"model.pos_emb = {cfg.pos_emb!r}: GPT-2 has learned position embeddings only")
    if getattr(cfg, "norm", "layernorm") != "layernorm":
        out.append(f"model.norm = {cfg.norm!r}: GPT-2 uses LayerNorm only")
    return out


def to_hf(state: dict, cfg: ModelConfig) -> dict:
    """Our state dict -> GPT-2's. Both use the same names; GPT-2 stores Linear weights as Conv1D
    (in, out), has biases everywhere and no vocabulary padding."""
    state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # tied to wte: stored once
    for name, w in list(state.items()):
        # bias = false is the same model as zero biases, so the export is exact.
        if name.endswith(".weight") and "wte" not in name and "wpe" not in name:
            state.setdefault(name[:-len("weight")] + "bias", torch.zeros(w.shape[0], dtype=w.dtype))
    state["transformer.wte.weight"] = state["transformer.wte.weight"][:cfg.vocab_size]  # no padding rows
    return {k: v.t() if k.endswith(CONV1D) else v for k, v in state.items()}


def from_hf(state: dict, cfg: ModelConfig) -> dict:
    """GPT-2's state dict (with or without the "transformer." prefix) -> ours, for `cfg`."""
    out = {}
    for name, w in state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue  # old files carry the causal mask as a buffer; lm_head is wte
        name = name if name.startswith("transformer.") else "transformer." + name
        out[name] = w.t() if name.endswith(CONV1D) else w
    if not cfg.bias:  # we exported zero biases; anything else is a different model
        if any(v.any() for k, v in out.items() if k.endswith(".bias")):
            raise ExportError("this hf folder has non-zero biases but model.bias = false in its config")
        out = {k: v for k, v in out.items() if not k.endswith(".bias")}
    wte, m = out.get("transformer.wte.weight"), cfg.pad_vocab_multiple
    if wte is not None:  # padding rows as in GPT.padded_vocab_size (never used), and lm_head tied again
        wte = torch.cat([wte, wte.new_zeros((cfg.vocab_size + m - 1) // m * m - len(wte), wte.size(1))])
        out["transformer.wte.weight"] = out["lm_head.weight"] = wte
    return out


def hf_config(cfg: ModelConfig, src: dict, dtype: str) -> dict:
    eot = (src["meta"] or {}).get("eot_token")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_embd": cfg.n_embd, "n_positions": cfg.block_size,
            "n_ctx": cfg.block_size, "vocab_size": cfg.vocab_size, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.attn_dropout, "tie_word_embeddings": True,
            "bos_token_id": eot, "eos_token_id": eot, "torch_dtype": HF_DTYPES[dtype],
            "tinygpt": {"format_version": 1, "tokenizer": (src["meta"] or {}).get("tokenizer"),
                        "note": "exported by tinygpt; our tokenizer is in tokenizer_meta.json",
                        "model": dataclasses.asdict(cfg), "config": src["config"]}}


def hf_model_config(hf: dict) -> dict:
    """Our model config for a GPT-2 config.json written by someone else (e.g. the hub's gpt2)."""
    if hf.get("n_inner") == 4 * hf["n_embd"]:
        hf = hf | {"n_inner": None}  # None means 4 * n_embd, the only MLP width we have
    problems = [f"{k} = {hf.get(k)!r} (we support {ok!r})" for k, ok in (
        ("activation_function", "gelu_new"), ("layer_norm_epsilon", 1e-5), ("n_inner", None),
        ("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False)) if hf.get(k, ok) != ok]
    if problems:
        raise ExportError(f"this GPT-2 variant cannot be loaded: {'; '.join(problems)}")
    return dataclasses.asdict(ModelConfig()) | {
        "n_layer": hf["n_layer"], "n_head": hf["n_head"], "n_embd": hf["n_embd"], "bias": True,
        "block_size": hf["n_positions"], "vocab_size": hf["vocab_size"],
        "dropout": hf.get("resid_pdrop", 0.0), "attn_dropout": hf.get("attn_pdrop", 0.0)}


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


# ----------------------------------------------------------------------------- writing, reading

def write_export(src: dict, out: Path, fmt: str, dtype: str) -> None:
    """Write all files into `out` (a fresh staging folder; export() publishes it)."""
    cfg = model_config_from_dict(src["model_config"])
    problems = hf_problems(cfg) if fmt == "hf" else []
    if problems:
        raise ExportError(f"cannot export to the hf format: {'; '.join(problems)}; use --format native")
    state = to_hf(src["state_dict"], cfg) if fmt == "hf" else \
        {k: v for k, v in src["state_dict"].items() if k != "lm_head.weight"}  # tied to wte
    # contiguous: transposed views and slices must be laid out as stored; "pt": transformers wants it.
    save_file({k: v.to("cpu", DTYPES[dtype]).contiguous() for k, v in state.items()},
              out / "model.safetensors", metadata={"format": "pt"})
    config = hf_config(cfg, src, dtype) if fmt == "hf" else {
        "format": NATIVE, "format_version": 1, "dtype": dtype, "model": dataclasses.asdict(cfg),
        "config": src["config"], "source": {k: src.get(k) for k in ("step", "val_loss")}}
    write_json(out / "config.json", config)
    if src["meta"] is not None:
        write_json(out / META_FILE, src["meta"])
    if fmt == "hf" and (src["meta"] or {}).get("encoding") in ("gpt2", "r50k_base"):
        vocab, merges = gpt2_tokenizer_files(load_tiktoken("gpt2"))
        write_json(out / "vocab.json", vocab)
        (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        write_json(out / "tokenizer_config.json", {"tokenizer_class": "GPT2Tokenizer",
                                                   "model_max_length": cfg.block_size})


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export(ckpt: str | Path, out: str | Path, fmt: str = "native", dtype: str = "fp32",
           force: bool = False) -> Path:
    """Export a checkpoint (or an export folder) to `out`. The files are written to a staging folder
    that is renamed into place: a kill never leaves a half-written export behind."""
    out = Path(out)
    if out.exists() and (out.is_file() or any(out.iterdir())):
        if not force:
            raise ExportError(f"{out} exists and is not empty; choose another --out, or add --force "
                              "to replace an earlier export")
        if not is_export(out):
            raise ExportError(f"{out} is not an export, so --force will not delete it; choose another --out")
    src = load_weights(ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old.tmp")
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
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


def load_export(folder: str | Path, device: str | torch.device = "cpu") -> dict:
    """Read a native or hf export. Returns {"model_config": dict for ModelConfig(**...),
    "state_dict": fp32 tensors in our names (lm_head.weight is wte, tied), "meta": tokenizer meta or
    None, "config": the stored training config dict or None, "format": "native" | "hf", "dtype"}."""
    folder = Path(folder)
    if not is_export(folder):
        raise ExportError(f"{folder} is not an export: it needs config.json and model.safetensors; "
                          "make one with python export.py --ckpt CHECKPOINT --out FOLDER")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        tensors = load_file(folder / "model.safetensors")
        meta_path = folder / META_FILE
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else None
    except Exception as e:  # truncated, or not JSON / safetensors at all
        raise ExportError(f"{folder} cannot be read ({type(e).__name__}: {e}); export it again") from None
    state = {k: v.to(device, torch.float32) for k, v in tensors.items()}
    if config.get("format") == NATIVE:
        out = {"model_config": config["model"], "state_dict": state, "meta": meta, "format": "native",
               "config": config.get("config"), "dtype": config.get("dtype", "fp32")}
        if "transformer.wte.weight" in state:
            state["lm_head.weight"] = state["transformer.wte.weight"]  # tied
    elif config.get("model_type") == "gpt2":
        ours = config.get("tinygpt", {})
        model_config = ours.get("model") or hf_model_config(config)
        if meta is None and config["vocab_size"] == GPT2_META["vocab_size"]:
            meta = dict(GPT2_META)  # a GPT-2 BPE model from elsewhere
        hf_dtype = config.get("torch_dtype") or config.get("dtype")
        out = {"model_config": model_config, "meta": meta, "config": ours.get("config"), "format": "hf",
               "state_dict": from_hf(state, model_config_from_dict(model_config)),
               "dtype": {v: k for k, v in HF_DTYPES.items()}.get(hf_dtype, "fp32")}
    else:
        raise ExportError(f"{folder}/config.json is neither a tinygpt export nor a GPT-2 config "
                          f"(model_type {config.get('model_type')!r})")
    check_fits(out["state_dict"], out["model_config"], folder)
    return out


def check_fits(state: dict, model_config: dict, folder: Path) -> None:
    """Refuse weights that would not load into GPT(model_config), naming what differs. The model
    is built on the "meta" device: shapes only, no memory, so this is cheap even for big models."""
    try:
        with torch.device("meta"):
            expected = GPT(model_config_from_dict(model_config)).state_dict()
    except ValueError as e:  # GPT's own config checks
        raise ExportError(f"{folder}/config.json: {e}") from None
    wrong = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
    wrong += [k for k in state if k not in expected]
    if wrong:
        raise ExportError(f"{folder}: the weights do not fit its config.json ({', '.join(wrong[:3])}); "
                          "export it again")


# ----------------------------------------------------------------------------- command line

class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        self.exit(2, f"error: {message}; see python {self.prog} --help\n")


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="export.py", description="Export a checkpoint to safetensors (native or hf).")
    p.add_argument("--ckpt", help="checkpoint, run folder or export (default: checkpoints/ckpt_best.pt)")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--format", choices=("native", "hf"), default="native",
                   help="native: for this code; hf: for transformers' GPT2LMHeadModel (default: native)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="fp16/bf16 halve the file (default: fp32)")
    p.add_argument("--force", action="store_true", help="replace an earlier export in --out")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (2, already reported)
        return int(e.code or 0)
    try:
        out = export(find_checkpoint(args.ckpt), args.out, args.format, args.dtype, args.force)
    except (CheckpointError, ExportError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = (out / "model.safetensors").stat().st_size
    print(f"exported {args.format} ({args.dtype}, {size / 1e6:.1f} MB) to {out}\nnext: " +
          (f"GPT2LMHeadModel.from_pretrained({str(out)!r}) in transformers" if args.format == "hf" else
           f"python sample.py --ckpt {out}, or training.init_from = {str(out)!r} to fine-tune"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
