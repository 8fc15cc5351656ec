"""Cost of each selective state-matrix structure at one model size, on the CPU.

    python bench/structures.py [--rounds 3] [--threads 1] [--state-dim 64] [--out bench/results]

For hidden 256, 4 layers, state 64, expand 2, no FFN, vocab 4096, batch 8 x 256: parameters,
analytic SSM FLOPs per token and layer (`SelectiveSSMLayer.ssm_cost_per_token`), the median
forward+backward time of interleaved rounds, the speed relative to the diagonal class in the
same rounds, and the peak RSS of one step in a fresh process.  Every class at its default
discretisation (`auto`: ZOH for diagonal and rotation, bilinear for the others), in train mode with
dropout 0, the loss from the fused head; results carry their provenance (commit, versions, machine,
every model's config).
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

from common import peak_rss_gb, write_results  # noqa: E402
from provenance import provenance  # noqa: E402
from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM  # noqa: E402

CLASSES = {      # sparsity levels that give block sizes 1, 2, 4, 8 at state 64 (hippo.block_size_for)
    "sparse diagonal (0.99)": dict(selective_param_class="sparse", sparsity_level=0.99),
    "rotation (2 x 2)": dict(selective_param_class="rotation"),
    "sparse block (0.96)": dict(selective_param_class="sparse", sparsity_level=0.96),
    "sparse block (0.93)": dict(selective_param_class="sparse", sparsity_level=0.93),
    "sparse block (0.87)": dict(selective_param_class="sparse", sparsity_level=0.87),
    "sparse banded (0.93)": dict(selective_param_class="sparse", sparsity_level=0.93, sparsity_pattern="banded"),
    "low_rank (r=2)": dict(selective_param_class="low_rank", low_rank_rank=2),
    "householder (r=2)": dict(selective_param_class="householder", low_rank_rank=2),
    "dense": dict(selective_param_class="dense"),
}
BATCH, SEQ = 8, 256
BATCH_OF: dict[str, int] = {}


def build(name, state_dim):
    cfg = SparseSSMConfig(vocab_size=4096, hidden_dim=256, state_dim=state_dim, ffn_dim=0, num_layers=4,
                          expand=2, dropout=0.0, max_seq_len=SEQ, **CLASSES[name])
    return SparseSSMForCausalLM(cfg).train()


def fwd_bwd(model, ids):
    model(ids, labels=ids, return_logits=False).loss.backward()


def peak_rss(name, state_dim, threads):
    return peak_rss_gb(f"import structures as s; m = s.build({name!r}, {state_dim});"
                       f"ids = torch.randint(0, 4096, (s.BATCH_OF.get({name!r}, s.BATCH), s.SEQ)); s.fwd_bwd(m, ids)",
                       threads)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--state-dim", type=int, default=64)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {name: build(name, args.state_dim) for name in CLASSES}
    ids = torch.randint(0, 4096, (BATCH, SEQ))
    batch_ids = {name: ids[:BATCH_OF.get(name, BATCH)] for name in models}
    for name, m in models.items():
        fwd_bwd(m, batch_ids[name])
    times = {name: [] for name in models}
    for r in range(args.rounds):
        for name, m in models.items():
            t0 = time.perf_counter()
            fwd_bwd(m, batch_ids[name])
            times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()), flush=True)
    rows = []
    diagonal = "sparse diagonal (0.99)"
    for name, m in models.items():
        cost = m.blocks[0].mixer.ssm_cost_per_token()
        med = statistics.median(times[name])
        batch = BATCH_OF.get(name, BATCH)
        rows.append({"class": name, "structure": cost["structure"], "batch": batch, "params": m.num_parameters(),
                     "generator_params_per_layer": cost["generator_params"],
                     "ssm_flops_per_token_per_layer": cost["ssm_flops"], "fwd_bwd_s": med,
                     "tokens_per_s": batch * SEQ / med,
                     "speed_vs_diagonal": statistics.median(d / t for d, t in zip(times[diagonal], times[name]))
                     * BATCH_OF.get(name, BATCH) / BATCH_OF.get(diagonal, BATCH),
                     "peak_rss_gb": peak_rss(name, args.state_dim, args.threads)})
    setup = {"hidden": 256, "layers": 4, "state": args.state_dim, "expand": 2, "ffn": 0, "vocab": 4096,
             "batch": BATCH, "seq_len": SEQ, "threads": args.threads, "rounds": args.rounds}
    lines = ["| class | structure | batch | params | generator params / layer | SSM MFLOP / token / layer | fwd+bwd (s) | "
             "tokens/s | × diagonal | peak RSS (GB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['class']} | {r['structure']} | {r['batch']} | {r['params'] / 1e6:.2f} M | "
                     f"{r['generator_params_per_layer']:,} | {r['ssm_flops_per_token_per_layer'] / 1e6:.2f} | "
                     f"{r['fwd_bwd_s']:.2f} | {r['tokens_per_s']:,.0f} | {r['speed_vs_diagonal']:.2f} | "
                     f"{r['peak_rss_gb']:.2f} |")
    lines += ["", f"Median of {args.rounds} interleaved rounds; train mode, dropout 0, fused loss."]
    write_results(Path(args.out), "structures", {"setup": setup, "rows": rows}, lines, provenance(models, seeds=[0]))


if __name__ == "__main__":
    main()
