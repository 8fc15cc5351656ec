"""The Hugging Face floor: our config and LM as transformers classes, their recurrent cache for
`generate`, and the export of a checkpoint to a Hugging Face model directory.

Importing this package registers model_type "sparse_ssm" with `AutoConfig` and
`AutoModelForCausalLM` (transformers is imported here, never by `import sparse_ssm` alone).  An
exported directory also loads without importing sparse_ssm first, through its auto_map files:
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.
Imports `ssm`, `model`, `data`, `generate` and `util` only."""

from transformers import AutoConfig, AutoModelForCausalLM

from .config import MODEL_TYPE, SparseSSMHFConfig
from .export import export_checkpoint, export_model
from .modeling import SparseSSMHFCache, SparseSSMHFForCausalLM

AutoConfig.register(MODEL_TYPE, SparseSSMHFConfig, exist_ok=True)
AutoModelForCausalLM.register(SparseSSMHFConfig, SparseSSMHFForCausalLM, exist_ok=True)

__all__ = ["SparseSSMHFConfig", "SparseSSMHFForCausalLM", "SparseSSMHFCache", "export_checkpoint", "export_model"]
