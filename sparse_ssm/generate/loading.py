"""A trained model ready for inference: the weights and model config of a checkpoint and its
tokenizer (what `generate`, `evaluate` and `serve` start from)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.tokenizer import load_tokenizer
from ..model import SparseSSMForCausalLM
from ..model.checkpoint import TOKENIZER, load_model, resolve_checkpoint
from ..util.device import resolve_device


@dataclass
class LoadedModel:
    model: SparseSSMForCausalLM
    tokenizer: object
    path: Path             # the checkpoint directory


def load_checkpoint(model_dir: str | Path, which: str | None = None, device: str = "auto") -> LoadedModel:
    """The checkpoint `which` (best | latest | STEP | PATH; None: best, else latest) of a training
    output directory, on `device` (auto | cpu | cuda[:N] | mps), in eval mode."""
    path = resolve_checkpoint(model_dir, which)
    model = load_model(path, resolve_device(device))
    return LoadedModel(model, load_tokenizer(path / TOKENIZER), path)
