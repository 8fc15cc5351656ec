"""sparse-ssm: selective state space language models with structured-sparse state matrices.

Floors, each importing only the ones below it (see docs/design.md):
`util` < `ssm` < `model` < `data`, `generate`, `train`, `teacher`, `hf`, `serve` < `tasks` (the
synthetic tasks that train small models to evaluate a layer; nothing in `train` imports them) <
`config`, `cli`.

The transformers classes (`SparseSSMHFConfig`, `SparseSSMHFForCausalLM`) are imported on first
use, since `import transformers` takes seconds: `import sparse_ssm.hf` (or reading one of those
names here) registers model_type "sparse_ssm" with `AutoConfig` / `AutoModelForCausalLM`.
"""

import os

# OpenMP threads waiting for work sleep instead of spinning (unless OMP_WAIT_POLICY is set already):
# with torch's spinning default, a busy neighbour on one core slows a two-thread run several-fold,
# while idle speed is the same either way (bench/results/threads.md).  OpenMP reads this when torch
# loads, so it acts only where sparse_ssm is imported before torch (main.py, the sparse-ssm script).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .model import CausalLMOutput, SparseSSMConfig, SparseSSMForCausalLM  # noqa: E402
from .util.errors import ConfigError, SparseSSMError  # noqa: E402

__all__ = ["ConfigError", "SparseSSMError", "SparseSSMConfig", "SparseSSMForCausalLM", "CausalLMOutput",
           "SparseSSMHFConfig", "SparseSSMHFForCausalLM"]
__version__ = "0.1.0"

HF_NAMES = ("SparseSSMHFConfig", "SparseSSMHFForCausalLM")


def __getattr__(name):
    if name in HF_NAMES:
        from . import hf
        return getattr(hf, name)
    raise AttributeError(f"module 'sparse_ssm' has no attribute {name!r}")
