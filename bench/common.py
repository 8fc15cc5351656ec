"""Shared by the benchmarks: peak memory of a piece of work in a fresh process, results files, plots, flags."""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def peak_rss_gb(setup: str, threads: int) -> float:
    """Run `setup` (Python source, with bench/ and the repository on sys.path) in a new process
    and return its peak resident set size (VmHWM) in GB, or nan when it fails.  A fresh process,
    since ru_maxrss would include the parent's peak (it is inherited through fork)."""
    code = (f"import sys, torch; sys.argv = ['x']; torch.set_num_threads({threads});"
            f"sys.path[:0] = {[str(HERE), str(HERE.parent)]!r};\n{setup}\n"
            f"print(int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1e6)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else float("nan")


def run_concurrently(count: int, work) -> float:
    """Run work(i) for i in 0..count-1 in one thread each, started together (a barrier): the wall
    seconds from the start until the last one returns."""
    barrier = threading.Barrier(count + 1)

    def one(i):
        barrier.wait()
        work(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def write_results(out: Path, name: str, payload: dict, lines: list[str], provenance: dict):
    """bench/results-style output, written atomically: NAME.json (payload, with `provenance` from
    `provenance.provenance()` under "provenance") and NAME.md (lines, then the provenance's summary
    line), also printed."""
    import json

    from provenance import summary_line
    from sparse_ssm.util.files import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    lines = [*lines, "", summary_line(provenance)]
    atomic_write_text(out / f"{name}.json", json.dumps({**payload, "provenance": provenance}, indent=2, default=str))
    atomic_write_text(out / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a note) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def curriculum_phases(text: str) -> list[tuple[int, float]]:
    """The --curriculum flag of the task benches: '64:0.33,128:0.33' -> [(64, 0.33), (128, 0.33)]."""
    try:
        return [(int(L), float(f)) for L, f in (item.split(":") for item in text.split(",") if item)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LENGTH:FRACTION,... e.g. 64:0.33,128:0.33") from None


def trained_lengths(phases, length: int, short: bool = False) -> str:
    """The lengths a task bench trained at: '16', or after a curriculum '8 for 30% of the steps, 16 for
    30%, then 64' ('8 → 16 → 64' if short)."""
    if short:
        return " → ".join(str(L) for L in [*(L for L, _ in phases), length])
    words = [f"{L} for {f:.0%}{' of the steps' * (i == 0)}" for i, (L, f) in enumerate(phases)]
    return ", ".join(words) + f", then {length}" if words else str(length)


def comma_list(text: str, allowed) -> list[str]:
    """An argparse type: 'a,b' -> ['a', 'b'], each one of `allowed`."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in items if x not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown[0]!r}; choose from {', '.join(allowed)}")
    return items
