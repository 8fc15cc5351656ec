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

from ..util.errors import CheckpointError, ConfigError
from ..util.files import atomic_path
from ..util.schema import load_yaml
from .config import SparseSSMConfig
from .lm import SparseSSMForCausalLM
from .memory import MemoryNeed
from .quantize import WEIGHT_FORMATS, quantize_model
from .weights_file import TensorsOnDemand, empty_model, fill_parameters

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.yaml", "tokenizer.json"
REQUIRED = (WEIGHTS, CONFIG, TOKENIZER)


def step_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:08d}"


def resolve_checkpoint(output_dir: str | Path, which: str | None = None) -> Path:
    """'latest', 'best', a step number or a path (None: best if present, else latest; or
    `output_dir` itself when it is a checkpoint directory) -> the checkpoint directory, checked for
    completeness."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        inside = (f" (it is a checkpoint's file: pass its folder, --model-dir {output_dir.parent})"
                  if output_dir.name in REQUIRED else "")
        raise CheckpointError(f"model directory {output_dir} is a file, not a folder{inside}; --model-dir takes a "
                              f"training output folder (with checkpoints/, latest, best/) or a checkpoint folder "
                              f"(with {', '.join(REQUIRED)})")
    if which is None:
        if not output_dir.is_dir():
            raise CheckpointError(f"model directory {output_dir} does not exist; train one first "
                                  f"(python main.py train --config ... --output-dir {output_dir})")
        if (output_dir / WEIGHTS).is_file() and not (output_dir / "latest").exists():
            which = str(output_dir)                          # a checkpoint folder itself
        else:
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


def other_checkpoints(path: str | Path) -> tuple[Path | None, list[Path]]:
    """The output directory's checkpoints folder around checkpoint `path` (a step-N or best/) and
    its other complete step-N checkpoints, earlier steps only when `path` is one, newest first."""
    path = Path(path).resolve()
    folder = path.parent if path.parent.name == "checkpoints" else path.parent / "checkpoints"
    if not folder.is_dir():
        return None, []
    step = int(path.name[5:]) if path.parent == folder and path.name[5:].isdigit() else None
    found = [p for p in folder.glob("step-*") if p.name[5:].isdigit() and p.resolve() != path
             and (step is None or int(p.name[5:]) < step) and all((p / f).is_file() for f in REQUIRED)]
    return folder, sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def another_checkpoint_hint(path: str | Path) -> str:
    """What to use instead of a damaged checkpoint `path`: its output directory's other (earlier)
    checkpoints and the flags that pick one."""
    folder, others = other_checkpoints(path)
    if not others:
        return (f"no other checkpoint to fall back on is in {folder}: train again without --resume"
                if folder else "pick another checkpoint")
    names = ", ".join(p.name for p in others[:5]) + (", ..." if len(others) > 5 else "")
    step = int(others[0].name[5:])
    return (f"use an earlier checkpoint of {folder} ({names}; not checked yet): --checkpoint {step} for "
            f"generate / evaluate / export / serve, --resume {step} for train")


def _all_finite(tensor: torch.Tensor, elements_at_once: int = 1 << 20) -> bool:
    """No NaN or inf in `tensor`, checked a slice at a time (isfinite's temporaries of a whole
    embedding would be larger than the int8 model)."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + elements_at_once]).all()) for i in range(0, flat.numel(), elements_at_once))


def check_weights(path: str | Path, state: dict, model: SparseSSMForCausalLM):
    """Refuse (CheckpointError naming the file and what to use instead) tensors `state` read from
    `path` that do not fit `model` (names, shapes, floating-point dtypes) or hold NaN or inf (meta
    tensors: names, shapes and dtypes only; their values are checked as they are read)."""
    expected = model.state_dict()        # under FSDP: DTensors, whose shapes are the full ones
    missing, unexpected = [k for k in expected if k not in state], [k for k in state if k not in expected]
    problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
        [f"unexpected {', '.join(unexpected)}"] if unexpected else [])
    for k, v in expected.items():
        if k in state and state[k].shape != v.shape:
            problems.append(f"{k} has shape {tuple(state[k].shape)}, the config gives {tuple(v.shape)}")
        elif k in state and state[k].is_floating_point() != v.is_floating_point():
            problems.append(f"{k} is {state[k].dtype}, expected {v.dtype}")
    if problems:
        raise CheckpointError(f"{path} does not match the model of its config.yaml ({'; '.join(problems)[:400]}): "
                              f"the checkpoint is damaged or its files come from different runs; "
                              f"{another_checkpoint_hint(Path(path).parent)}")
    tied = state.get("lm_head.weight") is state.get("embed.weight")
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not v.is_meta
                 and not (tied and k == "lm_head.weight") and not _all_finite(v)]
    if nonfinite:
        raise _nonfinite(path, nonfinite)


def _nonfinite(path, names: list[str]) -> CheckpointError:
    return CheckpointError(f"{path} holds NaN or inf values in {len(names)} tensor(s) "
                           f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}): the checkpoint "
                           f"is corrupt (saved after training diverged, or the file was altered); "
                           f"{another_checkpoint_hint(Path(path).parent)}")


def _unreadable(path, e: Exception) -> CheckpointError:
    return CheckpointError(f"{path} is corrupt or not a safetensors file ({type(e).__name__}: {str(e)[:200]}); "
                           f"{another_checkpoint_hint(Path(path).parent)}")


def read_weights(path: str | Path, model: SparseSSMForCausalLM) -> dict:
    """The tensors of a model.safetensors for `model` (the tied LM head restored), checked
    (`check_weights`), or a CheckpointError."""
    tie_embeddings = model.config.tie_embeddings
    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for damaged files
        raise _unreadable(path, e) from None
    if tie_embeddings and "lm_head.weight" not in state and "embed.weight" in state:
        state["lm_head.weight"] = state["embed.weight"]
    check_weights(path, state, model)
    return state


def _load_weights(path: Path, config: SparseSSMConfig, weights: str) -> SparseSSMForCausalLM:
    """The model of weights file `path` with its weights as `weights` (fp32 | bf16 | int8), holding
    one copy of them: the model is allocated without being initialised (`weights_file.empty_model`),
    checked against the file's header, and each tensor is read into its parameter a block of rows
    at a time (int8: the linear maps quantised from those blocks, `quantize`; their float memory is
    never written).  NaN or inf met on the way is a CheckpointError after the reading."""
    model = empty_model(lambda: SparseSSMForCausalLM(config, init_weights=False))
    try:
        with open(path, "rb") as file:
            tensors = TensorsOnDemand(file, config.tie_embeddings)
            check_weights(path, tensors.meta(), model)
            if weights == "int8":
                quantize_model(model, tensors.rows)
            fill_parameters(model, tensors.rows, torch.bfloat16 if weights == "bf16" else None)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file fails in several ways
        raise _unreadable(path, e) from None
    if tensors.nonfinite:
        raise _nonfinite(path, tensors.nonfinite)
    return model


def read_checkpoint_yaml(file: str | Path) -> dict:
    """A checkpoint's config.yaml as a dict; a damaged one (not YAML, not a mapping) is a
    CheckpointError that names the checkpoints to use instead."""
    try:
        return load_yaml(file)
    except ConfigError as e:
        raise CheckpointError(f"{e}\nthe checkpoint's config.yaml is damaged; "
                              f"{another_checkpoint_hint(Path(file).parent)}") from None


def load_model_config(path: str | Path) -> SparseSSMConfig:
    """The `model` section of a checkpoint's config.yaml (keys added since it was written take the
    values that describe it: `SparseSSMConfig.from_saved`)."""
    return SparseSSMConfig.from_saved(read_checkpoint_yaml(Path(path) / CONFIG).get("model"))


def load_model(path: str | Path, device="cpu", weights: str = "fp32") -> SparseSSMForCausalLM:
    """The model of a checkpoint directory, in eval mode on `device` (refused before anything is
    allocated when its config describes a model larger than the free memory), with its weights
    as `weights`: fp32 (as stored), bf16 (the whole model cast; the scan and its state stay
    float32) or int8 (weight-only, `quantize`; never a float copy of the quantised maps)."""
    if weights not in WEIGHT_FORMATS:
        raise CheckpointError(f"weights {weights!r}: expected one of {', '.join(WEIGHT_FORMATS)}")
    path, device = Path(path), torch.device(device)
    config = load_model_config(path)
    fix = (f"its config.yaml describes a model too large for this machine: load it where more memory is free, "
           f"or pick another checkpoint")
    # the weights are read on the CPU, into the model (one copy: `_load_weights`), then moved to `device`
    MemoryNeed.inference(config).check(f"checkpoint {path}", "cpu", fix, CheckpointError)
    if device.type != "cpu":
        MemoryNeed.inference(config).check(f"checkpoint {path}", device, fix, CheckpointError)
    return _load_weights(path / WEIGHTS, config, weights).to(device).eval()
