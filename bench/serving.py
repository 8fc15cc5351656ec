"""Serving on a CPU at ~130 M parameters against llama.cpp (issue 38): decode, prefill, time to first
token and peak RSS, ours against llama.cpp's Mamba-1 and Mamba-2 at equal precision.

    flock /work/core0.lock taskset -c 0 python bench/serving.py --cache ~/.cache/sparse-ssm/serving
    python bench/serving.py --dry-run --cache /tmp/serving --archs ''      # tiny sizes, ours only

Ours: random ~130 M checkpoints (hidden 768, 24 layers without FFN, state 16, vocab 50,280; diagonal
A and block-8 A) loaded with `--weights fp32` / `int8`.  llama.cpp: random transformers
MambaForCausalLM / Mamba2ForCausalLM of the same shape converted by the llama.cpp sources' own
`convert_hf_to_gguf.py` to f32, f16 and q8_0 (`serving_models.py`; everything is cached under --cache,
never in git), run through llama-cpp-python.  Each measurement is a fresh process
(`serving_worker.py`: its peak RSS is its own), the engines in turn within a round, rounds repeated;
medians over rounds, and ratios ours / llama.cpp at equal precision (fp32 : f32, int8 : q8_0).
Writes bench/results/serving.{json,md}.  Needs the `llama-cpp` extra (or --archs '' for ours only).
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from common import HERE, comma_list, write_results  # noqa: E402
from serving_models import GGUF_TYPES, STRUCTURES, describe, prepare  # noqa: E402

WORKER = HERE / "serving_worker.py"
ARCHS = ("mamba1", "mamba2")
WEIGHTS = ("fp32", "int8")
EQUAL_PRECISION = {"fp32": "f32", "int8": "q8_0"}
NO_LLAMA = ("llama-cpp-python is not installed: install the `llama-cpp` extra: pip install -e '.[llama-cpp]' "
            "(compiles llama.cpp, ~15 min), or pass --archs '' to measure ours only")
DRY_RUN = dict(size="tiny", rounds=1, prompt_lengths=[8, 32], short_prompt=4, decode_tokens=4, batches=[1, 2])


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers separated by commas, e.g. 512,4096") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "sparse-ssm" / "serving",
                   help="where the checkpoints, transformers models and GGUF files are built once and kept")
    p.add_argument("--size", choices=("130m", "tiny"), default="130m")
    p.add_argument("--structures", type=lambda s: comma_list(s, tuple(STRUCTURES)), default=list(STRUCTURES))
    p.add_argument("--weights", type=lambda s: comma_list(s, WEIGHTS), default=list(WEIGHTS))
    p.add_argument("--archs", type=lambda s: comma_list(s, ARCHS), default=list(ARCHS),
                   help="llama.cpp models ('' for none: ours only)")
    p.add_argument("--gguf-types", type=lambda s: comma_list(s, GGUF_TYPES), default=["f32", "f16", "q8_0"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt-lengths", type=int_list, default=[16, 512, 4096])
    p.add_argument("--short-prompt", type=int, default=16, help="the prompt of each decoded sequence")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--batches", type=int_list, default=[1, 8])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-batch", type=int, default=512, help="llama.cpp's n_batch = n_ubatch (its default)")
    p.add_argument("--cpu", type=int, default=None, help="pin every measuring process to this core")
    p.add_argument("--lock", type=Path, default=None,
                   help="hold an flock on this file during each measuring process (a shared timing core)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="after the rounds, torch.profiler over this many decode steps of each of ours (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, one round (a check that it runs)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--name", default="serving", help="results file name (NAME.json, NAME.md)")
    args = p.parse_args(argv)
    if args.dry_run:
        for key, value in DRY_RUN.items():
            setattr(args, key, value)
    return args


def engines(args) -> list[tuple[str, dict]]:
    """(name, worker spec without path) in the order of one round: ours, then Mamba-1, Mamba-2, by precision."""
    common = dict(threads=args.threads, prompt_lengths=args.prompt_lengths, short_prompt=args.short_prompt,
                  decode_tokens=args.decode_tokens, batches=args.batches, seed=args.seed, n_batch=args.n_batch)
    out = [(f"ours_{s}_{w}", dict(common, engine="ours", model=f"ours_{s}", weights=w))
           for w in args.weights for s in args.structures]
    out += [(f"{a}_{t}", dict(common, engine="llama", model=f"{a}_{t}")) for t in args.gguf_types for a in args.archs]
    return out


@contextmanager
def held(lock: Path | None):
    if lock is None:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def measure(spec: dict, cpu: int | None, lock: Path | None) -> dict:
    """Run one worker process (pinned to `cpu`, holding `lock`) and return its JSON answer."""
    command = [sys.executable, str(WORKER), json.dumps(spec)]
    if cpu is not None:
        command = ["taskset", "-c", str(cpu), *command]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    with held(lock):
        done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{spec['model']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def medians(runs: list[dict]) -> dict:
    """Per metric (nested dicts of numbers), the median over the rounds."""
    first = runs[0]
    return {k: medians([r[k] for r in runs]) if isinstance(v, dict) else statistics.median(r[k] for r in runs)
            for k, v in first.items()}


def ratios(summary: dict) -> list[dict]:
    """ours / llama.cpp at equal precision, for each of ours' configs and each llama.cpp arch:
    decode tokens/s at each batch and prefill tokens/s at each length (> 1: ours faster), and peak RSS."""
    rows = []
    for name, ours in summary.items():
        if not name.startswith("ours_"):
            continue
        weights = name.rsplit("_", 1)[1]
        for arch in ARCHS:
            theirs = summary.get(f"{arch}_{EQUAL_PRECISION[weights]}")
            if theirs is None:
                continue
            rows.append({"ours": name, "llama_cpp": f"{arch}_{EQUAL_PRECISION[weights]}",
                         "decode": {b: ours["decode_tok_s"][b] / theirs["decode_tok_s"][b] for b in ours["decode_tok_s"]},
                         "prefill": {n: ours["prefill_tok_s"][n] / theirs["prefill_tok_s"][n]
                                     for n in ours["prefill_tok_s"]},
                         "peak_rss": ours["peak_rss_gb"] / theirs["peak_rss_gb"]})
    return rows


def table(args, summary: dict, rows: list[dict], described: dict) -> list[str]:
    b_cols, n_cols = [str(b) for b in args.batches], [str(n) for n in args.prompt_lengths]
    lines = [f"# Serving on a CPU against llama.cpp ({args.size}, {args.threads} thread(s), median of {args.rounds} "
             f"interleaved rounds)", "",
             "Decode: greedy tokens/s over all sequences after a " f"{args.short_prompt}-token prompt each "
             f"({args.decode_tokens} steps); prefill: prompt tokens/s to the first token; TTFT: prompt in, first "
             "token out; RSS loaded: the process's resident memory once the model is loaded; peak RSS: its peak over everything "
             "it did (the 4,096-token prefill included).", "",
             "| engine | " + " | ".join(f"decode b{b} tok/s" for b in b_cols) + " | "
             + " | ".join(f"prefill {n} tok/s" for n in n_cols) + " | " + " | ".join(f"TTFT {n} ms" for n in n_cols)
             + " | RSS loaded GB | peak RSS GB | load s |", "|--" * (3 + 2 * len(n_cols) + len(b_cols) + 1) + "|"]
    for name, m in summary.items():
        lines.append(f"| {name} | " + " | ".join(f"{m['decode_tok_s'][b]:.1f}" for b in b_cols) + " | "
                     + " | ".join(f"{m['prefill_tok_s'][n]:.0f}" for n in n_cols) + " | "
                     + " | ".join(f"{1e3 * m['ttft_s'][n]:.0f}" for n in n_cols)
                     + f" | {m['rss_after_load_gb']:.3f} | {m['peak_rss_gb']:.3f} | {m['load_s']:.2f} |")
    if rows:
        lines += ["", "Ratios ours / llama.cpp at equal precision (> 1: ours faster; RSS: < 1 ours smaller):", "",
                  "| ours | llama.cpp | " + " | ".join(f"decode b{b}" for b in b_cols) + " | "
                  + " | ".join(f"prefill {n}" for n in n_cols) + " | peak RSS |", "|--" * (3 + len(b_cols) + len(n_cols)) + "|"]
        lines += [f"| {r['ours']} | {r['llama_cpp']} | " + " | ".join(f"{r['decode'][b]:.2f}x" for b in b_cols) + " | "
                  + " | ".join(f"{r['prefill'][n]:.2f}x" for n in n_cols) + f" | {r['peak_rss']:.2f} |" for r in rows]
    sizes = {k: f"{v['bytes'] / 1e6:.0f} MB" for k, v in described.items() if "bytes" in v}
    if sizes:
        lines += ["", "GGUF files: " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + f"; llama.cpp n_batch = "
                  f"n_ubatch = {args.n_batch}, n_threads = n_threads_batch = {args.threads}."]
    return lines


def profile_lines(profiles: dict) -> list[str]:
    """Where a decode step of ours spends its time (torch.profiler, batch 1)."""
    lines = []
    for name, p in profiles.items():
        top = "; ".join(f"{t['op']} {t['self_ms']:.2f} ms ({t['calls']:.0f} calls)" for t in p["top"][:5])
        lines += ["", f"Profile of a decode step of {name} (batch 1): {p['step_ms']:.2f} ms a step; outside PyTorch "
                      f"operators (Python, native fused kernels) {p['outside_operators_ms']:.2f} ms; top operators "
                      f"by self time a step: {top}."]
    return lines


def main(argv=None):
    args = parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)        # what the provenance records: the workers' thread count
    if args.archs and importlib.util.find_spec("llama_cpp") is None:
        sys.exit(NO_LLAMA)
    paths = prepare(args.cache, args.size, args.gguf_types, args.archs, args.structures)
    plan = engines(args)
    vocab = {"130m": 50280, "tiny": 512}[args.size]
    runs = {name: [] for name, _ in plan}
    for r in range(args.rounds):
        for name, spec in plan:
            runs[name].append(measure(dict(spec, path=str(paths[spec["model"]]), vocab=vocab), args.cpu, args.lock))
            print(f"round {r + 1}/{args.rounds} {name}: {json.dumps(runs[name][-1])}", flush=True)
    profiles = {name: measure(dict(spec, path=str(paths[spec["model"]]), vocab=vocab, prompt_lengths=[], batches=[],
                                   profile_steps=args.profile_steps), args.cpu, args.lock)["profile"]
                for name, spec in plan if args.profile_steps and spec["engine"] == "ours"}
    summary = {name: medians(r) for name, r in runs.items()}
    rows = ratios(summary)
    described = describe(paths)
    from provenance import provenance
    llama_version = metadata.version("llama-cpp-python") if args.archs else None
    prov = provenance(None, seeds=[args.seed], rounds=args.rounds, threads=args.threads, size=args.size,
                      llama_cpp_python=llama_version, n_batch=args.n_batch, cpu=args.cpu,
                      model_configs=described, engines=dict(plan))
    write_results(args.out, args.name, {"setup": vars(args) | {"cache": str(args.cache), "out": str(args.out),
                                                                "lock": str(args.lock)},
                                        "runs": runs, "median": summary, "ratios": rows, "profiles": profiles},
                  table(args, summary, rows, described) + profile_lines(profiles), prov)


if __name__ == "__main__":
    main()
