"""Weights for inference (`--weights fp32|bf16|int8`): speed of the int8 matmul, quality, memory.

    nice -n 19 python bench/weights.py --checkpoint outputs/weights_demo --train config/demo.yaml --train-only
    taskset -c 0 python bench/weights.py --checkpoint outputs/weights_demo [--rounds 5]

0. the checkpoint: `--train CONFIG` trains CONFIG into the --checkpoint folder as `make demo` does
   (`main.py train --config CONFIG --output-dir DIR --use-best-model`; the embedded corpus is written
   first when the config reads it and it is missing) and records the command, the run's resolved
   config and the code version in DIR/weights_bench_training.json; the quality part reads that record
   into the results (a folder without one is refused: its figures could not be reproduced);

1. matmul: `Int8Linear` (weight-only int8: the native int8 product below 64 rows) and a bf16 `F.linear` against
   the float32 `F.linear`, at the projection shapes of a ~130 M model (hidden 768, expand 2, 24 heads,
   state 16, vocab 50,280) for 1, 8 and 512 rows, one thread, rounds interleaved (median);
2. quality of the trained checkpoint (DIR/best): perplexity on its run's test split (the embedded corpus), read
   whole (forward: prompts and evaluation) and token by token (the decoding step, whose int8 products round
   the activations to int8, on the first --decode-windows windows), and the greedy tokens' agreement
   with float32 (share of the first --new-tokens positions equal, and the mean length of the common
   prefix) for --prompts prompts taken from the test split;
3. memory: peak RSS of a fresh process that loads a random ~130 M checkpoint with each weights
   format and decodes a few tokens, and of one that imports the package and loads its native library (the
   code's own memory, no weights: the baseline);
   the ratio is given both for the whole process and above the baseline;
4. decoding at batch 1 on that model (tokens/s, rounds interleaved).
Writes bench/results/weights.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from common import HERE, peak_rss_gb, write_results  # noqa: E402
from provenance import AT_START, REPO, code_version, provenance, versions  # noqa: E402
from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM  # noqa: E402
from sparse_ssm.config import Config  # noqa: E402
from sparse_ssm.data.corpus import ensure_shakespeare  # noqa: E402
from sparse_ssm.data.pipeline import prepare_lm_data  # noqa: E402
from sparse_ssm.model.checkpoint import TOKENIZER, WEIGHTS, load_model, save_weights, weights_of  # noqa: E402
from sparse_ssm.model.quantize import Int8Linear  # noqa: E402
from sparse_ssm.train.evaluation import loss_metrics, loss_sum  # noqa: E402
from sparse_ssm.util.files import atomic_write_text  # noqa: E402

FORMATS = ("fp32", "bf16", "int8")
SHAPES = {"in_proj": (3072, 768), "out_proj": (768, 1536), "generator": (128, 1536), "lm_head": (50280, 768)}
TRAINING_RECORD = "weights_bench_training.json"
MODEL_130M = dict(vocab_size=50280, hidden_dim=768, state_dim=16, ffn_dim=0, num_layers=24, max_seq_len=2048,
                  dropout=0.0, selective_param_class="sparse", sparsity_level=0.9)


def seconds(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def matmul_times(rounds: int) -> list[dict]:
    """Median seconds per call of each matmul at each shape and row count, rounds interleaved."""
    rows = []
    for name, (out_features, in_features) in SHAPES.items():
        weight = torch.randn(out_features, in_features) / in_features ** 0.5
        int8, bf16 = Int8Linear.from_float(weight), weight.bfloat16()
        for m in (1, 8, 512):
            x = torch.randn(m, in_features)
            repeat = max(1, int(2e8 / (2 * m * in_features * out_features)))
            calls = {"fp32": lambda: F.linear(x, weight), "bf16": lambda: F.linear(x.bfloat16(), bf16),
                     "int8": lambda: int8(x)}
            times = {k: [] for k in calls}
            for _ in range(rounds):
                for k, call in calls.items():
                    times[k].append(seconds(call, repeat))
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"map": name, "shape": [out_features, in_features], "rows": m,
                         **{f"{k}_ms": 1e3 * v for k, v in med.items()},
                         "int8_speedup": med["fp32"] / med["int8"], "bf16_speedup": med["fp32"] / med["bf16"]})
            print(rows[-1], flush=True)
    return rows


def train_checkpoint(config: Path, folder: Path) -> dict:
    """Train `config` into `folder` as `make demo` does and record how in folder/TRAINING_RECORD:
    the command, the run's resolved config (its config.yaml), the code version and the packages."""
    data_path = Config.load(config).dataset.data_path
    if data_path and Path(data_path).resolve() == (REPO / "data/shakespeare").resolve():
        ensure_shakespeare(data_path)                                # the embedded corpus, as `make demo` writes it
    command = ["main.py", "train", "--config", str(config), "--output-dir", str(folder), "--use-best-model"]
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "main.py"), *command[1:]], check=True)
    import yaml
    record = {"command": ["python", *command], "cwd": str(Path.cwd()), "config_file": str(config),
              "config": yaml.safe_load((folder / "config.yaml").read_text()), "git": AT_START,
              "code_version": code_version(), "versions": versions(), "wall_s": time.perf_counter() - start}
    atomic_write_text(folder / TRAINING_RECORD, json.dumps(record, indent=2))
    return record


def training_record(folder: Path) -> dict:
    """The record `train_checkpoint` left in `folder`; exits naming the fix when there is none."""
    path = folder / TRAINING_RECORD
    if not (path.is_file() and (folder / "best").is_dir()):
        sys.exit(f"{folder} holds no checkpoint trained by this script ({path.name} and best/ are missing): its quality "
                 f"figures could not be reproduced. Train one: python bench/weights.py --checkpoint {folder} "
                 f"--train config/demo.yaml --train-only")
    return json.loads(path.read_text())


def quality(checkpoint: Path, prompts: int, prompt_tokens: int, new_tokens: int, max_windows: int,
            decode_windows: int) -> dict:
    """Test-split perplexity per weights format, read whole (forward) and token by token (the decoding
    step) on the first `decode_windows` windows, and greedy agreement with float32."""
    cfg = Config.load(checkpoint / "config.yaml", saved=True)
    data = prepare_lm_data(cfg.dataset, cfg.model.vocab_size, checkpoint / TOKENIZER, log=lambda *_: None)
    test = data.windows("test", cfg.dataset.max_seq_len, cfg.dataset.max_seq_len)
    n = min(len(test), max_windows)
    models = {w: load_model(checkpoint, "cpu", w) for w in FORMATS}
    out = {"checkpoint": str(checkpoint), "test_windows": n, "perplexity": {}, "greedy": {}}
    out["decode_windows"], out["decode_perplexity"] = min(n, decode_windows), {}
    ids = torch.stack([test[i][0] for i in range(out["decode_windows"])])
    for w, model in models.items():
        total, count = loss_sum(model, test, data.pad_id, torch.device("cpu"), range(0, n, 16), 16)
        out["perplexity"][w] = loss_metrics(total, count)["perplexity"]
        out["decode_perplexity"][w] = _stepped_perplexity(model, ids)
    stream = torch.as_tensor(data.streams["test"][: prompts * (prompt_tokens + new_tokens)].astype("int64"))
    starts = stream.reshape(prompts, -1)[:, :prompt_tokens]
    greedy = {w: _greedy(m, starts, new_tokens) for w, m in models.items()}
    for w in ("bf16", "int8"):
        same = greedy[w] == greedy["fp32"]
        prefix = same.int().cumprod(1).sum(1).float()
        out["greedy"][w] = {"agreement": float(same.float().mean()), "mean_common_prefix": float(prefix.mean()),
                            "identical_sequences": int((prefix == new_tokens).sum()), "prompts": prompts}
    out["models"] = models["fp32"]
    return out


@torch.no_grad()
def _stepped_perplexity(model, ids: torch.Tensor, batch: int = 32) -> float:
    """Perplexity of windows ids (n, T) read one token at a time (`model.step`, 32 rows a step), each token
    scored from the logits of the step before it."""
    total, count = 0.0, 0
    for rows in ids.split(batch):
        logits, cache = model.prefill(rows[:, :1])
        for t in range(1, rows.shape[1]):
            total += F.cross_entropy(logits.float(), rows[:, t], reduction="sum").item()
            count += rows.shape[0]
            logits, cache = model.step(rows[:, t], cache)
    return loss_metrics(total, count)["perplexity"]


@torch.no_grad()
def _greedy(model, prompt_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    logits, cache = model.prefill(prompt_ids)
    tokens = []
    for _ in range(new_tokens):
        nxt = logits.float().argmax(-1)
        tokens.append(nxt)
        logits, cache = model.step(nxt, cache)
    return torch.stack(tokens, 1)


def write_random_checkpoint(folder: Path) -> Path:
    """A random ~130 M diagonal model (hidden 768, 24 layers, no FFN) as a checkpoint directory."""
    import yaml
    torch.manual_seed(0)
    model = SparseSSMForCausalLM(SparseSSMConfig(**MODEL_130M))
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(folder / WEIGHTS, weights_of(model))
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": model.config.to_dict()}))
    return folder


def memory_and_decoding(folder: Path, rounds: int) -> dict:
    decode = (f"from sparse_ssm.model.checkpoint import load_model\n"
              f"m = load_model({str(folder)!r}, 'cpu', W)\n"
              f"logits, cache = m.prefill(torch.arange(64)[None])\n"
              f"for _ in range(4): logits, cache = m.step(logits.argmax(-1), cache)")
    # the code's own memory: torch, the package's loading and decoding modules and the native library, no
    # weights (not a model on the meta device: that imports torch._dynamo, ~0.17 GB that loading never does)
    baseline = peak_rss_gb("import sparse_ssm.model.checkpoint, sparse_ssm.generate.stream\n"
                           "from sparse_ssm.ssm.kernels import native_library\nnative_library()", 1)
    peaks = {w: peak_rss_gb(f"W = {w!r}\n" + decode, 1) for w in FORMATS}
    out = {"baseline_gb": baseline, "peak_rss_gb": peaks,
           "ratio_to_fp32": {w: peaks[w] / peaks["fp32"] for w in FORMATS},
           "ratio_to_fp32_above_baseline": {w: (peaks[w] - baseline) / (peaks["fp32"] - baseline) for w in FORMATS}}
    models = {w: load_model(folder, "cpu", w) for w in FORMATS}
    times = {w: [] for w in FORMATS}
    with torch.no_grad():
        caches = {w: m.prefill(torch.arange(16)[None])[1] for w, m in models.items()}
        token = torch.tensor([5])
        for _ in range(rounds):
            for w, m in models.items():
                times[w].append(seconds(lambda: m.step(token, caches[w]), 8))
    out["decode_tokens_per_s"] = {w: 1 / statistics.median(t) for w, t in times.items()}
    out["num_parameters"] = models["fp32"].num_parameters()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="the output folder of a training run that --train made (quality: its best/)")
    p.add_argument("--train", type=Path, metavar="CONFIG", help="first train CONFIG into --checkpoint (config/demo.yaml)")
    p.add_argument("--train-only", action="store_true", help="stop after --train (time the rest on a quiet core)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--max-windows", type=int, default=400, help="test windows scored at most")
    p.add_argument("--decode-windows", type=int, default=128, help="test windows also scored token by token")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    if args.train:
        train_checkpoint(args.train, args.checkpoint)
        if args.train_only:
            return
    record = training_record(args.checkpoint)
    torch.set_num_threads(1)
    matmuls = matmul_times(args.rounds)
    scored = quality(args.checkpoint / "best", args.prompts, args.prompt_tokens, args.new_tokens, args.max_windows,
                     args.decode_windows)
    scored["training"] = record
    trained = scored.pop("models")
    with tempfile.TemporaryDirectory() as tmp:
        memory = memory_and_decoding(write_random_checkpoint(Path(tmp) / "m130"), args.rounds)
    lines = ["# Weights for inference: fp32, bf16, int8 weight-only (one thread)", "",
             "Matmul, ms per call (median of interleaved rounds); speed-up over float32 `F.linear`; int8 is "
             "`Int8Linear`: the native int8 product (`ssm.quantized.int8_linear`; `torch._weight_int8pack_mm` "
             "without the native kernels) below 64 rows, a bf16 GEMM of the cast weight from 64 rows:", "",
             "| map | (out, in) | rows | fp32 | bf16 | int8 | int8 speed-up | bf16 speed-up |", "|--|--|--|--|--|--|--|--|"]
    lines += [f"| {r['map']} | {tuple(r['shape'])} | {r['rows']} | {r['fp32_ms']:.3f} | {r['bf16_ms']:.3f} | "
              f"{r['int8_ms']:.3f} | {r['int8_speedup']:.2f}x | {r['bf16_speedup']:.2f}x |" for r in matmuls]
    ppl, stepped, greedy = scored["perplexity"], scored["decode_perplexity"], scored["greedy"]
    lines += ["", f"Quality of {scored['checkpoint']} on its test split ({scored['test_windows']} windows; token by "
              f"token: the first {scored['decode_windows']}), trained by "
              f"`{' '.join(record['command'])}` at {record['code_version'][:12]} ({record['wall_s']:.0f} s):", "",
              "| weights | perplexity | vs fp32 | token by token | vs fp32 | greedy agreement (first "
              f"{args.new_tokens} tokens) | mean common prefix | identical sequences |", "|--|--|--|--|--|--|--|--|",
              f"| fp32 | {ppl['fp32']:.3f} | - | {stepped['fp32']:.3f} | - | - | - | - |"]
    lines += [f"| {w} | {ppl[w]:.3f} | {100 * (ppl[w] / ppl['fp32'] - 1):+.2f}% | {stepped[w]:.3f} | "
              f"{100 * (stepped[w] / stepped['fp32'] - 1):+.2f}% | {100 * g['agreement']:.1f}% | "
              f"{g['mean_common_prefix']:.1f} | {g['identical_sequences']}/{g['prompts']} |" for w, g in greedy.items()]
    lines += ["", f"Random ~130 M model ({memory['num_parameters']:,} parameters): peak RSS loading it and decoding "
              f"4 tokens (a fresh process; the code alone, torch, the package and its native library, no model: {memory['baseline_gb']:.3f} GB), "
              f"decode batch 1:",
              "", "| weights | peak RSS GB | / fp32 | / fp32 above the code alone | decode tokens/s |", "|--|--|--|--|--|"]
    lines += [f"| {w} | {memory['peak_rss_gb'][w]:.3f} | {memory['ratio_to_fp32'][w]:.2f} | "
              f"{memory['ratio_to_fp32_above_baseline'][w]:.2f} | {memory['decode_tokens_per_s'][w]:.1f} |"
              for w in FORMATS]
    write_results(args.out, "weights", {"matmul": matmuls, "quality": scored, "memory": memory},
                  lines, provenance({"trained": trained}, rounds=args.rounds, model_130m=MODEL_130M))


if __name__ == "__main__":
    main()
