"""The state-tracking configuration as a language model (issue 36, part 3): config/state_tracking_lm.yaml
against the default diagonal model (config/demo.yaml) on the embedded corpus.

    python -m sparse_ssm.data.corpus data/shakespeare        # the embedded corpus (make demo does it)
    python bench/state_tracking_lm.py --steps 400            # writes bench/results/state_tracking_lm.{json,md}
    python bench/state_tracking_lm.py --steps 4 --eval-every 2 --eval-windows 4 --timing-steps 2 --out /tmp/lm

Equal tokens: both models train in lockstep on the same batches (the demo's windows of 128, batch
16, in one shuffled order), AdamW with the demo's learning rate, warm-up and cosine schedule, for
--steps steps each, and are scored on the same validation windows (every token once, eval mode,
full logits) every --eval-every steps.  Speed: afterwards each model's training step (forward, loss,
backward, AdamW) is timed --timing-steps times, the two interleaved, 1 torch thread; tokens/s is
batch x 128 / the median step.  --timing-cpu pins the timing phase (only) to one core and
--timing-lock holds an exclusive lock on a file while it runs (on a shared machine: a core kept for
timing, `--timing-cpu 0 --timing-lock /work/core0.lock`); the training before it may run niced.  Equal wall-clock: the faster model's
training time (its steps x its median step) bounds the slower one's, which has then taken that time
/ its median step steps; its perplexity there is read from its evaluation log (linearly interpolated
in steps between evaluations).  Both models start from --seed (default 0: the settings were chosen on
it; report on others) and see the same data in that seed's order.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from chomsky import override  # noqa: E402
from common import write_results  # noqa: E402
from provenance import provenance  # noqa: E402
from wallclock_lm import validation_nll  # noqa: E402

from sparse_ssm import SparseSSMForCausalLM  # noqa: E402
from sparse_ssm.config import Config  # noqa: E402
from sparse_ssm.data import collate, prepare_lm_data  # noqa: E402
from sparse_ssm.train.optim import build_optimizer, build_scheduler  # noqa: E402

CONFIGS = {"diagonal (demo)": "config/demo.yaml", "state tracking": "config/state_tracking_lm.yaml"}


def build(path: str, vocab: int, steps: int, overrides: dict | None = None, seed: int = 0):
    """(model, optimizer, scheduler) of a config file, initialised from `seed`, the schedule stretched to `steps`;
    `overrides` replace model keys (validated as the file's are)."""
    cfg = Config.load(HERE.parent / path)
    if overrides:
        cfg.model = type(cfg.model)(**{**cfg.model.model_dump(), **overrides})
    cfg.model.vocab_size = vocab
    cfg.training.max_steps = steps
    torch.manual_seed(seed)
    model = SparseSSMForCausalLM(cfg.model)
    opt = build_optimizer(model, cfg.optimizer)
    return model, opt, build_scheduler(opt, steps, cfg.scheduler), cfg


def step(model, opt, sched, ids) -> float:
    """One training step as the Trainer takes it: fused loss, backward, clip at 1, AdamW, schedule."""
    model.train()
    loss = model(ids, labels=ids, return_logits=False).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return float(loss.detach())


def at_step(log: list[tuple[int, float]], s: float) -> float:
    """The perplexity of an evaluation log [(step, ppl)] at step s, linear in steps between entries."""
    for (s0, p0), (s1, p1) in zip(log, log[1:]):
        if s0 <= s <= s1:
            return p0 + (p1 - p0) * (s - s0) / (s1 - s0)
    return log[-1][1] if s >= log[-1][0] else log[0][1]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400, help="training steps of each model (default 400)")
    ap.add_argument("--eval-every", type=int, default=100, help="steps between validation scores (default 100)")
    ap.add_argument("--eval-windows", type=int, default=200, help="validation windows scored (default 200)")
    ap.add_argument("--timing-steps", type=int, default=15, help="timed steps per model, interleaved (default 15)")
    ap.add_argument("--timing-cpu", type=int, help="the core the timing phase runs on (default: any)")
    ap.add_argument("--timing-lock", help="a file locked (flock) while the timing phase runs")
    ap.add_argument("--set", dest="overrides", action="append", default=[], type=override, metavar="KEY=VALUE",
                    help="a model key of the state-tracking config (repeatable; e.g. --set reflection_init_logit=-1.5)")
    ap.add_argument("--seed", type=int, default=0, help="the models' initialisation and the batches' order (default 0)")
    ap.add_argument("--out", default=str(HERE / "results"))
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    base = Config.load(HERE.parent / CONFIGS["diagonal (demo)"])
    data = prepare_lm_data(base.dataset, base.model.vocab_size)
    L, bs, pad = base.dataset.max_seq_len, base.training.batch_size, data.pad_id
    train, val = data.windows("train", L, base.dataset.stride), data.windows("validation", L, L)
    val = [val[j] for j in range(min(args.eval_windows, len(val)))]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    changes = {"state tracking": dict(args.overrides)}
    runs = {name: build(path, data.vocab_size, args.steps, changes.get(name), args.seed) for name, path in CONFIGS.items()}
    logs = {name: [] for name in runs}
    losses = {name: [] for name in runs}
    for i in range(args.steps + 1):
        if i % args.eval_every == 0 or i == args.steps:
            for name, (model, *_) in runs.items():
                total, count = validation_nll(model, val, pad)
                logs[name].append((i, math.exp(total / count)))
            print(f"step {i}: " + ", ".join(f"{k} ppl {v[-1][1]:.2f}" for k, v in logs.items()), flush=True)
        if i == args.steps:
            break
        rows = [train[order[(i * bs + j) % len(order)]] for j in range(bs)]
        ids, _ = collate(rows, pad)
        for name, (model, opt, sched, _) in runs.items():
            losses[name].append(step(model, opt, sched, ids))
    batches = [collate([train[order[(i * bs + j) % len(order)]] for j in range(bs)], pad)[0]
               for i in range(args.timing_steps)]
    with timing_conditions(args.timing_cpu, args.timing_lock):
        times = time_steps(runs, batches)
    report(args, runs, logs, losses, times, bs * L)


@contextlib.contextmanager
def timing_conditions(cpu: int | None, lock: str | None):
    """Hold an exclusive flock on `lock` and run on core `cpu` (either may be None) inside the block;
    the process's niceness is reset to 0 where it may be (a niced training phase times unniced)."""
    affinity, niceness = os.sched_getaffinity(0), os.getpriority(os.PRIO_PROCESS, 0)
    with open(lock, "a") if lock else contextlib.nullcontext() as handle:
        if handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        with contextlib.suppress(PermissionError):
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        try:
            yield
        finally:
            os.setpriority(os.PRIO_PROCESS, 0, niceness)
            os.sched_setaffinity(0, affinity)


def time_steps(runs: dict, batches: list) -> dict:
    """Seconds of each training step of every model, the models interleaved on each batch."""
    times = {name: [] for name in runs}
    for ids in batches:
        for name, (model, opt, sched, _) in runs.items():
            start = time.perf_counter()
            step(model, opt, sched, ids)
            times[name].append(time.perf_counter() - start)
    return times


def report(args, runs, logs, losses, times, tokens_per_step):
    """Write state_tracking_lm.{json,md}: per model, ppl at equal tokens, tokens/s, ppl at equal wall-clock."""
    median = {k: statistics.median(v) for k, v in times.items()}
    fast = min(median, key=median.get)
    budget = args.steps * median[fast]
    rows = []
    for name, (model, _, _, cfg) in runs.items():
        reached = min(args.steps, budget / median[name])
        changed = args.overrides if name == "state tracking" else []
        config = CONFIGS[name] + "".join(f", {k} = {v}" for k, v in changed)
        rows.append({"model": name, "config": config, "parameters": model.num_parameters(),
                     "selective_param_class": cfg.model.selective_param_class,
                     "validation_ppl": logs[name][-1][1], "eval_log": logs[name], "final_train_loss": losses[name][-1],
                     "median_step_s": median[name], "step_times_s": times[name],
                     "tokens_per_s": tokens_per_step / median[name], "steps_in_equal_time": reached,
                     "ppl_in_equal_time": at_step(logs[name], reached)})
    diag, track = rows
    lines = [f"# The state-tracking configuration as a language model ({args.steps} steps of {tokens_per_step:,} "
             "tokens each)", "",
             f"Embedded corpus, demo data and schedule, seed {args.seed}; validation perplexity on {args.eval_windows} windows; "
             f"tokens/s from the median of {args.timing_steps} interleaved training steps, 1 thread.  Equal "
             f"wall-clock: {budget:.0f} s, the faster model's {args.steps} steps.", "",
             "| model | config | parameters | ppl, equal tokens | tokens/s | ppl, equal wall-clock (steps) |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | `{r['config']}` | {r['parameters']:,} | {r['validation_ppl']:.2f} | "
              f"{r['tokens_per_s']:,.0f} | {r['ppl_in_equal_time']:.2f} ({r['steps_in_equal_time']:.0f}) |" for r in rows]
    lines += ["", f"State tracking / diagonal: perplexity at equal tokens "
              f"{track['validation_ppl'] / diag['validation_ppl']:.3f}x (target <= 1.02), tokens/s "
              f"{track['tokens_per_s'] / diag['tokens_per_s']:.2f}x (target >= 0.5), perplexity at equal wall-clock "
              f"{track['ppl_in_equal_time'] / diag['ppl_in_equal_time']:.3f}x.", "",
              "Evaluation log (step: perplexity): " + "; ".join(
                  f"{r['model']}: " + ", ".join(f"{s}: {p:.2f}" for s, p in r["eval_log"]) for r in rows)]
    prov = provenance({r["model"]: m for r, (m, *_) in zip(rows, runs.values())}, seeds=[args.seed],
                      loss_path="fused chunked cross-entropy (as the Trainer)", scoring="eval mode, full logits")
    write_results(Path(args.out), "state_tracking_lm", {"steps": args.steps, "rows": rows}, lines, prov)


if __name__ == "__main__":
    main()
