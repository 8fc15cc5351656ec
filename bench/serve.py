"""Serving through `python main.py serve` in its own process (pinned to one core, one torch thread),
clients streaming /api/generate (NDJSON) from threads of this process.

1. Throughput with 1 and 8 concurrent streams (--streams): tokens/s = new tokens of all requests /
   wall time; the running batch decodes every stream in one step, so the total should grow with the
   number of streams.  Levels interleaved over --rounds rounds, the median round reported.
2. A 4,096-token prompt, on two servers side by side: one reading prompts in chunks of --chunk
   tokens between two decode steps, one reading a prompt whole (--prefill-chunk-tokens 4096: the
   engine before chunked prefill).  On an idle server: the time to first token (TTFT) of a short
   and of the long request (the long one's / its chunks = one chunk's time).  Then, while a stream
   decodes, the long request arrives and a short one 1/4, 1/2 or 3/4 of the long one's idle TTFT
   later: the short request's TTFT, and the running stream's longest pause between two tokens.

    flock /work/core0.lock taskset -c 1 python bench/serve.py [--hidden 512] [--name serve_h512]
    ... python bench/serve.py --serving-cache DIR --name serve_130m     (bench/serving.py's ~130 M model)

Without --model-dir: the model of config/small_cpu.yaml (or its shape at width --hidden, FFN twice
the width) with random weights and a BPE tokenizer trained on the package's own Python source
(about 0.5 MB, so the config's vocab of 2048 is reached), sampling at temperature 1 (text of random
tokens); the long prompt is the longest prefix of that source that encodes to 4,096 tokens.  TTFT
is measured from the request's send; the HTTP clients are made before any timing.  Writes
bench/results/NAME.json and .md (NAME: --name, default serve).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from common import HERE, run_concurrently, write_results  # noqa: E402
from provenance import provenance  # noqa: E402
from sparse_ssm.data.tokenizer import load_tokenizer  # noqa: E402
from sparse_ssm.generate.settings import PREFILL_CHUNK_TOKENS  # noqa: E402

ROOT = HERE.parent
LONG_PROMPT = 4096                     # tokens of the long prompt (the server's --max-prompt-tokens default)


def random_checkpoint(folder: Path, hidden: int | None = None) -> Path:
    """config/small_cpu.yaml's model with random weights, as a checkpoint directory; `hidden`: that
    width instead (the FFN twice it, as small_cpu's)."""
    import torch
    import yaml

    from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM
    from sparse_ssm.data.tokenizer import save_tokenizer, train_tokenizer
    from sparse_ssm.model.checkpoint import save_weights, weights_of

    model_cfg = yaml.safe_load((ROOT / "config" / "small_cpu.yaml").read_text())["model"]
    if hidden:
        model_cfg.update(hidden_dim=hidden, ffn_dim=2 * hidden)
    tokenizer = train_tokenizer(source_texts(), model_cfg["vocab_size"])
    model_cfg["vocab_size"] = tokenizer.get_vocab_size()
    torch.manual_seed(0)
    model = SparseSSMForCausalLM(SparseSSMConfig(**model_cfg))
    checkpoint = folder / "small_cpu_random" / "best"
    checkpoint.mkdir(parents=True)
    save_weights(checkpoint / "model.safetensors", weights_of(model))
    (checkpoint / "config.yaml").write_text(yaml.safe_dump({"model": model.config.to_dict()}))
    save_tokenizer(tokenizer, checkpoint / "tokenizer.json")
    return checkpoint.parent


def source_texts() -> list[str]:
    """The package's own Python source, file by file (a text that does not change with the docs)."""
    return [path.read_text() for path in sorted((ROOT / "sparse_ssm").rglob("*.py"))]


def served_config(model_dir: Path) -> dict | None:
    """The model section of the checkpoint's config.yaml (`best/` first), for the provenance."""
    import yaml
    found = sorted(model_dir.glob("*/config.yaml"), key=lambda p: p.parent.name != "best")
    return yaml.safe_load(found[0].read_text()).get("model") if found else None


def start_server(model_dir: Path, core: int, max_batch: int, chunk: int):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(["taskset", "-c", str(core), sys.executable, "-u", str(ROOT / "main.py"), "serve",
                             "--model-dir", str(model_dir), "--port", "0", "--name", "bench", "--device", "cpu",
                             "--max-batch", str(max_batch), "--max-prompt-tokens", str(LONG_PROMPT),
                             "--prefill-chunk-tokens", str(chunk)],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    line = proc.stdout.readline()
    if " on " not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}")
    return proc, line.split(" on ")[1].split()[0]


def request_body(prompt: str, tokens: int, seed: int) -> dict:
    return {"model": "bench", "prompt": prompt, "stream": True,
            "options": {"num_predict": tokens, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "repeat_penalty": 1.0,
                        "seed": seed}}


CLIENTS: queue.SimpleQueue = queue.SimpleQueue()      # HTTP clients made before the timing (`make_clients`)


def make_clients(n: int):
    """Set up n HTTP clients now: making one (its TLS context) holds this process's interpreter lock
    for tens of ms, which would delay the time stamps of the other streams' tokens."""
    for _ in range(n):
        CLIENTS.put(httpx.Client(timeout=600))


def stream(url: str, prompt: str, tokens: int, seed: int, arrivals: list | None = None, stop=None) -> int:
    """One streamed /api/generate request: its new tokens.  `arrivals` gets the time the request
    was sent, then each line's arrival time; `stop` (a threading.Event): hang up once it is set."""
    arrivals = [] if arrivals is None else arrivals
    client = CLIENTS.get_nowait() if not CLIENTS.empty() else httpx.Client(timeout=600)
    try:
        arrivals.append(time.perf_counter())
        with client.stream("POST", f"{url}/api/generate", json=request_body(prompt, tokens, seed)) as response:
            for line in response.iter_lines():
                arrivals.append(time.perf_counter())
                if stop is not None and stop.is_set():
                    return len(arrivals) - 1
    finally:
        CLIENTS.put(client)
    return json.loads(line)["eval_count"]


def run(url: str, streams: int, requests_each: int, tokens: int) -> dict:
    counts = [0] * streams

    def client(i):
        for r in range(requests_each):
            counts[i] += stream(url, f"Request {i}.{r}: the", tokens, seed=1000 * i + r)

    seconds = run_concurrently(streams, client)
    return {"streams": streams, "requests": streams * requests_each, "tokens": sum(counts), "seconds": seconds,
            "tokens_per_s": sum(counts) / seconds, "per_stream_tokens_per_s": sum(counts) / seconds / streams}


def long_prompt(tokenizer, tokens: int) -> str:
    """The longest prefix of the package's source that encodes to at most `tokens` tokens."""
    text = "\n".join(source_texts())
    low, high = 0, len(text)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if len(tokenizer.encode(text[:mid]).ids) <= tokens else (low, mid - 1)
    return text[:low]


def in_background(fn, *args):
    thread = threading.Thread(target=fn, args=args, daemon=True)
    thread.start()
    return thread


def while_long_prompt(url: str, prompt: str, offset: float) -> dict:
    """A stream is decoding; a LONG_PROMPT-token request arrives, and `offset` seconds later a short
    one: the short one's time to first token, the long one's, and the running stream's longest
    pause between two tokens while the long prompt was read."""
    running, long, short, stop = [], [], [], threading.Event()
    background = in_background(stream, url, "Running: the", 1000, 1, running, stop)
    while len(running) < 3:
        time.sleep(0.001)
    long_request = in_background(stream, url, prompt, 2, 2, long)
    time.sleep(offset)
    stream(url, "Short: the", 2, 3, short)
    long_request.join()
    stop.set()
    background.join()
    idle(url)
    tokens = running[1:]
    gaps = [b - a for a, b in zip(tokens, tokens[1:]) if b > long[0] and a < long[1]]
    return {"offset_s": offset, "short_ttft_s": short[1] - short[0], "long_ttft_s": long[1] - long[0],
            "running_longest_pause_s": max(gaps)}


def idle(url: str):
    """Wait until the server runs no request (a hung-up stream ends at its next step)."""
    while httpx.get(f"{url}/api/ps", timeout=60).json()["models"][0]["status"]["running"]:
        time.sleep(0.05)


def alone_ttft(url: str, prompt: str) -> float:
    arrivals = []
    stream(url, prompt, 1, 4, arrivals)
    return arrivals[1] - arrivals[0]



def throughput(url: str, levels: list[int], rounds: int, tokens: int, per_level: int) -> list[dict]:
    """Aggregate tokens/s a level, rounds interleaved: the median round's row, with every round's figure."""
    runs = {n: [] for n in levels}
    for _ in range(rounds):
        for n in levels:
            runs[n].append(run(url, n, max(1, per_level // (n * tokens)), tokens))
    rows = []
    for n in levels:
        ordered = sorted(runs[n], key=lambda r: r["tokens_per_s"])
        rows.append({**ordered[len(ordered) // 2], "rounds_tokens_per_s": [r["tokens_per_s"] for r in runs[n]]})
    return rows


def long_prompt_rounds(urls: dict, prompt: str, rounds: int) -> dict:
    """For each server (name -> url), interleaved: the TTFT of a short and of the long prompt on an
    idle server, and `while_long_prompt` with the short request sent at 1/4, 1/2 or 3/4 of the
    long prompt's idle TTFT."""
    out = {name: [] for name in urls}
    for r in range(rounds):
        for name, url in urls.items():
            short, long = alone_ttft(url, "Short: the"), alone_ttft(url, prompt)
            out[name].append({"idle_short_ttft_s": short, "idle_long_ttft_s": long,
                              **while_long_prompt(url, prompt, long * (1 + r % 3) / 4)})
    return out


def median(values):
    return statistics.median(values)


def long_prompt_lines(results: dict, chunks: dict, prompt_tokens: int) -> list[str]:
    lines = ["| prefill chunk (tokens) | idle: short TTFT | idle: long TTFT | one chunk (idle long / chunks) "
             "| short TTFT while the long prompt is read (median / max) | longest pause of a running stream "
             "| long TTFT while a stream runs |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, rows in results.items():
        chunk = chunks[name]
        per_chunk = median(r["idle_long_ttft_s"] for r in rows) / -(-prompt_tokens // chunk)
        ms = [1000 * r["short_ttft_s"] for r in rows]
        lines.append(f"| {chunk}{' (whole prompt)' if chunk >= prompt_tokens else ''} | "
                     f"{1000 * median(r['idle_short_ttft_s'] for r in rows):.0f} ms | "
                     f"{1000 * median(r['idle_long_ttft_s'] for r in rows):.0f} ms | {1000 * per_chunk:.0f} ms | "
                     f"{median(ms):.0f} / {max(ms):.0f} ms | "
                     f"{1000 * median(r['running_longest_pause_s'] for r in rows):.0f} ms | "
                     f"{1000 * median(r['long_ttft_s'] for r in rows):.0f} ms |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", help="a training output directory (default: random small_cpu model)")
    parser.add_argument("--hidden", type=int, help="the random model's width (default: small_cpu's 128)")
    parser.add_argument("--serving-cache", help="serve bench/serving.py's ~130 M diagonal checkpoint from this cache "
                                                "(with the GGUFs' vocabulary, as bench/serving_http.py does)")
    parser.add_argument("--streams", default="1,8", help="concurrent streams to measure (default 1,8)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request (default 64)")
    parser.add_argument("--tokens-per-level", type=int, default=1024, help="tokens requested per level (default 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--chunk", type=int, default=PREFILL_CHUNK_TOKENS,
                        help=f"the server's --prefill-chunk-tokens (default {PREFILL_CHUNK_TOKENS})")
    parser.add_argument("--server-core", type=int, default=0, help="CPU core of the server processes (default 0)")
    parser.add_argument("--output-dir", default=str(HERE / "results"))
    parser.add_argument("--name", default="serve", help="results file name (default serve)")
    args = parser.parse_args()
    levels = [int(s) for s in args.streams.split(",")]
    chunks = {"chunked": args.chunk, "whole": LONG_PROMPT}
    servers = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.serving_cache:
            from serving_http import our_model_dir
            root = Path(args.serving_cache) / "130m"
            model_dir = our_model_dir(root / "ours_diagonal", root / "mamba2-f32.gguf", Path(tmp))
        else:
            model_dir = Path(args.model_dir) if args.model_dir else random_checkpoint(Path(tmp), args.hidden)
        model_config = served_config(model_dir)
        prompt = long_prompt(load_tokenizer(next(model_dir.glob("*/tokenizer.json"))), LONG_PROMPT)
        try:
            for name, chunk in chunks.items():
                servers[name] = start_server(model_dir, args.server_core, max(levels), chunk)
            urls = {name: url for name, (_, url) in servers.items()}
            make_clients(max(levels) + 3)
            for url in urls.values():
                run(url, 1, 1, 8)                                   # warm-up
                alone_ttft(url, prompt)
            rows = throughput(urls["chunked"], levels, args.rounds, args.tokens, args.tokens_per_level)
            long_rows = long_prompt_rounds(urls, prompt, args.rounds)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait()
    base = rows[0]["tokens_per_s"]
    lines = ["| concurrent streams | requests | new tokens | seconds | tokens/s (all streams) | tokens/s per stream "
             "| × 1 stream |", "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['streams']} | {r['requests']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} | "
              f"{r['per_stream_tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f} |" for r in rows]
    lines += ["", f"A {LONG_PROMPT:,}-token prompt (TTFT: time to first token; median of {args.rounds} rounds):", "",
              *long_prompt_lines(long_rows, chunks, LONG_PROMPT)]
    write_results(Path(args.output_dir), args.name,
                  {"model_dir": (f"{args.serving_cache}/130m/ours_diagonal" if args.serving_cache else
                                 str(args.model_dir or f"random small_cpu, hidden {args.hidden or 128}")),
                   "tokens_per_request": args.tokens, "rows": rows, "long_prompt_tokens": LONG_PROMPT,
                   "prefill_chunks": chunks, "long_prompt": long_rows, "setup": {"model": model_config}}, lines,
                  provenance(server_core=args.server_core, rounds=args.rounds, model_config=model_config))


if __name__ == "__main__":
    main()
