"""Decoding speed against context length: our recurrent step vs. GPT-2 with a KV cache, mamba.py's
step and transformers' Mamba-2 with its cache.

    python bench/generation.py [--contexts 64,256,1024,4096] [--batches 1,8] [--new-tokens 32] [--rounds 3]

Ours: hidden 256, 4 layers, state 16, expand 2, no FFN, vocab 4096 (2.8 M parameters), prompt
prefilled in one parallel pass, then `model.step` per token (the in-place decode path).  Peers of
the same size: `transformers` GPT-2 (2 layers of width 256: matched parameters but for its position
table) with its KV cache; mamba.py's `Mamba.step` (its caches start at zeros: the cost of a step
does not depend on the state's values, and stepping through a 4,096-token prompt would take
minutes); `transformers` Mamba2ForCausalLM prefilled with its forward, then decoding with its cache.
Random weights, every model in eval mode with dropout 0 (bench/peers.py), greedy tokens, 1 thread;
for every (batch, context) the models alternate for --rounds rounds and the median over all decode
steps of the ms per new token is reported (the first steps after a long prefill also pay for
releasing its memory).  The results carry their provenance (commit, versions, machine, every
model's config).
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
from common import write_results  # noqa: E402
from provenance import provenance  # noqa: E402
from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM  # noqa: E402

VOCAB = 4096


def timed_steps(step, state, new_tokens):
    """Seconds of each of `new_tokens` calls state = step(state) (one decode step each)."""
    times = []
    for _ in range(new_tokens):
        start = time.perf_counter()
        state = step(state)
        times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def ours_decode(model, ctx, new_tokens):
    """Seconds of each decode step after the prefill."""
    return timed_steps(lambda s: model.step(s[0].argmax(-1), s[1]), model.prefill(ctx), new_tokens)


@torch.no_grad()
def gpt2_decode(model, ctx, new_tokens):
    step = lambda out: model(input_ids=out.logits[:, -1].argmax(-1)[:, None], past_key_values=out.past_key_values,
                             use_cache=True)
    return timed_steps(step, model(input_ids=ctx, use_cache=True), new_tokens)


@torch.no_grad()
def mambapy_decode(model, ctx, new_tokens):
    """mamba.py: embedding -> Mamba.step per layer -> norm -> head, from zero caches."""
    batch = ctx.shape[0]
    cfg = model.mamba.config
    caches = [(torch.zeros(batch, cfg.d_inner, cfg.d_state), torch.zeros(batch, cfg.d_inner, cfg.d_conv - 1))
              for _ in range(cfg.n_layers)]

    def step(state):
        token, caches = state
        x, caches = model.mamba.step(model.embedding(token), caches)
        return model.lm_head(model.norm_f(x)).argmax(-1), caches
    return timed_steps(step, (ctx[:, -1], caches), new_tokens)


@torch.no_grad()
def mamba2_decode(model, ctx, new_tokens):
    step = lambda out: model(input_ids=out.logits[:, -1].argmax(-1)[:, None], cache=out.cache, use_cache=True)
    return timed_steps(step, model(input_ids=ctx, use_cache=True), new_tokens)


def build_peers(max_len: int) -> dict:
    """name -> (model, decode function) of the peers that are installed."""
    table = {}
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        table["gpt2 (KV cache)"] = (peers.hf_gpt2(VOCAB, 256, 2, max_len)[0].eval(), gpt2_decode)
        table["mamba2 (HF, cache)"] = (peers.hf_mamba2(VOCAB, 256, 4, 16, 2)[0].eval(), mamba2_decode)
    except ImportError as e:
        print(f"skipping the transformers peers: {e}")
    try:
        table["mamba.py (step)"] = (peers.mambapy(VOCAB, 256, 4, 16, 2)[0].eval(), mambapy_decode)
    except ImportError as e:
        print(f"skipping mamba.py: {e}")
    return table


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="64,256,1024,4096")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    contexts = [int(c) for c in args.contexts.split(",")]
    ours = SparseSSMForCausalLM(SparseSSMConfig(vocab_size=VOCAB, hidden_dim=256, state_dim=16, ffn_dim=0, num_layers=4,
                                                dropout=0.0, max_seq_len=max(contexts) + args.new_tokens)).eval()
    models = {"sparse-ssm": (ours, ours_decode), **build_peers(max(contexts) + args.new_tokens)}
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for length in contexts:
            ctx = torch.randint(0, VOCAB, (batch, length))
            times = {name: [] for name in models}
            for _ in range(args.rounds):
                for name, (model, decode) in models.items():
                    times[name].extend(decode(model, ctx, args.new_tokens))
            for name, ts in times.items():
                ms = 1000 * statistics.median(ts)
                rows.append({"model": name, "batch": batch, "context": length, "ms_per_token": ms,
                             "tokens_per_s": batch * 1000 / ms})
                print(f"batch {batch} context {length:5d} {name:16s} {ms:7.2f} ms/token  {batch * 1000 / ms:8.1f} tok/s",
                      flush=True)
    setup = {"threads": args.threads, "new_tokens": args.new_tokens, "rounds": args.rounds,
             "params": {name: peers.num_params(m) for name, (m, _) in models.items()}}
    names = list(models)
    lines = ["| batch | context | " + " | ".join(f"{n} ms/token (tok/s)" for n in names) + " |",
             "|---:|---:|" + "---:|" * len(names)]
    for batch in sorted({r["batch"] for r in rows}):
        for length in contexts:
            cells = [next(r for r in rows if r["model"] == n and r["batch"] == batch and r["context"] == length)
                     for n in names]
            lines.append(f"| {batch} | {length} | " + " | ".join(f"{c['ms_per_token']:.2f} ({c['tokens_per_s']:.0f})"
                                                                 for c in cells) + " |")
    peers_present = [n for n in names if n != "sparse-ssm"]
    lines += ["", "| batch | context | " + " | ".join(f"sparse-ssm / {n}" for n in peers_present) + " |",
              "|---:|---:|" + "---:|" * len(peers_present)]
    for batch in sorted({r["batch"] for r in rows}):
        for length in contexts:
            speed = {r["model"]: r["tokens_per_s"] for r in rows if r["batch"] == batch and r["context"] == length}
            lines.append(f"| {batch} | {length} | " + " | ".join(f"{speed['sparse-ssm'] / speed[n]:.2f}x"
                                                                 for n in peers_present) + " |")
    lines += ["", f"Median ms per new token over {args.rounds} interleaved rounds of {args.new_tokens} greedy tokens; "
              "every model in eval mode with dropout 0."]
    write_results(Path(args.out), "generation", {"setup": setup, "rows": rows}, lines,
                  provenance({name: m for name, (m, _) in models.items()}, seeds=[0]))


if __name__ == "__main__":
    main()
