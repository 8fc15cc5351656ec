"""The LM head at decoding, timed: F.linear against the native few-rows kernel
(`sparse_ssm.ssm.kernels.lm_head_rows`) for the 130 M model's head (50,280 x 768), interleaved in
one process, each call after a sweep of `--flush-mb` MB of other memory (the layers' weights a
decoding step reads between two heads evict the head from the caches):

    python bench/lm_head.py [--rows 1 8] [--dtypes float32 bfloat16] [--repeats 30] [--flush-mb 256]

prints the median ms of each and the weight's bytes / median time.  A measurement, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--vocab", type=int, default=50280)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--flush-mb", type=int, default=256)
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F

    from sparse_ssm.ssm.kernels import lm_head_rows
    torch.set_num_threads(1)
    flush = torch.ones(args.flush_mb << 18)
    for dtype in [getattr(torch, d) for d in args.dtypes]:
        weight = torch.randn(args.vocab, args.dim).to(dtype)
        for rows in args.rows:
            x = torch.randn(rows, args.dim).to(dtype)
            ways = {"F.linear": lambda: F.linear(x, weight), "native": lambda: lm_head_rows(x, weight)}
            times = {name: [] for name in ways}
            for _ in range(args.repeats):
                for name, fn in ways.items():
                    flush.add_(1) if args.flush_mb else None
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            gb = weight.numel() * weight.element_size() / 1e9
            print(f"{str(dtype)[6:]:8s} rows {rows}: " + "  ".join(
                f"{name} {1e3 * statistics.median(t):.2f} ms ({gb / statistics.median(t):.1f} GB/s)"
                for name, t in times.items()))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
