"""How many torch threads a training run on a small CPU should use: the demo config's training
step with 1 thread, with one thread per core, and with one thread per core under
OMP_WAIT_POLICY=PASSIVE, each on an idle machine and beside a busy neighbour: a plain process
that spins on one core, or another torch job (matmuls with torch's default threads, as a second
training run or a test suite would be).

    python bench/threads.py [--config config/small_cpu.yaml] [--rounds 3] [--steps 12] [--out bench/results]

Each cell is a fresh process (OpenMP reads its settings when torch loads), which builds the
config's model and times `--steps` optimizer steps (forward, fused loss, backward, AdamW) on random
ids of the config's batch and length after two warm-up steps; rounds interleave every option and
neighbour, and the medians of the per-step times are reported.  Run it on an otherwise idle
machine: it needs every core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from provenance import provenance  # noqa: E402

CORES = len(os.sched_getaffinity(0))
OPTIONS = {                      # name -> (torch threads, extra environment)
    "1 thread": (1, {}),
    f"{CORES} threads": (CORES, {}),
    f"{CORES} threads, OMP_WAIT_POLICY=PASSIVE": (CORES, {"OMP_WAIT_POLICY": "PASSIVE"}),
}
NEIGHBOURS = {                   # name -> the neighbour's Python source (None: an idle machine)
    "idle": None,
    "a spinning process": "while True: pass",
    "a torch job": "import torch\na = torch.randn(512, 512)\nwhile True: a @ a",
}

CHILD = """
import json, sys, time, torch
from sparse_ssm.config import Config
from sparse_ssm import SparseSSMForCausalLM
torch.set_num_threads({threads})
torch.manual_seed(0)
config = Config.load({config!r})
model = SparseSSMForCausalLM(config.model).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
ids = torch.randint(0, config.model.vocab_size, (config.training.batch_size, config.dataset.max_seq_len))
times = []
for i in range({steps} + 2):
    t0 = time.perf_counter()
    model(ids, labels=ids, return_logits=False).loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
print(json.dumps(times[2:]))
"""


def time_cell(config: str, threads: int, env: dict, steps: int, neighbour_code: str | None) -> list[float]:
    """Per-step seconds of one fresh process, beside a process running `neighbour_code` if given
    (with the default environment: the neighbour's own threads spin as torch's do)."""
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}   # OpenMP's default unless `env` sets it
    neighbour = subprocess.Popen([sys.executable, "-c", neighbour_code], env=base) if neighbour_code else None
    try:
        code = CHILD.format(threads=threads, config=config, steps=steps)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**base, **env}, cwd=Path(__file__).resolve().parent.parent)
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="config/small_cpu.yaml")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    cells = {(name, nb): [] for name in OPTIONS for nb in NEIGHBOURS}
    for r in range(args.rounds):
        for (name, nb), times in cells.items():
            threads, env = OPTIONS[name]
            times += time_cell(args.config, threads, env, args.steps, NEIGHBOURS[nb])
            print(f"round {r + 1}/{args.rounds} {name}, {nb}: {statistics.median(times[-args.steps:]):.3f} s/step",
                  flush=True)
    rows = [{"option": name, "threads": OPTIONS[name][0], "env": OPTIONS[name][1],
             "step_s": {nb: statistics.median(cells[name, nb]) for nb in NEIGHBOURS}} for name in OPTIONS]
    one = rows[0]["step_s"]["idle"]
    busy = [nb for nb in NEIGHBOURS if nb != "idle"]
    lines = ["| option | step, idle (s) | idle speed × 1 thread | "
             + " | ".join(f"step beside {nb} (s) | slowdown" for nb in busy) + " |",
             "|---|---:|---:|" + "---:|---:|" * len(busy)]
    for row in rows:
        t = row["step_s"]
        lines.append(f"| {row['option']} | {t['idle']:.3f} | {one / t['idle']:.2f}× | "
                     + " | ".join(f"{t[nb]:.3f} | {t[nb] / t['idle']:.2f}×" for nb in busy) + " |")
    lines += ["", f"`{args.config}`'s model and batch, fused loss, {args.steps} steps per process after 2 warm-up "
              f"steps, medians over {args.rounds} interleaved rounds; {CORES} cores. Neighbours: "
              + "; ".join(f"{nb}: `{code}`" for nb, code in NEIGHBOURS.items() if code).replace("\n", "; ") + "."]
    write_results(Path(args.out), "threads", {"setup": vars(args), "rows": rows}, lines,
                  provenance(seeds=[0], cores=CORES))


if __name__ == "__main__":
    main()
