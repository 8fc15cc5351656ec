"""Write docs/configuration.md from the config's pydantic models, so that the reference stays true.

    python docs/make_config_reference.py          # rewrites docs/configuration.md
    python docs/make_config_reference.py --check  # exit 1 if the file is not what the models give

Keys, types, defaults and bounds are read from the sections of `sparse_ssm.config.Config`; only
the one-line meanings live here (MEANINGS), and every key must have one: a key added to a model
without a meaning, or a meaning left for a key that is gone, stops this script (and tests/test_docs.py).
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sparse_ssm.config import Config  # noqa: E402

OUTPUT = ROOT / "docs" / "configuration.md"

SECTION_INTROS = {
    "model": "The architecture (`SparseSSMConfig`, `sparse_ssm/model/config.py`). Fixed by a checkpoint: "
             "`--resume` refuses to change it, except `dropout`, `use_parallel_scan`, `scan_chunk_size` and "
             "`max_seq_len`.",
    "training": "The training loop (`sparse_ssm/train/config.py`).",
    "optimizer": "AdamW (`sparse_ssm/train/config.py`).",
    "scheduler": "Linear warm-up from 0, then cosine / linear decay to `min_lr_ratio` × lr, or constant.",
    "dataset": "Where the text comes from, how it is split, tokenised and windowed (`sparse_ssm/data/config.py`).",
    "generation": "Sampling defaults of `main.py generate` (its flags override them), the server and the "
                  "teachers (`sparse_ssm/generate/settings.py`). Order: repetition penalty, temperature, "
                  "top-k, top-p, draw.",
    "synthetic": "`main.py create-synthetic` (its flags override these; `sparse_ssm/teacher/config.py`).",
    "distillation": "Training on a `create-synthetic --distillation` dataset: loss = (1 − alpha) · CE + "
                    "alpha · T² · KL(teacher_T ‖ student_T) over the teacher's top-k plus one \"any other "
                    "token\" outcome.",
}

MEANINGS = {
    "model": {
        "vocab_size": "vocabulary size (the BPE tokenizer is trained to it, capped for small data)",
        "hidden_dim": "model width",
        "state_dim": "SSM state size N per channel",
        "ffn_dim": "feed-forward width; 0 drops the FFN sublayer (a pure Mamba-style block)",
        "num_layers": "residual blocks",
        "max_seq_len": "longest sequence the model is built for",
        "dropout": "dropout probability",
        "activation": "FFN activation",
        "selective_param_class": "structure of A_t: `dense` (one N×N matrix per head), `sparse` "
                                 "(block-diagonal; diagonal at high sparsity), `low_rank` (diag + U Vᵀ), "
                                 "`rotation` (2×2 scaled rotations, eigenvalues −λ ± iω; N even), "
                                 "`permutation` (PD-SSM's P_t diag(d_t): exact automaton steps; pure-PyTorch "
                                 "scan), `householder` (DeltaProduct's reflections times diag(d_t))",
        "sparsity_level": "`sparse`: block size b = largest divisor of N with b ≤ max(1, (1−level)·N); "
                          "N=16 at 0.9 → b=1 (diagonal, the Mamba case); N=128 at 0.9 → b=8",
        "sparsity_pattern": "`block`: block-diagonal b×b; `banded`: two block-diagonal parts offset by b/2 "
                            "(about 2b nonzeros a row; Lie–Trotter splitting, first-order in dt)",
        "low_rank_rank": "`low_rank`: rank r of U Vᵀ; `householder`: reflections per token",
        "use_parallel_scan": "the fast scan (fused CPU kernel where it applies, else the chunked matmul scan); "
                             "false: the sequential scan, one step per token",
        "selective": "false: the time-invariant ablation (dt, A, B, C, D are parameters, not functions of the token)",
        "scan_chunk_size": "tokens per chunk of the pure-PyTorch chunked scan; null: per device (8 on a CPU; "
                           "32 for the diagonal structure, 16 for the others on a GPU)",
        "expand": "inner width E = expand · hidden_dim",
        "num_heads": "heads; null: E / 64 (heads of 64 channels)",
        "num_groups": "B_t, C_t are shared by the heads of a group",
        "a_generator_rank": "rank of the bottleneck that generates A_t from the token; null: ⌈hidden_dim / 16⌉",
        "conv_kernel": "causal depthwise conv window (1: none)",
        "hippo_init": "initial A (`legs`, `legt`, `fourier`, `random`), projected onto the structure",
        "discretization": "`zoh`, `bilinear`, `gbt`; `auto`: `zoh` for diagonal, rotation, permutation and "
                          "householder, `bilinear` for block, banded, dense and low-rank (`low_rank` needs "
                          "`bilinear`/`gbt`; `zoh` for block, banded or dense needs a matrix exponential per token "
                          "and runs on the slow pure-PyTorch path)",
        "eigenvalue_range": "diagonal, and `householder`'s decay: `positive` exp(dt·a) ∈ (0, 1] (Mamba), "
                            "`signed` 2·exp(dt·a) − 1 ∈ (−1, 1] (what parity needs)",
        "rotation_angle_grid": "`rotation` only: K > 0 snaps each pair's turn to a multiple of 2π/K with "
                               "magnitude 1 and **no inputs into the state** (B = 0; needs "
                               "`learned_initial_state`): an automaton construction, not a language-model "
                               "setting; 0: off",
        "exact_reflections": "`householder` only: each β snapped to 0 or 2 and the decay to 1, **no inputs "
                             "into the state** (needs `learned_initial_state`): an automaton construction",
        "reflection_init_logit": "`householder` only: each reflection's logit b at initialisation, β = 2σ(b)",
        "reflection_init_logit_last": "`householder` only: the last head's b at initialisation, the heads' b "
                                      "evenly spaced from `reflection_init_logit` (first head) to it: a spread of "
                                      "write strengths, as Mamba spreads dt (one head: `reflection_init_logit`); unset: "
                                      "every head at `reflection_init_logit`",
        "structured_layers": "layers (from 0; negative from the end, -1 the last) built with `selective_param_class`; "
                             "the others are the default model's diagonal SSM (blocks of 1, eigenvalues in (0, 1], "
                             "the input through B, `dt_min`/`dt_max` at their defaults; sizes, the A generator's "
                             "rank, conv and `learned_initial_state` shared): a hybrid, e.g. `[-1]` for one state-tracking layer on top of Mamba layers; "
                             "unset: every layer",
        "reflection_range": "`householder` only: `open` β = 2σ(b) ∈ (0, 2); `closed` β ∈ [0, 2], 2σ(b) stretched "
                            "by 10% and clipped, so a learnt flip reaches eigenvalue −1 exactly (at b ≈ 3) "
                            "instead of approaching it",
        "reflection_input": "`householder` only: how a token's input x enters the state: `b` through B (Mamba's "
                            "B x, beside the reflections); `delta` by each reflection as a delta write, S − β k (kᵀS − xᵀ) "
                            "(DeltaNet's rule: the value along k is replaced by x at β = 1, mirrored about it at β = 2; "
                            "no B, and with β < 2 a bounded state without a decay); `both` the two",
        "reflection_decay": "`householder` only: `false` holds every decay d at 1 (DeltaProduct without its gate, "
                            "`HouseholderStructure.hold_decays`): the state forgets only what the delta writes "
                            "replace; needs `reflection_input: delta` (an input through B would add up without bound)",
        "learned_initial_state": "each layer learns the state a sequence starts from (heads × N × P, N(0, 1) "
                                 "at first, no weight decay; a cache passed in replaces it)",
        "gbt_alpha": "`gbt`: 0 forward Euler, 0.5 bilinear, 1 backward Euler",
        "dt_min": "lower end of the initial step size",
        "dt_max": "upper end of the initial step size",
        "tie_embeddings": "share the input embedding and the LM head",
        "norm_eps": "RMSNorm epsilon",
        "initializer_range": "std of the embeddings (and of every linear map under `weight_init: gpt2`)",
        "weight_init": "`mamba`: mamba_ssm's (Kaiming-uniform, residual outputs ÷ √(residuals · layers)); "
                       "`gpt2`: N(0, initializer_range). A saved config.yaml without this key reads as `gpt2`",
    },
    "training": {
        "num_epochs": "passes over the training split",
        "max_steps": "optimizer steps at most (stops before num_epochs when reached)",
        "batch_size": "sequences per process and micro-step (under torchrun the global batch is × processes)",
        "gradient_accumulation_steps": "micro-steps per optimizer step",
        "max_grad_norm": "gradient clipping; 0: none",
        "logging_steps": "steps between log lines / TensorBoard points",
        "save_steps": "steps between checkpoints",
        "eval_steps": "steps between validations",
        "eval_max_batches": "validation batches per evaluation at most; null: all",
        "save_total_limit": "step checkpoints kept (`best/` and the last good one are kept apart)",
        "mixed_precision": "`no`, `bf16` (CPU or GPU), `fp16` (CUDA, with a gradient scaler; bf16 on a machine "
                           "without CUDA)",
        "gradient_checkpointing": "recompute activations in the backward pass",
        "compile": "`torch.compile` the model",
        "seed": "seed of weights, data order and sampling (fixed by a checkpoint)",
        "output_dir": "where checkpoints, the tokenizer, TensorBoard logs and metrics go",
        "device": "`auto`, `cpu`, `cuda`, `cuda:N`, `mps`",
        "max_consecutive_nonfinite": "non-finite losses are skipped and reported; this many in a row stop the "
                                     "run, naming the last good checkpoint",
        "distributed_timeout_s": "torchrun: a collective waiting longer ends the job",
        "distributed": "torchrun: `ddp` (replicate) or `fsdp` (shard parameters, gradients, optimizer state)",
        "progress_bar": "show a progress bar",
    },
    "optimizer": {
        "name": "the optimizer",
        "learning_rate": "peak learning rate",
        "weight_decay": "AdamW weight decay",
        "use_param_groups": "no decay for norms, biases, embeddings and the SSM's A base / D base / dt bias",
        "selective_param_lr_multiplier": "learning-rate factor for the selective generators",
        "beta1": "AdamW β1",
        "beta2": "AdamW β2",
        "eps": "AdamW ε",
    },
    "scheduler": {
        "name": "`cosine`, `linear` or `constant`",
        "warmup_steps": "linear warm-up from 0",
        "min_lr_ratio": "final lr = ratio × lr",
    },
    "dataset": {
        "type": "`custom` (local .txt/.md/.jsonl/.json/.parquet files or folders), `synthetic` (the JSON of "
                "`create-synthetic`), `wikitext103` (`Salesforce/wikitext` or a local folder), `pile` (an "
                "uncopyrighted Pile mirror, streamed, or local files)",
        "max_seq_len": "window length (≤ model.max_seq_len)",
        "stride": "window step; evaluation scores every token once",
        "data_path": "the file or folder to read (required but for the hub datasets)",
        "val_split": "validation fraction; 0: no validation, no `best/`, `--use-best-model` refused",
        "test_split": "test fraction",
        "text_field": "record field of JSON/JSONL/parquet files",
        "tokenizer_path": "reuse a tokenizer.json; null: train a byte-level BPE",
        "tokenizer_vocab_size": "null: model.vocab_size, capped to about one token per 400 training characters",
        "cache_dir": "tokenised splits are cached here, keyed by the sources and the tokenizer",
        "split_seed": "documents are cut into ≤ 8 kB segments and split by a permutation with this seed",
        "max_documents": "documents read at most (streamed datasets: required)",
    },
    "generation": {
        "max_length": "number of new tokens",
        "temperature": "0: greedy",
        "top_k": "keep the k most likely tokens; 0: off",
        "top_p": "nucleus mass; 1: off",
        "repetition_penalty": "> 1 discourages repeated tokens; 1: off",
        "seed": "sequence i draws from a generator seeded seed + i (a batch equals one-by-one runs)",
        "stop_strings": "stop strings (generation also stops at end-of-text)",
        "num_return_sequences": "continuations per prompt",
        "weights": "weights for inference (`generate`, `evaluate`, `serve`; flag `--weights`): `fp32` as trained, "
                   "`bf16`, `int8` weight-only with per-output-channel scales; the scan and its state stay float32",
        "prefill_chunk_tokens": "the prompt runs through the parallel scan in chunks of at most this many tokens "
                                "(the state carried between them): the prefill's memory is set by it, not by the "
                                "prompt's length (`serve --prefill-chunk-tokens` for the server)",
    },
    "synthetic": {
        "backend": "`ollama`, `llama_cpp`, `transformers`; `auto`: Ollama when a server answers with the model, "
                   "else a local GGUF teacher",
        "model": "ollama: a model name (null: phi4-mini); llama_cpp / transformers: a .gguf path or `gemma3-270m` "
                 "(null: the bundled Gemma 3 270M)",
        "host": "Ollama server; null: $OLLAMA_HOST or http://127.0.0.1:11434",
        "num_samples": "samples to keep",
        "temperature": "teacher sampling temperature",
        "top_p": "teacher nucleus mass",
        "top_k": "teacher top-k; 0: off",
        "max_new_tokens": "tokens per sample at most",
        "seed": "seed of prompts and sampling",
        "output_dir": "folder of the dataset",
        "output_file": "dataset file name, ending in .json",
        "distillation": "also store the teacher's top-k token ids and log-probabilities, and its tokenizer",
        "top_logprobs": "k of the distillation targets (Ollama allows at most 20)",
        "workers": "concurrent requests (ollama)",
        "threads": "CPU threads of a local backend",
        "batch_size": "transformers backend: samples decoded together",
        "timeout_s": "per request (ollama)",
        "prompt_style": "`instruction` (an instruction model), `opening` (a base model continues an opening); "
                        "`auto`: instruction for ollama, opening for the local backends",
        "instruction": "the instruction template ({style}, {topic})",
        "topics": "topics drawn per sample",
        "styles": "styles drawn per sample",
        "openings": "opening templates for base models",
        "prompts_file": "your own prompts, one per line (or JSONL with \"prompt\"), used in turn",
        "min_words": "shorter samples are rejected",
        "near_duplicate_threshold": "Jaccard of word 5-gram sets (MinHash) above which a sample is dropped",
        "max_attempts_factor": "stop after num_samples × this many requests",
    },
    "distillation": {
        "enabled": "train on the teacher's token ids with its tokenizer, the vocabulary compacted to the ids used "
                   "(fixed by a checkpoint)",
        "alpha": "weight of the KL term",
        "temperature": "T; 1 is exact, > 1 also inflates the unknown tail mass",
    },
}


def type_name(annotation) -> str:
    """A field's type as a reader writes it: `int`, `float or null`, `list of str`, `"a" | "b"`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is typing.Union:
        parts = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin in (list, typing.List):
        return f"list of {type_name(args[0])}"
    return getattr(annotation, "__name__", str(annotation))


def bounds(field) -> str:
    """The numeric bounds of a field (`≥ 1`, `in [0, 1)`), from its pydantic metadata."""
    marks = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    found = [(marks[name], getattr(m, name)) for m in field.metadata for name in marks if hasattr(m, name)]
    return ", ".join(f"{op} {value}" for op, value in found)


def default_text(field) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return f"{len(value)} items" if len(value) > 3 else str(value)
    text = str(value).replace("\n", "\\n").replace("|", "\\|")
    return text if len(text) <= 40 else text[:37] + "…"


def section_lines(name: str, model) -> list[str]:
    """The reference of one section: its intro and a key | type | default | meaning table."""
    meanings = MEANINGS[name]
    fields = model.model_fields
    missing, stale = set(fields) - set(meanings), set(meanings) - set(fields)
    if missing or stale:
        raise SystemExit(f"{name}: keys without a meaning: {sorted(missing)}; meanings of no key: {sorted(stale)} "
                         f"(edit MEANINGS in {Path(__file__).name})")
    lines = [f"## `{name}`", "", SECTION_INTROS[name], "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for key, field in fields.items():
        kind = type_name(field.annotation)
        limit = bounds(field)
        lines.append(f"| `{key}` | {kind}{f' ({limit})' if limit else ''} | `{default_text(field)}` | "
                     f"{meanings[key]} |")
    return lines + [""]


def render() -> str:
    """The whole of docs/configuration.md."""
    lines = ["# Configuration reference", "",
             "<!-- generated by docs/make_config_reference.py from the pydantic models; do not edit by hand -->", "",
             "A config file is YAML with these sections; a missing section or key takes its default. Every "
             "section is a typed schema: unknown keys, wrong types and contradictions stop with an error that "
             "names the key (`model.state_dim: expected int, got str '16'`); an empty file is refused. Floats "
             "follow YAML 1.2 in files and in `--set` (`1e-3`, `5E+4`, `.5`). Start from "
             "`config/small_cpu.yaml` (a 1 M-parameter CPU model) "
             "or `config/default_config.yaml` (the ~140 M-parameter model of the seed document). "
             "`--set SECTION.KEY=VALUE` overrides any key on the command line.", ""]
    for name, field in Config.model_fields.items():
        lines += section_lines(name, field.annotation)
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is out of date")
    args = ap.parse_args()
    text = render()
    if args.check:
        if OUTPUT.read_text() != text:
            raise SystemExit(f"{OUTPUT} is out of date: run python docs/make_config_reference.py")
        return
    OUTPUT.write_text(text)


if __name__ == "__main__":
    main()
