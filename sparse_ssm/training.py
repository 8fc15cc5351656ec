"""Training: optimizer and schedule, the training loop, evaluation and checkpoints.

    trainer = Trainer(Config.load("config/small_cpu.yaml"))
    trainer.train()                      # resumable; Ctrl-C / SIGTERM save a checkpoint first

Output directory layout:

    OUTPUT/config.yaml, tokenizer.json          the resolved config and the tokenizer
    OUTPUT/checkpoints/step-00000100/           model.safetensors, training_state.pt, config.yaml,
                                                tokenizer.json  (the newest `save_total_limit` kept)
    OUTPUT/latest -> checkpoints/step-...       symlink to the newest checkpoint
    OUTPUT/best/                                the checkpoint with the lowest validation loss
    OUTPUT/tensorboard/                         TensorBoard event files
    OUTPUT/metrics.json                         final validation (and test) metrics

Checkpoints are written to a temporary directory and renamed into place, so a crash never
leaves a half-written checkpoint under its final name.  Resume is exact: the data order is a
function of (seed, epoch) and the position, RNG, optimizer, scheduler and scaler states are saved.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, load_model, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel

from .config import Config, ConfigError, OptimizerConfig, SchedulerConfig
from .data import WindowDataset, collate, load_splits, tokenize_splits
from .lm import SparseSSMForCausalLM
from .tokenizer import EOS, PAD, capped_vocab_size, load_tokenizer, train_tokenizer


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what was kept."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"training.device: {name!r} but no CUDA device is available; use 'cpu' or 'auto'")
    return device


def init_distributed(tc) -> tuple[int, int, int]:
    """(rank, world size, local rank).  Under torchrun (WORLD_SIZE > 1) this joins the process
    group: NCCL on CUDA, gloo on CPU, with training.distributed_timeout_s so that a lost rank
    ends the job instead of hanging it."""
    from datetime import timedelta

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and tc.device in ("auto", "cuda") or tc.device.startswith("cuda")
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=timedelta(seconds=tc.distributed_timeout_s))
    return dist.get_rank(), dist.get_world_size(), local


def shutdown_distributed() -> None:
    """Leave the process group, if one was joined.  Call it after the objects that hold it (the
    DistributedDataParallel wrapper) are released: with one still alive at interpreter exit, gloo
    tears its threads down late and the process aborts ("terminate called without an active
    exception"; seen in about half of 2-rank CPU runs on a busy machine)."""
    import gc

    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def lr_factor(step: int, total_steps: int, cfg: SchedulerConfig) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based): linear warmup from 0 over
    warmup_steps, then cosine or linear decay to min_lr_ratio at total_steps, or constant."""
    if step < cfg.warmup_steps:
        return step / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.name == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_optimizer(model: SparseSSMForCausalLM, cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW; with use_param_groups, no decay for norms/biases/embeddings/SSM bases and
    lr * selective_param_lr_multiplier for the selective generators."""
    if cfg.use_param_groups:
        groups = model.parameter_groups(cfg.weight_decay, cfg.selective_param_lr_multiplier)
    else:
        groups = [{"name": "all", "params": list({id(p): p for p in model.parameters()}.values()),
                   "weight_decay": cfg.weight_decay, "lr_multiplier": 1.0}]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr"] = cfg.learning_rate * g["lr_multiplier"]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def unigram_perplexity(train: np.ndarray, evaluate: np.ndarray, vocab_size: int) -> float:
    """Perplexity on `evaluate` of the add-one-smoothed unigram distribution of `train`: the
    baseline a language model must beat."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[evaluate[1:]].mean()))


def atomic_write_text(path: Path, text: str):
    """Write a file through a temporary name and a rename: readers never see half of it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_symlink(target: str, link: Path):
    tmp = link.with_name(link.name + ".tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def resolve_checkpoint(output_dir: Path, which: str) -> Path:
    """'latest', 'best', a step number, or a path -> a checkpoint directory (checked)."""
    if which == "latest":
        path = output_dir / "latest"
    elif which == "best":
        path = output_dir / "best"
    elif which.isdigit():
        path = output_dir / "checkpoints" / f"step-{int(which):08d}"
    else:
        path = Path(which)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist (look in {output_dir / 'checkpoints'})")
    path = path.resolve()
    missing = [f for f in ("model.safetensors", "config.yaml", "tokenizer.json") if not (path / f).is_file()]
    if missing:
        raise TrainingError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); "
                            f"pick another checkpoint or delete this one")
    return path


def load_checkpoint_model(path: Path, device="cpu") -> tuple[SparseSSMForCausalLM, Config]:
    """Model and config of a checkpoint directory, with clear errors for corrupt files."""
    config = Config.load(path / "config.yaml")
    model = SparseSSMForCausalLM(config.model)
    try:
        load_model(model, str(path / "model.safetensors"), device=str(device))
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for damaged files
        raise TrainingError(f"checkpoint {path}: model.safetensors is corrupt or does not match its config "
                            f"({type(e).__name__}: {str(e)[:200]}); pick another checkpoint") from None
    return model.to(device), config


class Trainer:
    def __init__(self, config: Config, resume: str | None = None, log=print):
        tc = config.training
        self.rank, self.world, local_rank = init_distributed(tc)
        self.main = self.rank == 0                    # only the main process writes files and logs
        self.config, self.log = config, (log if self.main else (lambda *_: None))
        log = self.log
        self.output_dir = Path(tc.output_dir)
        self.device = resolve_device(tc.device)
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        if tc.mixed_precision == "fp16" and self.device.type != "cuda":
            log(f"note: training.mixed_precision 'fp16' needs a CUDA device (it trains with a gradient scaler); "
                f"on {self.device.type} this run uses 'bf16' instead (set it to 'bf16' or 'no' to silence this)")
            tc.mixed_precision = "bf16"
        self.resume_from = None
        if resume:
            self.resume_from = resolve_checkpoint(self.output_dir, resume)
        torch.manual_seed(tc.seed)
        if not self.main:
            self._barrier()                           # the main process trains the tokenizer and fills the cache
        self._prepare_data()
        if self.main:
            self._barrier()
        self.model = SparseSSMForCausalLM(config.model).to(self.device)   # same seed: same weights on every rank
        self.model.gradient_checkpointing = tc.gradient_checkpointing
        self.fsdp = self.world > 1 and tc.distributed == "fsdp"
        if self.fsdp:
            # parameters, gradients and optimizer state sharded over the processes, block by block
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh(self.device.type, (self.world,))
            for block in self.model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
        self.forward = torch.compile(self.model) if tc.compile else self.model
        self.train_forward = self.forward
        if self.world > 1 and not self.fsdp:
            ddp = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
            self.ddp = ddp
            self.train_forward = torch.compile(ddp) if tc.compile else ddp
        self.optimizer = build_optimizer(self.model, config.optimizer)
        # a global micro-batch is batch_size sequences on each of the world-size processes
        self.global_batch = tc.batch_size * self.world
        steps_per_epoch = math.ceil(len(self.train_set) / (self.global_batch * tc.gradient_accumulation_steps))
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * tc.num_epochs
        if tc.max_steps:
            self.total_steps = min(self.total_steps, tc.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.total_steps, config.scheduler))
        self.scaler = torch.amp.GradScaler("cuda", enabled=tc.mixed_precision == "fp16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.mixed_precision)
        self.state = {"step": 0, "epoch": 0, "micro_batch": 0, "global_batch": self.global_batch,
                      "best_val_loss": float("inf"), "best_step": None, "nonfinite_in_row": 0, "nonfinite_total": 0}
        if self.resume_from:
            self._load_training_state(self.resume_from)
        elif (self.output_dir / "latest").exists():
            self.log(f"note: {self.output_dir} holds checkpoints of an earlier run (latest: "
                     f"{(self.output_dir / 'latest').resolve().name}); this new run replaces them as it saves "
                     f"(continue the earlier run with --resume)")
        self._stop_signal = None

    # --- data ---------------------------------------------------------------------------
    def _prepare_data(self):
        cfg, ds = self.config, self.config.dataset
        self.output_dir.mkdir(parents=True, exist_ok=True)
        tok_path = self.output_dir / "tokenizer.json"
        source = self.resume_from / "tokenizer.json" if self.resume_from else (
            Path(ds.tokenizer_path) if ds.tokenizer_path else tok_path)
        splits, targets = None, None
        if cfg.distillation.enabled:
            from . import distillation
            if ds.type != "synthetic":
                raise TrainingError(f"distillation.enabled needs dataset.type 'synthetic' (a create-synthetic "
                                    f"--distillation dataset), got {ds.type!r}")
            tokenizer, self.streams, targets = distillation.prepare(ds)
            self.log(f"distillation from {ds.data_path}: the teacher's tokenizer compacted to the "
                     f"{tokenizer.get_vocab_size():,} ids in use; alpha {cfg.distillation.alpha}, "
                     f"temperature {cfg.distillation.temperature}")
        elif source.is_file():
            tokenizer = load_tokenizer(source)
            self.log(f"tokenizer: {source} ({tokenizer.get_vocab_size()} tokens)")
        else:
            splits = load_splits(ds)
            chars = sum(len(t) for t in splits["train"])
            requested = ds.tokenizer_vocab_size or cfg.model.vocab_size
            size = capped_vocab_size(requested, chars)
            self.log(f"training a byte-level BPE tokenizer on {chars:,} characters: vocab {size}"
                     + (f" (capped from {requested} for this much text)" if size < requested else ""))
            tokenizer = train_tokenizer(splits["train"], size)
        self.tokenizer = tokenizer
        if self.main:
            tmp = tok_path.with_suffix(".tmp")
            tokenizer.save(str(tmp))
            os.replace(tmp, tok_path)
        cfg.model.vocab_size = tokenizer.get_vocab_size()
        self.pad_id = tokenizer.token_to_id(PAD)
        if self.pad_id is None:
            self.pad_id = tokenizer.token_to_id(EOS) or 0
        if targets is None:
            self.streams = tokenize_splits(ds, splits, tokenizer)
        L, stride = ds.max_seq_len, ds.stride
        self.train_set = WindowDataset(self.streams["train"], L, stride, targets=targets and targets["train"])
        self.val_set = WindowDataset(self.streams["validation"], L, stride, score_once=True)
        self.test_set = WindowDataset(self.streams["test"], L, stride, score_once=True)
        if len(self.train_set) == 0:
            raise TrainingError(f"the training split has {len(self.streams['train'])} tokens: fewer than one window "
                                f"of dataset.max_seq_len = {L}; add data or lower max_seq_len")
        self.log(f"data: train {len(self.streams['train']):,} tokens ({len(self.train_set)} windows), "
                 f"validation {len(self.streams['validation']):,}, test {len(self.streams['test']):,}")
        if self.main:
            atomic_write_text(self.output_dir / "config.yaml", cfg.to_yaml())

    # --- processes ----------------------------------------------------------------------
    def _barrier(self):
        if self.world > 1:
            dist.barrier()

    def _all(self, value: float, op) -> float:
        """`value` reduced over the processes (identity without torch.distributed)."""
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=op)
        return float(t)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.config.training.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train_set), generator=g)

    def _batch(self, dataset, indices):
        """(ids, labels) or, with teacher targets, (ids, labels, top_ids, top_logprobs) on the device."""
        return tuple(t.to(self.device) for t in collate([dataset[int(i)] for i in indices], self.pad_id))

    # --- checkpoints --------------------------------------------------------------------
    _FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def _full_model_state(self) -> dict:
        """Unsharded weights (on the main process; empty elsewhere under FSDP), tied copies dropped."""
        state = get_model_state_dict(self.model, options=self._FULL)
        if self.config.model.tie_embeddings:
            state.pop("lm_head.weight", None)
        return {k: v.contiguous() for k, v in state.items()}

    def _load_options(self) -> StateDictOptions:
        # under FSDP rank 0's full tensors are scattered into every process's shards
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=self.fsdp)

    def _load_model_file(self, path: Path):
        if self.fsdp:
            self.model.reshard()   # the root keeps its parameters gathered after a forward pass
        state = load_file(str(path), device="cpu")
        if self.config.model.tie_embeddings and "lm_head.weight" not in state:
            state["lm_head.weight"] = state["embed.weight"]
        set_model_state_dict(self.model, state, options=self._load_options())

    def save_checkpoint(self) -> Path:
        """Write a checkpoint (the main process; the others take part in gathering the sharded
        states under FSDP, then wait for it) and return its path."""
        step = self.state["step"]
        root = self.output_dir / "checkpoints"
        final = root / f"step-{step:08d}"
        weights = self._full_model_state()
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=self._FULL)
        if not self.main:
            self._barrier()
            return final
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-step-{step:08d}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(weights, str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(), "state": dict(self.state),
                    "rng_cpu": torch.get_rng_state(),
                    "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   tmp / "training_state.pt")
        self.config.save(tmp / "config.yaml")
        self.tokenizer.save(str(tmp / "tokenizer.json"))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _atomic_symlink(os.path.relpath(final, self.output_dir), self.output_dir / "latest")
        # rotation: keep the newest save_total_limit written (by time, so that the checkpoints of an
        # earlier run in this directory go first, even with higher step numbers); never this one
        others = sorted((p for p in root.glob("step-*") if p != final), key=lambda p: p.stat().st_mtime_ns)
        for old in others[:max(0, len(others) - (self.config.training.save_total_limit - 1))]:
            shutil.rmtree(old)
        self._barrier()
        return final

    def _save_best(self, source: Path, metrics: dict):
        if not self.main:
            return
        best = self.output_dir / "best"
        tmp = self.output_dir / ".tmp-best"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(source, tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))   # inside the temporary directory
        if best.exists():
            shutil.rmtree(best)
        tmp.rename(best)

    def _load_training_state(self, path: Path):
        try:
            self._load_model_file(path / "model.safetensors")
            saved = torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)
            set_optimizer_state_dict(self.model, self.optimizer, saved["optimizer"], options=self._load_options())
            self.scheduler.load_state_dict(saved["scheduler"])
            self.scaler.load_state_dict(saved["scaler"])
        except Exception as e:  # noqa: BLE001
            raise TrainingError(f"cannot resume from {path}: the checkpoint is corrupt or from a different model "
                                f"({type(e).__name__}: {str(e)[:200]}); resume from another checkpoint") from None
        self.state.update(saved["state"])
        old_global = self.state.get("global_batch", self.global_batch)
        if old_global != self.global_batch:   # another number of processes: keep the position in sequences
            self.log(f"resuming with a global micro-batch of {self.global_batch} sequences instead of {old_global}: "
                     f"the data position is kept, the run is no longer bitwise identical to an uninterrupted one")
            self.state["micro_batch"] = self.state["micro_batch"] * old_global // self.global_batch
            self.state["global_batch"] = self.global_batch
        torch.set_rng_state(saved["rng_cpu"])
        if saved["rng_cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng_cuda"])
        self.log(f"resumed from {path} at step {self.state['step']}")

    # --- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, dataset: WindowDataset, max_batches: int | None = None) -> dict:
        """Mean loss (nats per token), perplexity and bits per token over the scored tokens."""
        self.model.eval()
        total, count = 0.0, 0
        bs = self.config.training.batch_size
        starts = list(range(0, len(dataset), bs))[:max_batches]
        # batches shared out over the processes; under FSDP every process runs every batch (its
        # forward passes gather parameters collectively, so all must run the same number)
        shared = self.world > 1 and not self.fsdp
        for start in (starts[self.rank::self.world] if shared else starts):
            ids, labels = self._batch(dataset, range(start, min(start + bs, len(dataset))))[:2]
            n = int((labels[:, 1:] != -100).sum())
            if n == 0:
                continue
            with self._autocast():
                loss = self.forward(ids, labels=labels, return_logits=False).loss
            total += float(loss) * n
            count += n
        self.model.train()
        if shared:
            total, count = self._all(total, dist.ReduceOp.SUM), int(self._all(count, dist.ReduceOp.SUM))
        if count == 0:
            return {"loss": float("nan"), "perplexity": float("nan"), "tokens": 0}
        mean = total / count
        return {"loss": mean, "perplexity": math.exp(min(mean, 700)), "bits_per_token": mean / math.log(2),
                "tokens": count}

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # --- the loop -----------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self._stop_signal = signum
        self.log(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint at the end of this step ...")

    def train(self, until_step: int | None = None) -> dict:
        """Train to the end of the schedule (or only until optimizer step `until_step`, then save a
        checkpoint and return: the schedule stays that of the full run)."""
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        tc = self.config.training
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        writer = SummaryWriter(str(self.output_dir / "tensorboard")) if self.main else None
        baseline = unigram_perplexity(self.streams["train"], self.streams["validation"], self.config.model.vocab_size)
        self.log(f"model: {self.model.num_parameters():,} parameters on {self.device}; "
                 f"{self.total_steps} optimizer steps; unigram validation perplexity {baseline:.1f}")
        bar = tqdm(total=self.total_steps, initial=self.state["step"], disable=not (tc.progress_bar and self.main),
                   desc="training", unit="step", dynamic_ncols=True)
        accum, bs = tc.gradient_accumulation_steps, tc.batch_size
        window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
        window_terms: dict[str, float] = {}      # distillation: the cross-entropy and KL terms
        last_saved = None
        self.model.train()
        try:
            end = min(self.total_steps, until_step or self.total_steps)
            while self.state["step"] < end and self._stop_signal is None:
                order = self._epoch_order(self.state["epoch"])
                gb = self.global_batch
                batches = [order[i:i + gb] for i in range(0, len(order), gb)]
                if self.world > 1 and len(batches[-1]) < gb:
                    batches.pop()          # every process needs a full share of each micro-batch
                batches = [b[self.rank * bs:(self.rank + 1) * bs] for b in batches]
                while self.state["micro_batch"] < len(batches) and self.state["step"] < end:
                    group = batches[self.state["micro_batch"]:self.state["micro_batch"] + accum]
                    self.state["micro_batch"] += len(group)
                    weights = [len(b) for b in group]
                    loss_sum, tokens, finite = 0.0, 0, True
                    for j, (indices, w) in enumerate(zip(group, weights)):
                        ids, labels, *teacher = self._batch(self.train_set, indices)
                        with self._autocast():
                            loss = self._loss(ids, labels, *teacher)
                        # every process must take the same branch (a backward on some only would hang DDP)
                        if not self._all(float(torch.isfinite(loss)), dist.ReduceOp.MIN):
                            finite = False
                            break
                        last = j == len(group) - 1
                        if self.fsdp:
                            self.model.set_requires_gradient_sync(last)
                        sync = nullcontext() if self.world == 1 or self.fsdp or last else self.ddp.no_sync()
                        with sync:
                            self.scaler.scale(loss * w / sum(weights)).backward()
                        loss_sum += float(loss.detach()) * w / sum(weights)
                        for name, value in self._terms.items():
                            window_terms[name] = window_terms.get(name, 0.0) + value * w / sum(weights)
                        tokens += ids.numel()
                    grad_norm = self._optimizer_step(finite)
                    if grad_norm is None:
                        continue
                    self.state["step"] += 1
                    bar.update(1)
                    window_loss += loss_sum
                    window_steps += 1
                    window_tokens += tokens
                    step = self.state["step"]
                    if step % tc.logging_steps == 0 or step == self.total_steps:
                        elapsed = time.perf_counter() - window_start
                        loss_all = self._all(window_loss, dist.ReduceOp.SUM) / self.world   # mean over processes
                        tokens_all = self._all(window_tokens, dist.ReduceOp.SUM)
                        metrics = {"loss": loss_all / window_steps, "lr": self.scheduler.get_last_lr()[0],
                                   "grad_norm": grad_norm, "tokens_per_s": tokens_all / max(elapsed, 1e-9)}
                        for name, value in sorted(window_terms.items()):
                            metrics[name] = self._all(value, dist.ReduceOp.SUM) / self.world / window_steps
                        window_terms = {}
                        for k, v in metrics.items():
                            if writer:
                                writer.add_scalar(f"train/{k}", v, step)
                        bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}",
                                        tok_s=f"{metrics['tokens_per_s']:.0f}")
                        window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
                    evaluated = None
                    if step % tc.eval_steps == 0 or step == self.total_steps:
                        evaluated = self.evaluate(self.val_set, tc.eval_max_batches)
                        if writer:
                            writer.add_scalar("val/loss", evaluated["loss"], step)
                            writer.add_scalar("val/perplexity", evaluated["perplexity"], step)
                        if self.main:
                            bar.write(f"step {step}: validation loss {evaluated['loss']:.4f}, "
                                      f"perplexity {evaluated['perplexity']:.2f} (unigram {baseline:.1f})")
                    if self._all(1.0 if self._stop_signal else 0.0, dist.ReduceOp.MAX) and not self._stop_signal:
                        self._stop_signal = signal.SIGTERM          # another process was told to stop
                    must_save = step % tc.save_steps == 0 or step == end or self._stop_signal
                    if evaluated and evaluated["loss"] < self.state["best_val_loss"]:
                        self.state["best_val_loss"], self.state["best_step"] = evaluated["loss"], step
                        last_saved = self.save_checkpoint()
                        self._save_best(last_saved, {"step": step, **evaluated})
                    elif must_save:
                        last_saved = self.save_checkpoint()
                    if self._stop_signal:
                        break
                else:
                    if self.state["micro_batch"] >= len(batches):
                        self.state["epoch"] += 1
                        self.state["micro_batch"] = 0
        finally:
            bar.close()
            if writer:
                writer.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self._stop_signal:
            if last_saved is None or last_saved.name != f"step-{self.state['step']:08d}":
                last_saved = self.save_checkpoint()
            raise KeyboardInterrupt(f"interrupted at step {self.state['step']}: checkpoint saved in {last_saved}; "
                                    f"continue with --resume latest")
        final = self.evaluate(self.val_set, None)
        result = {"step": self.state["step"], "validation": final, "unigram_validation_perplexity": baseline,
                  "best_step": self.state["best_step"], "nonfinite_skipped": self.state["nonfinite_total"]}
        if self.main:
            atomic_write_text(self.output_dir / "metrics.json", json.dumps(result, indent=2))
        return result

    def _loss(self, ids, labels, top_ids=None, top_logprobs=None):
        """The training loss; with teacher rows, the distillation loss (its two terms kept in self._terms)."""
        if top_ids is None:
            self._terms = {}
            return self.train_forward(ids, labels=labels, return_logits=False).loss
        from .distillation import distillation_loss
        d = self.config.distillation
        logits = self.train_forward(ids).logits
        loss, ce, kd = distillation_loss(logits, labels, top_ids, top_logprobs, d.alpha, d.temperature)
        self._terms = {"ce_loss": float(ce.detach()), "kd_loss": float(kd.detach())}
        return loss

    def _optimizer_step(self, finite: bool):
        """Clip, step, schedule.  Returns the gradient norm, or None when the step was skipped."""
        tc = self.config.training
        norm = None
        if finite:
            self.scaler.unscale_(self.optimizer)
            max_norm = tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)   # a DTensor under FSDP
            finite = math.isfinite(norm) or self.scaler.is_enabled()
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                self.scaler.update()
            self.state["nonfinite_in_row"] += 1
            self.state["nonfinite_total"] += 1
            self.log(f"step {self.state['step'] + 1}: non-finite loss or gradient, update skipped "
                     f"({self.state['nonfinite_in_row']} in a row)")
            if self.state["nonfinite_in_row"] >= tc.max_consecutive_nonfinite:
                latest = self.output_dir / "latest"
                kept = f"the last good checkpoint is {latest.resolve()}" if latest.exists() else "no checkpoint was saved yet"
                raise TrainingError(f"{self.state['nonfinite_in_row']} non-finite losses in a row: training diverged; "
                                    f"{kept}. Lower optimizer.learning_rate or use mixed_precision 'no'/'bf16'.")
            return None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state["nonfinite_in_row"] = 0
        return norm

    def evaluate_checkpoint(self, which: str = "best") -> dict:
        """Load a checkpoint's weights into the model and evaluate it on the test split."""
        path = resolve_checkpoint(self.output_dir, which)
        self._load_model_file(path / "model.safetensors")
        return self.evaluate(self.test_set)
