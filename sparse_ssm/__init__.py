"""sparse-ssm: selective state space language models with structured-sparse state matrices.

Floors, each importing only the ones below it (see the README's Design section):
`util` < `ssm` < `model` < `data`, `generate`, `train`, `teacher` < `config`, `cli`.
"""

from .model import CausalLMOutput, SparseSSMConfig, SparseSSMForCausalLM
from .util.errors import ConfigError, SparseSSMError

__all__ = ["ConfigError", "SparseSSMError", "SparseSSMConfig", "SparseSSMForCausalLM", "CausalLMOutput"]
__version__ = "0.1.0"
