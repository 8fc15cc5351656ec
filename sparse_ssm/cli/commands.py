"""One `cmd_*` per command of `main.py`: each reads its parsed arguments, calls the library and
prints what the user needs; errors are raised as `SparseSSMError`s for `cli.main` to report."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import Config, SparseSSMConfig, load_yaml
from ..generate import GenerationConfig, generate, generate_streams, load_checkpoint
from ..model import SparseSSMForCausalLM
from ..model.checkpoint import resolve_checkpoint
from ..model.memory import MemoryNeed
from ..util.errors import ConfigError
from ..tasks.chomsky import CHOMSKY_TASKS
from ..util.files import atomic_write_text, check_output_file
from .tasks import cmd_chomsky_task


def cmd_inspect(args) -> int:
    config = SparseSSMConfig.from_dict(load_yaml(args.config).get("model"))
    length = min(args.length, config.max_seq_len)
    MemoryNeed.inference(config, tokens=length).check(
        f"inspect of the model of {args.config}", "cpu", f"lower model.hidden_dim, model.num_layers, model.state_dim "
                                                         f"or model.vocab_size in {args.config}")
    torch.manual_seed(args.seed)
    model = SparseSSMForCausalLM(config).eval()
    structured = config.structured_indices
    layer = model.blocks[structured[0]].mixer
    cost = layer.ssm_cost_per_token()
    hybrid = "" if len(structured) == config.num_layers else f" in layers {structured}, diagonal elsewhere"
    print(f"model: {config.num_layers} layers, hidden {config.hidden_dim}, state {config.state_dim}, "
          f"{layer.num_heads} heads x {layer.head_dim}, class {config.selective_param_class} "
          f"-> structure {cost['structure']}{hybrid}")
    print(f"parameters: {model.num_parameters():,}")
    which = "structured layer" if hybrid else "layer"
    print(f"SSM FLOPs per token per {which}: {cost['ssm_flops']:,} (generator {cost['generator_flops']:,}, "
          f"state {cost['state_flops']:,}); projections + conv {cost['projection_flops']:,}")
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
    quality = (f"validation loss {val['loss']:.4f}, perplexity {val['perplexity']:.2f} (whole split; unigram baseline "
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
    from ..train import Trainer, shutdown_distributed

    config = _train_config(args)
    start = time.perf_counter()
    trainer = None
    try:
        with _sigterm_as_interrupt():
            trainer = Trainer(config, resume=args.resume, overwrite=args.overwrite)
            say = print if trainer.procs.main else (lambda *a, **k: None)      # under torchrun only rank 0 reports
            result = trainer.train()
            _report_training(trainer, result, time.perf_counter() - start, args.use_best_model, say)
    finally:
        if trainer is not None:
            trainer.close()  # the output directory's lock
        del trainer          # its DistributedDataParallel wrapper must go before the process group
        shutdown_distributed()
    return 0


def _utf8_argument(flag: str, text: str) -> str:
    """`text` of a command-line argument, or a ConfigError when it is not valid UTF-8 (Python keeps
    the bytes it could not decode as lone surrogates, which no tokenizer or output can take)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        byte = f"byte 0x{ord(bad) - 0xdc00:02x} " if "\udc80" <= bad <= "\udcff" else ""    # surrogateescape's
        raise ConfigError(f"{flag}: not valid UTF-8 text ({byte}at character {e.start}); "
                          f"pass UTF-8 text (from a UTF-8 terminal and locale, e.g. LANG=C.UTF-8)") from None
    return text


def _read_prompts(args) -> list[str]:
    prompts = [_utf8_argument("--prompt", p) for p in args.prompt or []]
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ConfigError(f"--prompts-file: {path} does not exist")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            line = path.read_bytes()[:e.start].count(b"\n") + 1
            raise ConfigError(f"--prompts-file: {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} on line "
                              f"{line}); save it as UTF-8, one prompt per line") from None
        except OSError as e:
            raise ConfigError(f"--prompts-file: cannot read {path} ({e.strerror}); give a readable text file") from None
        prompts += [line for line in text.splitlines() if line.strip()]
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
    prompts = _read_prompts(args)                   # before the model loads (seconds)
    for stop in args.stop or []:
        _utf8_argument("--stop", stop)
    loaded = load_checkpoint(args.model_dir, args.checkpoint, args.device,
                             args.weights or (user.generation.weights if user else None))
    checkpoint, saved = loaded.path, Config.load(loaded.path / "config.yaml", saved=True)
    if user is not None:
        mine, theirs = user.model.to_dict(), saved.model.to_dict()
        differ = [f"{k}: {mine[k]!r} (config) vs {theirs[k]!r} (checkpoint)" for k in mine
                  if k != "vocab_size" and mine[k] != theirs[k]]
        if differ:
            print(f"note: {args.config} describes another model than the checkpoint; the checkpoint's model config "
                  f"is used ({'; '.join(differ[:4])}{'; ...' if len(differ) > 4 else ''})", file=sys.stderr)
    settings = _generation_settings(args, (user or saved).generation)
    if args.output_file:
        check_output_file(args.output_file, args.overwrite, "--output-file", inputs=[checkpoint])
    n = settings.num_return_sequences
    stream = not args.no_stream and len(prompts) * n == 1
    if stream:
        print(prompts[0], end="", flush=True)
    start = time.perf_counter()
    streams = generate_streams(loaded.model, loaded.tokenizer, prompts, settings, n,
                               on_text=(lambda i, piece: print(piece, end="", flush=True)) if stream else None)
    texts = [s.text for s in streams]
    elapsed = time.perf_counter() - start
    if stream:
        print()
    else:
        for i, text in enumerate(texts):
            print(f"--- [{i // n + 1}.{i % n + 1}] ---\n{prompts[i // n]}{text}")
    new_tokens = sum(len(s.ids) for s in streams)
    print(f"({len(texts)} sequence(s), {new_tokens} new tokens in {elapsed:.2f}s, {loaded.weights} weights, "
          f"from {checkpoint})", file=sys.stderr)
    if args.output_file:
        out = Path(args.output_file)
        if args.output_format == "jsonl":
            rows = [{"prompt": prompts[i // n], "completion": t, "checkpoint": str(checkpoint),
                     "settings": settings.to_dict()} for i, t in enumerate(texts)]
            body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        else:
            body = "\n\n".join(prompts[i // n] + t for i, t in enumerate(texts)) + "\n"
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, body)
        print(f"wrote {out}", file=sys.stderr)
    return 0


def _task_label(args) -> str:
    """The name of a task run's files and tables: the task, with its modulus or group."""
    suffix = {"modular-counting": f"-mod{args.modulus}", "permutation-composition": f"-{args.group}"}
    return args.task + suffix.get(args.task, "")


def cmd_task(args) -> int:
    """The synthetic tasks: train each variant with the same budget, report accuracy."""
    from ..tasks.synthetic import chance_accuracy, task_vocab
    from ..tasks.training import check_task_inputs, run_task, task_model_config

    names, test_lengths = [name.strip() for name in args.variants.split(",")], args.test_lengths or [args.length]
    check_task_inputs(args.task, names, args.length, test_lengths, args.num_memorize)
    vocab, label = task_vocab(args.task, args.modulus, args.group), _task_label(args)
    if args.output_dir:                                   # before the variants train (minutes)
        for suffix in (".json", ".md"):
            check_output_file(Path(args.output_dir) / f"{label}{suffix}", args.overwrite, "--output-dir")
    rows = []
    for name in names:
        config = task_model_config(name, max(test_lengths) + 64, vocab)
        print(f"{label}, {name}: {args.steps} steps at length {args.length} ...", flush=True)
        result = run_task(args.task, config, args.steps, args.batch_size, args.length, test_lengths, lr=args.lr,
                          seed=args.seed, num_memorize=args.num_memorize, modulus=args.modulus, group=args.group)
        rows.append({"variant": name, "accuracy": result.accuracy, "seconds": result.seconds, "loss": result.final_loss})
        print("   " + ", ".join(f"length {L}: {a:.1%}" for L, a in result.accuracy.items()) + f"  ({result.seconds:.0f}s)")
    chance = chance_accuracy(args.task, vocab)
    lines = ["| variant | " + " | ".join(f"acc. @ {L}" for L in test_lengths) + " |",
             "|---|" + "---:|" * len(test_lengths)]
    lines += [f"| {r['variant']} | " + " | ".join(f"{r['accuracy'][L]:.1%}" for L in test_lengths) + " |" for r in rows]
    table = "\n".join(lines) + (f"\n\nchance: {chance:.1%}; {args.steps} steps, batch {args.batch_size}, lr {args.lr:g}, "
                                 f"train length {args.length}\n")
    print(table)
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / f"{label}.json", json.dumps({"task": label, "steps": args.steps, "lr": args.lr,
                                                             "train_length": args.length, "chance": chance,
                                                             "rows": rows}, indent=2))
        atomic_write_text(out / f"{label}.md", table)
        print(f"wrote {out / (label + '.json')} and .md")
    return 0


def cmd_evaluate(args) -> int:
    if args.task in CHOMSKY_TASKS:
        return cmd_chomsky_task(args)
    if args.task != "perplexity":
        return cmd_task(args)
    from ..train.evaluation import perplexity_on_file

    if not args.model_dir or not args.data:
        raise ConfigError("--task perplexity needs --model-dir and --data")
    if args.output_file:
        check_output_file(args.output_file, args.overwrite, "--output-file",
                          inputs=[resolve_checkpoint(args.model_dir, args.checkpoint), args.data])
    loaded = load_checkpoint(args.model_dir, args.checkpoint, args.device, args.weights)
    length = args.max_seq_len or Config.load(loaded.path / "config.yaml", saved=True).dataset.max_seq_len
    stride = args.stride if args.stride is not None else max(1, length // 2)
    if stride > length:
        raise ConfigError(f"--stride: must be at most the window of {length} tokens (--max-seq-len, default the "
                          f"checkpoint's dataset.max_seq_len), got {stride}")
    result = perplexity_on_file(loaded.model, loaded.tokenizer, args.data, length, stride, args.batch_size,
                                args.text_field)
    result["checkpoint"], result["weights"] = str(loaded.path), loaded.weights
    print(f"{result['file']}: {result['tokens_scored']:,} tokens, loss {result['loss']:.4f}, perplexity "
          f"{result['perplexity']:.2f}, {result['bits_per_token']:.3f} bits/token, {result['bits_per_byte']:.3f} bits/byte "
          f"(window {result['max_seq_len']}, stride {result['stride']}, {loaded.path}, {loaded.weights} weights)")
    if args.output_file:
        Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.output_file), json.dumps(result, indent=2))
    return 0


def cmd_create_synthetic(args) -> int:
    from ..teacher import create_synthetic, make_teacher
    from ..teacher.synthetic import check_inputs

    overrides = list(args.set or [])
    for flag, value in (("--model", args.model), ("--host", args.host)):
        if value is not None:
            _utf8_argument(flag, value)
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
    from ..hf import export_checkpoint

    out = export_checkpoint(args.model_dir, args.checkpoint, args.output, overwrite=args.overwrite)
    print(f"wrote {out}: load it with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True) "
          f"(or after `import sparse_ssm.hf` without trust_remote_code) and AutoTokenizer.from_pretrained")
    return 0


def cmd_serve(args) -> int:
    from ..serve import ServeConfig, serve

    flags = {"host": args.host, "port": args.port, "name": args.name, "max_batch": args.max_batch,
             "max_waiting": args.max_waiting, "max_tokens": args.max_tokens,
             "max_prompt_tokens": args.max_prompt_tokens, "prefill_chunk_tokens": args.prefill_chunk_tokens,
             "max_body_bytes": args.max_body_bytes,
             "api_key": args.api_key, "device": args.device, "weights": args.weights}
    serve(args.model_dir, args.checkpoint, ServeConfig(**{k: v for k, v in flags.items() if v is not None}))
    return 0
