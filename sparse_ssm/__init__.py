"""sparse-ssm: selective state space language models with structured-sparse state matrices."""

from .config import ConfigError, SparseSSMConfig
from .lm import CausalLMOutput, SparseSSMForCausalLM

__all__ = ["ConfigError", "SparseSSMConfig", "SparseSSMForCausalLM", "CausalLMOutput"]
__version__ = "0.1.0"
