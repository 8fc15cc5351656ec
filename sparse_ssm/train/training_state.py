"""The resume state of a checkpoint (optimizer, scheduler, scaler, loop position, RNG), stored
without pickle: reading it can run no code.

    training_state.safetensors   every tensor: the optimizer's moments and step counts, the RNG states
    training_state.json          everything else, each tensor replaced by its name in the file above:

        {"format": 1,
         "optimizer": {"state": {FQN: {"step": {"__tensor__": "optimizer/state/FQN/step"}, "exp_avg": ...}},
                       "param_groups": [{"params": [FQN, ...], "lr": 0.003, "betas": {"__tuple__": [0.9, 0.95]},
                                         ...}]},
         "scheduler": {"last_epoch": 2, ...}, "scaler": {...}, "state": {"step": 2, ...},
         "rng_cpu": {"__tensor__": "rng_cpu"}, "rng_cuda": null | [{"__tensor__": "rng_cuda/0"}, ...]}

The optimizer part is `get_optimizer_state_dict`'s full state dict (parameters named by their
fully qualified names, so it loads under DDP, FSDP or in one process).  Values may be dicts with
string keys, lists, tuples, strings, ints, floats, bools, None and tensors; the file is strict
JSON (tuples are {"__tuple__": [...]}, inf and nan {"__float__": "inf"}).

Checkpoints written before this format hold `training_state.pt`, a pickle of the same dict.  It
is read with `torch.load(weights_only=True)`, whose unpickler builds only tensors and plain
containers and values; a file that needs anything else (a class, a function call) is refused.
"""

from __future__ import annotations

import json
import math
import pickle
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..model.checkpoint import another_checkpoint_hint
from ..util.errors import CheckpointError
from ..util.files import atomic_path, atomic_write_text

STATE_JSON, STATE_TENSORS, LEGACY_STATE = "training_state.json", "training_state.safetensors", "training_state.pt"
FORMAT = 1
_TENSOR, _TUPLE, _FLOAT = "__tensor__", "__tuple__", "__float__"    # JSON has no tensors, tuples, inf or nan


def _encode(value, name: str, tensors: dict):
    """`value` as JSON, its tensors moved to `tensors` under their path of keys (`name`)."""
    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().cpu().contiguous()
        return {_TENSOR: name}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value) or set(value) & {_TENSOR, _TUPLE, _FLOAT}:
            raise TypeError(f"training state {name!r}: a dict needs string keys other than {_TENSOR}/{_TUPLE}/{_FLOAT}")
        return {k: _encode(v, f"{name}/{k}" if name else k, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]
        return {_TUPLE: items} if isinstance(value, tuple) else items
    if isinstance(value, float) and not math.isfinite(value):
        return {_FLOAT: repr(value)}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"training state {name!r}: cannot store a {type(value).__name__}")


def _decode(value, tensors: dict, where: Path):
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            if value[_TENSOR] not in tensors:
                raise CheckpointError(f"{where}: names tensor {value[_TENSOR]!r}, which {STATE_TENSORS} lacks; the "
                                      f"checkpoint is damaged, resume from another one")
            return tensors[value[_TENSOR]]
        if set(value) == {_TUPLE}:
            return tuple(_decode(v, tensors, where) for v in value[_TUPLE])
        if set(value) == {_FLOAT} and value[_FLOAT] in ("inf", "-inf", "nan"):
            return float(value[_FLOAT])
        return {k: _decode(v, tensors, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    return value


def write_training_state(folder: Path, state: dict):
    """Write `state` (see the module docstring) as training_state.json + .safetensors in `folder`."""
    tensors: dict = {}
    body = {"format": FORMAT, **_encode(state, "", tensors)}
    with atomic_path(folder / STATE_TENSORS) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_text(folder / STATE_JSON, json.dumps(body, indent=1, allow_nan=False))


def read_training_state(folder: Path) -> dict:
    """The resume state of checkpoint `folder`: from training_state.json + .safetensors, or from
    the pickled training_state.pt of an older checkpoint when it holds only tensors and plain values."""
    folder = Path(folder)
    if (folder / STATE_JSON).is_file():
        try:
            body = json.loads((folder / STATE_JSON).read_text())
            tensors = load_file(str(folder / STATE_TENSORS), device="cpu")
        except Exception as e:  # noqa: BLE001 - JSON, OS and safetensors errors alike
            raise CheckpointError(f"the training state of {folder} is unreadable ({type(e).__name__}: {str(e)[:200]}); "
                                  f"resume from another checkpoint") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise CheckpointError(f"{folder / STATE_JSON}: not a training state of format {FORMAT} (this version of "
                                  f"sparse-ssm writes and reads format {FORMAT}); resume from another checkpoint")
        body.pop("format")
        return _finite_optimizer_state(_decode(body, tensors, folder / STATE_JSON), folder)
    if (folder / LEGACY_STATE).is_file():
        return _finite_optimizer_state(_read_legacy(folder / LEGACY_STATE), folder)
    raise CheckpointError(f"checkpoint {folder} holds no training state ({STATE_JSON} and {STATE_TENSORS}): it can "
                          f"be used for generate and evaluate, but not resumed; resume from another checkpoint")


def _nonfinite(value, name: str = "") -> list[str]:
    """The names (paths of keys) of the floating-point tensors in `value` that hold NaN or inf."""
    if isinstance(value, torch.Tensor):
        return [name] if value.is_floating_point() and not bool(torch.isfinite(value).all()) else []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    return [bad for key, item in items for bad in _nonfinite(item, f"{name}/{key}" if name else str(key))]


def _finite_optimizer_state(state: dict, folder: Path) -> dict:
    """`state`, or a CheckpointError when its optimizer moments hold NaN or inf (every later step
    from it would be non-finite)."""
    bad = _nonfinite(state.get("optimizer", {}) if isinstance(state, dict) else {})
    if bad:
        raise CheckpointError(f"the training state of {folder} holds NaN or inf in {len(bad)} optimizer tensor(s) "
                              f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): the checkpoint is corrupt "
                              f"and cannot be resumed; {another_checkpoint_hint(folder)}")
    return state


def _read_legacy(path: Path) -> dict:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # (torch's note on the pickle protocol)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = (str(e).split("WeightsUnpickler error:", 1)[-1].strip().splitlines() or [""])[0].split(". ")[0][:160]
        raise CheckpointError(
            f"{path} was not loaded: it is a pickle that needs more than tensors and plain values "
            f"({detail}), and loading it could run code. sparse-ssm never writes such a file, "
            f"so the checkpoint was altered or comes from elsewhere. Resume from a checkpoint you trust (newer "
            f"checkpoints store this state as {STATE_JSON} + {STATE_TENSORS}, which cannot run code); its "
            f"model.safetensors alone is safe for generate and evaluate") from None
    except Exception as e:  # noqa: BLE001 - a damaged file fails in several ways
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {str(e)[:200]}); resume from another "
                              f"checkpoint") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of training state, got {type(state).__name__}; resume from "
                              f"another checkpoint")
    return state
