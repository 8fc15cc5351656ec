"""Device names of the configuration (`auto`, `cpu`, `cuda`, `cuda:N`, `mps`) to torch devices, and
what a CPU run computes with."""

from __future__ import annotations

import os

import torch

from .errors import ConfigError

DEVICE_NAMES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def is_device_name(name: str) -> bool:
    return name == "auto" or name.split(":")[0] in ("cpu", "cuda", "mps")


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; an unavailable CUDA device is a ConfigError."""
    if not is_device_name(name):
        raise ConfigError(f"device: must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} but no CUDA device is available; use 'cpu' or 'auto'")
    return device


def cpu_threads() -> str:
    """'2 torch threads (OMP_WAIT_POLICY=PASSIVE)': what a CPU run computes with, for its log."""
    return (f"{torch.get_num_threads()} torch thread{'s' * (torch.get_num_threads() != 1)} "
            f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})")
