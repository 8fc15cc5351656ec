"""Induction heads (the Mamba paper's task) over several seeds and learning rates, with provenance.

    python bench/induction_heads.py [--variants diagonal,lti,mambapy] [--seeds 10,11,12,13,14]
                                    [--lrs 6e-3,3e-3] [--steps 600] [--length 32]
                                    [--test-lengths 32,128,512] [--name induction_heads] [--out bench/results]

Each run of ours is `python main.py evaluate --task induction-heads --variants V --lr LR --seed S`
(the same model config, batches and schedule: `sparse_ssm.tasks.training.run_task`, batch 32);
`mambapy` is mamba.py's Mamba in the sizes of bench/selective_copying.py, trained by the same harness.
Results go to NAME.json / NAME.md under --out: one row per variant and learning rate with every
seed's accuracy, the mean at each test length and the CPU seconds per run; the JSON holds the
provenance (bench/provenance.py) and each row its code version and model config.
"""

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
from provenance import code_version, model_record, provenance  # noqa: E402
from selective_copying import EXPAND, LAYERS, STATE, WIDTH, TaskAdapter  # noqa: E402
from sparse_ssm.tasks.synthetic import chance_accuracy, task_vocab  # noqa: E402
from sparse_ssm.tasks.training import VARIANTS, run_task, task_model_config  # noqa: E402

TASK = "induction-heads"


def model_source(name: str, max_len: int):
    """What `run_task` trains: our variant's config, or a builder of mamba.py's Mamba (called after seeding)."""
    vocab = task_vocab(TASK)
    if name == "mambapy":
        return lambda: TaskAdapter(peers.mambapy(vocab, WIDTH, LAYERS, STATE, EXPAND)[0])
    return task_model_config(name, max_len, vocab)


def run_row(name: str, lr: float, args) -> dict:
    """Every seed of one variant at one learning rate: accuracy per test length, loss, CPU seconds."""
    source = model_source(name, max(args.test_lengths) + 64)        # the length `main.py evaluate` builds for
    torch.manual_seed(0)
    config = model_record(source().model)["config"] if callable(source) else source.to_dict()
    runs = []
    for seed in args.seeds:
        cpu0 = time.process_time()
        result = run_task(TASK, source, args.steps, 32, args.length, args.test_lengths, lr=lr, seed=seed,
                          vocab=task_vocab(TASK))
        runs.append({"seed": seed, "accuracy": {str(L): a for L, a in result.accuracy.items()},
                     "final_loss": result.final_loss, "cpu_s": time.process_time() - cpu0})
        print(f"{name} lr {lr:g} seed {seed}: " + ", ".join(f"@{L} {a:.1%}" for L, a in result.accuracy.items())
              + f" ({runs[-1]['cpu_s']:.0f} CPU s)", flush=True)
    mean = {str(L): statistics.mean(r["accuracy"][str(L)] for r in runs) for L in args.test_lengths}
    return {"variant": name, "lr": lr, "runs": runs, "mean_accuracy": mean,
            "cpu_s_per_run": statistics.mean(r["cpu_s"] for r in runs), "code_version": code_version(), "config": config}


def markdown(rows: list[dict], setup: dict) -> list[str]:
    """A table: variant, lr, accuracy per seed at the training length, mean (min–max) at each test length."""
    lengths = setup["test_lengths"]
    lines = [f"| variant | lr | acc. @ {lengths[0]} per seed | " + " | ".join(f"mean @ {L}" for L in lengths)
             + " | CPU s / run |", "|---|---:|---|" + "---:|" * len(lengths) + "---:|"]
    for row in rows:
        seeds = " / ".join(f"{r['accuracy'][str(lengths[0])]:.1%}" for r in row["runs"])
        cells = []
        for L in lengths:
            accs = [r["accuracy"][str(L)] for r in row["runs"]]
            cells.append(f"{statistics.mean(accs):.1%} ({min(accs):.1%}–{max(accs):.1%})")
        lines.append(f"| {row['variant']} | {row['lr']:g} | {seeds} | " + " | ".join(cells)
                     + f" | {row['cpu_s_per_run']:.0f} |")
    lines += ["", f"chance: {chance_accuracy(TASK):.1%}; {setup['steps']} steps, batch 32, one-cycle AdamW, train length "
              f"{setup['length']}, seeds {', '.join(map(str, setup['seeds']))}; mean (min–max) over the seeds"]
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="diagonal,lti", help=f"comma list of: mambapy, {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", default="10,11,12,13,14")
    ap.add_argument("--lrs", default="6e-3,3e-3", help="peak learning rates, each run for every variant and seed")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--test-lengths", default="32,128,512")
    ap.add_argument("--name", default="induction_heads", help="results file stem")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n != "mambapy" and n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant {unknown[0]!r}; choose from mambapy, {', '.join(VARIANTS)}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.test_lengths = [int(L) for L in args.test_lengths.split(",")]
    torch.set_num_threads(1)
    setup = {"task": TASK, "steps": args.steps, "length": args.length, "seeds": args.seeds,
             "test_lengths": args.test_lengths, "threads": 1}
    rows = []
    for lr in [float(x) for x in args.lrs.split(",")]:
        for name in names:
            rows.append(run_row(name, lr, args))
            write_results(Path(args.out), args.name, {"setup": setup, "rows": rows}, markdown(rows, setup),
                          provenance(seeds=args.seeds, lrs=args.lrs))


if __name__ == "__main__":
    main()
