"""Serving throughput with 1, 4 and 16 concurrent streams: `python main.py serve` in its own
process (pinned to one core, one torch thread), clients streaming /api/generate (NDJSON) from
threads of this process.  Tokens/s = new tokens of all requests / wall time; the running batch
decodes every stream in one step, so the total should grow with the number of streams.

    taskset -c 0 python bench/serve.py [--model-dir outputs/small_cpu] [--tokens 64] [--server-core 1]

Without --model-dir: the model of config/small_cpu.yaml with random weights and a BPE tokenizer
trained on the package's own Python source (about 0.5 MB, so the config's vocab of 2048 is reached;
not the docs, whose length changes), sampling at temperature 1 (text of random tokens).
Writes bench/results/serve.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from common import HERE, write_results  # noqa: E402
from provenance import provenance  # noqa: E402

ROOT = HERE.parent


def random_checkpoint(folder: Path) -> Path:
    """config/small_cpu.yaml's model with random weights, as a checkpoint directory."""
    import torch
    import yaml

    from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM
    from sparse_ssm.data.tokenizer import save_tokenizer, train_tokenizer
    from sparse_ssm.model.checkpoint import save_weights, weights_of

    model_cfg = yaml.safe_load((ROOT / "config" / "small_cpu.yaml").read_text())["model"]
    sources = [path.read_text() for path in sorted((ROOT / "sparse_ssm").rglob("*.py"))]
    tokenizer = train_tokenizer(sources, model_cfg["vocab_size"])
    model_cfg["vocab_size"] = tokenizer.get_vocab_size()
    torch.manual_seed(0)
    model = SparseSSMForCausalLM(SparseSSMConfig(**model_cfg))
    checkpoint = folder / "small_cpu_random" / "best"
    checkpoint.mkdir(parents=True)
    save_weights(checkpoint / "model.safetensors", weights_of(model))
    (checkpoint / "config.yaml").write_text(yaml.safe_dump({"model": model.config.to_dict()}))
    save_tokenizer(tokenizer, checkpoint / "tokenizer.json")
    return checkpoint.parent


def served_config(model_dir: Path) -> dict | None:
    """The model section of the checkpoint's config.yaml (`best/` first), for the provenance."""
    import yaml
    found = sorted(model_dir.glob("*/config.yaml"), key=lambda p: p.parent.name != "best")
    return yaml.safe_load(found[0].read_text()).get("model") if found else None


def start_server(model_dir: Path, core: int, max_batch: int):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(["taskset", "-c", str(core), sys.executable, "-u", str(ROOT / "main.py"), "serve",
                             "--model-dir", str(model_dir), "--port", "0", "--name", "bench", "--device", "cpu",
                             "--max-batch", str(max_batch)], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    line = proc.stdout.readline()
    if " on " not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}")
    return proc, line.split(" on ")[1].split()[0]


def stream(url: str, prompt: str, tokens: int, seed: int) -> int:
    body = {"model": "bench", "prompt": prompt, "stream": True,
            "options": {"num_predict": tokens, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "repeat_penalty": 1.0,
                        "seed": seed}}
    with httpx.Client(timeout=600) as client, client.stream("POST", f"{url}/api/generate", json=body) as response:
        last = None
        for line in response.iter_lines():
            last = line
    return json.loads(last)["eval_count"]


def run(url: str, streams: int, requests_each: int, tokens: int) -> dict:
    counts = [0] * streams
    barrier = threading.Barrier(streams + 1)

    def client(i):
        barrier.wait()
        for r in range(requests_each):
            counts[i] += stream(url, f"Request {i}.{r}: the", tokens, seed=1000 * i + r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    return {"streams": streams, "requests": streams * requests_each, "tokens": sum(counts), "seconds": seconds,
            "tokens_per_s": sum(counts) / seconds, "per_stream_tokens_per_s": sum(counts) / seconds / streams}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", help="a training output directory (default: random small_cpu model)")
    parser.add_argument("--streams", default="1,4,16", help="concurrent streams to measure (default 1,4,16)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request (default 64)")
    parser.add_argument("--tokens-per-level", type=int, default=1024, help="tokens requested per level (default 1024)")
    parser.add_argument("--server-core", type=int, default=1, help="CPU core of the server process (default 1)")
    parser.add_argument("--output-dir", default=str(HERE / "results"))
    args = parser.parse_args()
    levels = [int(s) for s in args.streams.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else random_checkpoint(Path(tmp))
        model_config = served_config(model_dir)
        proc, url = start_server(model_dir, args.server_core, max(levels))
        try:
            run(url, 1, 1, 8)                                       # warm-up
            rows = [run(url, n, max(1, args.tokens_per_level // (n * args.tokens)), args.tokens) for n in levels]
        finally:
            proc.terminate()
            proc.wait()
    base = rows[0]["tokens_per_s"]
    lines = ["| concurrent streams | requests | new tokens | seconds | tokens/s (all streams) | tokens/s per stream "
             "| × 1 stream |", "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['streams']} | {r['requests']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} | "
              f"{r['per_stream_tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f} |" for r in rows]
    write_results(Path(args.output_dir), "serve", {"model_dir": str(args.model_dir or "random small_cpu"),
                                                   "tokens_per_request": args.tokens, "rows": rows}, lines,
                  provenance(server_core=args.server_core, model_config=model_config))


if __name__ == "__main__":
    main()
