"""State tracking against the structure of the selective A_t: the tables of issue 12.

    python bench/state_tracking.py                      # the full grid (hours; resumable)
    python bench/state_tracking.py --tasks parity,mod3 --variants diagonal,block4 --seeds 0
    python bench/state_tracking.py --quick              # a few steps, one seed: the harness works
    python bench/state_tracking.py --length 64 --curriculum 16:0.6 --out DIR   # 16 first, then 64
    python bench/state_tracking.py --state-noise 1.0:0.1 --out DIR   # random initial states from 10% on

For each task (parity; counting mod 3 and mod 5; composition in S3 and A5; `--tasks` also takes s5)
x variant (`sparse_ssm.tasks.training.VARIANTS`) x seed, train the task's small model (2 layers, width
64, state 16, `task_model_config`; a variant may set its own layers, conv window and state size) for
a fixed budget (steps, batch, AdamW with a one-cycle learning rate) at one length, then score every
position of 256 fresh sequences at 1x, 4x and 16x that length (`--curriculum` trains shorter
lengths first; the tests stay at multiples of `--length`, the longest length trained; `--state-noise`
starts training sequences from random states, `tasks.training.noisy_initial_states`). Each cell
records its accuracy per length, final training loss, steps, CPU seconds (of this process, the unit
of the budget on a shared machine) and wall seconds.

Resumable: state_tracking.json is rewritten (atomically) after every cell, and a rerun skips the
(task, variant, seed) cells it already holds; a file made with another budget is refused (pass
another --out, or delete it), and so are cells that another code version (git commit, or a dirty
tree's diff) or another model config made, unless --allow-mixed keeps them.  Every cell records
its code version and model config, the JSON its provenance (bench/provenance.py).  Writes state_tracking.json, .md (per task and variant: mean and
min-max over the seeds at each length, CPU minutes per run) and .png (accuracy against length)
under --out; `--quick` writes state_tracking_quick.* instead, so it never mixes with real figures.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import comma_list, curriculum_phases, pyplot, trained_lengths  # noqa: E402
from provenance import code_version, load_grid_cells, provenance, summary_line  # noqa: E402
from sparse_ssm import SparseSSMForCausalLM  # noqa: E402
from sparse_ssm.tasks.synthetic import chance_accuracy, task_vocab  # noqa: E402
from sparse_ssm.tasks.training import ANGLE_GRID_FROM, TASK_MODEL, VARIANTS, run_task, task_model_config  # noqa: E402
from sparse_ssm.util.files import atomic_write_text  # noqa: E402

TASKS = {"parity": dict(task="parity"),
         "mod3": dict(task="modular-counting", modulus=3),
         "mod5": dict(task="modular-counting", modulus=5),
         "s3": dict(task="permutation-composition", group="s3"),
         "a5": dict(task="permutation-composition", group="a5"),
         "s5": dict(task="permutation-composition", group="s5")}
DEFAULT_TASKS = ("parity", "mod3", "mod5", "s3", "a5")
DEFAULT_VARIANTS = ("diagonal", "diagonal_signed", "rotation", "block4", "dense", "low_rank", "lti")
MULTIPLES = (1, 4, 16)


def cell_config(name: str, variant: str, setup: dict):
    """The model config of a (task, variant) cell: (SparseSSMConfig, task options, vocab, test lengths)."""
    spec = TASKS[name]
    options = {k: v for k, v in spec.items() if k != "task"}
    vocab = task_vocab(spec["task"], **options)
    lengths = [m * setup["length"] for m in setup["multiples"]]
    return task_model_config(variant, max(lengths) + 1, vocab), options, vocab, lengths


def run_cell(name: str, variant: str, seed: int, setup: dict) -> dict:
    """Train and test one (task, variant, seed); the record that goes into the JSON, with the code
    version and model config that made it."""
    spec = TASKS[name]
    config, options, vocab, lengths = cell_config(name, variant, setup)
    structured = SparseSSMForCausalLM(config).blocks[config.structured_indices[0]]      # a hybrid's first structured one
    structure = structured.mixer.ssm_cost_per_token()["structure"]
    cpu, wall = time.process_time(), time.perf_counter()
    result = run_task(spec["task"], config, setup["steps"], setup["batch"], setup["length"], lengths,
                      lr=setup["lr"], seed=seed, curriculum=setup.get("curriculum", []),
                      state_noise=tuple(setup.get("state_noise", (0.0, 0.0))), **options)
    return {"task": name, "variant": variant, "seed": seed, "structure": structure,
            "discretization": config.resolved_discretization, "num_layers": config.num_layers,
            "conv_kernel": config.conv_kernel, "state_dim": config.state_dim, "num_heads": config.resolved_num_heads,
            "angle_grid": config.rotation_angle_grid, "learned_initial_state": config.learned_initial_state,
            "exact_reflections": config.exact_reflections, "reflection_init_logit": config.reflection_init_logit,
            "classes": vocab,
            "chance": chance_accuracy(spec["task"], vocab), "accuracy": {str(L): a for L, a in result.accuracy.items()},
            "final_loss": result.final_loss, "steps": setup["steps"],
            "cpu_seconds": time.process_time() - cpu, "wall_seconds": time.perf_counter() - wall,
            "code_version": code_version(), "config": config.to_dict()}


def load_cells(path: Path, setup: dict, allow_mixed: bool = False) -> list[dict]:
    """The finished cells of an earlier run with the same setup, made by this code version and the
    model configs it would build (any, with allow_mixed); [] when there is none."""
    return load_grid_cells(path, setup, lambda c: cell_config(c["task"], c["variant"], setup)[0].to_dict(), allow_mixed)


def percent_range(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.1%}" if len(values) == 1 else f"{mean:.1%} ({min(values):.1%}–{max(values):.1%})"


def model_label(cell: dict) -> str:
    """'structure (discretisation)', plus the layer count, conv window, state size and heads where a
    variant sets its own, a learned initial state, the angle grid of rotation pairs, and exact
    reflections (with their initial strength)."""
    layers, window, state = (cell.get(k, TASK_MODEL[k]) for k in ("num_layers", "conv_kernel", "state_dim"))
    heads, grid = cell.get("num_heads", TASK_MODEL["num_heads"]), cell.get("angle_grid", 0)
    exact = (f"pairs exact rotations by multiples of 2π/{grid}" if grid else
             f"β = {2 / (1 + math.exp(-cell['reflection_init_logit'])):.2g} at first, then exact reflections "
             f"(β 0 or 2, decay 1)" if cell.get("exact_reflections") else "")
    shape = [f"{layers} layer{'s' * (layers > 1)}" if layers != TASK_MODEL["num_layers"] else "",
             f"conv window {window}" if window != TASK_MODEL["conv_kernel"] else "",
             f"state {state}" if state != TASK_MODEL["state_dim"] else "",
             f"{heads} heads" if heads != TASK_MODEL["num_heads"] else "",
             "learned initial state" if cell.get("learned_initial_state") else "",
             f"{exact} and no inputs into the state from {ANGLE_GRID_FROM:.0%} of the steps" if exact else ""]
    return f"{cell['structure']} ({', '.join([cell['discretization'], *filter(None, shape)])})"


def markdown(setup: dict, cells: list[dict]) -> list[str]:
    """Per task: one row per variant, mean (min–max over seeds) accuracy at each test length."""
    lengths = [m * setup["length"] for m in setup["multiples"]]
    trained = trained_lengths(setup.get("curriculum", []), setup["length"])
    lines = [f"Budget per run: {setup['steps']} steps of {setup['batch']} sequences of length {trained}, "
             f"AdamW lr {setup['lr']} (one-cycle), model: {TASK_MODEL['num_layers']} layers (conv window "
             f"{TASK_MODEL['conv_kernel']}), width {TASK_MODEL['hidden_dim']}, state {TASK_MODEL['state_dim']} unless "
             f"the structure column says otherwise, {setup['threads']} CPU "
             f"thread(s); accuracy over every position of 256 fresh sequences; mean (min–max) over seeds.", ""]
    if "state_noise" in setup:
        sigma, start = setup["state_noise"]
        lines[0] += (f" From {start:.0%} of the steps on, training sequences start from a random state "
                     f"N(0, {sigma:g}²) (around the learned initial state where a model has one); tests from "
                     f"zero (or that state).")
    for name in dict.fromkeys(c["task"] for c in cells):
        mine = [c for c in cells if c["task"] == name]
        lines += [f"**{name}** ({mine[0]['classes']} classes, chance {mine[0]['chance']:.1%})", "",
                  "| variant | structure | " + " | ".join(f"acc. @ {L} ({L // setup['length']}x)" for L in lengths)
                  + " | seeds | CPU min / run |", "|---|---|" + "---:|" * (len(lengths) + 2)]
        for variant in dict.fromkeys(c["variant"] for c in mine):
            runs = [c for c in mine if c["variant"] == variant]
            accs = [percent_range([r["accuracy"][str(L)] for r in runs]) for L in lengths]
            minutes = statistics.fmean(r["cpu_seconds"] for r in runs) / 60
            lines.append(f"| {variant} | {model_label(runs[0])} | " + " | ".join(accs)
                         + f" | {len(runs)} | {minutes:.2f} |")
        lines.append("")
    total = sum(c["cpu_seconds"] for c in cells) / 60
    lines.append(f"{len(cells)} runs, {total:.1f} CPU minutes in all.")
    return lines


def plot(setup: dict, cells: list[dict], path: Path):
    """One panel per task: mean accuracy against test length per variant, bars from min to max."""
    plt = pyplot()
    if plt is None:
        return
    names = list(dict.fromkeys(c["task"] for c in cells))
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.5), squeeze=False)
    lengths = [m * setup["length"] for m in setup["multiples"]]
    trained = trained_lengths(setup.get("curriculum", []), setup["length"], short=True)
    for ax, name in zip(axes[0], names):
        mine = [c for c in cells if c["task"] == name]
        for variant in dict.fromkeys(c["variant"] for c in mine):
            accs = [[100 * c["accuracy"][str(L)] for c in mine if c["variant"] == variant] for L in lengths]
            means = [statistics.fmean(a) for a in accs]
            spread = [[m - min(a) for m, a in zip(means, accs)], [max(a) - m for m, a in zip(means, accs)]]
            ax.errorbar(lengths, means, yerr=spread, fmt="o-", capsize=3, label=variant,
                        color=f"C{list(VARIANTS).index(variant) % 10}")     # one colour per variant in every panel
        ax.axhline(100 * mine[0]["chance"], color="k", ls=":", lw=0.8, label="chance")
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 105)
        ax.set_xlabel(f"test length (trained at {trained})")
        ax.set_ylabel("accuracy, every position (%)")
        noise = setup.get("state_noise")
        ax.set_title(name + (f" (training from random states, σ = {noise[0]:g})" if noise else ""), fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def state_noise_spec(text: str) -> tuple[float, float]:
    """The --state-noise flag: '1.0' -> (1.0, 0.0), '1.0:0.1' -> (1.0, 0.1)."""
    try:
        sigma, start = (float(x) for x in (text.split(":") if ":" in text else (text, "0")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SIGMA or SIGMA:FROM, e.g. 1.0:0.1") from None
    if sigma <= 0 or not 0 <= start < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: SIGMA must be > 0 and FROM in [0, 1)")
    return sigma, start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=lambda s: comma_list(s, TASKS), default=list(DEFAULT_TASKS))
    ap.add_argument("--variants", type=lambda s: comma_list(s, VARIANTS), default=list(DEFAULT_VARIANTS))
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], help="comma list (default 0,1,2)")
    ap.add_argument("--steps", type=int, help="training steps per run (default 1500; --quick 10)")
    ap.add_argument("--length", type=int, help="training length; tests at 1x, 4x, 16x (default 16; --quick 4)")
    ap.add_argument("--curriculum", type=curriculum_phases, default=[], metavar="L:FRACTION,...",
                    help="shorter lengths trained first, e.g. 16:0.6 (then --length for the rest; tests stay at "
                         "multiples of --length, the longest trained)")
    ap.add_argument("--state-noise", type=state_noise_spec, metavar="SIGMA[:FROM]",
                    help="training sequences start from a random state N(h0, SIGMA^2), from the fraction FROM of "
                         "the steps on (default 0); tests start from h0, the learned initial state or zero "
                         "(Buitrago Ruiz & Gu's random noise)")
    ap.add_argument("--batch", type=int, default=32, help="sequences per step (default 32)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--quick", action="store_true", help="tiny budget and one seed, written to state_tracking_quick.*")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--allow-mixed", action="store_true",
                    help="keep earlier cells that another code version or model config made")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    setup = {"steps": args.steps or (10 if args.quick else 1500), "batch": args.batch, "lr": args.lr,
             "length": args.length or (4 if args.quick else 16), "multiples": list(MULTIPLES), "threads": args.threads}
    if args.curriculum:         # only then: files written before the flag keep their setup
        setup["curriculum"] = [[L, f] for L, f in args.curriculum]
    if args.state_noise:
        setup["state_noise"] = list(args.state_noise)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "state_tracking_quick" if args.quick else "state_tracking"
    path = out / f"{stem}.json"
    cells = load_cells(path, setup, args.allow_mixed)
    done = {(c["task"], c["variant"], c["seed"]) for c in cells}
    todo = [(n, v, s) for s in seeds for n in args.tasks for v in args.variants if (n, v, s) not in done]
    print(f"{len(done)} runs already in {path}; {len(todo)} to go", flush=True)
    for i, (name, variant, seed) in enumerate(todo):
        cell = run_cell(name, variant, seed, setup)
        cells.append(cell)
        prov = provenance(seeds=seeds, code_versions_of_cells=sorted({c.get("code_version", "unrecorded") for c in cells}))
        atomic_write_text(path, json.dumps({"setup": setup, "provenance": prov, "cells": cells}, indent=2))
        print(f"[{i + 1}/{len(todo)}] {name}, {variant}, seed {seed}: "
              + ", ".join(f"{L}: {a:.1%}" for L, a in cell["accuracy"].items())
              + f" ({cell['cpu_seconds'] / 60:.1f} CPU min)", flush=True)
    rank = {name: i for i, name in enumerate([*TASKS, *VARIANTS])}
    cells.sort(key=lambda c: (rank.get(c["task"], len(rank)), rank.get(c["variant"], len(rank)), c["seed"]))
    lines = [*markdown(setup, cells), "", summary_line(provenance(seeds=seeds))]
    if len({c.get("code_version") for c in cells}) > 1:
        lines.append(f"Cells from {len({c.get('code_version') for c in cells})} code versions (--allow-mixed).")
    atomic_write_text(out / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(setup, cells, out / f"{stem}.png")


if __name__ == "__main__":
    main()
