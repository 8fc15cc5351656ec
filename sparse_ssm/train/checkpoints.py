"""Checkpoints of a training run: writing (rotation, `latest`, `best/`) and resuming.

Output directory layout:

    OUTPUT/config.yaml, tokenizer.json          the resolved config and the tokenizer
    OUTPUT/checkpoints/step-00000100/           model.safetensors, training_state.json + .safetensors,
                                                config.yaml, tokenizer.json  (the newest `save_total_limit`
                                                kept, and the last good one)
    OUTPUT/latest -> checkpoints/step-...       link to the newest checkpoint
    OUTPUT/best/                                the checkpoint with the lowest validation loss
    OUTPUT/tensorboard/, OUTPUT/metrics.json
    OUTPUT/.sparse-ssm-output.json              marks the folder as a training run's (`output_dir`: who
                                                may write here, and the clean-up after killed runs)

Every checkpoint is written to a temporary directory and renamed into place, so none is ever
half-written.  Nothing in a checkpoint is a pickle: loading one runs no code (the resume state's
format, and how older pickled ones are read, is in `training_state`).  Under FSDP the sharded weights and optimizer state are gathered to full tensors
(on rank 0) for writing and scattered back when resuming, so checkpoints load anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from ..data.tokenizer import save_tokenizer
from ..model.checkpoint import (CONFIG, TOKENIZER, WEIGHTS, read_weights, resolve_checkpoint, save_weights, step_dir,
                                weights_of)
from ..util.errors import CheckpointError
from ..util.files import atomic_directory, atomic_symlink, atomic_write_text
from .distributed import Processes
from .training_state import read_training_state, write_training_state

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class CheckpointManager:
    def __init__(self, output_dir: Path, procs: Processes, save_total_limit: int):
        self.output_dir, self.procs, self.save_total_limit = Path(output_dir), procs, save_total_limit

    def resolve(self, which: str) -> Path:
        return resolve_checkpoint(self.output_dir, which)

    @property
    def latest(self) -> Path | None:
        link = self.output_dir / "latest"
        return link.resolve() if link.exists() else None

    def _load_options(self) -> StateDictOptions:
        # under FSDP rank 0's full tensors are scattered into every process's shards
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=self.procs.fsdp)

    def load_weights(self, model, path: Path):
        """The weights of checkpoint `path` into `model` (sharded or not)."""
        if self.procs.fsdp:
            model.reshard()   # the root keeps its parameters gathered after a forward pass
        state = read_weights(path / WEIGHTS, model)
        set_model_state_dict(model, state, options=self._load_options())

    def save(self, step: int, model, optimizer, scheduler, scaler, state: dict, config, tokenizer,
             keep: Path | None = None) -> Path:
        """Write checkpoint `step` (the main process; the others take part in gathering the sharded
        states under FSDP, then wait for it), point `latest` at it, rotate (never removing `keep`);
        its path."""
        final = step_dir(self.output_dir, step)
        weights = weights_of(model, get_model_state_dict(model, options=_FULL))
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
        if self.procs.main:
            with atomic_directory(final) as tmp:
                save_weights(tmp / WEIGHTS, weights)
                write_training_state(tmp, {
                    "optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "state": dict(state), "rng_cpu": torch.get_rng_state(),
                    "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None})
                atomic_write_text(tmp / CONFIG, config.to_yaml())
                save_tokenizer(tokenizer, tmp / TOKENIZER)
            atomic_symlink(os.path.relpath(final, self.output_dir), self.output_dir / "latest")
            self._rotate(final, keep)
        self.procs.barrier()
        return final

    def _rotate(self, newest: Path, keep: Path | None):
        """Keep the newest save_total_limit written (by time, so that the checkpoints of an earlier
        run in this directory go first, even with higher step numbers); never `newest` or `keep`."""
        others = sorted((p for p in newest.parent.glob("step-*") if p not in (newest, keep)),
                        key=lambda p: p.stat().st_mtime_ns)
        for old in others[:max(0, len(others) - (self.save_total_limit - 1))]:
            shutil.rmtree(old)

    def save_best(self, source: Path, metrics: dict):
        """Copy checkpoint `source` to best/ with its validation metrics."""
        if not self.procs.main:
            return
        with atomic_directory(self.output_dir / "best") as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            atomic_write_text(tmp / "metrics.json", json.dumps(metrics, indent=2))

    def resume(self, path: Path, model, opt) -> dict:
        """Restore weights, optimizer state, schedule position, scaler and RNG from checkpoint
        `path` into `model` and `opt` (an `optim.OptimizerStep`, whose config keeps deciding the
        hyperparameters); returns the saved loop state."""
        saved = read_training_state(path)          # a CheckpointError of its own when unsafe or unreadable
        try:
            self.load_weights(model, path)
            set_optimizer_state_dict(model, opt.optimizer, saved["optimizer"], options=self._load_options())
            opt.restore(saved["scheduler"], saved["scaler"])
            torch.set_rng_state(saved["rng_cpu"])
            if saved["rng_cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(saved["rng_cuda"])
            if not isinstance(saved["state"], dict):
                raise TypeError(f"loop state is a {type(saved['state']).__name__}")
        except CheckpointError:
            raise                                   # already names the file and what to use instead
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot resume from {path}: the checkpoint is corrupt or from a different model "
                                  f"({type(e).__name__}: {str(e)[:200]}); resume from another checkpoint") from None
        return saved["state"]
