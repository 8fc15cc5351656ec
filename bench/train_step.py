"""Training-step throughput (forward + loss + backward + AdamW) against peers, on the CPU.

    python bench/train_step.py [--rounds 5] [--threads 1] [--peers mamba2,gpt2,mambapy] [--compile]
                               [--loss-paths fused,full-logits] [--out bench/results]

Models are built from configs with random weights at hidden 256, 4 layers, state 16, expand 2,
vocab 4096, batch 8 x 256 (DEVELOPERS.md / shared/facts.md).  The models are timed in
interleaved rounds (one step of each model per round, after warm-up), so a slow phase of the
machine hits every model alike; medians are reported, and the speed ratio to the Mamba-2 peer per
round (median, min and max over rounds).  Peak RSS
per model comes from a separate one-model process.  Results: JSON and Markdown under --out, with
their provenance (commit, versions, machine, every model's config and mode).

Loss paths: the peers compute their loss from full logits (`labels=`, as their users train them).
Ours is timed as users train it (`fused`: the chunked cross-entropy that never materialises the
logits) and, with `full-logits`, on the peers' path too (logits, then cross-entropy), so both views
come from the same rounds.  Every model trains in train mode with dropout 0 (bench/peers.py).
"""

from __future__ import annotations

import argparse
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
from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM  # noqa: E402

VOCAB, HIDDEN, LAYERS, STATE, EXPAND, BATCH, SEQ = 4096, 256, 4, 16, 2, 8, 256
LOSS_PATHS = {"fused": "fused chunked cross-entropy (no logits tensor)",
              "full-logits": "full logits, then cross-entropy"}
FULL_LOGITS = ", full logits"           # suffix of our rows timed on the peers' loss path


def ours(compile_model=False, full_logits=False, **overrides):
    """Our model in train mode, dropout 0; its loss fused (as users train it) or from full logits."""
    cfg = SparseSSMConfig(vocab_size=VOCAB, hidden_dim=HIDDEN, state_dim=STATE, num_layers=LAYERS,
                          expand=EXPAND, dropout=0.0, max_seq_len=SEQ, **overrides)
    model = SparseSSMForCausalLM(cfg).train()
    run = torch.compile(model) if compile_model else model
    return model, lambda ids: run(ids, labels=ids, return_logits=full_logits).loss


def loss_path(name: str) -> str:
    """The loss path of a row of `builders`: ours fused unless named full logits, peers full logits."""
    fused = name.startswith("sparse-ssm") and not name.endswith(FULL_LOGITS)
    return LOSS_PATHS["fused" if fused else "full-logits"]


def compiled_mamba2():
    model, _ = peers.hf_mamba2(VOCAB, HIDDEN, LAYERS, STATE, EXPAND)
    run = torch.compile(model)
    return model, lambda ids: run(input_ids=ids, labels=ids).loss


def builders(selected, compile_models=False, loss_paths=("fused",)):
    table = {}
    if "fused" in loss_paths:
        table["sparse-ssm (sparse 0.9, no FFN)"] = lambda: ours(ffn_dim=0)
        table["sparse-ssm (sparse 0.9, FFN 512)"] = lambda: ours(ffn_dim=512)
    if "full-logits" in loss_paths:
        table["sparse-ssm (sparse 0.9, no FFN)" + FULL_LOGITS] = lambda: ours(ffn_dim=0, full_logits=True)
        table["sparse-ssm (sparse 0.9, FFN 512)" + FULL_LOGITS] = lambda: ours(ffn_dim=512, full_logits=True)
    table |= {
        "mamba2": lambda: peers.hf_mamba2(VOCAB, HIDDEN, LAYERS, STATE, EXPAND),
        "gpt2": lambda: peers.hf_gpt2(VOCAB, HIDDEN, 2, SEQ),
        "mambapy": lambda: peers.mambapy(VOCAB, HIDDEN, LAYERS, STATE, EXPAND),
        "hf-mamba": lambda: peers.hf_mamba(VOCAB, HIDDEN, LAYERS, STATE, EXPAND),
    }
    if compile_models:   # torch.compile for ours and the Mamba-2 peer alike
        table["sparse-ssm (sparse 0.9, no FFN), compiled"] = lambda: ours(compile_model=True, ffn_dim=0)
        table["mamba2, compiled"] = compiled_mamba2
    return {k: v for k, v in table.items() if k.startswith("sparse-ssm") or k.split(",")[0] in selected}


def make_step(model, loss_fn):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(ids):
        loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def peak_rss_child(name: str, threads: int) -> float:
    """Peak RSS (GB) of a process that builds one model and runs two training steps."""
    return peak_rss_gb(f"import train_step as b; m, f = b.builders({[name.split(',')[0]]!r}, True, "
                       f"tuple(b.LOSS_PATHS))[{name!r}]();"
                       f"s = b.make_step(m, f); ids = torch.randint(0, b.VOCAB, (b.BATCH, b.SEQ)); s(ids); s(ids)",
                       threads)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peers", default="mamba2,gpt2,mambapy", help="comma list of: mamba2,gpt2,mambapy,hf-mamba")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-model peak-RSS processes")
    ap.add_argument("--compile", action="store_true", help="add torch.compile'd variants of ours and Mamba-2")
    ap.add_argument("--loss-paths", default="fused,full-logits",
                    help="comma list: fused (ours as users train it), full-logits (ours on the peers' loss path)")
    args = ap.parse_args()
    paths = args.loss_paths.split(",")
    if not paths or any(p not in LOSS_PATHS for p in paths):
        ap.error(f"--loss-paths {args.loss_paths!r}: choose from {', '.join(LOSS_PATHS)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models, steps = {}, {}
    for name, build in builders(args.peers.split(","), args.compile, paths).items():
        try:
            model, loss_fn = build()
        except ImportError as e:
            print(f"skipping {name}: {e}")
            continue
        models[name] = model
        steps[name] = make_step(model, loss_fn)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    for step in steps.values():          # warm-up
        step(ids)
    times = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(ids)
            times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()), flush=True)
    tokens = BATCH * SEQ
    rows = []
    ref = statistics.median(times["mamba2"]) if "mamba2" in times else None
    for name, ts in times.items():
        med = statistics.median(ts)
        # per-round ratios: each round times every model back to back, so they share the machine's state
        ratios = [m / t for m, t in zip(times["mamba2"], ts)] if ref else None
        rows.append({"model": name, "loss_path": loss_path(name), "mode": "train" if models[name].training else "eval",
                     "params": peers.num_params(models[name]), "median_step_s": med,
                     "tokens_per_s": tokens / med, "speed_vs_mamba2": (ref / med) if ref else None,
                     "per_round_speed_vs_mamba2": ratios,
                     "peak_rss_gb": None if args.no_memory else peak_rss_child(name, args.threads)})
    setup = {"vocab": VOCAB, "hidden": HIDDEN, "layers": LAYERS, "state": STATE, "expand": EXPAND, "batch": BATCH,
             "seq_len": SEQ, "threads": args.threads, "rounds": args.rounds, "compile": args.compile,
             "loss_paths": {p: LOSS_PATHS[p] for p in paths}}
    lines = ["| model | loss path | params | tokens/s | × mamba2 (median of rounds; min–max) | peak RSS (GB) |",
             "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        r = row["per_round_speed_vs_mamba2"]
        ratio = f"{statistics.median(r):.2f} ({min(r):.2f}–{max(r):.2f})" if r else "-"
        rss = "-" if row["peak_rss_gb"] is None else f"{row['peak_rss_gb']:.2f}"
        lines.append(f"| {row['model']} | {row['loss_path']} | {row['params'] / 1e6:.2f} M | {row['tokens_per_s']:,.0f} "
                     f"| {ratio} | {rss} |")
    lines += ["", f"Batch {BATCH} × {SEQ}, fp32, every model in train mode with dropout 0; medians of {args.rounds} "
              f"interleaved rounds after one warm-up step each."]
    write_results(Path(args.out), "train_step", {"setup": setup, "rows": rows}, lines,
                  provenance(models, seeds=[0]))


if __name__ == "__main__":
    main()
