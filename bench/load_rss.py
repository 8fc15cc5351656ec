"""Peak and current RSS of a process at each stage of serving a checkpoint (import torch, load,
prefill, decode), one fresh process per weight format, so that each peak is its own:

    python bench/load_rss.py CHECKPOINT_DIR [fp32 bf16 int8] [--prompt 4096] [--steps 16]

prints one line a format: VmRSS / VmHWM in GB after each stage.  A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def _memory() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in GB."""
    status = Path("/proc/self/status").read_text()
    return tuple(int(status.split(f"{f}:")[1].split()[0]) / 1e6 for f in ("VmRSS", "VmHWM"))


def measure(path: str, weights: str, prompt: int, steps: int) -> dict:
    """The stages of one process: {stage: (rss, peak)}."""
    stages = {"start": _memory()}
    import torch
    stages["import torch"] = _memory()
    from sparse_ssm.generate.settings import PREFILL_CHUNK_TOKENS
    from sparse_ssm.model.checkpoint import load_model
    torch.set_num_threads(1)
    model = load_model(path, "cpu", weights)
    stages["load"] = _memory()
    with torch.no_grad():
        ids = torch.randint(0, 50277, (1, prompt), generator=torch.Generator().manual_seed(0))
        logits, cache = model.prefill(ids, chunk_tokens=PREFILL_CHUNK_TOKENS)
        stages[f"prefill {prompt}"] = _memory()
        for _ in range(steps):
            logits, cache = model.step(logits.argmax(-1), cache)
        stages[f"decode {steps}"] = _memory()
    return stages


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("weights", nargs="*", default=["fp32", "bf16", "int8"])
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.path, args.weights[0], args.prompt, args.steps)))
        return
    for weights in args.weights:
        done = subprocess.run([sys.executable, __file__, args.path, weights, "--prompt", str(args.prompt),
                               "--steps", str(args.steps), "--child"], capture_output=True, text=True, check=True)
        stages = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{weights:5s} " + "  ".join(f"{k}: {r:.3f}/{p:.3f}" for k, (r, p) in stages.items()))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
