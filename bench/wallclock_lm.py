"""Language modelling at equal wall-clock: our small model against a GPT-2 of matched size.

    python -m sparse_ssm.data.corpus data/shakespeare        # the embedded corpus (make demo does it)
    python bench/wallclock_lm.py --seconds 240          # writes bench/results/wallclock_lm.{json,md,png}

Both models see the same data: the embedded corpus, the same byte-level BPE tokenizer (trained on
its training split), the same windows of 128 tokens in the same order, batch 16, AdamW at the same
learning rate (linear warm-up, then constant).  They train in lockstep, one step each in turn, and
each stops when its own summed step time reaches the budget, so a busy machine slows both alike.
Then both are scored on the same validation windows (every token once).  1 torch thread.  Both
train in train mode with dropout 0 (GPT-2 from bench/peers.py's config), ours with its fused loss
as users train it (--full-logits: from full logits, as GPT-2), GPT-2 from full logits; the
results carry their provenance.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import peers  # noqa: E402
from common import pyplot, write_results  # noqa: E402
from provenance import provenance  # noqa: E402
from sparse_ssm import SparseSSMForCausalLM  # noqa: E402
from sparse_ssm.config import Config  # noqa: E402
from sparse_ssm.data import collate, prepare_lm_data  # noqa: E402


def gpt2_matched(vocab, target_params, seq_len):
    """The GPT-2 (width 128, 2 heads) whose layer count brings it closest to target_params."""
    from transformers import GPT2LMHeadModel
    best = None
    for layers in range(1, 13):
        cfg = peers.gpt2_config(vocab, 128, layers, seq_len, heads=2)
        n = sum(p.numel() for p in GPT2LMHeadModel(cfg).parameters())
        if best is None or abs(n - target_params) < abs(best[1] - target_params):
            best = (cfg, n)
    return GPT2LMHeadModel(best[0]).train()


def train_lockstep(models: dict, windows: list, bs: int, pad: int, lr: float, seconds: float):
    """Train every model of `models` (name -> (module, loss of ids)) one step each in turn on the
    same batches of `windows` (in order, cycled), AdamW with a 30-step linear warm-up, until each
    model's own summed step time reaches `seconds`.  -> (seconds spent, steps, [(seconds, loss)]) per name."""
    opts = {k: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
            for k, (m, _) in models.items()}
    spent, steps, losses = {k: 0.0 for k in models}, {k: 0 for k in models}, {k: [] for k in models}
    warmup, i = 30, 0
    while any(spent[k] < seconds for k in models):
        start_row = (i * bs) % len(windows)
        ids, _ = collate(windows[start_row:start_row + bs], pad)
        i += 1
        for name, (model, loss_fn) in models.items():
            if spent[name] >= seconds:
                continue
            for group in opts[name].param_groups:
                group["lr"] = lr * min(1.0, (steps[name] + 1) / warmup)
            start = time.perf_counter()
            loss = loss_fn(ids)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opts[name].step()
            spent[name] += time.perf_counter() - start
            steps[name] += 1
            losses[name].append((spent[name], float(loss.detach())))
        if i % 50 == 0:
            print({k: (steps[k], round(spent[k]), round(losses[k][-1][1], 3)) for k in models}, flush=True)
    return spent, steps, losses


@torch.no_grad()
def validation_nll(model, windows: list, pad: int) -> tuple[float, int]:
    """(summed negative log-likelihood, scored tokens) of `model` in eval mode over the windows,
    16 at a time, every model through the same full logits."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), 16):
        ids, labels = collate(windows[start:start + 16], pad)
        logits = model(input_ids=ids).logits
        lp = torch.log_softmax(logits[:, :-1].float(), -1)
        target = labels[:, 1:]
        mask = target != -100
        total += float(-lp.gather(-1, target.clamp(min=0)[..., None])[..., 0][mask].sum())
        count += int(mask.sum())
    return total, count


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/small_cpu.yaml")
    parser.add_argument("--seconds", type=float, default=240.0, help="training time budget per model")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-windows", type=int, default=200)
    parser.add_argument("--full-logits", action="store_true",
                        help="train ours from full logits, GPT-2's loss path, instead of its fused loss")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = Config.load(args.config)
    ds = cfg.dataset
    data = prepare_lm_data(ds, cfg.model.vocab_size)          # the trainer's own data preparation
    vocab, L, pad = data.vocab_size, ds.max_seq_len, data.pad_id
    cfg.model.vocab_size = vocab
    train, val = data.windows("train", L, ds.stride), data.windows("validation", L, L)

    ours = SparseSSMForCausalLM(cfg.model)
    n_ours = ours.num_parameters()
    gpt2 = gpt2_matched(vocab, n_ours, L)
    models = {"sparse-ssm": (ours, lambda ids: ours(ids, labels=ids, return_logits=args.full_logits).loss),
              "gpt2": (gpt2, lambda ids: gpt2(input_ids=ids, labels=ids).loss)}
    bs = cfg.training.batch_size
    spent, steps, losses = train_lockstep(models, [train[int(j)] for j in torch.randperm(
        len(train), generator=torch.Generator().manual_seed(0))], bs, pad, args.lr, args.seconds)

    prov = provenance({k: m for k, (m, _) in models.items()}, seeds=[0],     # recorded in train mode
                      loss_paths={"sparse-ssm": "full logits" if args.full_logits else "fused chunked cross-entropy",
                                  "gpt2": "full logits (labels=)"},
                      scoring="eval mode, full logits")
    rows = []
    windows = range(min(args.eval_windows, len(val)))
    for name, (model, _) in models.items():
        total, count = validation_nll(model, [val[j] for j in windows], pad)
        params = sum(p.numel() for p in model.parameters()) if name == "gpt2" else n_ours
        rows.append({"model": name, "params": params, "steps": steps[name], "train_seconds": round(spent[name], 1),
                     "tokens_per_s": steps[name] * bs * L / spent[name], "validation_loss": total / count,
                     "validation_perplexity": math.exp(total / count), "validation_tokens": count})
        print(json.dumps(rows[-1]))
    machine = f"{platform.machine()}, 1 torch thread, torch {torch.__version__}"
    base = rows[1]["validation_perplexity"]
    lines = [f"# Equal wall-clock language modelling: sparse-ssm vs. GPT-2 ({args.seconds:.0f} s of training each)", "",
             f"Embedded corpus (Shakespeare), BPE vocab {vocab}, windows of {L}, batch {bs}, lr {args.lr}; {machine}.", "",
             "| model | parameters | steps | tokens/s | validation loss | perplexity | vs. GPT-2 |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['params']:,} | {r['steps']} | {r['tokens_per_s']:,.0f} | {r['validation_loss']:.4f} | "
              f"{r['validation_perplexity']:.2f} | {r['validation_perplexity'] / base:.3f}x |" for r in rows]
    out = Path(args.out)
    write_results(out, "wallclock_lm", {"budget_s": args.seconds, "config": args.config, "machine": machine,
                                        "rows": rows, "curves": {k: v[::5] for k, v in losses.items()}}, lines, prov)
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, curve in losses.items():
        t, v = np.array(curve).T
        k = min(20, len(v))
        ax.plot(t[k - 1:], np.convolve(v, np.ones(k) / k, mode="valid"), label=name)
    ax.set_xlabel("training seconds (1 CPU thread)")
    ax.set_ylabel("training loss (20-step mean)")
    ax.set_title("Equal wall-clock: sparse-ssm vs. GPT-2 of matched size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "wallclock_lm.png", dpi=110)


if __name__ == "__main__":
    main()
