"""The pure-PyTorch chunked scan (the fallback without the native kernels: `SPARSE_SSM_NATIVE=0`, or no
compiler) on a CPU: how its chunk boundaries are computed, against the length.

    taskset -c 0 python bench/fallback.py            # 1 torch thread; writes bench/results/fallback.{json,md}

For the diagonal structure (state 16) and 8 x 8 blocks (state 16), lengths 256, 1024 and 4096,
forward + backward of `selective_scan_chunked` (batch 4, 8 heads of 32 channels, B/C shared by the
heads), interleaved round by round, medians:
- "one step per chunk": the boundary states one chunk per Python step (the CPU's path before the
  tree: `leaf` larger than the number of chunks), chunks of 8;
- "tree, leaf 4": the odd-even tree down to 4 chunks stepped one at a time (the default), chunks of 8;
- "tree, leaf 16" and "tree, chunks of 16": the neighbouring choices.
The table gives each variant's time and its ratio to "one step per chunk" (below 1: faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import write_results  # noqa: E402
from provenance import provenance  # noqa: E402
from sparse_ssm.ssm.scan import selective_scan_chunked  # noqa: E402
from sparse_ssm.ssm.structures import BlockStructure, DiagonalStructure  # noqa: E402

# name -> (chunk size T, leaf); a leaf of 10**9 never reaches the tree
VARIANTS = {"one step per chunk": (8, 10 ** 9), "tree, leaf 4": (8, 4), "tree, leaf 16": (8, 16),
            "tree, chunks of 16": (16, 4)}
STRUCTURES = {"diagonal N=16": DiagonalStructure(16), "block 8 N=16": BlockStructure(16, 8)}


def scan_inputs(structure, batch, length, heads, head_dim, seed=0):
    """(u, dt, A_raw, B, C, D) of the shared scan signature, float32, requiring gradients."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    N = structure.state_dim
    xs = [r(batch, length, heads, head_dim), torch.nn.functional.softplus(r(batch, length, heads) - 3),
          0.25 * r(batch, length, heads, structure.raw_size), r(batch, length, 1, N), r(batch, length, 1, N),
          r(batch, length, heads)]
    return [x.requires_grad_() for x in xs]


def forward_backward_s(structure, xs, chunk, leaf) -> float:
    """Seconds of one forward + backward of the chunked scan."""
    start = time.perf_counter()
    y, h = selective_scan_chunked(*xs, structure, "zoh", chunk_size=chunk, leaf=leaf)
    (y.sum() + h.sum()).backward()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="256,1024,4096")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    lengths = [int(x) for x in args.lengths.split(",")]
    cells = {(s, L): scan_inputs(STRUCTURES[s], args.batch, L, args.heads, args.head_dim)
             for s in STRUCTURES for L in lengths}
    times = {(s, L, v): [] for s, L in cells for v in VARIANTS}
    for rnd in range(args.rounds + 1):                  # round 0 warms up
        for (s, L), xs in cells.items():
            for v, (chunk, leaf) in VARIANTS.items():
                t = forward_backward_s(STRUCTURES[s], xs, chunk, leaf)
                if rnd:
                    times[(s, L, v)].append(t)
    rows = []
    for (s, L), _ in cells.items():
        base = statistics.median(times[(s, L, "one step per chunk")])
        for v, (chunk, leaf) in VARIANTS.items():
            ms = statistics.median(times[(s, L, v)]) * 1e3
            rows.append({"structure": s, "length": L, "variant": v, "chunk": chunk, "leaf": min(leaf, 10 ** 6),
                         "forward_backward_ms": ms, "ratio_to_one_step_per_chunk": ms / (base * 1e3)})
            print(rows[-1], flush=True)
    lines = ["# The pure-PyTorch fallback: chunk boundaries on a CPU", "",
             f"`selective_scan_chunked`, forward + backward, batch {args.batch}, {args.heads} heads of "
             f"{args.head_dim} channels, 1 thread, medians of {args.rounds} interleaved rounds "
             "(ratio: time / one step per chunk; below 1 is faster).", "",
             "| structure | length | variant | fwd+bwd (ms) | ratio |", "|---|---:|---|---:|---:|"]
    lines += [f"| {r['structure']} | {r['length']} | {r['variant']} | {r['forward_backward_ms']:.1f} | "
              f"{r['ratio_to_one_step_per_chunk']:.2f} |" for r in rows]
    setup = {k: getattr(args, k) for k in ("lengths", "batch", "heads", "head_dim", "rounds")}
    write_results(Path(args.out), "fallback", {"setup": setup, "variants": {k: list(v) for k, v in VARIANTS.items()},
                                               "rows": rows}, lines,
                  provenance(seeds=[0], scans="functions, no models (inputs from torch.Generator seed 0)",
                             threads=1))


if __name__ == "__main__":
    main()
