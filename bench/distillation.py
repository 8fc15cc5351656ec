"""Distillation against plain training on the same teacher text.

    python main.py create-synthetic --config config/default_config.yaml --backend llama_cpp \\
        --distillation --num-samples 300 --max-new-tokens 96 --output-file gemma_distill.json
    python bench/distillation.py --data data/synthetic/gemma_distill.json

Two students of the same size, seed, data order and step budget train on the teacher's own token
ids (its tokenizer, compacted): one with the plain next-token loss (alpha 0), one with the
distillation loss (alpha > 0, temperature T).  Both are scored by cross-entropy on held-out
records of the teacher text (validation during training; the best checkpoint then on the test
records).  Writes bench/results/distillation.json and .md (each run's config in its row, the
dataset file's sha256, the provenance of bench/provenance.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import write_results  # noqa: E402
from provenance import provenance  # noqa: E402
from sparse_ssm.config import Config  # noqa: E402
from sparse_ssm.train import Trainer  # noqa: E402


def student_config(data: str, output: Path, steps: int, alpha: float, temperature: float, seed: int) -> Config:
    return Config.from_dict({
        "model": dict(vocab_size=50000, hidden_dim=128, state_dim=16, ffn_dim=0, num_layers=2, max_seq_len=64,
                      dropout=0.1, selective_param_class="sparse", sparsity_level=0.9),
        "training": dict(num_epochs=1000, max_steps=steps, batch_size=16, gradient_accumulation_steps=1,
                         logging_steps=25, save_steps=steps, eval_steps=max(1, steps // 8), mixed_precision="no",
                         gradient_checkpointing=False, output_dir=str(output), device="cpu", progress_bar=False,
                         seed=seed, save_total_limit=1),
        "optimizer": dict(learning_rate=3e-3, weight_decay=0.1),
        "scheduler": dict(name="cosine", warmup_steps=max(1, steps // 20), min_lr_ratio=0.1),
        "dataset": dict(type="synthetic", data_path=data, max_seq_len=64, stride=32, val_split=0.15, test_split=0.15),
        "distillation": dict(enabled=True, alpha=alpha, temperature=temperature),
    })


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/synthetic/gemma_distill.json")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--alphas", default="0,0.5,0.9")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--work", default="outputs/bench-distillation")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    meta = json.loads(Path(args.data).read_text())
    rows = []
    for seed in map(int, args.seeds.split(",")):
        for alpha in map(float, args.alphas.split(",")):
            run = Path(args.work) / f"alpha{alpha}-seed{seed}"
            config = student_config(args.data, run, args.steps, alpha, args.temperature, seed)
            start = time.perf_counter()
            trainer = Trainer(config, overwrite=True, log=lambda *_: None)      # a rerun replaces its scratch run
            result = trainer.train()
            test = trainer.evaluate_checkpoint("best")
            row = {"alpha": alpha, "temperature": args.temperature, "seed": seed, "steps": result["step"],
                   "best_step": result["best_step"], "validation_best_loss": trainer.state.best_val_loss,
                   "validation_final_loss": result["validation"]["loss"], "test_loss": test["loss"],
                   "test_perplexity": test["perplexity"], "seconds": round(time.perf_counter() - start, 1),
                   "student_vocab": trainer.config.model.vocab_size,
                   "train_tokens": int(len(trainer.data.streams["train"])), "test_tokens": test["tokens"],
                   "config": config.to_dict()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    by_alpha = {}
    for r in rows:
        by_alpha.setdefault(r["alpha"], []).append(r)
    summary = {a: {"test_loss": sum(r["test_loss"] for r in rs) / len(rs),
                   "test_perplexity": sum(r["test_perplexity"] for r in rs) / len(rs)} for a, rs in by_alpha.items()}
    out = Path(args.out)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch thread, torch {torch.__version__}"
    digest = hashlib.sha256(Path(args.data).read_bytes()).hexdigest()              # which teacher text it was
    payload = {"teacher": meta.get("teacher"), "dataset": {"path": args.data, "sha256": digest, **meta.get("stats", {})},
               "machine": machine, "rows": rows, "mean_by_alpha": summary}
    base = summary[min(summary)]["test_perplexity"]
    lines = [f"# Distillation vs. plain training on teacher text ({meta['teacher'].get('model')})", "",
             f"Data: {args.data} ({meta['stats']['samples']} samples, {meta['stats']['teacher_tokens']:,} teacher tokens, "
             f"records split 70/15/15); student: 2 layers, hidden 128, state 16 (sparse), {args.steps} steps of "
             f"16 x 64 tokens; temperature {args.temperature}; {machine}.", "",
             "| alpha | test loss (nats/token) | test perplexity | vs. alpha 0 |", "|---:|---:|---:|---:|"]
    for a in sorted(summary):
        lines.append(f"| {a} | {summary[a]['test_loss']:.4f} | {summary[a]['test_perplexity']:.2f} | "
                     f"{summary[a]['test_perplexity'] / base:.3f}x |")
    lines += ["", "Per run:", "", "| alpha | seed | best step | validation best | test perplexity | seconds |",
              "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['alpha']} | {r['seed']} | {r['best_step']} | {r['validation_best_loss']:.4f} | "
              f"{r['test_perplexity']:.2f} | {r['seconds']} |" for r in rows]
    write_results(out, "distillation", payload, lines,
                  provenance(seeds=[int(x) for x in args.seeds.split(",")]))


if __name__ == "__main__":
    main()
