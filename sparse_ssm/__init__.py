"""sparse-ssm: selective state space language models with structured-sparse state matrices.

Floors, each importing only the ones below it (see the README's Design section):
`util` < `ssm` < `model` < `data`, `generate`, `train`, `teacher`, `hf`, `serve` < `config`, `cli`.

The transformers classes (`SparseSSMHFConfig`, `SparseSSMHFForCausalLM`) are imported on first
use, since `import transformers` takes seconds: `import sparse_ssm.hf` (or reading one of those
names here) registers model_type "sparse_ssm" with `AutoConfig` / `AutoModelForCausalLM`.
"""

from .model import CausalLMOutput, SparseSSMConfig, SparseSSMForCausalLM
from .util.errors import ConfigError, SparseSSMError

__all__ = ["ConfigError", "SparseSSMError", "SparseSSMConfig", "SparseSSMForCausalLM", "CausalLMOutput",
           "SparseSSMHFConfig", "SparseSSMHFForCausalLM"]
__version__ = "0.1.0"

HF_NAMES = ("SparseSSMHFConfig", "SparseSSMHFForCausalLM")


def __getattr__(name):
    if name in HF_NAMES:
        from . import hf
        return getattr(hf, name)
    raise AttributeError(f"module 'sparse_ssm' has no attribute {name!r}")
