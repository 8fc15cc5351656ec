"""The model floor: the selective SSM layer, the residual block, the causal LM (forward /
prefill / step), its fused loss, its config section and the checkpoint files of a model."""

from .config import SparseSSMConfig
from .layer import LayerState, SelectiveSSMLayer
from .lm import CausalLMOutput, SparseSSMForCausalLM

__all__ = ["SparseSSMConfig", "SparseSSMForCausalLM", "CausalLMOutput", "LayerState", "SelectiveSSMLayer"]
