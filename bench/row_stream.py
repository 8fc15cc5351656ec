"""One core's read bandwidth for a one-row product by the order the weight is read in (row after row
in one stream, with and without software prefetch, against tiles of four rows side by side): compiles
and runs `bench/row_stream.c` (AVX-512, gcc) for row lengths 768 and 1,536, pinned to one core.

    python bench/row_stream.py [--cpu 0] [--lengths 768 1536]

writes bench/results/row_stream.json and .md.  A measurement, not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", type=int, default=0, help="the core the measurement is pinned to")
    parser.add_argument("--lengths", type=int, nargs="+", default=[768, 1536], help="row lengths (multiples of 64)")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    compiler = shutil.which("gcc")
    if compiler is None:
        sys.exit("bench/row_stream.py needs gcc (apt install gcc) to build bench/row_stream.c")
    from common import write_results
    from provenance import provenance
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "row_stream"
        subprocess.run([compiler, "-O3", "-march=native", str(HERE / "row_stream.c"), "-o", str(binary)], check=True)
        outputs = [subprocess.run([str(binary), str(n)], capture_output=True, text=True, check=True,
                                  preexec_fn=lambda: os.sched_setaffinity(0, {args.cpu})).stdout for n in args.lengths]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    setup = {"lengths": args.lengths, "cpu": args.cpu, "compiler": version, "flags": "-O3 -march=native",
             "weight_mb": 360, "rounds": 11}
    lines = ["# Read order of a one-row product (`bench/row_stream.c`)", "",
             "GB/s over a weight larger than the caches, median and best of 11 interleaved rounds, one core:",
             "", "```", *[line for out in outputs for line in out.rstrip().splitlines()], "```"]
    write_results(Path(args.out), "row_stream", {"setup": setup, "outputs": outputs}, lines,
                  provenance(seeds=None, cpu=args.cpu))


if __name__ == "__main__":
    main()
