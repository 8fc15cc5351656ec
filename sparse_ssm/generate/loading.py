"""A trained model ready for inference: the weights and model config of a checkpoint and its
tokenizer (what `generate`, `evaluate` and `serve` start from)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.tokenizer import load_tokenizer
from ..model import SparseSSMForCausalLM
from ..model.checkpoint import (CONFIG, TOKENIZER, another_checkpoint_hint, load_model, read_checkpoint_yaml,
                                resolve_checkpoint)
from ..util.device import resolve_device
from ..util.errors import CheckpointError, DataError
from .settings import GenerationConfig


@dataclass
class LoadedModel:
    model: SparseSSMForCausalLM
    tokenizer: object
    path: Path             # the checkpoint directory
    weights: str = "fp32"  # the weights it was loaded with: fp32 | bf16 | int8


def load_checkpoint(model_dir: str | Path, which: str | None = None, device: str = "auto",
                    weights: str | None = None) -> LoadedModel:
    """The checkpoint `which` (best | latest | STEP | PATH; None: best, else latest) of a training
    output directory, on `device` (auto | cpu | cuda[:N] | mps), in eval mode, with its weights as
    `weights` (fp32 | bf16 | int8; None: the checkpoint's own `generation.weights`, fp32 unless set)."""
    path = resolve_checkpoint(model_dir, which)
    if weights is None:
        saved = read_checkpoint_yaml(path / CONFIG).get("generation") or {}
        weights = saved.get("weights", "fp32")
    weights = GenerationConfig(weights=weights).weights           # a ConfigError naming the key and values
    model = load_model(path, resolve_device(device), weights)
    try:
        tokenizer = load_tokenizer(path / TOKENIZER)
    except DataError as e:
        raise CheckpointError(f"{e}: the checkpoint is damaged; {another_checkpoint_hint(path)}") from None
    return LoadedModel(model, tokenizer, path, weights)
