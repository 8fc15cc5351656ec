"""Serving through the servers (issue 38): our `python main.py serve` against llama-cpp-python's
OpenAI-compatible server on llama.cpp's Mamba-2 / Mamba-1 GGUFs, the same HTTP client, 1 and 8
concurrent streams.

    flock /work/core0.lock taskset -c 1 python bench/serving_http.py --cache ~/.cache/sparse-ssm/serving
    python bench/serving_http.py --dry-run --cache ~/.cache/sparse-ssm/serving     # 1 round, 8 tokens

The ~130 M models of `bench/serving.py` (built there once and kept under --cache/130m: our diagonal
checkpoint, the GGUFs of random transformers Mamba-1 / Mamba-2 of the same shape).  Every server is
its own process pinned to --server-core with one thread: ours with `--weights fp32` and `int8`,
llama-cpp-python's (`python -m llama_cpp.server --n_threads 1`) on f32 and q8_0.  Our checkpoint is
served with the GGUFs' own GPT-NeoX vocabulary (a tokenizer.json written from the GGUF's token list
and merges), so both read the same prompt as the same tokens.  The client (httpx, one thread a stream,
in this process) streams POST /v1/completions with greedy decoding (temperature 0) and max_tokens
--tokens; a stream's new tokens are max_tokens when its finish_reason is "length", else its chunks.
Levels and servers interleave within each round (ours, llama.cpp, ours, ...); the median round is
reported: aggregate tokens/s (all streams' new tokens / wall time) and time to first token (TTFT,
from the request's send).  Writes bench/results/NAME.{json,md} (NAME: --name, default serving_http).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import httpx
import yaml

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from common import HERE, comma_list, run_concurrently, write_results  # noqa: E402
from provenance import provenance  # noqa: E402

ROOT = HERE.parent
OURS_WEIGHTS = ("fp32", "int8")
ARCHS = ("mamba2", "mamba1")
GGUF_TYPES = ("f32", "q8_0")
EQUAL_PRECISION = {"fp32": "f32", "int8": "q8_0"}
PROMPT = "The history of the city begins"
NO_SERVER = ("llama-cpp-python's server is not installed: pip install -e '.[llama-cpp]' (its `server` extra: "
             "fastapi, sse-starlette, starlette-context, pydantic-settings), or pass --archs '' for ours only")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "sparse-ssm" / "serving",
                   help="bench/serving.py's cache (its 130m/ folder holds the checkpoint and GGUFs)")
    p.add_argument("--weights", type=lambda s: comma_list(s, OURS_WEIGHTS), default=list(OURS_WEIGHTS))
    p.add_argument("--archs", type=lambda s: comma_list(s, ARCHS), default=list(ARCHS),
                   help="llama.cpp models ('' for none: ours only)")
    p.add_argument("--gguf-types", type=lambda s: comma_list(s, GGUF_TYPES), default=list(GGUF_TYPES))
    p.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8],
                   help="concurrent streams (default 1,8)")
    p.add_argument("--tokens", type=int, default=64, help="max_tokens of each request (default 64)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--server-core", type=int, default=0, help="the core every server is pinned to (default 0)")
    p.add_argument("--dry-run", action="store_true", help="one round of 8 tokens (a check that it runs)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--name", default="serving_http", help="results file name (NAME.json, NAME.md)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.rounds, args.tokens = 1, 8
    return args


def request_body(model: str, tokens: int, prompt: str = PROMPT) -> dict:
    """A streamed, greedy /v1/completions request for exactly `tokens` new tokens (unless EOS)."""
    return {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0.0, "top_p": 1.0,
            "seed": 0, "stream": True}


def sse_events(lines) -> list[dict]:
    """The JSON chunks of a server-sent-events stream ("data: {...}" lines, up to "data: [DONE]")."""
    events = []
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            raise RuntimeError(f"the server failed the stream: {event['error']}")
        events.append(event)
    return events


def count_tokens(events: list[dict], max_tokens: int) -> dict:
    """{"tokens", "chunks", "finish_reason"} of a completion stream: finish_reason "length" means all
    max_tokens were generated (a chunk may hold several tokens, or none, while a UTF-8 character is
    incomplete); otherwise (EOS) the chunks that carry text are counted."""
    chunks = [e["choices"][0] for e in events if e.get("choices")]
    finish = next((c["finish_reason"] for c in reversed(chunks) if c.get("finish_reason")), None)
    with_text = sum(1 for c in chunks if c.get("text"))
    return {"tokens": max_tokens if finish == "length" else with_text, "chunks": with_text, "finish_reason": finish}


def stream(client: httpx.Client, url: str, model: str, tokens: int) -> dict:
    """One streamed completion: its token count and its time to first chunk (from the send)."""
    sent, first, lines = time.perf_counter(), None, []
    with client.stream("POST", f"{url}/v1/completions", json=request_body(model, tokens)) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and line.startswith("data:"):
                first = time.perf_counter()
            lines.append(line)
    return {**count_tokens(sse_events(lines), tokens), "ttft_s": first - sent}


def run_level(clients: list[httpx.Client], url: str, model: str, streams: int, tokens: int) -> dict:
    """`streams` concurrent requests (one thread each): aggregate tokens/s over the wall time."""
    results = [None] * streams

    def one(i):
        results[i] = stream(clients[i], url, model, tokens)

    seconds = run_concurrently(streams, one)
    if any(r is None for r in results):
        raise RuntimeError(f"a stream to {url} failed (see the thread's traceback above)")
    total = sum(r["tokens"] for r in results)
    return {"streams": streams, "tokens": total, "seconds": seconds, "tokens_per_s": total / seconds,
            "ttft_s": statistics.median(r["ttft_s"] for r in results), "max_ttft_s": max(r["ttft_s"] for r in results),
            "complete": sum(r["finish_reason"] == "length" for r in results),
            "finish_reasons": sorted({str(r["finish_reason"]) for r in results}),
            "chunks": [r["chunks"] for r in results]}


def gguf_tokenizer(gguf: Path, out: Path) -> Path:
    """A tokenizer.json (byte-level BPE) from a GGUF's GPT-2-style token list and merges."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    reader = GGUFReader(str(gguf))

    def strings(key):
        field = reader.fields[key]
        return [bytes(field.parts[i]).decode() for i in field.data]

    tokens, merges = strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges")
    types = [int(reader.fields["tokenizer.ggml.token_type"].parts[i][0])
             for i in reader.fields["tokenizer.ggml.token_type"].data]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges])
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([t for t, kind in zip(tokens, types) if kind == 3])      # 3: control
    tokenizer.save(str(out))
    return out


def our_model_dir(checkpoint: Path, gguf: Path, folder: Path) -> Path:
    """A training-output-like directory (best/: config, weights, the GGUF's tokenizer) for `serve`."""
    best = folder / "ours" / "best"
    best.mkdir(parents=True)
    for name in ("config.yaml", "model.safetensors"):
        (best / name).symlink_to(checkpoint / name)
    gguf_tokenizer(gguf, best / "tokenizer.json")
    return best.parent


def wait_ready(proc: subprocess.Popen, url: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server at {url} exited with {proc.returncode} before it answered")
        try:
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server at {url} did not answer within {seconds:.0f} s")


def server_command(kind: str, target: Path, weights: str, port: int, core: int) -> list[str]:
    """The command of one server pinned to `core` with one thread: ours (kind "ours", `target` a model
    directory, `weights` fp32 | int8) or llama-cpp-python's ("llama", `target` a GGUF)."""
    if kind == "ours":
        command = [sys.executable, "-u", str(ROOT / "main.py"), "serve", "--model-dir", str(target),
                   "--port", str(port), "--name", "bench", "--device", "cpu", "--weights", weights, "--max-batch", "8"]
    else:
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(target), "--model_alias", "bench",
                   "--n_threads", "1", "--n_threads_batch", "1", "--n_ctx", "2048", "--port", str(port),
                   "--interrupt_requests", "false"]      # its default ends a running stream when another arrives
    return ["taskset", "-c", str(core), *command]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, target: Path, weights: str, core: int, log_dir: Path):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = open(log_dir / f"{kind}-{weights}.log", "w")
    proc = subprocess.Popen(server_command(kind, target, weights, port, core), stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=ROOT)
    return proc, f"http://127.0.0.1:{port}"


def median_row(runs: list[dict]) -> dict:
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ordered[len(ordered) // 2], "rounds_tokens_per_s": [r["tokens_per_s"] for r in runs],
            "rounds_ttft_s": [r["ttft_s"] for r in runs]}


def measure(urls: dict, levels: list[int], rounds: int, tokens: int, log=print) -> dict:
    """name -> rows (one a level, the median round's), levels and servers interleaved in each round."""
    clients = [httpx.Client(timeout=900) for _ in range(max(levels))]
    for url in urls.values():
        run_level(clients, url, "bench", 1, 4)                        # warm-up
    runs = {name: {n: [] for n in levels} for name in urls}
    for r in range(rounds):
        for n in levels:
            for name, url in urls.items():
                runs[name][n].append(run_level(clients, url, "bench", n, tokens))
                log(f"round {r}, {n} streams, {name}: {runs[name][n][-1]['tokens_per_s']:.1f} tok/s")
    return {name: [median_row(runs[name][n]) for n in levels] for name in urls}


def servers_of(args, root: Path, model_dir: Path) -> dict:
    """name -> (kind, target, weights), ours and llama.cpp alternating."""
    ours = [(f"ours {w}", ("ours", model_dir, w)) for w in args.weights]
    llama = [(f"llama.cpp {a} {t}", ("llama", root / f"{a}-{t}.gguf", t)) for t in args.gguf_types for a in args.archs]
    mixed = []
    for i in range(max(len(ours), len(llama))):
        mixed += ours[i:i + 1] + llama[i:i + 1] if i < len(ours) else llama[i:i + 1]
    return dict(mixed)


def table(rows: dict, levels: list[int]) -> list[str]:
    lines = ["| server | " + " | ".join(f"{n} stream{'s' * (n > 1)}: tokens/s, TTFT" for n in levels)
             + f" | {levels[-1]} : {levels[0]} streams |", "|---|" + "---:|" * (len(levels) + 1)]
    for name, level_rows in rows.items():
        cells = [f"{r['tokens_per_s']:.1f}, {1000 * r['ttft_s']:.0f} ms"
                 + (f" ({r['complete']} of {r['streams']} streams reached max_tokens)" if r["complete"] < r["streams"]
                    else "") for r in level_rows]
        ratio = level_rows[-1]["tokens_per_s"] / level_rows[0]["tokens_per_s"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio:.2f}× |")
    return lines


def main(argv=None):
    args = parse_args(argv)
    root = args.cache / "130m"
    if args.archs and args.gguf_types:
        import importlib.util
        if importlib.util.find_spec("sse_starlette") is None or importlib.util.find_spec("llama_cpp") is None:
            raise SystemExit(NO_SERVER)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = our_model_dir(root / "ours_diagonal", root / "mamba2-f32.gguf", Path(tmp))
        servers = servers_of(args, root, model_dir)
        procs = {}
        try:
            for name, spec in servers.items():
                procs[name] = start(*spec, args.server_core, Path(tmp))
            for proc, url in procs.values():
                wait_ready(proc, url)
            rows = measure({name: url for name, (_, url) in procs.items()}, args.streams, args.rounds, args.tokens)
        finally:
            for proc, _ in procs.values():
                proc.terminate()
                proc.wait()
    lines = [f"Aggregate tokens/s of all streams and median time to first token (median of {args.rounds} "
             f"interleaved rounds; {args.tokens} new tokens a request, greedy):", "", *table(rows, args.streams), "",
             f"Each server one process on core {args.server_core}, one thread; ours "
             "`main.py serve --weights fp32|int8 --max-batch 8`, llama.cpp through llama-cpp-python "
             f"{metadata.version('llama-cpp-python') if args.archs else '(not run)'}'s server "
             "(`--n_threads 1 --interrupt_requests false`)."]
    setup = {"servers": {name: {"kind": k, "target": str(t), "weights": w} for name, (k, t, w) in servers.items()},
             "model": yaml.safe_load((root / "ours_diagonal" / "config.yaml").read_text())["model"],
             "gguf_bytes": {f"{a}-{t}": (root / f"{a}-{t}.gguf").stat().st_size
                            for a in args.archs for t in args.gguf_types},
             "llama_cpp_python": metadata.version("llama-cpp-python") if args.archs else None,
             "prompt": PROMPT, "tokens_per_request": args.tokens, "streams": args.streams}
    write_results(args.out, args.name, {"rows": rows, "setup": setup}, lines,
                  provenance(server_core=args.server_core, rounds=args.rounds, setup=setup))


if __name__ == "__main__":
    main()
