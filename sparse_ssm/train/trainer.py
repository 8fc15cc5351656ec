"""The training loop: a Trainer that composes the data, the model, the optimizer step, the
processes, the checkpoint manager, the monitor and the evaluation.

    with Trainer(Config.load("config/small_cpu.yaml")) as trainer:   # takes the output directory's lock
        trainer.train()                  # resumable; Ctrl-C / SIGTERM save a checkpoint first

Resume is exact: the data order is a function of (seed, epoch) and the position, RNG, optimizer,
scheduler and scaler states are saved with every checkpoint (see `checkpoints`).  What a resumed
run keeps and which config values may change is in `resume`.

One process writes to an output directory: the trainer holds its lock (`util.lock`; under torchrun
rank 0 holds it) from before its first write until `close()` (or the end of a `with` block, the
trainer's garbage collection, the process's exit).  A fresh run writes only into a folder that is
new, empty or a run's without checkpoints, or with `overwrite` (see `output_dir`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import signal
import sys
import weakref
from contextlib import nullcontext
from pathlib import Path

import torch

from ..data import collate, prepare_lm_data
from ..data.tokenizer import save_tokenizer
from ..model import SparseSSMForCausalLM
from ..model.checkpoint import CONFIG, TOKENIZER, another_checkpoint_hint, step_dir
from ..model.memory import MemoryNeed
from ..util.device import cpu_threads
from ..util.errors import CheckpointError, ConfigError, DataError, SparseSSMError, TrainingError
from ..util.files import atomic_write_text
from ..util.lock import DirectoryLock
from .batches import EpochBatches
from .checkpoints import CheckpointManager
from .distributed import Processes
from .evaluation import loss_metrics, loss_sum, unigram_perplexity
from .losses import distillation_loss
from .monitor import Monitor
from .optim import OptimizerStep
from .output_dir import claim_output_dir
from .resume import resume_changes


@dataclasses.dataclass
class LoopState:
    """What a checkpoint keeps of the loop (the data position counts micro-batches of the epoch;
    good_step: the newest checkpoint known to be good, i.e. with finite weights that gave a finite
    validation loss or a finite training loss and gradient)."""

    step: int = 0
    epoch: int = 0
    micro_batch: int = 0
    global_batch: int = 0
    best_val_loss: float = float("inf")
    best_step: int | None = None
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    good_step: int | None = None


class Trainer:
    def __init__(self, config, resume: str | None = None, overwrite: bool = False, log=print):
        """config: the aggregate `sparse_ssm.config.Config`; resume: latest | best | STEP | PATH;
        overwrite: a fresh run may replace the run in its output directory (see `output_dir`)."""
        tc = config.training
        self.config, self.procs = config, Processes.start(tc)
        self.log, self.device = (log if self.procs.main else (lambda *_: None)), self.procs.device
        if tc.mixed_precision == "fp16" and self.device.type != "cuda":
            self.log(f"note: training.mixed_precision 'fp16' needs a CUDA device (it trains with a gradient scaler); "
                     f"on {self.device.type} this run uses 'bf16' instead (set it to 'bf16' or 'no' to silence this)")
            tc.mixed_precision = "bf16"
        self.output_dir = Path(tc.output_dir)
        lock = self._lock_output_dir(resume is not None, overwrite)     # before anything is written there
        self._unlock = weakref.finalize(self, lock.release) if lock else (lambda: None)
        try:
            self._setup(resume)
        except BaseException:
            self.close()
            raise
        self.stop_signal = None

    def _lock_output_dir(self, resume: bool, overwrite: bool) -> DirectoryLock | None:
        """The output directory's lock, taken by rank 0, which then checks that this run may write
        there (`claim_output_dir`); every process fails when either refuses."""
        lock, refused = None, None
        if self.procs.main:
            try:
                lock = DirectoryLock.acquire(self.output_dir, shlex.join(sys.argv), self.log)
                ds = self.config.dataset
                claim_output_dir(self.output_dir, resume, overwrite,
                                 {"dataset.data_path": ds.data_path, "dataset.tokenizer_path": ds.tokenizer_path},
                                 self.log)
            except SparseSSMError as e:
                if lock is not None:
                    lock.release()
                refused = e
        if not self.procs.all_reduce(0.0 if refused else 1.0, "min"):
            raise refused or TrainingError(f"the main process could not take the lock of {self.output_dir} "
                                           f"(see its message)")
        return lock

    def close(self):
        """Release the output directory (its lock) for other runs; the trainer writes no more."""
        self._unlock()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _setup(self, resume: str | None):
        config, tc = self.config, self.config.training
        self.checkpoints = CheckpointManager(self.output_dir, self.procs, tc.save_total_limit)
        resume_from = self.checkpoints.resolve(resume) if resume else None
        if resume_from:
            changes = resume_changes(type(config).load(resume_from / CONFIG, saved=True).to_dict(), config.to_dict())
            if changes:
                self.log(f"resuming with changed settings, applied from the first resumed step: {'; '.join(changes)}")
        torch.manual_seed(tc.seed)
        self.data = self.procs.main_first(lambda: self._prepare_data(resume_from))
        self._check_memory()
        self.model = SparseSSMForCausalLM(config.model).to(self.device)   # same seed: same weights on every rank
        self.model.gradient_checkpointing = tc.gradient_checkpointing
        self.forward, self.train_forward = self.procs.wrap(self.model, tc.compile)
        self.batches = EpochBatches(len(self.train_set), tc.seed, tc.batch_size, tc.gradient_accumulation_steps,
                                    self.procs)
        self.total_steps = min(self.batches.steps_per_epoch() * tc.num_epochs, tc.max_steps or math.inf)
        self.opt = OptimizerStep(self.model, config.optimizer, config.scheduler, self.total_steps, tc.max_grad_norm,
                                 fp16=tc.mixed_precision == "fp16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.mixed_precision)
        self.state = LoopState(global_batch=self.batches.global_batch)
        self.unconfirmed = None        # the newest checkpoint (saved or resumed from) not yet known to be good
        self.resumed_from, self.resumed_step = None, None     # the checkpoint resumed from, its step
        if resume_from:
            self._resume(resume_from)

    def _check_memory(self):
        """Refuse (every process, when one does) a model and batch larger than the free memory,
        before they are allocated."""
        config, tc, refused = self.config, self.config.training, None
        try:
            MemoryNeed.training(config.model, tc.batch_size, config.dataset.max_seq_len, tc.gradient_checkpointing,
                                tc.mixed_precision != "no", self.procs.world if self.procs.fsdp else 1).check(
                "training", self.device, "lower model.hidden_dim, model.num_layers or model.vocab_size (the "
                                         "parameters), or training.batch_size or dataset.max_seq_len (the activations; "
                                         "training.gradient_checkpointing: true keeps fewer)")
        except ConfigError as e:
            refused = e
        if not self.procs.all_reduce(0.0 if refused else 1.0, "min"):
            raise refused or TrainingError("another process has too little memory for this training (see its message)")

    def _prepare_data(self, resume_from: Path | None):
        cfg, ds = self.config, self.config.dataset
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # a fresh run trains its own tokenizer unless it is given one: never one left in the output directory
        tokenizer_file = resume_from / TOKENIZER if resume_from else (Path(ds.tokenizer_path) if ds.tokenizer_path
                                                                      else None)
        data = prepare_lm_data(ds, ds.tokenizer_vocab_size or cfg.model.vocab_size, tokenizer_file,
                               cfg.distillation.enabled, self.log)
        if cfg.distillation.enabled:
            self.log(f"distillation: alpha {cfg.distillation.alpha}, temperature {cfg.distillation.temperature}")
        cfg.model.vocab_size = data.vocab_size
        self.train_set, self.val_set, self.test_set = (data.windows(split, ds.max_seq_len, ds.stride)
                                                       for split in ("train", "validation", "test"))
        self.has_validation = len(self.val_set) > 0
        if not self.has_validation:
            self.log(f"note: no validation data (dataset.val_split = {ds.val_split}): the run reports no validation "
                     f"loss and keeps no best/ checkpoint")
        if len(self.train_set) == 0:
            raise DataError(f"the training split has {len(data.streams['train'])} tokens: fewer than one window of "
                            f"dataset.max_seq_len = {ds.max_seq_len}; add data or lower max_seq_len")
        self.log(f"data: train {len(data.streams['train']):,} tokens ({len(self.train_set)} windows), "
                 f"validation {len(data.streams['validation']):,}, test {len(data.streams['test']):,}")
        if self.procs.main:
            save_tokenizer(data.tokenizer, self.output_dir / TOKENIZER)
            atomic_write_text(self.output_dir / CONFIG, cfg.to_yaml())
        return data

    def _resume(self, path: Path):
        saved = self.checkpoints.resume(path, self.model, self.opt)
        try:
            self.state = LoopState(**saved)
        except TypeError as e:
            raise CheckpointError(f"cannot resume from {path}: its loop state does not fit this version ({e}); "
                                  f"resume from another checkpoint") from None
        self.resumed_from, self.resumed_step = path, self.state.step
        if self.state.good_step != self.state.step:
            self.unconfirmed = self.state.step
        if self.state.global_batch != self.batches.global_batch:   # another number of processes
            self.log(f"resuming with a global micro-batch of {self.batches.global_batch} sequences instead of "
                     f"{self.state.global_batch}: the data position is kept, the run is no longer bitwise "
                     f"identical to an uninterrupted one")
            self.state.micro_batch = self.state.micro_batch * self.state.global_batch // self.batches.global_batch
            self.state.global_batch = self.batches.global_batch
        self.log(f"resumed from {path} at step {self.state.step}")

    # --- one optimizer step ---------------------------------------------------------------
    def _autocast(self):
        return nullcontext() if self.autocast_dtype is None else torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _loss(self, ids, labels, top_ids=None, top_logprobs=None) -> tuple[torch.Tensor, dict]:
        """The training loss and its named terms (distillation: the cross-entropy and the KL)."""
        if top_ids is None:
            return self.train_forward(ids, labels=labels, return_logits=False).loss, {}
        d = self.config.distillation
        loss, ce, kd = distillation_loss(self.train_forward(ids).logits, labels, top_ids, top_logprobs, d.alpha,
                                         d.temperature)
        return loss, {"ce_loss": float(ce.detach()), "kd_loss": float(kd.detach())}

    def _train_step(self, group) -> dict | None:
        """Forward and backward over the micro-batches of `group`, then the optimizer step: the
        step's loss, tokens, terms and gradient norm, or None when it was skipped (non-finite)."""
        weights = [len(b) / sum(len(b) for b in group) for b in group]
        out, finite = {"loss": 0.0, "tokens": 0, "terms": {}}, True
        for j, (indices, w) in enumerate(zip(group, weights)):
            batch = collate([self.train_set[int(i)] for i in indices], self.data.pad_id)
            ids, labels, *teacher = (t.to(self.device) for t in batch)
            with self._autocast():
                loss, terms = self._loss(ids, labels, *teacher)
            # every process must take the same branch (a backward on some only would hang DDP)
            if not self.procs.all_reduce(float(torch.isfinite(loss)), "min"):
                finite = False
                break
            with self.procs.no_sync(self.train_forward, j == len(group) - 1, self.model):
                self.opt.backward(loss * w)
            out["loss"] += float(loss.detach()) * w
            out["tokens"] += ids.numel()
            for name, value in terms.items():
                out["terms"][name] = out["terms"].get(name, 0.0) + value * w
        out["grad_norm"] = self.opt.step(finite)
        if out["grad_norm"] is None:
            self._skipped_step()
            return None
        self.state.nonfinite_in_row = 0
        return out

    def _skipped_step(self):
        tc, state = self.config.training, self.state
        state.nonfinite_in_row += 1
        state.nonfinite_total += 1
        self.log(f"step {state.step + 1}: non-finite loss or gradient, update skipped ({state.nonfinite_in_row} in a row)")
        if state.nonfinite_in_row >= tc.max_consecutive_nonfinite:
            raise TrainingError(self._divergence_message())

    def _divergence_message(self) -> str:
        """Why training stops after too many non-finite steps, and where to continue from: not from
        the checkpoint this run resumed from when no step from it was finite."""
        state = self.state
        if self.resumed_from is not None and state.step == self.resumed_step:
            return (f"{state.nonfinite_in_row} non-finite losses in a row, every step since resuming from "
                    f"{self.resumed_from}: its weights and optimizer state are finite but no update from them is, "
                    f"so it is no good checkpoint to continue from; {another_checkpoint_hint(self.resumed_from)} "
                    f"(or lower optimizer.learning_rate)")
        good = self._good_checkpoint()
        kept = (f"the last good checkpoint is {good} (continue from it with --resume {state.good_step} --set "
                f"optimizer.learning_rate=...)" if good else "no good checkpoint was saved")
        return (f"{state.nonfinite_in_row} non-finite losses in a row: training diverged; {kept}. "
                f"Lower optimizer.learning_rate or use mixed_precision 'no'/'bf16'.")

    def _good_checkpoint(self) -> Path | None:
        good = self.state.good_step
        path = step_dir(self.output_dir, good) if good is not None else None
        return path if path is not None and path.is_dir() else None

    def _weights_finite(self) -> bool:
        local = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())   # FSDP: the shards
                    for p in self.model.parameters())
        return bool(self.procs.all_reduce(float(local), "min"))

    # --- evaluation and checkpoints -------------------------------------------------------
    def evaluate(self, windows, max_batches: int | None = None) -> dict:
        """Mean loss (nats per token), perplexity and bits per token over the scored tokens.
        Batches are shared out over the processes; under FSDP every process runs every batch
        (its forward passes gather parameters collectively, so all must run the same number)."""
        bs = self.config.training.batch_size
        starts = list(range(0, len(windows), bs))[:max_batches]
        shared = self.procs.world > 1 and not self.procs.fsdp
        self.model.eval()
        total, count = loss_sum(self.forward, windows, self.data.pad_id, self.device,
                                self.procs.shard(starts) if shared else starts, bs, self._autocast)
        self.model.train()
        if shared:
            total, count = self.procs.all_reduce(total), int(self.procs.all_reduce(count))
        return loss_metrics(total, count)

    def save_checkpoint(self, validated: bool = False) -> Path:
        """Save the current step; `validated`: its weights just gave a finite validation loss, so
        the checkpoint is good at once (otherwise it is once the next step's loss is finite)."""
        opt, step = self.opt, self.state.step
        finite = self._weights_finite()
        if finite and validated:
            self.state.good_step = step
        path = self.checkpoints.save(step, self.model, opt.optimizer, opt.scheduler, opt.scaler,
                                     dataclasses.asdict(self.state), self.config, self.data.tokenizer,
                                     keep=self._good_checkpoint())
        self.unconfirmed = step if finite and not validated else None
        if not finite:
            self.log(f"warning: step {step}: the weights are not finite; {path.name} is saved but is not a good "
                     f"checkpoint")
        return path

    def _checkpoint_after_step(self, step: int, end: int, evaluated: dict | None) -> Path | None:
        """Save when due (every save_steps, at the end, on a stop signal) or when validation improved
        (then also as best/); the path saved, if any."""
        validated = evaluated is not None and math.isfinite(evaluated["loss"])
        if validated and evaluated["loss"] < self.state.best_val_loss:
            self.state.best_val_loss, self.state.best_step = evaluated["loss"], step
            path = self.save_checkpoint(validated)
            self.checkpoints.save_best(path, {"step": step, **evaluated})
            return path
        if step % self.config.training.save_steps == 0 or step == end or self.stop_signal:
            return self.save_checkpoint(validated)
        return None

    def evaluate_checkpoint(self, which: str = "best") -> dict:
        """Load a checkpoint's weights into the model and evaluate it on the test split."""
        self.checkpoints.load_weights(self.model, self.checkpoints.resolve(which))
        return self.evaluate(self.test_set)

    def test_best(self, result: dict) -> dict | None:
        """The test-split metrics of this run's best checkpoint (lowest validation loss), added to
        `result` (what `train` returned) and metrics.json as `test_best`; None without one."""
        if self.state.best_step is None:
            return None
        result["test_best"] = test = self.evaluate_checkpoint("best")
        if self.procs.main:
            atomic_write_text(self.output_dir / "metrics.json", json.dumps(result, indent=2))
        return test

    # --- the loop -----------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self.stop_signal = signum
        self.log(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint at the end of this step ...")

    def train(self, until_step: int | None = None) -> dict:
        """Train to the end of the schedule (or only until optimizer step `until_step`, then save a
        checkpoint and return: the schedule stays that of the full run)."""
        tc = self.config.training
        end = min(self.total_steps, until_step or self.total_steps)
        baseline = (unigram_perplexity(self.data.streams["train"], self.data.streams["validation"], self.data.vocab_size)
                    if self.has_validation else None)
        where = f"cpu, {cpu_threads()}" if self.device.type == "cpu" else str(self.device)
        self.log(f"model: {self.model.num_parameters():,} parameters on {where}; {self.total_steps} optimizer "
                 f"steps" + (f"; unigram validation perplexity {baseline:.1f}" if baseline else ""))
        last_saved = None
        cap = tc.eval_max_batches                   # the periodic validations' batches; the final one runs all
        capped = cap if cap and len(self.val_set) > cap * tc.batch_size else None
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.model.train()
        try:
            with Monitor(self.output_dir, self.procs, tc, self.total_steps, self.state.step, baseline) as monitor:
                for group in self.batches.groups(self.state, end, stopped=lambda: self.stop_signal is not None):
                    result = self._train_step(group)
                    if result is None:
                        continue
                    if self.unconfirmed is not None:    # this step's finite loss came from its weights
                        self.state.good_step, self.unconfirmed = self.unconfirmed, None
                    self.state.step += 1
                    step = self.state.step
                    monitor.step(step, result, self.opt.lr)
                    evaluated = None
                    if self.has_validation and (step % tc.eval_steps == 0 or step == self.total_steps):
                        evaluated = monitor.validation(step, self.evaluate(self.val_set, cap), capped)
                    if self.procs.all_reduce(1.0 if self.stop_signal else 0.0, "max") and not self.stop_signal:
                        self.stop_signal = signal.SIGTERM          # another process was told to stop
                    last_saved = self._checkpoint_after_step(step, end, evaluated) or last_saved
                    if self.stop_signal:
                        break
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self.stop_signal:
            if last_saved is None or last_saved.name != f"step-{self.state.step:08d}":
                last_saved = self.save_checkpoint()
            raise KeyboardInterrupt(f"interrupted at step {self.state.step}: checkpoint saved in {last_saved}; "
                                    f"continue with --resume latest")
        result = {"step": self.state.step, "validation": self.evaluate(self.val_set) if self.has_validation else None,
                  "unigram_validation_perplexity": baseline, "best_step": self.state.best_step,
                  "nonfinite_skipped": self.state.nonfinite_total}
        if self.procs.main:
            atomic_write_text(self.output_dir / "metrics.json", json.dumps(result, indent=2))
        return result
