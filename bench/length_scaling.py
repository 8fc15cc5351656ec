"""Cost against sequence length at a fixed number of tokens per step.

    python bench/length_scaling.py [--tokens 4096] [--lengths 128,256,512,1024,2048,4096] [--rounds 3]
                                   [--models sparse-ssm,sparse-ssm-full-logits,mamba2,gpt2]

For each length L the batch is tokens / L, so a model whose cost is linear in the sequence length
keeps a flat time per step.  Models (random weights, the train-step bench's size, train mode,
dropout 0): ours (default diagonal, no FFN) with its fused loss as users train it and, as
`sparse-ssm-full-logits`, on the peers' loss path (full logits, then cross-entropy),
`transformers` Mamba-2 and GPT-2 (2 layers, SDPA attention).  One training step (forward +
loss + backward + AdamW) per model per round, interleaved; median seconds per step, the growth
from the shortest to the longest length, the exponent of a log-log fit of time against L, and the
peak RSS of one step in a fresh process.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
from common import peak_rss_gb, write_results  # noqa: E402
from provenance import provenance  # noqa: E402
from train_step import EXPAND, HIDDEN, LAYERS, LOSS_PATHS, STATE, VOCAB, make_step, ours  # noqa: E402

MODELS = ("sparse-ssm", "sparse-ssm-full-logits", "mamba2", "gpt2")


def build(name, max_len):
    if name.startswith("sparse-ssm"):   # no position limit: the state carries any length
        return ours(ffn_dim=0, full_logits=name.endswith("full-logits"))
    if name == "mamba2":
        return peers.hf_mamba2(VOCAB, HIDDEN, LAYERS, STATE, EXPAND)
    return peers.hf_gpt2(VOCAB, HIDDEN, 2, max_len)


def slope(lengths, times):
    xs, ys = [math.log(x) for x in lengths], [math.log(y) for y in times]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--lengths", default="128,256,512,1024,2048,4096")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of: {', '.join(MODELS)}")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lengths = [int(x) for x in args.lengths.split(",")]
    names = args.models.split(",")
    if any(n not in MODELS for n in names):
        ap.error(f"--models {args.models!r}: choose from {', '.join(MODELS)}")
    steps, models = {}, {}
    for name in names:
        models[name], loss = build(name, max(lengths))
        steps[name] = make_step(models[name], loss)
    rows = []
    for L in lengths:
        ids = torch.randint(0, VOCAB, (max(1, args.tokens // L), L))
        for step in steps.values():
            step(ids)                                   # warm-up at this shape
        times = {n: [] for n in names}
        for _ in range(args.rounds):
            for n in names:
                t0 = time.perf_counter()
                steps[n](ids)
                times[n].append(time.perf_counter() - t0)
        for n in names:
            rss = None if args.no_memory else peak_rss_gb(
                f"import length_scaling as b; m, f = b.build({n!r}, {max(lengths)}); s = b.make_step(m, f);"
                f"ids = torch.randint(0, b.VOCAB, ({ids.shape[0]}, {L})); s(ids); s(ids)", args.threads)
            rows.append({"model": n, "length": L, "batch": ids.shape[0], "step_s": statistics.median(times[n]),
                         "peak_rss_gb": rss})
        print(f"L={L}: " + ", ".join(f"{r['model']} {r['step_s']:.2f}s" for r in rows if r["length"] == L), flush=True)
    summary = {}
    for n in names:
        ts = [r["step_s"] for r in rows if r["model"] == n]
        summary[n] = {"growth": ts[-1] / ts[0], "loglog_exponent": slope(lengths, ts)}
    lines = ["| length | batch | " + " | ".join(f"{n} s/step (GB)" for n in names) + " |",
             "|---:|---:|" + "---:|" * len(names)]
    for L in lengths:
        cells = [next(r for r in rows if r["model"] == n and r["length"] == L) for n in names]
        mem = lambda r: "" if r["peak_rss_gb"] is None else f" ({r['peak_rss_gb']:.2f})"
        lines.append(f"| {L} | {cells[0]['batch']} | " + " | ".join(f"{c['step_s']:.2f}{mem(c)}" for c in cells) + " |")
    lines.append(f"| growth {lengths[0]}→{lengths[-1]} | | " + " | ".join(f"{summary[n]['growth']:.2f}×" for n in names) + " |")
    lines.append("| log-log exponent | | " + " | ".join(f"{summary[n]['loglog_exponent']:.2f}" for n in names) + " |")
    loss_paths = {n: LOSS_PATHS["fused" if n == "sparse-ssm" else "full-logits"] for n in names}
    lines += ["", f"{args.tokens} tokens per step, median of {args.rounds} interleaved rounds; every model in train "
              f"mode with dropout 0; loss: " + "; ".join(f"{n}: {p}" for n, p in loss_paths.items()) + "."]
    write_results(Path(args.out), "length_scaling",
                  {"tokens_per_step": args.tokens, "threads": args.threads, "rounds": args.rounds,
                   "loss_paths": loss_paths, "rows": rows, "summary": summary}, lines, provenance(models, seeds=[0]))


if __name__ == "__main__":
    main()
