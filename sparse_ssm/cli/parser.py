"""The argument parsers of `main.py`: one `add_*` per command, each naming its `cmd_*`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..tasks.chomsky import CHOMSKY_TASKS
from ..tasks.length_generalization import TEST_EDGES, TRAIN_RANGE
from ..tasks.state_tracking import GROUPS
from ..tasks.synthetic import TASKS
from ..tasks.training import VARIANTS
from .commands import (cmd_create_synthetic, cmd_evaluate, cmd_export, cmd_generate, cmd_inspect, cmd_serve,
                       cmd_train)


def _int_at_least(low: int, many: bool = False):
    """An argparse type: an integer >= low (`many`: a comma list of them); the message says what is wrong."""
    def parse(text: str):
        try:
            values = [int(x) for x in text.split(",")] if many else [int(text)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a comma list of integers' if many else 'an integer'}, "
                                             f"got {text!r}") from None
        if min(values) < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {min(values)}")
        return values if many else values[0]
    return parse


def _length_range(text: str) -> tuple[int, int]:
    """An argparse type: 'MIN-MAX' -> (MIN, MAX), 1 <= MIN <= MAX."""
    try:
        low, high = (int(x) for x in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN-MAX (e.g. 3-40), got {text!r}") from None
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"need 1 <= MIN <= MAX, got {text!r}")
    return low, high


def _positive_float(text: str) -> float:
    """An argparse type: a float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _add_checkpoint_arguments(parser):
    """--model-dir and --checkpoint: the trained checkpoint a command reads."""
    parser.add_argument("--model-dir", required=True, help="a training output directory")
    parser.add_argument("--checkpoint", help="best | latest | STEP | PATH (default: best if present, else latest)")


def _add_device_argument(parser):
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] | mps (default auto)")


def _add_weights_argument(parser):
    parser.add_argument("--weights", choices=["fp32", "bf16", "int8"],
                        help="the weights for inference: fp32 as trained, bf16, or int8 weight-only with per-channel "
                             "scales (the scan and its state stay float32; default: generation.weights, fp32)")


def _add_train_parser(sub):
    t = sub.add_parser("train", help="train a model (resumable; Ctrl-C saves a checkpoint)",
                       description="Train on the dataset of the config.  Checkpoints, the tokenizer, TensorBoard "
                                   "logs and metrics go to training.output_dir.")
    t.add_argument("--config", required=True, type=Path, help="YAML config file")
    t.add_argument("--output-dir", help="output directory (overrides training.output_dir)")
    t.add_argument("--seed", type=int, help="random seed (overrides training.seed)")
    t.add_argument("--resume", nargs="?", const="latest", metavar="latest|best|STEP|PATH",
                   help="continue from a checkpoint of the output directory (default: latest)")
    t.add_argument("--overwrite", action="store_true",
                   help="start afresh in an output directory that holds a run: its checkpoints, best/, tokenizer "
                        "and logs are removed (other files are kept)")
    t.add_argument("--use-best-model", action="store_true",
                   help="after training, evaluate the best checkpoint (lowest validation loss) on the test split")
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set training.num_epochs=1 (repeatable)")
    t.set_defaults(func=cmd_train)


def _add_generate_parser(sub):
    g = sub.add_parser("generate", help="generate text from a trained model (streams to the terminal)",
                       description="Continue prompts with a trained checkpoint: the prompt is prefilled in one "
                                   "parallel pass, then each new token is one recurrent step.  The checkpoint's own "
                                   "model config and tokenizer are used; --config supplies generation defaults.")
    g.add_argument("--config", type=Path, help="YAML config: its `generation` section gives defaults for the flags below")
    _add_checkpoint_arguments(g)
    g.add_argument("--prompt", action="append", help="text to continue (repeatable: a batch)")
    g.add_argument("--prompts-file", help="a file with one prompt per line")
    g.add_argument("--max-length", type=int, help="number of NEW tokens to generate (default 100)")
    g.add_argument("--temperature", type=float, help="sampling temperature, 0 = greedy (default 1.0)")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens, 0 = off (default 0)")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1], 1 = off (default 1.0)")
    g.add_argument("--repetition-penalty", type=float, help="penalty > 1 discourages repeated tokens (default 1.0)")
    g.add_argument("--seed", type=int, help="seed for reproducible sampling (sequence i uses seed + i)")
    g.add_argument("--stop", action="append", help="stop string (repeatable); generation also stops at end-of-text")
    g.add_argument("--num-return-sequences", type=int, help="continuations per prompt (default 1)")
    g.add_argument("--output-file", help="write the results to this file (an existing one only with --overwrite)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --output-file")
    g.add_argument("--output-format", choices=["text", "jsonl"], default="text",
                   help="text: prompt + continuation per sequence; jsonl: one record with the settings per sequence")
    g.add_argument("--no-stream", action="store_true", help="print the results at the end instead of streaming")
    _add_device_argument(g)
    _add_weights_argument(g)
    g.set_defaults(func=cmd_generate)


def _add_evaluate_parser(sub):
    e = sub.add_parser("evaluate", help="perplexity of a checkpoint on a file, or the synthetic tasks",
                       description="--task perplexity: score a text/JSONL/JSON/parquet file with a trained checkpoint, "
                                   "with sliding windows (every token predicted once).  The other tasks train small "
                                   "models of each variant (and the ablation without selection, 'lti') with the same "
                                   "budget and report their accuracy at each test length: selective-copying and "
                                   "induction-heads (the Mamba paper's), and the state-tracking tasks, scored at every "
                                   "position: parity (running parity of a bit string), modular-counting (running sum "
                                   "mod --modulus of tokens 0 .. m-1) and permutation-composition (running product "
                                   "of --group elements).  The Chomsky-hierarchy tasks (parity-check, even-pairs, "
                                   "cycle-navigation, modular-arithmetic, modular-arithmetic-brackets; Deletang et al. "
                                   "2023) and word-problem (of --group) train on random lengths in --train-lengths "
                                   "and report scaled accuracy (1 perfect, 0 chance) per bucket of --test-buckets.")
    e.add_argument("--task", choices=["perplexity", *TASKS, *CHOMSKY_TASKS], default="perplexity",
                   help="what to evaluate (default perplexity)")
    e.add_argument("--model-dir", help="perplexity: a training output directory")
    e.add_argument("--checkpoint", help="perplexity: best | latest | STEP | PATH (default: best, else latest)")
    e.add_argument("--data", help="perplexity: file to score")
    e.add_argument("--max-seq-len", type=_int_at_least(2),
                   help="window length (default: the checkpoint's dataset.max_seq_len)")
    e.add_argument("--stride", type=_int_at_least(1), help="window step, 1 .. the window (default: half the window)")
    e.add_argument("--batch-size", type=_int_at_least(1), default=32,
                   help="perplexity: windows per forward pass; tasks: sequences per training step (default 32)")
    e.add_argument("--text-field", default="text", help="record field of JSON/JSONL/parquet files (default text)")
    e.add_argument("--output-file", help="perplexity: write the result as JSON")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --output-file, or tasks' files in "
                                                            "--output-dir")
    e.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"tasks: comma list of {', '.join(VARIANTS)} (default all; state 16: diagonal has Mamba's "
                        f"transition eigenvalues in (0, 1], diagonal_signed in (-1, 1], rotation 2 x 2 scaled "
                        f"rotations, rotation_shallow / diagonal_signed_shallow the same in one layer, state 8, no conv "
                        f"window, rotation_grid rotation_shallow in 8 heads with turns snapped to multiples of "
                        f"2 pi / 60 from half the steps, permutation PD-SSM's one-hot moves of the states, "
                        f"householder DeltaProduct's two reflections per token (householder_closed with beta in "
                        f"[0, 2], householder_delta its reflections delta writes of the input from "
                        f"beta = 1, householder_delta_lm from beta = 0.004, householder_delta_hybrid the last "
                        f"layer householder_delta and the others diagonal, as config/state_tracking_lm.yaml), "
                        f"householder_exact one reflection "
                        f"per token in the rotation_grid shape, exact from half the steps, blockB B x B blocks, "
                        f"block 8 x 8, lti no selection)")
    e.add_argument("--steps", type=_int_at_least(1), default=600, help="tasks: training steps per variant (default 600)")
    e.add_argument("--length", type=_int_at_least(3), default=32, help="tasks: training sequence length (default 32)")
    e.add_argument("--lr", type=_positive_float, default=3e-3,
                   help="tasks: peak learning rate of the one-cycle AdamW schedule (default 3e-3)")
    e.add_argument("--test-lengths", type=_int_at_least(3, many=True),
                   help="tasks: comma list of test lengths (default: the training length)")
    e.add_argument("--train-lengths", type=_length_range, default=TRAIN_RANGE,
                   help="Chomsky tasks and word-problem: each training batch has one length drawn uniformly from "
                        f"MIN-MAX (default {TRAIN_RANGE[0]}-{TRAIN_RANGE[1]})")
    e.add_argument("--test-buckets", type=_int_at_least(1, many=True), default=TEST_EDGES,
                   help="Chomsky tasks and word-problem: comma list of increasing lengths, the edges of the test "
                        f"buckets (default {','.join(map(str, TEST_EDGES))}: 40-64, 65-128, 129-256)")
    e.add_argument("--num-memorize", type=_int_at_least(1), default=4,
                   help="selective copying: tokens to copy (default 4)")
    e.add_argument("--modulus", type=_int_at_least(2), default=3, help="modular-counting: the modulus m (default 3)")
    e.add_argument("--group", choices=list(GROUPS), default="s3",
                   help="permutation-composition and word-problem: s3 (order 6, the smallest non-abelian group), a5 (order 60, the "
                        "smallest non-solvable one) or s5 (order 120); product g_0 g_1 ... g_t, each new element "
                        "applied after the product so far (default s3)")
    e.add_argument("--seed", type=int, default=0, help="tasks: seed of data and weights (default 0)")
    e.add_argument("--output-dir", help="tasks: write <task>.json and <task>.md here (modular-counting-modM, "
                                             "permutation-composition-GROUP)")
    _add_device_argument(e)
    _add_weights_argument(e)
    e.set_defaults(func=cmd_evaluate)


def _add_create_synthetic_parser(sub):
    c = sub.add_parser("create-synthetic", help="write a synthetic training dataset with a teacher LM (resumable)",
                       description="Ask a teacher LM (Ollama, or a local GGUF model through llama.cpp or transformers) "
                                   "for diverse samples, filter and de-duplicate them, and write one JSON dataset that "
                                   "`dataset.type: synthetic` trains on.  --distillation also stores the teacher's "
                                   "top-k log-probabilities and tokenizer.  Flags override the `synthetic` section.")
    c.add_argument("--config", required=True, type=Path, help="YAML config file (its `synthetic` section)")
    c.add_argument("--num-samples", type=int, help="samples to keep (default 1000)")
    c.add_argument("--temperature", type=float, help="teacher sampling temperature (default 0.8)")
    c.add_argument("--output-dir", help="folder of the dataset (default data/synthetic)")
    c.add_argument("--output-file", help="dataset file name, .json (default phi4_dataset.json)")
    c.add_argument("--distillation", action="store_true",
                   help="also store the teacher's top-k token ids and log-probabilities, and its tokenizer")
    c.add_argument("--backend", choices=["auto", "ollama", "llama_cpp", "transformers"],
                   help="teacher backend (default auto: Ollama when a server answers with the model, else a local "
                        "GGUF teacher; llama_cpp and transformers run a GGUF file in this process)")
    c.add_argument("--model", help="ollama: model name (default phi4-mini); llama_cpp/transformers: a .gguf path or "
                                   "gemma3-270m (the bundled Gemma 3 270M, the default for those backends)")
    c.add_argument("--host", help="Ollama server (default $OLLAMA_HOST or http://127.0.0.1:11434)")
    c.add_argument("--seed", type=int, help="seed of prompts and sampling (default 42)")
    c.add_argument("--max-new-tokens", type=int, help="tokens per sample at most (default 256)")
    c.add_argument("--top-logprobs", type=int, metavar="K", help="distillation: top-k per token, 1..20 (default 8)")
    c.add_argument("--prompts", metavar="FILE", help="prompts to use in turn: one per line, or JSONL with \"prompt\"")
    c.add_argument("--workers", type=int, metavar="N", help="concurrent requests to an Ollama server (default 1)")
    c.add_argument("--threads", type=int, help="CPU threads of a local backend (default 1)")
    c.add_argument("--resume", action="store_true", help="continue an interrupted run from its .partial.jsonl")
    c.add_argument("--overwrite", action="store_true", help="replace an existing dataset file")
    c.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    c.set_defaults(func=cmd_create_synthetic)


def _add_inspect_parser(sub):
    p = sub.add_parser("inspect", help="build the model of a config, print its size and cost, and check that "
                                       "recurrent decoding matches the parallel forward pass")
    p.add_argument("--config", required=True, type=Path, help="YAML config file (its `model` section is used)")
    p.add_argument("--length", type=int, default=64, help="tokens in the check sequence (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed for weights and tokens (default 0)")
    p.set_defaults(func=cmd_inspect)


def _add_export_serve_parsers(sub):
    x = sub.add_parser("export", help="write a checkpoint as a Hugging Face model directory",
                       description="Write config.json, model.safetensors, the tokenizer (tokenizer.json) and the "
                                   "auto_map files, for transformers' AutoModelForCausalLM / AutoTokenizer and "
                                   "lm-evaluation-harness (--model hf --model_args pretrained=DIR,trust_remote_code=True).")
    _add_checkpoint_arguments(x)
    x.add_argument("--format", choices=["hf"], default="hf", help="output format (hf: Hugging Face transformers)")
    x.add_argument("--output", required=True,
                   help="the directory to write, outside --model-dir: new, empty or an earlier export's (which is "
                        "replaced); another folder only with --overwrite")
    x.add_argument("--overwrite", action="store_true",
                   help="write into a folder that holds other files (files of the same names are replaced, the "
                        "others kept)")
    x.set_defaults(func=cmd_export)
    s = sub.add_parser("serve", help="serve a model over the Ollama and OpenAI HTTP APIs",
                       description="An Ollama-compatible (/api/generate, /api/chat, /api/tags, /api/show) and "
                                   "OpenAI-compatible (/v1/completions, /v1/chat/completions, /v1/models) server. "
                                   "Concurrent requests are decoded together in one batch on the recurrent state. "
                                   "Stop it with Ctrl-C or SIGTERM.")
    _add_checkpoint_arguments(s)
    s.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 11434, Ollama's; 0: any free port, printed at start)")
    s.add_argument("--name", help="model name in the APIs (default: the model directory's name)")
    s.add_argument("--max-batch", type=int, help="sequences decoded together (default 16)")
    s.add_argument("--max-waiting", type=int, help="requests queued beyond those; more are refused with 503 (default 64)")
    s.add_argument("--max-tokens", type=int, help="new tokens per request at most; larger requests are refused "
                                                  "(default 1024)")
    s.add_argument("--max-prompt-tokens", type=int, help="prompt tokens per request at most (default 4096)")
    s.add_argument("--prefill-chunk-tokens", type=int,
                   help="prompt tokens prefilled between two decode steps at most, so a long prompt delays the "
                        "running streams by one chunk at a time (default 256)")
    s.add_argument("--max-body-bytes", type=int, help="request body size at most; larger ones get 413 (default 1 MiB)")
    s.add_argument("--api-key", help="require \"Authorization: Bearer KEY\" on every route but / (default "
                                     "$SPARSE_SSM_API_KEY; none: no key). Set one when --host is not loopback")
    s.add_argument("--device", help="auto | cpu | cuda[:N] | mps (default auto)")
    _add_weights_argument(s)
    s.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main.py", description="sparse-ssm: selective sparse state space LMs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(sub)
    _add_generate_parser(sub)
    _add_evaluate_parser(sub)
    _add_create_synthetic_parser(sub)
    _add_inspect_parser(sub)
    _add_export_serve_parsers(sub)
    return parser
