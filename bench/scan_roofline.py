"""The selective scan alone against what this machine can do: the fraction of the roofline reached.

    python bench/scan_roofline.py            # 1 torch thread; writes bench/results/scan_roofline.{json,md,png}

Shapes (the Mamba-1 paper's block at small scale): batch 4, length 1024, 512 channels, state 16;
Mamba-2 style layouts use 8 heads of 64 channels.  Scans compared, interleaved round by round:
- sparse-ssm's fused kernel (`selective_scan_fused`, the model's path on CPUs: A per head and
  state, B/C shared by the heads), its pure-PyTorch chunked scan (`selective_scan_chunked`, the
  fallback without a compiler) and its sequential loop (`selective_scan_sequential`);
- transformers' Mamba-2 pure-torch SSD (`mamba2_chunk_scan`, chunk 64; A per head);
- mambapy's parallel scan (`pscan` on (B, L, ED, N) tensors; A per channel and state).

The floor of each: its minimal work is the recurrence itself, 5 flops per (batch, token,
channel, state) element (X = a*X + b*u: 3; y += C*X: 2), and its minimal traffic the bytes of
its inputs and output once (fp32).  Time floor = max(bytes / copy bandwidth, flops / matmul
rate), both measured here on 1 thread (the results carry their provenance: commit, versions, CPU); forward + backward is taken as 3x the forward floor.
Fraction of the roofline = floor / measured time (1.0 would be a perfect fused kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import pyplot, write_results  # noqa: E402
from provenance import provenance  # noqa: E402
from sparse_ssm.ssm.fused import selective_scan_fused  # noqa: E402
from sparse_ssm.ssm.scan import selective_scan_chunked, selective_scan_sequential  # noqa: E402
from sparse_ssm.ssm.structures import DiagonalStructure  # noqa: E402


def machine_limits(repeats=5):
    """(copy GB/s counting read + write, fp32 matmul GFLOP/s), best of `repeats`."""
    src = torch.randn(64 * 2 ** 20)           # 256 MB
    dst = torch.empty_like(src)
    copy = min(_time(lambda: dst.copy_(src)) for _ in range(repeats))
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    mm = min(_time(lambda: a @ b) for _ in range(repeats))
    return 2 * src.numel() * 4 / copy / 1e9, 2 * 1024 ** 3 / mm / 1e9


def _time(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cases(batch, length, channels, state, heads):
    P = channels // heads
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)
    out = {}

    # ours: u (b, L, h, P), dt (b, L, h), A's raw parameters (b, L, h, N) (A = -exp(2 raw)),
    # B/C (b, L, groups = 1, N) shared by the heads as in Mamba-2, D (b, L, h)
    u, dt = r(batch, length, heads, P), torch.nn.functional.softplus(r(batch, length, heads) - 3)
    raw = 0.25 * r(batch, length, heads, state)
    B, C, D = r(batch, length, 1, state), r(batch, length, 1, state), r(batch, length, heads)
    ours_inputs = [u, dt, raw, B, C, D]
    structure = DiagonalStructure(state)
    ours_bytes = 4 * (2 * u.numel() + dt.numel() + raw.numel() + B.numel() + C.numel() + D.numel())
    out["sparse-ssm fused (diagonal, the model's path)"] = (
        lambda u, dt, a, B, C, D: selective_scan_fused(u, dt, a, B, C, D, structure, "zoh")[0], ours_inputs, ours_bytes)
    out["sparse-ssm chunked (pure PyTorch)"] = (
        lambda u, dt, a, B, C, D: selective_scan_chunked(u, dt, a, B, C, D, structure, "zoh", chunk_size=8)[0],
        ours_inputs, ours_bytes)
    out["sparse-ssm sequential"] = (
        lambda u, dt, a, B, C, D: selective_scan_sequential(u, dt, a, B, C, D, structure, "zoh")[0],
        ours_inputs, ours_bytes)

    try:   # transformers Mamba-2 SSD: x (b, L, h, P), dt (b, L, h), A (h,), B/C (b, L, groups=1, N), D (h,)
        from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan
        A2, B2, C2, D2 = -torch.exp(r(heads)), r(batch, length, 1, state), r(batch, length, 1, state), r(heads)
        inputs = [u, dt, A2, B2, C2, D2]
        nbytes = 4 * (2 * u.numel() + dt.numel() + A2.numel() + B2.numel() + C2.numel() + D2.numel())
        out["transformers Mamba-2 SSD (chunk 64)"] = (
            lambda x, dt, A, B, C, D: mamba2_chunk_scan(x, dt, A, B, C, chunk_size=64, D=D), inputs, nbytes)
    except ImportError as e:
        print(f"skipping transformers Mamba-2: {e}")
    try:   # mambapy: x/delta (b, L, ED), A (ED, N), B/C (b, L, N), D (ED)
        from mambapy.mamba import MambaBlock
        x, delta = r(batch, length, channels), torch.nn.functional.softplus(r(batch, length, channels) - 3)
        A1, B1, C1, D1 = -torch.exp(r(channels, state)), r(batch, length, state), r(batch, length, state), r(channels)
        inputs = [x, delta, A1, B1, C1, D1]
        nbytes = 4 * (3 * x.numel() + A1.numel() + B1.numel() + C1.numel() + D1.numel())
        out["mambapy pscan"] = (lambda x, d, A, B, C, D: MambaBlock.selective_scan(None, x, d, A, B, C, D),
                                inputs, nbytes)
    except ImportError as e:
        print(f"skipping mambapy: {e}")
    return out


def run(fn, inputs, backward):
    if not backward:
        with torch.no_grad():
            return _time(lambda: fn(*inputs))
    leaves = [t.detach().requires_grad_(True) for t in inputs]

    def step():
        y = fn(*leaves)
        y.backward(torch.ones_like(y))
    return _time(step)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-sequential", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bandwidth, gflops = machine_limits()
    print(f"copy bandwidth {bandwidth:.1f} GB/s, fp32 matmul {gflops:.1f} GFLOP/s ({args.threads} thread)")
    table = cases(args.batch, args.length, args.channels, args.state, args.heads)
    if args.skip_sequential:
        table.pop("sparse-ssm sequential")
    elements = args.batch * args.length * args.channels * args.state
    flops = 5 * elements
    times = {(name, bwd): [] for name in table for bwd in (False, True)}
    for name, (fn, inputs, _) in table.items():          # warm-up
        run(fn, inputs, False)
        run(fn, inputs, True)
    for _ in range(args.rounds):
        for name, (fn, inputs, _) in table.items():
            for bwd in (False, True):
                times[(name, bwd)].append(run(fn, inputs, bwd))
    rows = []
    for name, (_, _, nbytes) in table.items():
        floor = max(nbytes / (bandwidth * 1e9), flops / (gflops * 1e9))
        fwd, both = statistics.median(times[(name, False)]), statistics.median(times[(name, True)])
        rows.append({"scan": name, "bytes_min": nbytes, "flops_min": flops, "floor_forward_ms": floor * 1e3,
                     "forward_ms": fwd * 1e3, "forward_fraction": floor / fwd,
                     "forward_backward_ms": both * 1e3, "forward_backward_fraction": 3 * floor / both,
                     "bound": "memory" if nbytes / bandwidth > flops / gflops else "compute"})
        print(json.dumps(rows[-1]))
    out = Path(args.out)
    setup = {k: getattr(args, k) for k in ("batch", "length", "channels", "state", "heads", "rounds", "threads")}
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    lines = ["# Selective scan against the roofline", "",
             f"batch {args.batch}, length {args.length}, {args.channels} channels, state {args.state} "
             f"({args.heads} heads for Mamba-2 layouts); {args.threads} thread; {machine}; measured copy "
             f"{bandwidth:.1f} GB/s, matmul {gflops:.1f} GFLOP/s; medians of {args.rounds} interleaved rounds.", "",
             "| scan | floor fwd (ms) | forward (ms) | fraction | fwd+bwd (ms) | fraction |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['scan']} | {r['floor_forward_ms']:.2f} | {r['forward_ms']:.1f} | {r['forward_fraction']:.1%} | "
              f"{r['forward_backward_ms']:.1f} | {r['forward_backward_fraction']:.1%} |" for r in rows]
    write_results(out, "scan_roofline", {"setup": setup, "machine": machine, "copy_gb_s": bandwidth,
                                         "matmul_gflop_s": gflops, "rows": rows}, lines,
                  provenance(seeds=[0], scans="functions, no models (inputs from torch.Generator seed 0)"))
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 3.2))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [100 * r["forward_fraction"] for r in rows], 0.4, label="forward")
    ax.barh([i - 0.2 for i in y], [100 * r["forward_backward_fraction"] for r in rows], 0.4, label="forward+backward")
    ax.set_yticks(list(y), [r["scan"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("% of the roofline (higher is better)")
    ax.set_title(f"Selective scan, B{args.batch} L{args.length} D{args.channels} N{args.state}, 1 CPU thread")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "scan_roofline.png", dpi=110)


if __name__ == "__main__":
    main()
