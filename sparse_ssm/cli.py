"""Command-line interface: a thin layer over the Python API.

    python main.py train --config config/small_cpu.yaml [--output-dir DIR] [--seed N] [--resume [latest|PATH]]
                         [--use-best-model] [--set training.num_epochs=1 ...]
    python main.py inspect --config config/small_cpu.yaml      # build the model, report its cost,
                                                              # check prefill + recurrent decoding
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .config import Config, ConfigError, SparseSSMConfig, load_yaml
from .data import DataError
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


def cmd_train(args) -> int:
    from .training import Trainer, atomic_write_text

    overrides = list(args.set or [])
    if args.output_dir:
        overrides.append(f"training.output_dir={args.output_dir}")
    if args.seed is not None:
        overrides.append(f"training.seed={args.seed}")
    config = Config.load(args.config, overrides)
    if args.resume:
        # continue with the checkpoint's own config (what exact resume needs); --set and the flags still apply
        from .training import resolve_checkpoint
        checkpoint = resolve_checkpoint(Path(config.training.output_dir), args.resume)
        config = Config.load(checkpoint / "config.yaml", overrides)
        args.resume = str(checkpoint)
        print(f"resuming from {checkpoint} with its saved config (change values with --set)")
    start = time.perf_counter()
    trainer = Trainer(config, resume=args.resume)
    result = trainer.train()
    val = result["validation"]
    print(f"done in {time.perf_counter() - start:.0f}s, {result['step']} steps: validation loss {val['loss']:.4f}, "
          f"perplexity {val['perplexity']:.2f} (unigram baseline {result['unigram_validation_perplexity']:.1f})")
    out = trainer.output_dir
    print(f"checkpoints: {out / 'checkpoints'} (latest: {(out / 'latest').resolve()}, best: {out / 'best'}); "
          f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}")
    if args.use_best_model:
        test = trainer.evaluate_checkpoint("best")
        print(f"best checkpoint (step {trainer.state['best_step']}) on the test split: loss {test['loss']:.4f}, "
              f"perplexity {test['perplexity']:.2f}")
        result["test_best"] = test
        atomic_write_text(out / "metrics.json", json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main.py", description="sparse-ssm: selective sparse state space LMs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser("train", help="train a model (resumable; Ctrl-C saves a checkpoint)",
                       description="Train on the dataset of the config.  Checkpoints, the tokenizer, TensorBoard "
                                   "logs and metrics go to training.output_dir.")
    t.add_argument("--config", required=True, type=Path, help="YAML config file")
    t.add_argument("--output-dir", help="output directory (overrides training.output_dir)")
    t.add_argument("--seed", type=int, help="random seed (overrides training.seed)")
    t.add_argument("--resume", nargs="?", const="latest", metavar="latest|best|STEP|PATH",
                   help="continue from a checkpoint of the output directory (default: latest)")
    t.add_argument("--use-best-model", action="store_true",
                   help="after training, evaluate the best checkpoint (lowest validation loss) on the test split")
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set training.num_epochs=1 (repeatable)")
    t.set_defaults(func=cmd_train)
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
    except (ConfigError, FileNotFoundError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\n{e}" if str(e) else "\ninterrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        from .training import TrainingError
        if isinstance(e, TrainingError):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise
