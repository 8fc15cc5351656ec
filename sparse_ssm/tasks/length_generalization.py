"""The length-generalisation protocol of the Chomsky-hierarchy tasks (`chomsky`), after Deletang et
al. 2023 and Grazzi et al. 2025: train on strings of random lengths (uniform in a range, e.g. 3-40,
one length per batch), test on longer ones (e.g. 40-256), report scaled accuracy per test-length
bucket and over the whole test range.

A bucket is a range of lengths (lo, hi] (the first one [lo, hi]).  A task answered once per string
is tested on `test_sequences` fresh strings per bucket spread evenly over `lengths_per_bucket`
lengths of it; a word problem (answered after every token) on `test_sequences` strings of the
longest test length, each position scored in the bucket of its prefix length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..model import SparseSSMConfig, SparseSSMForCausalLM
from ..util.errors import ConfigError
from .chomsky import ChomskyTask, scaled_accuracy
from .training import ANGLE_GRID_FROM, accuracy, fit

TRAIN_RANGE = (3, 40)
TEST_EDGES = (40, 64, 128, 256)


@dataclass
class LengthGeneralizationResult:
    """accuracy / scaled: bucket label ('40-64') -> value; `overall_*`: over the whole test range,
    each bucket weighted by the number of lengths in it (the mean over lengths, as the papers report)."""

    task: str
    accuracy: dict = field(default_factory=dict)
    scaled: dict = field(default_factory=dict)
    overall_accuracy: float = 0.0
    overall_scaled: float = 0.0
    seconds: float = 0.0
    final_loss: float = float("nan")


def check_protocol(train_range: Sequence[int], test_edges: Sequence[int]):
    """A ConfigError naming the `evaluate` flag for a training range or test buckets no run could use."""
    low, high = train_range
    if not 1 <= low <= high:
        raise ConfigError(f"--train-lengths {low}-{high}: need 1 <= MIN <= MAX (e.g. 3-40)")
    if len(test_edges) < 2 or any(b <= a for a, b in zip(test_edges, test_edges[1:])) or test_edges[0] < 1:
        raise ConfigError(f"--test-buckets {','.join(map(str, test_edges))}: need at least two increasing lengths "
                          "(bucket edges, e.g. 40,64,128,256)")


def bucket_labels(test_edges: Sequence[int]) -> list[str]:
    return [f"{lo}-{hi}" for lo, hi in zip(test_edges, test_edges[1:])]


def bucket_lengths(lo: int, hi: int, first: bool, count: int) -> list[int]:
    """`count` lengths spread evenly over the bucket (lo, hi] ([lo, hi] when `first`), ends included
    (one: the longest)."""
    start = lo if first else lo + 1
    if count == 1:
        return [hi]
    if hi - start + 1 <= count:
        return list(range(start, hi + 1))
    return sorted({round(start + i * (hi - start) / (count - 1)) for i in range(count)})


def bucket_accuracies(model, task: ChomskyTask, test_edges: Sequence[int], generator: torch.Generator,
                      test_sequences: int, lengths_per_bucket: int) -> list[float]:
    """The accuracy in each bucket of `test_edges` (module docstring)."""
    out = []
    if task.every_position:
        inputs, labels = task.batch(test_sequences, test_edges[-1], generator)
        position = torch.arange(labels.shape[1])                 # labels[:, t] is the product of t tokens
        for i, (lo, hi) in enumerate(zip(test_edges, test_edges[1:])):
            inside = (position >= lo if i == 0 else position > lo) & (position <= hi)
            out.append(accuracy(model, inputs[:, :hi + 1], labels[:, :hi + 1].masked_fill(~inside[:hi + 1], -100)))
        return out
    for i, (lo, hi) in enumerate(zip(test_edges, test_edges[1:])):
        lengths = bucket_lengths(lo, hi, i == 0, lengths_per_bucket)
        per_length = max(1, test_sequences // len(lengths))
        out.append(sum(accuracy(model, *task.batch(per_length, L, generator)) for L in lengths) / len(lengths))
    return out


def curriculum_lengths(steps: int, train_range: Sequence[int], generator: torch.Generator,
                     curriculum: float = 0.0) -> list[int]:
    """The length of each step's batch, uniform in `train_range` (inclusive).  With `curriculum` f > 0
    the longest length allowed grows linearly from the shortest to the longest over the first f of the
    steps (a length curriculum: short strings first, whose answers a fresh model can fit, as in the
    papers' curricula), then stays at the longest."""
    if not 0 <= curriculum <= 1:
        raise ConfigError(f"--curriculum {curriculum}: the fraction of the steps must be in [0, 1]")
    low, high = train_range
    ramp = max(1, round(curriculum * steps))
    tops = [high if not curriculum else low + round((high - low) * min(1.0, (i + 1) / ramp)) for i in range(steps)]
    draws = torch.rand(steps, generator=generator).tolist()
    return [low + min(top - low, int(u * (top - low + 1))) for u, top in zip(draws, tops)]


def run_length_generalization(task: ChomskyTask, model_config: SparseSSMConfig | Callable[[], torch.nn.Module],
                              steps: int, batch: int, train_range: Sequence[int] = TRAIN_RANGE,
                              test_edges: Sequence[int] = TEST_EDGES, lr: float = 3e-3, seed: int = 0,
                              test_sequences: int = 256, lengths_per_bucket: int = 8, log=None,
                              angle_grid_from: float = ANGLE_GRID_FROM,
                              curriculum: float = 0.0) -> LengthGeneralizationResult:
    """Train a fresh model (a `SparseSSMConfig`, or a callable building any model with the task
    harness's interface, `training.run_task`) for `steps` steps, each on a fresh batch of one
    length drawn uniformly from `train_range` (inclusive; under a `curriculum`, from its growing
    part: `curriculum_lengths`), then score it per bucket of `test_edges`."""
    check_protocol(train_range, test_edges)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = SparseSSMForCausalLM(model_config) if isinstance(model_config, SparseSSMConfig) else model_config()
    lengths = (curriculum_lengths(steps, train_range, g, curriculum) if curriculum
               else torch.randint(train_range[0], train_range[1] + 1, (steps,), generator=g).tolist())
    start = time.perf_counter()
    loss = fit(model, lambda n, L: task.batch(n, L, g), lengths, batch, lr, angle_grid_from=angle_grid_from,
               log=log)
    accuracies = bucket_accuracies(model, task, test_edges, g, test_sequences, lengths_per_bucket)
    labels = bucket_labels(test_edges)
    widths = [hi - lo + (i == 0) for i, (lo, hi) in enumerate(zip(test_edges, test_edges[1:]))]
    overall = sum(a * w for a, w in zip(accuracies, widths)) / sum(widths)
    return LengthGeneralizationResult(
        task.name, dict(zip(labels, accuracies)), {k: scaled_accuracy(a, task.chance) for k, a in zip(labels, accuracies)},
        overall, scaled_accuracy(overall, task.chance), time.perf_counter() - start, loss)


def results_table(rows: list[dict], test_edges: Sequence[int]) -> list[str]:
    """Markdown rows: variant, scaled accuracy per bucket, over the whole test range, seconds.  Each
    row: {"variant", "scaled": {bucket: value}, "overall_scaled", "seconds"}."""
    labels = bucket_labels(test_edges)
    lines = ["| variant | " + " | ".join(f"scaled @ {b}" for b in labels) + f" | scaled @ {test_edges[0]}-"
             f"{test_edges[-1]} | seconds |", "|---|" + "---:|" * (len(labels) + 2)]
    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(f"{r['scaled'][b]:.3f}" for b in labels)
                     + f" | {r['overall_scaled']:.3f} | {r['seconds']:.0f} |")
    return lines
