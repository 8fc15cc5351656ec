"""One measurement of `bench/serving.py`, in a process of its own (so that its peak RSS is its own):

    python bench/serving_worker.py '<json spec>'      -> one JSON line on stdout

spec: {"engine": "ours" | "llama", "path": checkpoint dir | GGUF file, "weights": "fp32" | "int8"
(ours), "threads": 1, "prompt_lengths": [512, 4096], "short_prompt": 16, "decode_tokens": 64,
"batches": [1, 8], "seed": 0, "vocab": 50280}.

Every prompt is random token ids (the same for both engines: `prompt_ids`); every decode is greedy.
- time to first token at each prompt length L: the prompt through the model, then the argmax of the
  last logits; prefill tokens/s = L / that time (ours: `model.prefill` in chunks of the product's default
  `prefill_chunk_tokens`, as `generate` and `serve` read prompts; llama.cpp: `Llama.eval`, which
  feeds the prompt in n_batch pieces);
- decode tokens/s at batch b: b short prompts prefilled, then `decode_tokens` greedy steps of all b
  (ours: `stream_generate`, the loop `generate` and `serve` use, timed from its first token to its
  last; llama.cpp: batch 1 through `Llama.eval` one token at a time and the logits read with
  `llama_get_logits_ith`; batch 8 through a `llama_batch` of 8 sequences (one token each) on a
  context with n_seq_max = 8);
- peak RSS (VmHWM) of the process after everything, and the RSS after loading.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def rss_gb(field: str = "VmHWM") -> float:
    """This process's VmHWM (peak) or VmRSS (now) in GB."""
    status = Path("/proc/self/status").read_text()
    return int(status.split(f"{field}:")[1].split()[0]) / 1e6


def prompt_ids(length: int, seed: int, vocab: int, row: int = 0) -> list[int]:
    """Random token ids in [0, min(vocab, 50277)) (GPT-NeoX's real tokens), one stream per (seed, row)."""
    rng = np.random.default_rng([seed, row, length])
    return rng.integers(0, min(vocab, 50277), size=length).tolist()


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# ---- ours -------------------------------------------------------------------------------------------

def run_ours(spec: dict) -> dict:
    import sparse_ssm  # noqa: F401 - before torch, as main.py imports it: idle OpenMP threads sleep (its __init__)
    import torch

    from sparse_ssm.generate.settings import GenerationConfig
    from sparse_ssm.generate.stream import stream_generate
    from sparse_ssm.model.checkpoint import load_model
    torch.set_num_threads(spec["threads"])
    model, load_s = _timed(lambda: load_model(spec["path"], "cpu", spec["weights"]))
    out = {"load_s": load_s, "rss_after_load_gb": rss_gb("VmRSS"), "ttft_s": {}, "decode_tok_s": {}}
    chunk = GenerationConfig().prefill_chunk_tokens              # the product's default, as generate / serve
    with torch.no_grad():
        model.prefill(torch.tensor([prompt_ids(8, spec["seed"], spec["vocab"], 99)]))       # warm-up
        for length in spec["prompt_lengths"]:
            ids = torch.tensor([prompt_ids(length, spec["seed"], spec["vocab"])])
            _, out["ttft_s"][length] = _timed(lambda: int(model.prefill(ids, chunk_tokens=chunk)[0].argmax(-1)))
    if spec.get("profile_steps"):
        out["profile"] = profile_steps(model, spec)
    settings = GenerationConfig(max_length=spec["decode_tokens"] + 1, temperature=0.0)
    for batch in spec["batches"]:
        prompts = [prompt_ids(spec["short_prompt"], spec["seed"], spec["vocab"], row) for row in range(batch)]
        stamps = [time.perf_counter() for _ in stream_generate(model, prompts, settings)]
        out["decode_tok_s"][batch] = batch * spec["decode_tokens"] / (stamps[-1] - stamps[0])
    return out


def profile_steps(model, spec: dict, rows: int = 8) -> dict:
    """torch.profiler over `profile_steps` greedy decode steps at batch 1 (after 4 warm-up steps):
    wall ms a step, the operators' self CPU ms a step (the top `rows`), and the rest of the wall time
    (Python, and native kernels that are no PyTorch operator: the fused block step)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    steps = spec["profile_steps"]
    with torch.no_grad():
        logits, cache = model.prefill(torch.tensor([prompt_ids(spec["short_prompt"], spec["seed"], spec["vocab"])]))
        token = logits.argmax(-1)
        for _ in range(4):
            logits, cache = model.step(token, cache)
            token = logits.argmax(-1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                logits, cache = model.step(token, cache)
                token = logits.argmax(-1)
            wall = (time.perf_counter() - start) / steps
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    in_ops = sum(e.self_cpu_time_total for e in ops) / 1e3 / steps
    return {"step_ms": 1e3 * wall, "outside_operators_ms": 1e3 * wall - in_ops,
            "top": [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3 / steps, "calls": e.count / steps}
                    for e in ops[:rows]]}


# ---- llama.cpp --------------------------------------------------------------------------------------

def _argmax_last(llama_cpp, ctx, n_vocab: int, i: int = -1) -> int:
    return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())


def run_llama(spec: dict) -> dict:
    import llama_cpp
    longest = max([*spec["prompt_lengths"], spec["short_prompt"]]) + spec["decode_tokens"] + 8
    llm, load_s = _timed(lambda: llama_cpp.Llama(spec["path"], n_threads=spec["threads"],
                                                 n_threads_batch=spec["threads"], n_ctx=longest,
                                                 n_batch=spec["n_batch"], n_ubatch=spec["n_batch"], verbose=False))
    n_vocab = llm.n_vocab()
    out = {"load_s": load_s, "rss_after_load_gb": rss_gb("VmRSS"), "ttft_s": {}, "decode_tok_s": {},
           "n_vocab": n_vocab, "n_batch": llm.n_batch}

    def first_token(ids):
        llm.reset()
        llm.eval(ids)
        return _argmax_last(llama_cpp, llm.ctx, n_vocab)

    first_token(prompt_ids(8, spec["seed"], spec["vocab"], 99))                            # warm-up
    for length in spec["prompt_lengths"]:
        ids = prompt_ids(length, spec["seed"], spec["vocab"])
        _, out["ttft_s"][length] = _timed(lambda: first_token(ids))
    for batch in spec["batches"]:
        out["decode_tok_s"][batch] = (_llama_decode_1 if batch == 1 else _llama_decode_batch)(
            llm, llama_cpp, spec, batch, first_token, n_vocab)
    return out


def _llama_decode_1(llm, llama_cpp, spec, batch, first_token, n_vocab) -> float:
    token = first_token(prompt_ids(spec["short_prompt"], spec["seed"], spec["vocab"]))
    start = time.perf_counter()
    for _ in range(spec["decode_tokens"]):
        llm.eval([token])
        token = _argmax_last(llama_cpp, llm.ctx, n_vocab)
    return spec["decode_tokens"] / (time.perf_counter() - start)


def _llama_decode_batch(llm, llama_cpp, spec, batch, first_token, n_vocab) -> float:
    """`batch` sequences on one context (n_seq_max = batch): each short prompt prefilled on its own
    sequence, then one llama_batch of `batch` tokens (one a sequence) per step."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = batch * (spec["short_prompt"] + spec["decode_tokens"] + 8)
    params.n_batch = params.n_ubatch = max(batch, spec["short_prompt"])
    params.n_seq_max = batch
    params.n_threads = params.n_threads_batch = spec["threads"]
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    lb = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
    try:
        def submit(entries):               # [(token, pos, seq, wants_logits)]
            lb.n_tokens = len(entries)
            for k, (token, pos, seq, logits) in enumerate(entries):
                lb.token[k], lb.pos[k], lb.n_seq_id[k], lb.seq_id[k][0], lb.logits[k] = token, pos, 1, seq, logits
            if llama_cpp.llama_decode(ctx, lb) != 0:
                raise RuntimeError("llama_decode failed")
        tokens = []
        for seq in range(batch):
            ids = prompt_ids(spec["short_prompt"], spec["seed"], spec["vocab"], seq)
            submit([(t, p, seq, p == len(ids) - 1) for p, t in enumerate(ids)])
            tokens.append(_argmax_last(llama_cpp, ctx, n_vocab))
        start = time.perf_counter()
        for step in range(spec["decode_tokens"]):
            submit([(tokens[seq], spec["short_prompt"] + step, seq, True) for seq in range(batch)])
            tokens = [_argmax_last(llama_cpp, ctx, n_vocab, seq) for seq in range(batch)]
        return batch * spec["decode_tokens"] / (time.perf_counter() - start)
    finally:
        llama_cpp.llama_batch_free(lb)
        llama_cpp.llama_free(ctx)


def main():
    spec = json.loads(sys.argv[1])
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    out = (run_ours if spec["engine"] == "ours" else run_llama)(spec)
    out["prefill_tok_s"] = {length: length / s for length, s in out["ttft_s"].items()}
    out["peak_rss_gb"] = rss_gb()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
