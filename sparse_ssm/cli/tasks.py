"""`evaluate --task` for the Chomsky-hierarchy tasks and group word problems (`tasks.chomsky`):
train each variant on random lengths, report scaled accuracy per test-length bucket."""

from __future__ import annotations

import json
from pathlib import Path

from ..tasks.chomsky import chomsky_task
from ..tasks.length_generalization import check_protocol, results_table, run_length_generalization
from ..tasks.training import check_variants, task_model_config
from ..util.files import atomic_write_text, check_output_file


def cmd_chomsky_task(args) -> int:
    """Train every variant of --variants with the same budget on lengths --train-lengths, test each
    on the buckets of --test-buckets; print (and with --output-dir write) the scaled accuracies."""
    names = [name.strip() for name in args.variants.split(",")]
    task, train_range, edges = chomsky_task(args.task, args.group), args.train_lengths, args.test_buckets
    check_protocol(train_range, edges)
    check_variants(names)
    if args.output_dir:                                   # before the variants train (minutes)
        for suffix in (".json", ".md"):
            check_output_file(Path(args.output_dir) / f"{task.name}{suffix}", args.overwrite, "--output-dir")
    rows = []
    for name in names:
        config = task_model_config(name, edges[-1] + 64, task.vocab)
        print(f"{task.name}, {name}: {args.steps} steps at lengths {train_range[0]}-{train_range[1]} ...", flush=True)
        result = run_length_generalization(task, config, args.steps, args.batch_size, train_range, edges,
                                           lr=args.lr, seed=args.seed)
        rows.append({"variant": name, "accuracy": result.accuracy, "scaled": result.scaled,
                     "overall_accuracy": result.overall_accuracy, "overall_scaled": result.overall_scaled,
                     "seconds": result.seconds, "loss": result.final_loss})
        print("   scaled accuracy " + ", ".join(f"{b}: {s:.3f}" for b, s in result.scaled.items())
              + f"; {edges[0]}-{edges[-1]}: {result.overall_scaled:.3f}  ({result.seconds:.0f}s)")
    table = "\n".join(results_table(rows, edges)) + (
        f"\n\nscaled accuracy: (accuracy - chance) / (1 - chance), chance {task.chance:.3f}; {args.steps} steps, "
        f"batch {args.batch_size}, lr {args.lr:g}, train lengths {train_range[0]}-{train_range[1]}, seed {args.seed}\n")
    print(table)
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / f"{task.name}.json", json.dumps(
            {"task": task.name, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
             "train_lengths": list(train_range), "test_buckets": list(edges), "chance": task.chance, "rows": rows},
            indent=2))
        atomic_write_text(out / f"{task.name}.md", table)
        print(f"wrote {out / (task.name + '.json')} and .md")
    return 0
