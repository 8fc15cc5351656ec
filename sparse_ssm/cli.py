"""Command-line interface: a thin layer over the Python API.

    python main.py inspect --config config/small_cpu.yaml      # build the model, report its cost,
                                                              # check prefill + recurrent decoding
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .config import ConfigError, SparseSSMConfig, load_yaml
from .lm import SparseSSMForCausalLM


def cmd_inspect(args) -> int:
    raw = load_yaml(args.config)
    config = SparseSSMConfig.from_dict(raw.get("model"))
    torch.manual_seed(args.seed)
    model = SparseSSMForCausalLM(config).eval()
    layer = model.blocks[0].mixer
    cost = layer.ssm_cost_per_token()
    print(f"model: {config.num_layers} layers, hidden {config.hidden_dim}, state {config.state_dim}, "
          f"{layer.num_heads} heads x {layer.head_dim}, class {config.selective_param_class} "
          f"-> structure {cost['structure']}")
    print(f"parameters: {model.num_parameters():,}")
    print(f"SSM FLOPs per token per layer: {cost['ssm_flops']:,} (generator {cost['generator_flops']:,}, "
          f"state {cost['state_flops']:,}); projections + conv {cost['projection_flops']:,}")
    length = min(args.length, config.max_seq_len)
    ids = torch.randint(0, config.vocab_size, (1, length))
    start = time.perf_counter()
    with torch.no_grad():
        full = model(ids).logits
    print(f"forward of {length} tokens: {time.perf_counter() - start:.3f}s")
    half = length // 2
    logits, cache = model.prefill(ids[:, :half])
    worst = (logits - full[:, half - 1]).abs().max().item()
    for t in range(half, length):
        logits, cache = model.step(ids[:, t], cache)
        worst = max(worst, (logits - full[:, t]).abs().max().item())
    print(f"prefill {half} tokens + {length - half} recurrent steps vs. full forward: max |logit diff| {worst:.2e}")
    sample = model.generate(ids[:, :4], max_new_tokens=8)
    print(f"greedy continuation (random weights): {sample[0].tolist()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main.py", description="sparse-ssm: selective sparse state space LMs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("inspect", help="build the model of a config, print its size and cost, and check that "
                                       "recurrent decoding matches the parallel forward pass")
    p.add_argument("--config", required=True, type=Path, help="YAML config file (its `model` section is used)")
    p.add_argument("--length", type=int, default=64, help="tokens in the check sequence (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed for weights and tokens (default 0)")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
