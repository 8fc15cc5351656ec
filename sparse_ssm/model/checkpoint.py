"""The files of a model checkpoint, and finding a checkpoint in a training output directory.

A checkpoint directory holds (see `train.checkpoints` for what training adds):

    model.safetensors     the weights (tied LM head left out)        written by `save_weights`
    config.yaml           the run's whole config; its `model` section builds the model
    tokenizer.json        the tokenizer (read by `sparse_ssm.data.tokenizer.load_tokenizer`)

An output directory holds `checkpoints/step-NNNNNNNN/`, `latest` (a link to the newest) and
`best/`.  Loading reads safetensors and YAML only: no file can make it run code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..util.errors import CheckpointError
from ..util.files import atomic_path
from ..util.schema import load_yaml
from .config import SparseSSMConfig
from .lm import SparseSSMForCausalLM

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.yaml", "tokenizer.json"
REQUIRED = (WEIGHTS, CONFIG, TOKENIZER)


def step_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:08d}"


def resolve_checkpoint(output_dir: str | Path, which: str | None = None) -> Path:
    """'latest', 'best', a step number or a path (None: best if present, else latest) -> the
    checkpoint directory, checked for completeness."""
    output_dir = Path(output_dir)
    if which is None:
        if not output_dir.is_dir():
            raise CheckpointError(f"model directory {output_dir} does not exist; train one first "
                                  f"(python main.py train --config ... --output-dir {output_dir})")
        which = "best" if (output_dir / "best").exists() else "latest"
    if which in ("latest", "best"):
        path = output_dir / which
    elif which.isdigit():
        path = step_dir(output_dir, int(which))
    else:
        path = Path(which)
    if not path.exists():
        replaced = sorted(output_dir.glob(f".{which}.old*")) if which in ("latest", "best") else []
        if replaced:
            raise CheckpointError(f"checkpoint {path} does not exist: a run was stopped while replacing it, and the "
                                  f"previous one is {replaced[-1]}; continue the run from its latest checkpoint "
                                  f"(python main.py train ... --resume), which restores it, or rename that folder "
                                  f"to {path}")
        raise CheckpointError(f"checkpoint {path} does not exist (look in {output_dir / 'checkpoints'})")
    path = path.resolve()
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); "
                              f"pick another checkpoint or delete this one")
    return path


def weights_of(model: SparseSSMForCausalLM, state: dict | None = None) -> dict:
    """The tensors to store: `state` (default the model's own) without the tied LM head, contiguous."""
    state = dict(model.state_dict() if state is None else state)
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_weights(path: str | Path, tensors: dict):
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def read_weights(path: str | Path, tie_embeddings: bool) -> dict:
    """The tensors of a model.safetensors (the tied LM head restored), or a CheckpointError."""
    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for damaged files
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({type(e).__name__}: {str(e)[:200]}); "
                              f"pick another checkpoint") from None
    if tie_embeddings and "lm_head.weight" not in state and "embed.weight" in state:
        state["lm_head.weight"] = state["embed.weight"]
    return state


def load_model_config(path: str | Path) -> SparseSSMConfig:
    """The `model` section of a checkpoint's config.yaml (keys added since it was written take the
    values that describe it: `SparseSSMConfig.from_saved`)."""
    return SparseSSMConfig.from_saved(load_yaml(Path(path) / CONFIG).get("model"))


def load_model(path: str | Path, device="cpu") -> SparseSSMForCausalLM:
    """The model of a checkpoint directory, in eval mode on `device`."""
    path = Path(path)
    config = load_model_config(path)
    model = SparseSSMForCausalLM(config)
    state = read_weights(path / WEIGHTS, config.tie_embeddings)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path}: {WEIGHTS} does not match its config.yaml ({str(e)[:300]}); "
                              f"pick another checkpoint") from None
    return model.to(torch.device(device)).eval()
