"""What a run reports as it goes: a progress bar, TensorBoard scalars (`train/loss`, `train/lr`,
`train/grad_norm`, `train/tokens_per_s`, distillation terms, `val/loss`, `val/perplexity`) and
the validation lines.  Only the main process writes; the others only take part in reductions."""

from __future__ import annotations

import time
from pathlib import Path

from .config import TrainingConfig
from .distributed import Processes


class Monitor:
    def __init__(self, output_dir: Path, procs: Processes, tc: TrainingConfig, total_steps: int, first_step: int,
                 baseline_perplexity: float):
        self.output_dir, self.procs, self.tc, self.total_steps = Path(output_dir), procs, tc, total_steps
        self.first_step, self.baseline = first_step, baseline_perplexity
        self._reset()

    def __enter__(self):
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        self.writer = SummaryWriter(str(self.output_dir / "tensorboard")) if self.procs.main else None
        self.bar = tqdm(total=self.total_steps, initial=self.first_step, disable=not (self.tc.progress_bar and self.procs.main),
                        desc="training", unit="step", dynamic_ncols=True)
        return self

    def __exit__(self, *exc):
        self.bar.close()
        if self.writer:
            self.writer.close()

    def _reset(self):
        self.loss, self.steps, self.tokens, self.terms, self.start = 0.0, 0, 0, {}, time.perf_counter()

    def _scalars(self, prefix: str, values: dict, step: int):
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def step(self, step: int, result: dict, lr: float):
        """Account one optimizer step (`result`: loss, tokens, terms, grad_norm); every
        logging_steps (and at the last step) report the means since the last report."""
        self.bar.update(1)
        self.loss, self.steps, self.tokens = self.loss + result["loss"], self.steps + 1, self.tokens + result["tokens"]
        for name, value in result["terms"].items():
            self.terms[name] = self.terms.get(name, 0.0) + value
        if step % self.tc.logging_steps and step != self.total_steps:
            return
        elapsed = time.perf_counter() - self.start
        mean = lambda total: self.procs.all_reduce(total) / self.procs.world / self.steps   # over steps and processes
        metrics = {"loss": mean(self.loss), "lr": lr, "grad_norm": result["grad_norm"],
                   "tokens_per_s": self.procs.all_reduce(self.tokens) / max(elapsed, 1e-9)}
        metrics.update({name: mean(value) for name, value in sorted(self.terms.items())})
        self._scalars("train", metrics, step)
        self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}",
                             tok_s=f"{metrics['tokens_per_s']:.0f}")
        self._reset()

    def validation(self, step: int, metrics: dict, first_batches: int | None = None) -> dict:
        """Log a validation result; `first_batches`: it covers only that many batches of the split."""
        self._scalars("val", {"loss": metrics["loss"], "perplexity": metrics["perplexity"]}, step)
        if self.procs.main:
            scope = f"first {first_batches} batch{'es' * (first_batches > 1)}; " if first_batches else ""
            self.bar.write(f"step {step}: validation loss {metrics['loss']:.4f}, perplexity "
                           f"{metrics['perplexity']:.2f} ({scope}unigram {self.baseline:.1f})")
        return metrics
