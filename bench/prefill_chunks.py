"""Chunked prefill: time and peak memory of `model.prefill` on a 4,096-token prompt against the
chunk size (`generation.prefill_chunk_tokens` / `serve --prefill-chunk-tokens`), for the model of
config/small_cpu.yaml (random weights) at its width 128 and at width 512 (FFN twice the width).

    flock /work/core0.lock taskset -c 0 python bench/prefill_chunks.py [--rounds 3]

Time: one torch thread, the chunk sizes interleaved in every round, the median round.  Peak memory:
a fresh process per (width, chunk), its peak resident set (VmHWM) minus its resident set before
the prefill, with MALLOC_MMAP_MAX_=0 unless set (so freed blocks are not handed back to the OS
and the peak counts what the prefill held at once).  Writes bench/results/prefill_chunks.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from common import HERE, write_results  # noqa: E402
from provenance import provenance  # noqa: E402

ROOT = HERE.parent
PROMPT = 4096
CHUNKS = [0, 2048, 1024, 512, 256, 128, 64]            # 0: the whole prompt in one pass


def build(hidden: int):
    import torch
    import yaml

    from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM

    cfg = yaml.safe_load((ROOT / "config" / "small_cpu.yaml").read_text())["model"]
    cfg.update(hidden_dim=hidden, ffn_dim=2 * hidden)
    torch.manual_seed(0)
    model = SparseSSMForCausalLM(SparseSSMConfig(**cfg)).eval()
    return model, torch.randint(0, cfg["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(1))


def status_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":")) / 1024


def peak_child(hidden: int, chunk: int):
    """In a fresh process: print the MB the prefill added to the peak resident set."""
    model, ids = build(hidden)
    before = status_mb("VmRSS")
    model.prefill(ids, chunk_tokens=chunk or None)
    print(json.dumps(status_mb("VmHWM") - before))


def peak_mb(hidden: int, chunk: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_MAX_": os.environ.get("MALLOC_MMAP_MAX_", "0")}
    out = subprocess.run([sys.executable, __file__, "--peak-child", str(hidden), str(chunk)], env=env, check=True,
                         capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def seconds(model, ids, rounds: int) -> dict[int, list[float]]:
    """Seconds of one whole prefill of `ids` (1, PROMPT) per chunk size, the sizes interleaved in
    every round."""
    model.prefill(ids[:, :256])                                       # warm-up
    times = {chunk: [] for chunk in CHUNKS}
    for _ in range(rounds):
        for chunk in CHUNKS:
            start = time.perf_counter()
            model.prefill(ids, chunk_tokens=chunk or None)
            times[chunk].append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="128,512", help="model widths (default 128,512)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-dir", default=str(HERE / "results"))
    parser.add_argument("--peak-child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        return peak_child(*args.peak_child)
    import torch
    torch.set_num_threads(1)
    rows, models = [], {}
    for hidden in (int(w) for w in args.widths.split(",")):
        model, ids = build(hidden)
        models[f"width {hidden}"] = model
        times = seconds(model, ids, args.rounds)
        whole = statistics.median(times[0])
        for chunk in CHUNKS:
            s = statistics.median(times[chunk])
            rows.append({"hidden": hidden, "chunk": chunk or PROMPT, "seconds": s, "rounds_seconds": times[chunk],
                         "tokens_per_s": PROMPT / s, "vs_whole": whole / s,
                         "chunk_ms": 1000 * s * (chunk or PROMPT) / PROMPT,
                         "peak_mb": peak_mb(hidden, chunk)})
    lines = [f"| width | chunk (tokens) | prefill of {PROMPT:,} tokens | tokens/s | × one pass | one chunk "
             f"| peak memory added |", "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['hidden']} | {r['chunk']:,}{' (one pass)' if r['chunk'] == PROMPT else ''} | "
              f"{1000 * r['seconds']:,.0f} ms | {r['tokens_per_s']:,.0f} | {r['vs_whole']:.2f} | "
              f"{r['chunk_ms']:,.1f} ms | "
              f"{r['peak_mb']:,.0f} MB |" for r in rows]
    write_results(Path(args.output_dir), "prefill_chunks", {"prompt_tokens": PROMPT, "rows": rows}, lines,
                  provenance(models, rounds=args.rounds, widths=args.widths, model="config/small_cpu.yaml, random weights",
                             peak_memory_malloc_env={"MALLOC_MMAP_MAX_": os.environ.get("MALLOC_MMAP_MAX_", "0")}))


if __name__ == "__main__":
    main()
