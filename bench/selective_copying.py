"""Selective copying: our layer and its ablations against mamba.py's Mamba, on the same batches.

    python bench/selective_copying.py [--variants default,mambapy,...] [--seeds 0,1,2] [--steps 600]
                                      [--length 32] [--num-memorize 4] [--test-lengths 32,128]
                                      [--curriculum 64:0.33,128:0.33]
                                      [--speed-rounds 3] [--speed-only] [--name selective_copying]
                                      [--out bench/results]

Every variant is trained with `sparse_ssm.tasks.training.run_task` (the harness of `main.py evaluate
--task`): 2 layers, width 64, state 16, vocab 16, batch 32, AdamW lr 3e-3 with a one-cycle
schedule, fresh batches drawn from the seed, accuracy on 256 fresh sequences per test length.
The seed fixes both the batches and the initial weights, so every variant (mamba.py's Mamba too)
sees the same data.  Each variant changes one thing against its base (`VARIANTS`): today's
default (`weight_init: mamba`) or the previous one (`weight_init: gpt2`).

Beside the accuracy per seed: parameters, CPU seconds per run, and the training throughput of
the LM-sized model of bench/train_step.py (hidden 256, 4 layers, state 16, expand 2, vocab 4096,
batch 8 x 256, 1 thread) built with the same change (head widths kept: `num_heads: 8` at width 64
is 16 channels per head, 32 heads at width 256), timed in interleaved rounds with the default as
the reference (`--speed-only` re-times the variants of an existing results file).  Results go to
NAME.json / NAME.md under --out; rows of variants not run this time are kept from an earlier file
with the same setup, so rows can be re-run alone; kept rows that another code version (commit or
dirty diff) or another model config made are refused unless --allow-mixed.  Each row records its
code version and model config, the JSON its provenance (bench/provenance.py).  `--curriculum` trains shorter sequences first
(the length-256 runs of the README: 64 for a third of the steps, 128 for a third, then 256).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
import train_step  # noqa: E402
from common import curriculum_phases, trained_lengths, write_results  # noqa: E402
from provenance import code_version, mixed_records, model_record, provenance, refuse_mixed  # noqa: E402
from sparse_ssm import SparseSSMForCausalLM  # noqa: E402
from sparse_ssm.tasks.synthetic import chance_accuracy  # noqa: E402
from sparse_ssm.tasks.training import run_task, task_model_config  # noqa: E402

VOCAB, WIDTH, LAYERS, STATE, EXPAND = 16, 64, 2, 16, 2


# --- changes that are not config keys: re-initialisations and frozen generator parts -----------
def kaiming_in_proj(model):
    for block in model.blocks:
        block.mixer.in_proj.reset_parameters()


def mamba_out_proj(model):
    for block in model.blocks:
        block.mixer.out_proj.reset_parameters()
        block.mixer.out_proj.weight.data /= math.sqrt(model.config.num_layers)


def kaiming_generator(model):
    for block in model.blocks:
        block.mixer.generator.reset_generator(std=None)


def gpt2_generator(model):
    for block in model.blocks:
        block.mixer.generator.reset_generator(std=0.02)


def gpt2_in_proj(model):
    for block in model.blocks:
        nn.init.normal_(block.mixer.in_proj.weight, std=0.02)


def zero_conv_bias(model):
    for block in model.blocks:
        nn.init.zeros_(block.mixer.conv.bias)


def embedding_n01(model):
    nn.init.normal_(model.embed.weight, std=1.0)


def static_a(model):
    """A_t = A_base: the bottleneck that makes A depend on the token stays at zero."""
    for block in model.blocks:
        block.mixer.generator.a_up.weight.requires_grad_(False)


def static_d(model):
    """D_t = D_base: the generator rows of the token-dependent part of D get no gradient."""
    for block in model.blocks:
        gen = block.mixer.generator
        rows = torch.zeros_like(gen.proj.weight)
        rows[-gen.sizes[4]:] = 1.0
        gen.proj.weight.register_hook(lambda grad, rows=rows: grad * (1.0 - rows))


MAMBA, GPT2 = {"weight_init": "mamba"}, {"weight_init": "gpt2"}
# name -> (what changes, config keys, head_dim or None (keeps the config's heads), patches)
VARIANTS = {
    "default": ("today's default: weight_init mamba, 2 heads of 64 channels", MAMBA, None, ()),
    "mambapy": ("mamba.py's Mamba (Mamba-1 / S6)", None, None, ()),
    "lti": ("default, time-invariant (selective: false)", {**MAMBA, "selective": False}, None, ()),
    "heads8": ("default, 8 heads of 16 channels", MAMBA, 16, ()),
    "heads32": ("default, 32 heads of 4 channels", MAMBA, 4, ()),
    "per-channel": ("default, 128 heads of 1 channel (dt and A per channel)", MAMBA, 1, ()),
    "static-a": ("default, A_t static per head (no A generator)", MAMBA, None, (static_a,)),
    "static-d": ("default, D static per head", MAMBA, None, (static_d,)),
    "no-conv": ("default, no conv (conv_kernel 1)", {**MAMBA, "conv_kernel": 1}, None, ()),
    "a-rank1": ("default, A generator rank 1 (not 4)", {**MAMBA, "a_generator_rank": 1}, None, ()),
    "groups2": ("default, B/C per head (num_groups 2)", {**MAMBA, "num_groups": 2}, None, ()),
    "untied": ("default, untied embeddings", {**MAMBA, "tie_embeddings": False}, None, ()),
    "dt-wide": ("default, dt range 0.001..1 (not ..0.1)", {**MAMBA, "dt_max": 1.0}, None, ()),
    "embed-n01": ("default, embedding N(0, 1) (mamba.py's)", MAMBA, None, (embedding_n01,)),
    "gpt2-generator": ("default, generator rows N(0, 0.02)", MAMBA, None, (gpt2_generator,)),
    "gpt2-in-proj": ("default, in_proj N(0, 0.02)", MAMBA, None, (gpt2_in_proj,)),
    "gpt2": ("previous default: weight_init gpt2", GPT2, None, ()),
    "gpt2+kaiming-in-proj": ("previous, in_proj Kaiming-uniform", GPT2, None, (kaiming_in_proj,)),
    "gpt2+mamba-out-proj": ("previous, out_proj Kaiming-uniform / sqrt(layers)", GPT2, None, (mamba_out_proj,)),
    "gpt2+kaiming-generator": ("previous, generator dt/B/C rows Kaiming-uniform", GPT2, None, (kaiming_generator,)),
    "gpt2+embed-n01": ("previous, embedding N(0, 1)", GPT2, None, (embedding_n01,)),
    "gpt2+conv-bias0": ("previous, conv bias starts at 0 (not uniform(+-0.5))", GPT2, None, (zero_conv_bias,)),
    "gpt2+range0.1": ("previous, initializer_range 0.1", {**GPT2, "initializer_range": 0.1}, None, ()),
    "gpt2-heads32": ("previous, 32 heads of 4 channels", GPT2, 4, ()),
}


class TaskAdapter(nn.Module):
    """mamba.py's LM behind the interface `run_task` trains: (ids, labels, return_logits) -> .loss, .logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, labels=None, return_logits=True, cache=None):
        """cache: None only (`run_task` passes initial states with --state-noise, which mamba.py lacks)."""
        if cache is not None:
            raise ValueError("mamba.py's LM starts from zero states: no state noise for the mambapy variant")
        logits = self.model(ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return types.SimpleNamespace(logits=logits, loss=loss)


def task_builder(name: str, max_len: int):
    """A callable that builds the task-sized model of a variant (called after seeding)."""
    _, keys, head_dim, patches = VARIANTS[name]
    if keys is None:
        return lambda: TaskAdapter(peers.mambapy(VOCAB, WIDTH, LAYERS, STATE, EXPAND)[0])
    heads = {} if head_dim is None else {"num_heads": EXPAND * WIDTH // head_dim}
    config = task_model_config("diagonal", max_len, VOCAB, **keys, **heads)

    def build():
        model = SparseSSMForCausalLM(config)
        for patch in patches:
            patch(model)
        return model
    return build


def lm_step(name: str):
    """One training step (forward, loss, backward, AdamW) of the LM-sized model of
    bench/train_step.py with the variant's change, as a callable of the token ids."""
    _, keys, head_dim, patches = VARIANTS[name]
    if keys is None:
        model, loss_fn = peers.mambapy(train_step.VOCAB, train_step.HIDDEN, train_step.LAYERS, train_step.STATE,
                                       train_step.EXPAND)
    else:
        heads = {} if head_dim is None else {"num_heads": train_step.EXPAND * train_step.HIDDEN // head_dim}
        model, loss_fn = train_step.ours(ffn_dim=0, **keys, **heads)
        for patch in patches:
            patch(model)
    return train_step.make_step(model, loss_fn)


def lm_tokens_per_s(names: list[str], rounds: int) -> dict[str, float]:
    """Median training tokens/s of each variant's LM-sized model, timed in interleaved rounds (one
    step of every model per round) so that a busy phase of the machine hits all of them alike."""
    steps = {name: lm_step(name) for name in names}
    ids = torch.randint(0, train_step.VOCAB, (train_step.BATCH, train_step.SEQ))
    times = {name: [] for name in names}
    for step in steps.values():                          # warm-up
        step(ids)
    for r in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(ids)
            times[name].append(time.perf_counter() - t0)
        print(f"speed round {r + 1}/{rounds}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()), flush=True)
    return {name: train_step.BATCH * train_step.SEQ / statistics.median(ts) for name, ts in times.items()}


def task_max_len(args) -> int:
    return max(int(x) for x in args.test_lengths.split(",")) + args.num_memorize + 1


def variant_config(name: str, args) -> dict:
    """The resolved config of a variant's task-sized model (ours: SparseSSMConfig; mamba.py's)."""
    return model_record(task_builder(name, task_max_len(args))())["config"]


def run_variant(name: str, args) -> dict:
    test_lengths = [int(x) for x in args.test_lengths.split(",")]
    build = task_builder(name, task_max_len(args))
    torch.manual_seed(0)
    model = build()
    params, config = peers.num_params(model), model_record(model)["config"]
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        cpu0 = time.process_time()
        result = run_task("selective-copying", build, args.steps, 32, args.length, test_lengths, seed=seed,
                          num_memorize=args.num_memorize, vocab=VOCAB, curriculum=args.curriculum,
                          log=lambda line: print(f"{name} seed {seed}{line}", flush=True))
        runs.append({"seed": seed, "accuracy": {str(L): a for L, a in result.accuracy.items()},
                     "final_loss": result.final_loss, "cpu_s": time.process_time() - cpu0})
        print(f"{name} seed {seed}: " + ", ".join(f"@{L} {a:.1%}" for L, a in result.accuracy.items())
              + f" ({runs[-1]['cpu_s']:.0f} CPU s)", flush=True)
    mean = {str(L): statistics.mean(r["accuracy"][str(L)] for r in runs) for L in test_lengths}
    return {"variant": name, "what": VARIANTS[name][0], "params": params, "runs": runs, "mean_accuracy": mean,
            "lm_train_tokens_per_s": None, "code_version": code_version(), "config": config}


def markdown(rows: list[dict], setup: dict) -> list[str]:
    lengths = setup["test_lengths"]
    first = str(lengths[0])
    lines = [f"| variant | what changes | params | acc. @ {first} per seed | mean @ {first} | "
             + "".join(f"mean @ {L} | " for L in lengths[1:]) + "LM train tokens/s | × default |",
             "|---|---|---:|---|---:|" + "---:|" * (len(lengths) - 1) + "---:|---:|"]
    reference = next((r["lm_train_tokens_per_s"] for r in rows if r["variant"] == "default"), None)
    for row in rows:
        seeds = " / ".join(f"{r['accuracy'][first]:.1%}" for r in row["runs"]) or "not trained"
        mean = {L: f"{row['mean_accuracy'][str(L)]:.1%}" if row["runs"] else "-" for L in lengths}
        rest = "".join(f"{mean[L]} | " for L in lengths[1:])
        tps = row["lm_train_tokens_per_s"]
        speed = "- | -" if tps is None else f"{tps:,.0f} | " + (f"{tps / reference:.2f}" if reference else "-")
        params = "-" if row["params"] is None else f"{row['params']:,}"
        lines.append(f"| {row['variant']} | {row['what']} | {params} | {seeds} | {mean[lengths[0]]} | {rest}{speed} |")
    trained = trained_lengths(setup.get("curriculum", []), setup["length"])
    lines += ["", f"chance: {chance_accuracy('selective-copying', VOCAB):.1%}; {setup['steps']} steps, batch 32, "
              f"train length {trained}, {setup['num_memorize']} tokens to copy, seeds {setup['seeds']}"]
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="default,mambapy,lti,gpt2", help=f"comma list of: {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--num-memorize", type=int, default=4)
    ap.add_argument("--test-lengths", default="32,128")
    ap.add_argument("--curriculum", type=curriculum_phases, default=[], metavar="L:FRACTION,...",
                    help="shorter lengths trained first, e.g. 64:0.33,128:0.33 (then --length for the rest)")
    ap.add_argument("--speed-rounds", type=int, default=3,
                    help="interleaved rounds of LM-sized training steps for the throughput (0: skip)")
    ap.add_argument("--speed-only", action="store_true",
                    help="only (re)measure the throughput of variants whose accuracy rows are in the results file")
    ap.add_argument("--name", default="selective_copying", help="results file stem")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--allow-mixed", action="store_true",
                    help="keep earlier rows that another code version or model config made")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    setup = {"steps": args.steps, "length": args.length, "curriculum": [[L, f] for L, f in args.curriculum],
             "num_memorize": args.num_memorize, "seeds": args.seeds,
             "test_lengths": [int(x) for x in args.test_lengths.split(",")], "torch": torch.__version__,
             "threads": 1, "lm_model": "bench/train_step.py sizes, ffn_dim 0"}
    path = Path(args.out) / f"{args.name}.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    same = {"curriculum": [], **{k: v for k, v in earlier.get("setup", {}).items() if k != "torch"}} == \
        {k: v for k, v in setup.items() if k != "torch"}
    rows = {r["variant"]: r for r in earlier.get("rows", [])} if same else {}
    kept = [r for n, r in rows.items() if args.speed_only or n not in names]
    mixed = mixed_records(kept, code_version(), lambda r: (f"variant {r['variant']}", variant_config(r["variant"], args)))
    if mixed and not args.allow_mixed:
        refuse_mixed(path, mixed)
    write = lambda: write_results(Path(args.out), args.name, {"setup": setup, "rows": [rows[n] for n in VARIANTS if n in rows]},
                                  markdown([rows[n] for n in VARIANTS if n in rows], setup),
                                  provenance(seeds=[int(x) for x in args.seeds.split(",")],
                                             code_versions_of_rows=sorted({r.get("code_version", "unrecorded")
                                                                           for r in rows.values()})))
    for name in names if args.speed_only else []:        # a variant timed but not trained
        params = peers.num_params(task_builder(name, 64)())
        rows.setdefault(name, {"variant": name, "what": VARIANTS[name][0], "params": params, "runs": [],
                               "mean_accuracy": {}, "lm_train_tokens_per_s": None})
    for name in [] if args.speed_only else names:
        rows[name] = run_variant(name, args)
        write()
    if args.speed_rounds:
        timed = ["default", *(n for n in names if n != "default")]       # the reference is always timed
        for name, speed in lm_tokens_per_s(timed, args.speed_rounds).items():
            if name in rows:
                rows[name]["lm_train_tokens_per_s"] = speed
        write()

if __name__ == "__main__":
    main()
