"""Where the reflections' length generalisation fades (issue 36): train a variant on one task as
bench/chomsky.py does, then score the same trained model on the same test strings four times, with
its Householder layers' transitions made exact at test time in parts:

    as trained       the model as it learnt
    decays 1         every decay d = 1 (the diagonal factor of A_bar the identity), the writes kept
    writes exact     every write strength beta snapped to 0 or 2 (beta > 1: an exact reflection), the decays kept
    both             both: the model's `exact_reflections` transitions (`HouseholderStructure.snap_to_grid`)

    python bench/chomsky_fade.py --task parity-check --variant householder_delta_hybrid --seeds 0,1,2 \\
        --steps 8000 --curriculum 0.5 --out bench/results/chomsky_fade/parity

If making a part exact at test time keeps accuracy where the trained model loses it, that part's
error (a decay below 1, a write strength off 0 or 2) is what adds up with length; if accuracy falls,
the model uses that part as it learnt it (forgetting, partial writes).  Nothing is retrained: this
reads a trained model, it does not propose a training recipe.  Resumable per --out, like
bench/chomsky.py (one JSON rewritten atomically after every seed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from chomsky import TASKS, cell_config, override, spread, task_of  # noqa: E402
from provenance import code_version, load_grid_cells, provenance, summary_line  # noqa: E402
from sparse_ssm.model.lm import SparseSSMForCausalLM  # noqa: E402
from sparse_ssm.ssm.selective import SelectiveParameterGenerator  # noqa: E402
from sparse_ssm.ssm.structures.householder import HouseholderStructure  # noqa: E402
from sparse_ssm.tasks.length_generalization import (bucket_accuracies, bucket_labels, check_protocol,  # noqa: E402
                                                    run_length_generalization)
from sparse_ssm.tasks.training import VARIANTS  # noqa: E402
from sparse_ssm.util.errors import ConfigError  # noqa: E402
from sparse_ssm.util.files import atomic_write_text  # noqa: E402

# intervention -> (decays set to 1, write strengths snapped to 0 or 2)
INTERVENTIONS = {"as trained": (False, False), "decays 1": (True, False), "writes exact": (False, True),
                 "both": (True, True)}
TEST_SEED_OFFSET = 10_000      # the test strings' generator: the same strings for every intervention


def exact_parts(raw: torch.Tensor, dt: torch.Tensor, structure: HouseholderStructure, decays: bool,
                writes: bool) -> torch.Tensor:
    """raw (..., raw_size) -> the same with the decays' part and/or the reflections' part replaced by
    their exact values (`snap_to_grid` with grid 2: decays 1, beta 0 or 2); the keys are kept."""
    snapped = structure.snap_to_grid(raw, dt, 2)
    N = structure.state_dim
    return torch.cat([(snapped if decays else raw)[..., :N], (snapped if writes else raw)[..., N:]], -1)


@contextlib.contextmanager
def intervention(model: torch.nn.Module, decays: bool, writes: bool):
    """While open, every Householder layer's generated A_raw has the named parts made exact."""
    def hook(generator, _inputs, outputs):
        dt, A_raw, B, C, D = outputs
        return dt, exact_parts(A_raw, dt, generator.structure, decays, writes), B, C, D
    generators = [m for m in model.modules() if isinstance(m, SelectiveParameterGenerator)
                  and isinstance(m.structure, HouseholderStructure)]
    handles = [g.register_forward_hook(hook) for g in generators] if decays or writes else []
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_seed(setup: dict, seed: int) -> dict:
    """Train one model (bench/chomsky.py's cell) and score it under every intervention on the same strings."""
    task, config = task_of(setup["task"]), cell_config(setup["task"], setup["variant"], setup)
    built = []

    def build():
        built.append(SparseSSMForCausalLM(config))
        return built[-1]

    cpu = time.process_time()
    trained = run_length_generalization(task, build, setup["steps"], setup["batch"], setup["train_lengths"],
                                        setup["test_buckets"], lr=setup["lr"], seed=seed,
                                        test_sequences=setup["test_sequences"], curriculum=setup.get("curriculum", 0.0))
    model, labels = built[0].eval(), bucket_labels(setup["test_buckets"])
    accuracy = {}
    for name, (decays, writes) in INTERVENTIONS.items():
        strings = torch.Generator().manual_seed(TEST_SEED_OFFSET + seed)
        with torch.no_grad(), intervention(model, decays, writes):
            accuracy[name] = dict(zip(labels, bucket_accuracies(model, task, setup["test_buckets"], strings,
                                                                setup["test_sequences"], 8)))
    return {"task": setup["task"], "variant": setup["variant"], "seed": seed, "chance": task.chance,
            "final_loss": trained.final_loss, "accuracy": accuracy,
            "cpu_seconds": time.process_time() - cpu, "code_version": code_version(), "config": config.to_dict()}


def markdown(setup: dict, cells: list[dict]) -> list[str]:
    """One row per intervention: accuracy per bucket, mean (min-max) over seeds; then per seed."""
    labels = bucket_labels(setup["test_buckets"])
    low, high = setup["train_lengths"]
    lines = [f"**{setup['task']}**, `{setup['variant']}`: {setup['steps']} steps of {setup['batch']}, "
             f"lengths {low}-{high} (curriculum {setup.get('curriculum', 0.0)}), lr {setup['lr']}; "
             f"{setup['test_sequences']} test strings per bucket, the same for every intervention. "
             "Accuracy, mean (min–max) over seeds:", "",
             "| at test time | " + " | ".join(f"acc. @ {b}" for b in labels) + " |",
             "|---|" + "---:|" * len(labels)]
    for name in INTERVENTIONS:
        lines.append(f"| {name} | " + " | ".join(spread([c["accuracy"][name][b] for c in cells], True) for b in labels)
                     + " |")
    lines += ["", "Per seed (final training loss):", "", "| seed | at test time | " + " | ".join(labels) + " |",
              "|---:|---|" + "---:|" * len(labels)]
    for c in cells:
        for name in INTERVENTIONS:
            lines.append(f"| {c['seed']} ({c['final_loss']:.1e}) | {name} | "
                         + " | ".join(f"{100 * c['accuracy'][name][b]:.1f}%" for b in labels) + " |")
    lines += ["", f"{len(cells)} runs, {sum(c['cpu_seconds'] for c in cells) / 60:.1f} CPU minutes in all."]
    return lines


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=TASKS, required=True)
    ap.add_argument("--variant", choices=list(VARIANTS), default="householder_delta_hybrid")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--train-lengths", type=lambda s: [int(x) for x in s.split("-")], default=[3, 40])
    ap.add_argument("--test-buckets", type=lambda s: [int(x) for x in s.split(",")], default=[40, 64, 128, 160, 256])
    ap.add_argument("--test-sequences", type=int, default=256)
    ap.add_argument("--curriculum", type=float, default=0.5)
    ap.add_argument("--set", dest="overrides", action="append", default=[], type=override, metavar="KEY=VALUE")
    ap.add_argument("--out", required=True)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    setup = {"task": args.task, "variant": args.variant, "steps": args.steps, "batch": args.batch, "lr": args.lr,
             "train_lengths": args.train_lengths, "test_buckets": args.test_buckets,
             "test_sequences": args.test_sequences, "curriculum": args.curriculum,
             "overrides": dict(args.overrides)}
    try:
        check_protocol(setup["train_lengths"], setup["test_buckets"])
    except ConfigError as e:
        sys.exit(f"error: {e}")
    try:
        config = cell_config(args.task, args.variant, setup)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if config.selective_param_class != "householder":
        sys.exit(f"error: {args.variant} has no Householder layer: nothing to make exact (pick a householder* variant)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "chomsky_fade.json"
    cells = load_grid_cells(path, setup, lambda c: cell_config(c["task"], c["variant"], setup).to_dict())
    for seed in [s for s in args.seeds if s not in {c["seed"] for c in cells}]:
        cells.append(run_seed(setup, seed))
        prov = provenance(seeds=args.seeds)
        atomic_write_text(path, json.dumps({"setup": setup, "provenance": prov, "cells": cells}, indent=2))
        last = bucket_labels(args.test_buckets)[-1]
        print(f"seed {seed}: " + "; ".join(f"{n} {100 * cells[-1]['accuracy'][n][last]:.1f}%" for n in INTERVENTIONS)
              + " in the last bucket", flush=True)
    cells.sort(key=lambda c: c["seed"])
    lines = [*markdown(setup, cells), "", summary_line(provenance(seeds=args.seeds))]
    atomic_write_text(out / "chomsky_fade.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
