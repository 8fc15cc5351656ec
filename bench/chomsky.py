"""The state-tracking benchmark of the linear-RNN papers (issue 36): Deletang et al.'s regular and
context-free tasks and the group word problems, under their length-generalisation protocol.

    python bench/chomsky.py                                   # the grid (hours on 2 cores; resumable)
    python bench/chomsky.py --tasks parity-check,a5 --variants diagonal_signed,householder --seeds 0
    python bench/chomsky.py --layers 3 --width 128            # another model shape for every variant
    python bench/chomsky.py --quick                           # a few steps, one seed: the harness works

For each task (`sparse_ssm.tasks.chomsky`: parity-check, even-pairs, cycle-navigation,
modular-arithmetic, modular-arithmetic-brackets, and the word problems s3, a5, s5) x variant
(`sparse_ssm.tasks.training.VARIANTS`) x seed, train the variant's small model (2 layers, width 64,
state 16 unless the variant or --layers / --width set another) for a fixed budget, each batch of
one length drawn uniformly from --train-lengths (default 3-40), then score it on fresh strings in
each bucket of --test-buckets (default 40-64, 65-128, 129-256) as scaled accuracy, (accuracy -
chance) / (1 - chance) (`tasks.length_generalization`).  Each cell records its scaled accuracy per
bucket and over the whole test range, final loss, CPU and wall seconds, its code version and model
config.

Resumable: chomsky.json is rewritten (atomically) after every cell and a rerun skips the cells it
holds; a file made with another setup is refused, and so are cells another code version or model
config made unless --allow-mixed (bench/provenance.py).  Writes chomsky.json and chomsky.md (per
task and variant: mean and min-max over seeds) under --out; --quick writes chomsky_quick.* instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import comma_list  # noqa: E402
from provenance import code_version, load_grid_cells, provenance, summary_line  # noqa: E402
from sparse_ssm.tasks.chomsky import DELETANG_TASKS, chomsky_task  # noqa: E402
from sparse_ssm.tasks.length_generalization import (TEST_EDGES, TRAIN_RANGE, bucket_labels,  # noqa: E402
                                                    check_protocol, run_length_generalization)
from sparse_ssm.util.schema import parse_value  # noqa: E402
from sparse_ssm.model import SparseSSMConfig  # noqa: E402
from sparse_ssm.tasks.training import TASK_MODEL, VARIANTS, task_model_config  # noqa: E402
from sparse_ssm.util.errors import ConfigError  # noqa: E402
from sparse_ssm.util.files import atomic_write_text  # noqa: E402

TASKS = (*DELETANG_TASKS, "s3", "a5", "s5")
DEFAULT_TASKS = (*DELETANG_TASKS, "s3", "a5")
DEFAULT_VARIANTS = ("diagonal", "diagonal_signed", "rotation", "householder", "block4", "lti")


def task_of(name: str):
    """The `ChomskyTask` of a grid task name (a word problem is named by its group)."""
    return chomsky_task(name) if name in DELETANG_TASKS else chomsky_task("word-problem", name)


def cell_config(name: str, variant: str, setup: dict):
    """The model config of a (task, variant) cell under the setup's shape and --set overrides."""
    shape = {k: setup[k] for k in ("num_layers", "hidden_dim") if setup.get(k)}
    return task_model_config(variant, setup["test_buckets"][-1] + 8, task_of(name).vocab,
                             **shape, **setup.get("overrides", {}))


def run_cell(name: str, variant: str, seed: int, setup: dict) -> dict:
    """Train and test one (task, variant, seed): its record, with the code version and config that made it."""
    task, config = task_of(name), cell_config(name, variant, setup)
    cpu, wall = time.process_time(), time.perf_counter()
    result = run_length_generalization(task, config, setup["steps"], setup["batch"], setup["train_lengths"],
                                       setup["test_buckets"], lr=setup["lr"], seed=seed,
                                       curriculum=setup.get("curriculum", 0.0))
    return {"task": name, "variant": variant, "seed": seed, "chance": task.chance, "classes": task.classes,
            "num_layers": config.num_layers, "hidden_dim": config.hidden_dim, "state_dim": config.state_dim,
            "accuracy": result.accuracy, "scaled": result.scaled, "overall_scaled": result.overall_scaled,
            "final_loss": result.final_loss, "steps": setup["steps"],
            "cpu_seconds": time.process_time() - cpu, "wall_seconds": time.perf_counter() - wall,
            "code_version": code_version(), "config": config.to_dict()}


def load_cells(path: Path, setup: dict, allow_mixed: bool = False) -> list[dict]:
    """The cells of an earlier run with the same setup, made by this code and the configs it would build."""
    return load_grid_cells(path, setup, lambda c: cell_config(c["task"], c["variant"], setup).to_dict(), allow_mixed)


def spread(values: list[float], percent: bool = False) -> str:
    """mean (min–max) of the values, as 0.123 or (percent) 12.3%."""
    show = (lambda v: f"{100 * v:.1f}%") if percent else (lambda v: f"{v:.3f}")
    mean = statistics.fmean(values)
    return show(mean) if len(values) == 1 else f"{show(mean)} ({show(min(values))}–{show(max(values))})"


def markdown(setup: dict, cells: list[dict]) -> list[str]:
    """Per task: one row per variant, mean (min–max over seeds) scaled accuracy per bucket and overall."""
    edges, (low, high) = setup["test_buckets"], setup["train_lengths"]
    buckets = bucket_labels(edges)
    lines = [f"Budget per run: {setup['steps']} steps of {setup['batch']} strings, each batch of one length drawn "
             f"uniformly from {low}-{high}; AdamW lr {setup['lr']} (one-cycle); model: the variant's shape (default "
             f"{TASK_MODEL['num_layers']} layers, width {TASK_MODEL['hidden_dim']}, state {TASK_MODEL['state_dim']})"
             f"{'' if not (setup.get('num_layers') or setup.get('hidden_dim')) else ', layers / width set by flag'}"
             f"{''.join(f', {k} = {v}' for k, v in setup.get('overrides', {}).items())}"
             f"{'' if not setup.get('curriculum') else ', longest training length growing from ' + str(low) + ' to ' + str(high) + ' over the first ' + format(setup['curriculum'], '.0%') + ' of the steps'}"
             f", {setup['threads']} CPU thread(s).  Scaled accuracy (1 perfect, 0 chance) on 256 fresh strings per "
             f"test bucket; mean (min–max) over seeds.", ""]
    for name in dict.fromkeys(c["task"] for c in cells):
        mine = [c for c in cells if c["task"] == name]
        lines += [f"**{name}** ({mine[0]['classes']} classes, chance {mine[0]['chance']:.3f})", "",
                  "| variant | layers x width | " + " | ".join(f"scaled @ {b}" for b in buckets)
                  + f" | scaled @ {edges[0]}-{edges[-1]} | seeds | CPU min / run |",
                  "|---|---|" + "---:|" * (len(buckets) + 3)]
        for variant in dict.fromkeys(c["variant"] for c in mine):
            runs = [c for c in mine if c["variant"] == variant]
            lines.append(f"| {variant} | {runs[0]['num_layers']} x {runs[0]['hidden_dim']} | "
                         + " | ".join(spread([r["scaled"][b] for r in runs]) for b in buckets)
                         + f" | {spread([r['overall_scaled'] for r in runs])} | {len(runs)} | "
                         f"{statistics.fmean(r['cpu_seconds'] for r in runs) / 60:.2f} |")
        lines += ["", "Accuracy (not scaled), mean (min–max) over seeds:", "",
                  "| variant | " + " | ".join(f"acc. @ {b}" for b in buckets) + " |", "|---|" + "---:|" * len(buckets)]
        for variant in dict.fromkeys(c["variant"] for c in mine):
            runs = [c for c in mine if c["variant"] == variant]
            lines.append(f"| {variant} | " + " | ".join(spread([r["accuracy"][b] for r in runs], True) for b in buckets)
                         + " |")
        lines.append("")
    lines.append(f"{len(cells)} runs, {sum(c['cpu_seconds'] for c in cells) / 60:.1f} CPU minutes in all.")
    return lines


def override(text: str) -> tuple[str, object]:
    """KEY=VALUE of --set, the value read as the config files read it (`config.parse_value`)."""
    key, sep, value = text.partition("=")
    if not sep or key not in SparseSSMConfig.model_fields:
        raise argparse.ArgumentTypeError(f"{text!r}: need KEY=VALUE with KEY a model config key")
    return key, parse_value(value)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=lambda s: comma_list(s, TASKS), default=list(DEFAULT_TASKS))
    ap.add_argument("--variants", type=lambda s: comma_list(s, VARIANTS), default=list(DEFAULT_VARIANTS))
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], help="comma list (default 0,1,2)")
    ap.add_argument("--steps", type=int, help="training steps per run (default 3000; --quick 5)")
    ap.add_argument("--batch", type=int, default=32, help="strings per step (default 32)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    ap.add_argument("--train-lengths", type=lambda s: [int(x) for x in s.split("-")],
                    help=f"MIN-MAX (default {TRAIN_RANGE[0]}-{TRAIN_RANGE[1]}; --quick 3-8)")
    ap.add_argument("--test-buckets", type=lambda s: [int(x) for x in s.split(",")],
                    help=f"bucket edges (default {','.join(map(str, TEST_EDGES))}; --quick 8,12,16)")
    ap.add_argument("--layers", type=int, help="layers of every variant (default: the variant's)")
    ap.add_argument("--width", type=int, help="hidden width of every variant (default: the variant's)")
    ap.add_argument("--curriculum", type=float, default=0.0,
                    help="fraction of the steps over which the longest training length grows from MIN to MAX "
                         "(default 0: uniform in MIN-MAX from the start)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], type=override, metavar="KEY=VALUE",
                    help="a model config key for every variant (repeatable; e.g. --set low_rank_rank=3): ablations")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--quick", action="store_true", help="tiny budget and one seed, written to chomsky_quick.*")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--allow-mixed", action="store_true",
                    help="keep earlier cells that another code version or model config made")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    setup = {"steps": args.steps or (5 if args.quick else 3000), "batch": args.batch, "lr": args.lr,
             "train_lengths": args.train_lengths or ([3, 8] if args.quick else list(TRAIN_RANGE)),
             "test_buckets": args.test_buckets or ([8, 12, 16] if args.quick else list(TEST_EDGES)),
             "num_layers": args.layers, "hidden_dim": args.width, "threads": args.threads}
    if args.curriculum:
        setup["curriculum"] = args.curriculum
    if args.overrides:
        setup["overrides"] = dict(args.overrides)
    try:
        check_protocol(setup["train_lengths"], setup["test_buckets"])
    except ConfigError as e:
        sys.exit(f"error: {e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "chomsky_quick" if args.quick else "chomsky"
    path = out / f"{stem}.json"
    cells = load_cells(path, setup, args.allow_mixed)
    done = {(c["task"], c["variant"], c["seed"]) for c in cells}
    todo = [(n, v, s) for s in seeds for n in args.tasks for v in args.variants if (n, v, s) not in done]
    print(f"{len(done)} runs already in {path}; {len(todo)} to go", flush=True)
    for i, (name, variant, seed) in enumerate(todo):
        cells.append(run_cell(name, variant, seed, setup))
        prov = provenance(seeds=seeds, code_versions_of_cells=sorted({c["code_version"] for c in cells}))
        atomic_write_text(path, json.dumps({"setup": setup, "provenance": prov, "cells": cells}, indent=2))
        print(f"[{i + 1}/{len(todo)}] {name}, {variant}, seed {seed}: scaled "
              + ", ".join(f"{b}: {s:.3f}" for b, s in cells[-1]["scaled"].items())
              + f" ({cells[-1]['cpu_seconds'] / 60:.1f} CPU min)", flush=True)
    rank = {name: i for i, name in enumerate([*TASKS, *VARIANTS])}
    cells.sort(key=lambda c: (rank.get(c["task"], len(rank)), rank.get(c["variant"], len(rank)), c["seed"]))
    lines = [*markdown(setup, cells), "", summary_line(provenance(seeds=seeds))]
    if len({c["code_version"] for c in cells}) > 1:
        lines.append(f"Cells from {len({c['code_version'] for c in cells})} code versions (--allow-mixed).")
    atomic_write_text(out / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
