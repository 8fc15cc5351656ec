"""PNG plots of the benchmark results in bench/results/*.json (matplotlib; `pip install -e '.[bench]'`).

    python bench/plots.py       # writes bench/results/{train_step,length_scaling,generation}.png
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def load(name):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def train_step(data):
    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    names = [r["model"] for r in rows]
    speed = [statistics.median(r["per_round_speed_vs_mamba2"]) for r in rows]     # as the table shows
    ax.barh(range(len(rows)), speed, color=["C0" if n.startswith("sparse-ssm") else "C7" for n in names])
    for i, r in enumerate(rows):
        ax.text(speed[i], i, f" {r['tokens_per_s']:,.0f} tok/s", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", lw=0.8)
    s = data["setup"]
    ax.set_xlabel("speed relative to transformers Mamba-2\n(median per-round ratio)")
    ax.set_title(f"Train step: hidden {s['hidden']}, {s['layers']} layers, state {s['state']}, "
                 f"{s['batch']}x{s['seq_len']} tokens, {s['threads']} CPU thread", fontsize=9)
    ax.set_xlim(0, max(speed) * 1.35)
    fig.tight_layout()
    fig.savefig(RESULTS / "train_step.png", dpi=110)


def length_scaling(data):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    models = sorted({r["model"] for r in data["rows"]})
    for m in models:
        rows = sorted((r for r in data["rows"] if r["model"] == m), key=lambda r: r["length"])
        ax.plot([r["length"] for r in rows], [r["step_s"] for r in rows], "o-",
                label=f"{m} (exponent {data['summary'][m]['loglog_exponent']:.2f})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens per step fixed)")
    ax.set_ylabel("seconds per training step")
    ax.set_title(f"Cost against length at {data['tokens_per_step']} tokens per step", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "length_scaling.png", dpi=110)


def generation(data):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    keys = sorted({(r["model"], r["batch"]) for r in data["rows"]})
    for model, batch in keys:
        rows = sorted((r for r in data["rows"] if r["model"] == model and r["batch"] == batch), key=lambda r: r["context"])
        ax.plot([r["context"] for r in rows], [r["ms_per_token"] for r in rows], "o-", label=f"{model}, batch {batch}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length")
    ax.set_ylabel("ms per new token")
    ax.set_title("Decoding cost against context (1 CPU thread)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "generation.png", dpi=110)


def main():
    for name, fn in (("train_step", train_step), ("length_scaling", length_scaling), ("generation", generation)):
        data = load(name)
        if data:
            fn(data)
            print(f"wrote {RESULTS / (name + '.png')}")


if __name__ == "__main__":
    main()
