"""Where a serving step goes: the decode engine in this process (no HTTP), the model and streams of
bench/serve.py (random weights, sampling at temperature 1, 64 new tokens a request).

    flock /work/core0.lock taskset -c 0 python bench/serve_profile.py [--hidden 512] [--name serve_profile_h512]

1. Tokens/s of the engine alone with 1 and 8 concurrent requests (what bench/serve.py measures
   through HTTP, without the server's event loop and sockets).
2. cProfile of the engine's loop decoding 8 requests: the share of its time in the batched model
   step, in sampling (each request's own generator; rows that share settings drawn together), in
   the text of each token (TextStream: tokenizer.decode) and the rest (events, bookkeeping).
3. torch.profiler of one batched decode step at 8 rows: the operators that take most of it; and
   the step's time at 1 and at 8 rows.
One torch thread.  Writes bench/results/NAME.json and .md (default serve_profile).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import queue
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from common import HERE, write_results  # noqa: E402
from provenance import provenance  # noqa: E402
from serve import random_checkpoint, served_config  # noqa: E402

TOKENS = 64
# (label, function names whose cumulative time is that part of the engine loop)
PARTS = [("model step (batched)", ("step",), "lm.py"),
         ("sampling (next_token, sample_group)", ("next_token", "sample_group"), "sampling.py"),
         ("text of each token (TextStream, tokenizer.decode)", ("push", "take"), "text.py"),
         ("prefill of the prompts", ("prefill",), "lm.py")]


def request(tokenizer, i: int, seed: int, on_event):
    """Request i: a short prompt, TOKENS new tokens sampled at temperature 1."""
    from sparse_ssm.generate import GenerationConfig
    from sparse_ssm.serve import Job

    return Job(tokenizer.encode(f"Request {i}: the").ids, GenerationConfig(max_length=TOKENS, temperature=1.0, seed=seed),
               on_event=on_event)


def submit_all(engine, tokenizer, rows: int, seed: int = 0):
    """Submit `rows` requests and wait for them: their new tokens."""
    events = [queue.Queue() for _ in range(rows)]
    for i, q in enumerate(events):
        engine.submit(request(tokenizer, i, seed + i, q.put))
    total = 0
    for q in events:
        while not (event := q.get()).done:
            pass
        total += event.completion_tokens
    return total


def engine_tokens_per_s(model, tokenizer, rounds: int) -> dict[int, float]:
    from sparse_ssm.serve import BatchEngine

    engine = BatchEngine(model, tokenizer, None, max_batch=8).start()
    try:
        submit_all(engine, tokenizer, 1)                               # warm-up
        runs = {1: [], 8: []}
        for r in range(rounds):
            for rows in runs:
                start = time.perf_counter()
                tokens = sum(submit_all(engine, tokenizer, rows, 100 * r) for _ in range(8 // rows))
                runs[rows].append(tokens / (time.perf_counter() - start))
    finally:
        engine.stop()
    return {rows: sorted(v)[len(v) // 2] for rows, v in runs.items()}


def engine_loop_parts(model, tokenizer) -> dict:
    """cProfile of the engine loop (run in this thread) decoding 8 requests: seconds per part."""
    from sparse_ssm.serve import BatchEngine

    engine = BatchEngine(model, tokenizer, None, max_batch=8)
    left = [8]

    def on_event(event):
        left[0] -= bool(event.done)
        engine._stopping = engine._stopping or not left[0]          # the loop ends after the last request
    for i in range(8):
        engine.submit(request(tokenizer, i, i, on_event))
    profile = cProfile.Profile()
    profile.enable()
    engine._loop()
    profile.disable()
    stats = pstats.Stats(profile).stats
    total = max(v[3] for (file, _, name), v in stats.items() if name == "_loop")
    parts = {label: sum(v[3] for (file, _, name), v in stats.items() if name in names and file.endswith(where))
             for label, names, where in PARTS}
    return {"seconds": total, "tokens": 8 * TOKENS, **parts, "other": total - sum(parts.values())}


def step_ms(model, rows: int, steps: int = 40, rounds: int = 5) -> float:
    """Milliseconds of one batched decode step of `rows` rows (the median of `rounds` timings)."""
    import torch

    from sparse_ssm.generate.cache import stack_rows
    cache = stack_rows([model.prefill(torch.tensor([[1, 2, 3]]))[1] for _ in range(rows)])
    tokens = torch.zeros(rows, dtype=torch.long)
    for _ in range(5):
        model.step(tokens, cache)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            model.step(tokens, cache)
        times.append((time.perf_counter() - start) / steps)
    return 1000 * sorted(times)[rounds // 2]


def step_operators(model, rows: int = 8, steps: int = 50) -> list[tuple[str, float]]:
    """torch.profiler over `steps` batched decode steps of `rows` rows: (operator, share of the
    steps' time), the largest first."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from sparse_ssm.generate.cache import stack_rows
    cache = stack_rows([model.prefill(torch.tensor([[1, 2, 3]]))[1] for _ in range(rows)])
    tokens = torch.zeros(rows, dtype=torch.long)
    for _ in range(5):
        model.step(tokens, cache)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            model.step(tokens, cache)
        wall = time.perf_counter() - start
    ops = sorted(((e.key, e.self_cpu_time_total / 1e6) for e in prof.key_averages()), key=lambda kv: -kv[1])
    outside = wall - sum(s for _, s in ops)
    return ([("wall time of one step (ms, profiled)", 1000 * wall / steps)] + [(k, s / wall) for k, s in ops[:6]]
            + [("outside every aten operator (the fused native layer step, Python)", outside / wall)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, help="the random model's width (default: small_cpu's 128)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-dir", default=str(HERE / "results"))
    parser.add_argument("--name", default="serve_profile")
    args = parser.parse_args()
    import torch

    from sparse_ssm.generate import load_checkpoint
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = random_checkpoint(Path(tmp), args.hidden)
        loaded, model_config = load_checkpoint(model_dir, device="cpu"), served_config(model_dir)
    model, tokenizer = loaded.model, loaded.tokenizer
    speeds = engine_tokens_per_s(model, tokenizer, args.rounds)
    parts = engine_loop_parts(model, tokenizer)
    ops = step_operators(model)
    steps = {rows: step_ms(model, rows) for rows in (1, 8)}
    lines = ["| engine alone (no HTTP) | tokens/s |", "|---|---:|", f"| 1 request | {speeds[1]:,.0f} |",
             f"| 8 concurrent requests | {speeds[8]:,.0f} ({speeds[8] / speeds[1]:.2f}×) |", "",
             f"The batched decode step (`model.step`): {steps[1]:.2f} ms at 1 row, {steps[8]:.2f} ms at 8 rows "
             f"({steps[8] / steps[1]:.1f}×).", "",
             f"The engine loop decoding 8 requests ({parts['tokens']} tokens, {parts['seconds']:.2f} s under "
             f"cProfile):", "", "| part | share |", "|---|---:|"]
    lines += [f"| {label} | {parts[label] / parts['seconds']:.0%} |" for label, *_ in PARTS]
    lines += [f"| other (events, bookkeeping) | {parts['other'] / parts['seconds']:.0%} |", "",
              f"One batched decode step at 8 rows (torch.profiler, {ops[0][1]:.2f} ms a step), operators' self "
              f"time:", "",
              "| operator | share of the step |", "|---|---:|"]
    lines += [f"| `{name}` | {share:.0%} |" for name, share in ops[1:-1]] + [f"| {ops[-1][0]} | {ops[-1][1]:.0%} |"]
    write_results(Path(args.output_dir), args.name,
                  {"hidden": args.hidden or 128, "tokens_per_request": TOKENS, "engine_tokens_per_s": speeds,
                   "engine_loop_seconds": parts, "step_operators": ops, "step_ms": steps,
                   "setup": {"model": model_config}}, lines,
                  provenance(rounds=args.rounds, model_config=model_config))


if __name__ == "__main__":
    main()
