"""The benchmarks that bench.py runs, by name: BENCHMARKS below is the one list of them, in the order
they run. Each is a function of its own module, which says what it measures: speed.py (train, sample,
prepare, records, profile), quality.py (speedrun, ablation), finetune.py (lora), peers.py (peft), memory.py
(memory) and gpu.py (gpu); common.py holds what they share."""

from benchmarks import finetune, gpu, memory, peers, quality, speed

# name: (what it measures, the function (opts, cfg, device) -> table rows).
BENCHMARKS = {
    "train": ("ms per training step at each precision, and a plain eager loop", speed.bench_train),
    "sample": ("generation with and without the KV cache", speed.bench_sample),
    "prepare": ("prepare.py on 50 MB, char and bpe, against tiktoken alone", speed.bench_prepare),
    "records": ("prepare.py on 200 MB of JSONL pairs: time and peak memory", speed.bench_records),
    "profile": ("the operators a training step spends its time in", speed.bench_profile),
    "speedrun": ("the speedrun preset against the reference: wall time to val 1.88", quality.bench_speedrun),
    "ablation": ("what each change of the speedrun is worth", quality.bench_ablation),
    "lora": ("a LoRA run against a full fine-tune: time, memory, val loss", finetune.bench_lora),
    "peft": ("LoRA and generation against transformers + PEFT on a real model", peers.bench_peft),
    "memory": ("ddp vs fsdp per process; activation checkpointing", memory.bench_memory),
    "gpu": ("every check only a CUDA GPU can make, ok or FAILED", gpu.bench_gpu),
}
