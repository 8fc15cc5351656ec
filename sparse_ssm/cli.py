"""Command-line interface: argparse and one `cmd_*` per command, each a thin layer over the
Python API; every `SparseSSMError` is reported in one place (`main`) without a traceback.

    python main.py train --config config/small_cpu.yaml [--output-dir DIR] [--seed N] [--resume [latest|PATH]]
                         [--use-best-model] [--set training.num_epochs=1 ...]
    python main.py generate --config config/small_cpu.yaml --model-dir outputs/small_cpu --prompt "To be"
    python main.py evaluate --model-dir outputs/small_cpu --task perplexity --data FILE
    python main.py create-synthetic --config config/default_config.yaml [--distillation]
    python main.py inspect --config config/small_cpu.yaml      # build the model, report its cost,
                                                              # check prefill + recurrent decoding
    python main.py export --model-dir outputs/small_cpu --format hf --output hf/small_cpu
    python main.py serve --model-dir outputs/small_cpu [--host 127.0.0.1 --port 11434]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import Config, SparseSSMConfig, load_yaml
from .generate import GenerationConfig, generate, generate_text, load_checkpoint
from .model import SparseSSMForCausalLM
from .model.checkpoint import resolve_checkpoint
from .train.state_tracking import GROUPS
from .train.tasks import TASKS, VARIANTS
from .util.errors import ConfigError, SparseSSMError
from .util.files import atomic_write_text


def cmd_inspect(args) -> int:
    config = SparseSSMConfig.from_dict(load_yaml(args.config).get("model"))
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
    sample = generate(model, ids[:, :4], max_new_tokens=8)
    print(f"greedy continuation (random weights): {sample[0].tolist()}")
    return 0


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM ends the command like Ctrl-C (cleanup runs: the output directory's lock is released);
    during the training loop the trainer's own handler saves a checkpoint first."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt("terminated (SIGTERM)")
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train_config(args) -> Config:
    """The config of `train`: the file with --set and the flags, or on --resume the checkpoint's own
    config with them (the trainer refuses values the checkpoint fixes and reports the others)."""
    overrides = list(args.set or [])
    if args.output_dir:
        overrides.append(f"training.output_dir={args.output_dir}")
    if args.seed is not None:
        overrides.append(f"training.seed={args.seed}")
    config = Config.load(args.config, overrides)
    if args.resume:
        checkpoint = resolve_checkpoint(config.training.output_dir, args.resume)
        config = Config.load(checkpoint / "config.yaml", overrides, saved=True)
        args.resume = str(checkpoint)
        if os.environ.get("RANK", "0") == "0":
            print(f"resuming from {checkpoint} with its saved config (--set changes what the checkpoint does not fix)")
    ds = config.dataset
    if args.use_best_model and ds.type != "wikitext103" and not (ds.val_split > 0 and ds.test_split > 0):
        raise ConfigError(f"--use-best-model evaluates the checkpoint with the lowest validation loss on the test split: "
                          f"it needs dataset.val_split > 0 and dataset.test_split > 0 (got {ds.val_split} and "
                          f"{ds.test_split})")
    return config


def _report_training(trainer, result: dict, seconds: float, use_best_model: bool, say):
    val, out = result["validation"], trainer.output_dir
    quality = (f"validation loss {val['loss']:.4f}, perplexity {val['perplexity']:.2f} (unigram baseline "
               f"{result['unigram_validation_perplexity']:.1f})" if val else "no validation data")
    say(f"done in {seconds:.0f}s, {result['step']} steps: {quality}")
    best = f", best: {out / 'best'}" if trainer.state.best_step is not None else ""
    say(f"checkpoints: {out / 'checkpoints'} (latest: {trainer.checkpoints.latest}{best}); "
        f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}")
    test = trainer.test_best(result) if use_best_model else None
    if test:
        say(f"best checkpoint (step {trainer.state.best_step}) on the test split: loss {test['loss']:.4f}, "
            f"perplexity {test['perplexity']:.2f}")
    elif use_best_model:
        say("no best checkpoint to evaluate: no validation loss was finite")


def cmd_train(args) -> int:
    from .train import Trainer, shutdown_distributed

    config = _train_config(args)
    start = time.perf_counter()
    trainer = None
    try:
        with _sigterm_as_interrupt():
            trainer = Trainer(config, resume=args.resume)
            say = print if trainer.procs.main else (lambda *a, **k: None)      # under torchrun only rank 0 reports
            result = trainer.train()
            _report_training(trainer, result, time.perf_counter() - start, args.use_best_model, say)
    finally:
        if trainer is not None:
            trainer.close()  # the output directory's lock
        del trainer          # its DistributedDataParallel wrapper must go before the process group
        shutdown_distributed()
    return 0


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ConfigError(f"--prompts-file: {path} does not exist")
        prompts += [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
    if any(not p.strip() for p in prompts):
        raise ConfigError("prompt: empty prompt; give some text to continue")
    return prompts


def _generation_settings(args, defaults: GenerationConfig) -> GenerationConfig:
    """The `generation` defaults with the flags that were given."""
    flags = {"max_length": args.max_length, "temperature": args.temperature, "top_k": args.top_k,
             "top_p": args.top_p, "repetition_penalty": args.repetition_penalty, "seed": args.seed,
             "stop_strings": args.stop, "num_return_sequences": args.num_return_sequences}
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return GenerationConfig(**{**defaults.to_dict(), **given})
    except ConfigError as e:                     # name the flag the user typed, not the config key
        key = str(e).split(":")[0].removeprefix("generation.")
        flag = {"stop_strings": "--stop", "max_length": "--max-length"}.get(key, "--" + key.replace("_", "-"))
        raise ConfigError(f"{flag}{str(e)[len('generation.' + key):]}" if key in given else str(e)) from None


def cmd_generate(args) -> int:
    user = Config.load(args.config) if args.config else None
    loaded = load_checkpoint(args.model_dir, args.checkpoint, args.device)
    checkpoint, saved = loaded.path, Config.load(loaded.path / "config.yaml", saved=True)
    if user is not None:
        mine, theirs = user.model.to_dict(), saved.model.to_dict()
        differ = [f"{k}: {mine[k]!r} (config) vs {theirs[k]!r} (checkpoint)" for k in mine
                  if k != "vocab_size" and mine[k] != theirs[k]]
        if differ:
            print(f"note: {args.config} describes another model than the checkpoint; the checkpoint's model config "
                  f"is used ({'; '.join(differ[:4])}{'; ...' if len(differ) > 4 else ''})", file=sys.stderr)
    settings = _generation_settings(args, (user or saved).generation)
    prompts = _read_prompts(args)
    n = settings.num_return_sequences
    stream = not args.no_stream and len(prompts) * n == 1
    if stream:
        print(prompts[0], end="", flush=True)
    start = time.perf_counter()
    texts = generate_text(loaded.model, loaded.tokenizer, prompts, settings, n,
                          on_text=(lambda i, piece: print(piece, end="", flush=True)) if stream else None)
    elapsed = time.perf_counter() - start
    if stream:
        print()
    else:
        for i, text in enumerate(texts):
            print(f"--- [{i // n + 1}.{i % n + 1}] ---\n{prompts[i // n]}{text}")
    new_tokens = sum(len(loaded.tokenizer.encode(t).ids) for t in texts)
    print(f"({len(texts)} sequence(s), {new_tokens} new tokens in {elapsed:.2f}s from {checkpoint})", file=sys.stderr)
    if args.output_file:
        out = Path(args.output_file)
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.output_format == "jsonl":
            rows = [{"prompt": prompts[i // n], "completion": t, "checkpoint": str(checkpoint),
                     "settings": settings.to_dict()} for i, t in enumerate(texts)]
            body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        else:
            body = "\n\n".join(prompts[i // n] + t for i, t in enumerate(texts)) + "\n"
        atomic_write_text(out, body)
        print(f"wrote {out}", file=sys.stderr)
    return 0


def _task_label(args) -> str:
    """The name of a task run's files and tables: the task, with its modulus or group."""
    suffix = {"modular-counting": f"-mod{args.modulus}", "permutation-composition": f"-{args.group}"}
    return args.task + suffix.get(args.task, "")


def cmd_task(args) -> int:
    """The synthetic tasks: train each variant with the same budget, report accuracy."""
    from .train.tasks import chance_accuracy, check_task_inputs, run_task, task_model_config, task_vocab

    names, test_lengths = [name.strip() for name in args.variants.split(",")], args.test_lengths or [args.length]
    check_task_inputs(args.task, names, args.length, test_lengths, args.num_memorize)
    vocab, label = task_vocab(args.task, args.modulus, args.group), _task_label(args)
    rows = []
    for name in names:
        config = task_model_config(name, max(test_lengths) + 64, vocab)
        print(f"{label}, {name}: {args.steps} steps at length {args.length} ...", flush=True)
        result = run_task(args.task, config, args.steps, args.batch_size, args.length, test_lengths,
                          seed=args.seed, num_memorize=args.num_memorize, modulus=args.modulus, group=args.group)
        rows.append({"variant": name, "accuracy": result.accuracy, "seconds": result.seconds, "loss": result.final_loss})
        print("   " + ", ".join(f"length {L}: {a:.1%}" for L, a in result.accuracy.items()) + f"  ({result.seconds:.0f}s)")
    chance = chance_accuracy(args.task, vocab)
    lines = ["| variant | " + " | ".join(f"acc. @ {L}" for L in test_lengths) + " |",
             "|---|" + "---:|" * len(test_lengths)]
    lines += [f"| {r['variant']} | " + " | ".join(f"{r['accuracy'][L]:.1%}" for L in test_lengths) + " |" for r in rows]
    table = "\n".join(lines) + f"\n\nchance: {chance:.1%}; {args.steps} steps, batch {args.batch_size}, train length {args.length}\n"
    print(table)
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / f"{label}.json", json.dumps({"task": label, "steps": args.steps,
                                                             "train_length": args.length, "chance": chance,
                                                             "rows": rows}, indent=2))
        atomic_write_text(out / f"{label}.md", table)
        print(f"wrote {out / (label + '.json')} and .md")
    return 0


def cmd_evaluate(args) -> int:
    if args.task != "perplexity":
        return cmd_task(args)
    from .train.evaluation import perplexity_on_file

    if not args.model_dir or not args.data:
        raise ConfigError("--task perplexity needs --model-dir and --data")
    loaded = load_checkpoint(args.model_dir, args.checkpoint, args.device)
    length = args.max_seq_len or Config.load(loaded.path / "config.yaml", saved=True).dataset.max_seq_len
    stride = args.stride if args.stride is not None else max(1, length // 2)
    if stride > length:
        raise ConfigError(f"--stride: must be at most the window of {length} tokens (--max-seq-len, default the "
                          f"checkpoint's dataset.max_seq_len), got {stride}")
    result = perplexity_on_file(loaded.model, loaded.tokenizer, args.data, length, stride, args.batch_size,
                                args.text_field)
    result["checkpoint"] = str(loaded.path)
    print(f"{result['file']}: {result['tokens_scored']:,} tokens, loss {result['loss']:.4f}, perplexity "
          f"{result['perplexity']:.2f}, {result['bits_per_token']:.3f} bits/token, {result['bits_per_byte']:.3f} bits/byte "
          f"(window {result['max_seq_len']}, stride {result['stride']}, {loaded.path})")
    if args.output_file:
        atomic_write_text(Path(args.output_file), json.dumps(result, indent=2))
    return 0


def cmd_create_synthetic(args) -> int:
    from .teacher import create_synthetic, make_teacher
    from .teacher.synthetic import check_inputs

    overrides = list(args.set or [])
    flags = {"num_samples": args.num_samples, "temperature": args.temperature, "output_dir": args.output_dir,
             "output_file": args.output_file, "backend": args.backend, "model": args.model, "host": args.host,
             "seed": args.seed, "max_new_tokens": args.max_new_tokens, "top_logprobs": args.top_logprobs,
             "prompts_file": args.prompts, "workers": args.workers, "threads": args.threads}
    overrides += [f"synthetic.{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    if args.distillation:
        overrides.append("synthetic.distillation=true")
    cfg = Config.load(args.config, overrides).synthetic
    check_inputs(cfg, resume=args.resume, overwrite=args.overwrite)      # before the teacher loads (tens of seconds)
    print(f"teacher: {cfg.backend} {cfg.resolved_model(cfg.backend)}; {cfg.num_samples} samples of up to {cfg.max_new_tokens} tokens"
          f"{f', top-{cfg.top_logprobs} log-probabilities for distillation' if cfg.distillation else ''}")
    start = time.perf_counter()
    teacher = make_teacher(cfg)
    print(f"teacher ready in {time.perf_counter() - start:.1f}s: {json.dumps(teacher.describe())}")
    try:
        stats = create_synthetic(cfg, teacher, resume=args.resume, overwrite=args.overwrite)
    finally:
        teacher.close()
    rejected = ", ".join(f"{k} {v}" for k, v in stats["rejected"].items()) or "none"
    print(f"wrote {stats['path']}: {stats['samples']} samples from {stats['requests']} requests (rejected: {rejected}); "
          f"{stats['teacher_tokens']:,} teacher tokens, {stats['words']:,} words; distinct 1/2/3-grams "
          f"{stats['distinct_1']:.3f}/{stats['distinct_2']:.3f}/{stats['distinct_3']:.3f}; "
          f"{stats['samples_per_s']:.2f} samples/s, {stats['tokens_per_s']:.1f} tokens/s")
    return 0


def cmd_export(args) -> int:
    from .hf import export_checkpoint

    out = export_checkpoint(args.model_dir, args.checkpoint, args.output)
    print(f"wrote {out}: load it with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True) "
          f"(or after `import sparse_ssm.hf` without trust_remote_code) and AutoTokenizer.from_pretrained")
    return 0


def cmd_serve(args) -> int:
    from .serve import ServeConfig, serve

    flags = {"host": args.host, "port": args.port, "name": args.name, "max_batch": args.max_batch,
             "max_waiting": args.max_waiting, "max_tokens": args.max_tokens,
             "max_prompt_tokens": args.max_prompt_tokens, "device": args.device}
    serve(args.model_dir, args.checkpoint, ServeConfig(**{k: v for k, v in flags.items() if v is not None}))
    return 0


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


def _add_train_parser(sub):
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


def _add_generate_parser(sub):
    g = sub.add_parser("generate", help="generate text from a trained model (streams to the terminal)",
                       description="Continue prompts with a trained checkpoint: the prompt is prefilled in one "
                                   "parallel pass, then each new token is one recurrent step.  The checkpoint's own "
                                   "model config and tokenizer are used; --config supplies generation defaults.")
    g.add_argument("--config", type=Path, help="YAML config: its `generation` section gives defaults for the flags below")
    g.add_argument("--model-dir", required=True, help="a training output directory")
    g.add_argument("--checkpoint", help="best | latest | STEP | PATH (default: best if present, else latest)")
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
    g.add_argument("--output-file", help="write the results to this file")
    g.add_argument("--output-format", choices=["text", "jsonl"], default="text",
                   help="text: prompt + continuation per sequence; jsonl: one record with the settings per sequence")
    g.add_argument("--no-stream", action="store_true", help="print the results at the end instead of streaming")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] | mps (default auto)")
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
                                   "of --group elements).")
    e.add_argument("--task", choices=["perplexity", *TASKS], default="perplexity",
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
    e.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"tasks: comma list of {', '.join(VARIANTS)} (default all; state 16: diagonal has Mamba's "
                        f"transition eigenvalues in (0, 1], diagonal_signed in (-1, 1], rotation 2 x 2 scaled "
                        f"rotations, blockB B x B blocks, block 8 x 8, lti no selection)")
    e.add_argument("--steps", type=_int_at_least(1), default=600, help="tasks: training steps per variant (default 600)")
    e.add_argument("--length", type=_int_at_least(3), default=32, help="tasks: training sequence length (default 32)")
    e.add_argument("--test-lengths", type=_int_at_least(3, many=True),
                   help="tasks: comma list of test lengths (default: the training length)")
    e.add_argument("--num-memorize", type=_int_at_least(1), default=4,
                   help="selective copying: tokens to copy (default 4)")
    e.add_argument("--modulus", type=_int_at_least(2), default=3, help="modular-counting: the modulus m (default 3)")
    e.add_argument("--group", choices=list(GROUPS), default="s3",
                   help="permutation-composition: s3 (order 6, the smallest non-abelian group), a5 (order 60, the "
                        "smallest non-solvable one) or s5 (order 120); product g_0 g_1 ... g_t, each new element "
                        "applied after the product so far (default s3)")
    e.add_argument("--seed", type=int, default=0, help="tasks: seed of data and weights (default 0)")
    e.add_argument("--output-dir", help="tasks: write <task>.json and <task>.md here (modular-counting-modM, "
                                             "permutation-composition-GROUP)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] | mps (default auto)")
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
    x.add_argument("--model-dir", required=True, help="a training output directory")
    x.add_argument("--checkpoint", help="best | latest | STEP | PATH (default: best if present, else latest)")
    x.add_argument("--format", choices=["hf"], default="hf", help="output format (hf: Hugging Face transformers)")
    x.add_argument("--output", required=True, help="the directory to write (replaced as a whole)")
    x.set_defaults(func=cmd_export)
    s = sub.add_parser("serve", help="serve a model over the Ollama and OpenAI HTTP APIs",
                       description="An Ollama-compatible (/api/generate, /api/chat, /api/tags, /api/show) and "
                                   "OpenAI-compatible (/v1/completions, /v1/chat/completions, /v1/models) server. "
                                   "Concurrent requests are decoded together in one batch on the recurrent state. "
                                   "Stop it with Ctrl-C or SIGTERM.")
    s.add_argument("--model-dir", required=True, help="a training output directory")
    s.add_argument("--checkpoint", help="best | latest | STEP | PATH (default: best if present, else latest)")
    s.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 11434, Ollama's; 0: any free port, printed at start)")
    s.add_argument("--name", help="model name in the APIs (default: the model directory's name)")
    s.add_argument("--max-batch", type=int, help="sequences decoded together (default 16)")
    s.add_argument("--max-waiting", type=int, help="requests queued beyond those; more are refused with 503 (default 64)")
    s.add_argument("--max-tokens", type=int, help="new tokens per request at most; larger requests are refused "
                                                  "(default 1024)")
    s.add_argument("--max-prompt-tokens", type=int, help="prompt tokens per request at most (default 4096)")
    s.add_argument("--device", help="auto | cpu | cuda[:N] | mps (default auto)")
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SparseSSMError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        print(f"\n{e}" if str(e) else "\ninterrupted", file=sys.stderr)
        return 130
