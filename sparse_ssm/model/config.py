"""The `model` section: the architecture of a sparse-ssm language model.

Defaults are the seed document's (a GPU-size model); `config/small_cpu.yaml` is a small one.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from ..ssm.structures.householder import INITIAL_REFLECTION_LOGIT
from ..util.schema import Section

POSITIVE = Field(ge=1)

# Keys added after runs first saved their config, with the value that describes a run whose saved
# config.yaml (a complete dump of this section when it was written) lacks them.  A config file a user
# writes takes the current defaults instead: only `from_saved` fills these in.
SAVED_BEFORE_KEY = {"weight_init": "gpt2"}

# What the layers outside `structured_layers` take in place of the model's values: the default
# diagonal model's SSM (Mamba's: blocks of 1, eigenvalues in (0, 1], the input through B, dt from
# dt_min to dt_max at their defaults), whatever keys the structured layers' class needed.
DIAGONAL_LAYER_KEYS = ("selective_param_class", "sparsity_pattern", "eigenvalue_range", "discretization",
                       "rotation_angle_grid", "exact_reflections", "reflection_init_logit",
                       "reflection_init_logit_last", "reflection_range", "reflection_input", "reflection_decay",
                       "dt_min", "dt_max", "structured_layers")


class SparseSSMConfig(Section):
    """Hyper-parameters of `SparseSSMForCausalLM` (see the README's `model` table)."""

    section = "model"

    vocab_size: int = Field(50000, ge=1)
    hidden_dim: int = Field(768, ge=1)
    state_dim: int = Field(128, ge=1)
    ffn_dim: int = Field(2048, ge=0)                 # 0: no feed-forward sublayer (a pure Mamba-style block)
    num_layers: int = Field(12, ge=1)
    max_seq_len: int = Field(1024, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    activation: Literal["gelu", "gelu_tanh", "silu", "relu"] = "gelu"
    selective_param_class: Literal["dense", "sparse", "low_rank", "rotation", "permutation", "householder"] = "sparse"
    sparsity_level: float = Field(0.9, ge=0.0, lt=1.0)
    sparsity_pattern: Literal["block", "banded"] = "block"
    low_rank_rank: int = Field(2, ge=1)              # low_rank: rank of U V^T; householder: reflections per token
    use_parallel_scan: bool = True
    selective: bool = True                           # false: the time-invariant ablation
    scan_chunk_size: Optional[int] = Field(None, ge=1)   # None: per device (ssm.scan.chunk_size_for)
    expand: int = Field(2, ge=1)
    num_heads: Optional[int] = Field(None, ge=1)     # None: expand * hidden_dim / 64
    num_groups: int = Field(1, ge=1)                 # B_t, C_t are shared by the heads of a group
    a_generator_rank: Optional[int] = Field(None, ge=1)   # bottleneck of the A_t generator; None: ceil(hidden/16)
    conv_kernel: int = Field(4, ge=1)
    hippo_init: Literal["legs", "legt", "fourier", "random"] = "legs"
    discretization: Literal["auto", "zoh", "bilinear", "gbt"] = "auto"   # auto: zoh for diagonal/rotation, else bilinear
    eigenvalue_range: Literal["positive", "signed"] = "positive"   # diagonal/householder decay: (0, 1] or (-1, 1]
    rotation_angle_grid: int = Field(0, ge=0)        # rotation: pairs exact elements of Z_K (magnitude 1); 0: off
    exact_reflections: bool = False                  # householder: each beta 0 or 2, decay 1 (orthogonal A_bar)
    reflection_init_logit: float = INITIAL_REFLECTION_LOGIT   # householder: b of beta = 2 sigmoid(b) at first
    reflection_init_logit_last: Optional[float] = None   # householder: the last head's b; heads evenly spaced between
    reflection_range: Literal["open", "closed"] = "open"   # householder: beta in (0, 2), or [0, 2] (exact flips)
    reflection_input: Literal["b", "delta", "both"] = "b"   # householder: input through B, by delta writes, or both
    reflection_decay: bool = True                    # householder: false holds every decay at 1 (delta writes only)
    structured_layers: Optional[list[int]] = None    # layers (from 0; -1 the last) with the class; others diagonal. None: all
    learned_initial_state: bool = False              # each layer learns its SSM state before the first token
    gbt_alpha: float = Field(0.5, ge=0.0, le=1.0)
    dt_min: float = Field(0.001, gt=0.0)
    dt_max: float = Field(0.1, gt=0.0)
    tie_embeddings: bool = True
    norm_eps: float = Field(1e-5, gt=0.0)
    initializer_range: float = Field(0.02, ge=0.0)
    weight_init: Literal["mamba", "gpt2"] = "mamba"  # linear maps: mamba_ssm's init, or N(0, initializer_range)

    @classmethod
    def from_saved(cls, data: dict | None) -> "SparseSSMConfig":
        """The model section of a run's or checkpoint's saved config.yaml (see SAVED_BEFORE_KEY)."""
        return cls.from_dict(complete_saved(data))

    def layer_config(self, index: int) -> "SparseSSMConfig":
        """The config layer `index` (0 to num_layers - 1) is built from: this one, or for a layer
        outside `structured_layers` a copy with the default diagonal model's SSM keys
        (DIAGONAL_LAYER_KEYS; the sparsity of blocks of 1) and every other key as here (sizes, the
        A generator's rank, conv, learned_initial_state, init).  A copy: a key changed on this
        config after the model is built does not reach the diagonal layers."""
        return self if self.structured_layers is None or index in self.structured_indices else self.diagonal_layer()

    def diagonal_layer(self) -> "SparseSSMConfig":
        """The config of a layer outside `structured_layers` (see `layer_config`)."""
        defaults = {key: type(self).model_fields[key].default for key in DIAGONAL_LAYER_KEYS}
        return self.model_copy(update={**defaults, "sparsity_level": 1.0 - 1.0 / self.state_dim})

    @property
    def structured_indices(self) -> list[int]:
        """`structured_layers` counted from 0 (a negative index from the end, as Python's); all without it."""
        layers = range(self.num_layers)
        return list(layers) if self.structured_layers is None else sorted(layers[i] for i in self.structured_layers)

    @property
    def inner_dim(self) -> int:
        return self.expand * self.hidden_dim

    @property
    def resolved_num_heads(self) -> int:
        return self.num_heads if self.num_heads is not None else max(1, self.inner_dim // 64)

    @property
    def resolved_a_generator_rank(self) -> int:
        return self.a_generator_rank if self.a_generator_rank is not None else -(-self.hidden_dim // 16)

    @property
    def head_dim(self) -> int:
        return self.inner_dim // self.resolved_num_heads

    @property
    def is_diagonal(self) -> bool:
        """The sparse class at a sparsity whose blocks have size 1 (the Mamba case)."""
        from ..ssm.hippo import block_size_for
        return self.selective_param_class == "sparse" and block_size_for(self.state_dim, self.sparsity_level) == 1

    @property
    def resolved_discretization(self) -> str:
        """`auto`: the exact zero-order hold where it is cheap (diagonal, rotation, the diagonal of
        the permutation and householder structures), the bilinear transform for block, banded, dense
        and low-rank A_t (its fused kernel solves a small system per block; ZOH would need a matrix
        exponential per token)."""
        if self.discretization != "auto":
            return self.discretization
        return "zoh" if self.is_diagonal or self.selective_param_class in ("rotation", "permutation", "householder") \
            else "bilinear"

    @model_validator(mode="after")
    def _check_relations(self):
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min: need dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        if self.num_heads is not None and self.inner_dim % self.num_heads:
            raise ValueError(f"num_heads: must divide expand * hidden_dim = {self.inner_dim}, got {self.num_heads}")
        if self.resolved_num_heads % self.num_groups:
            raise ValueError(f"num_groups: must divide the number of heads ({self.resolved_num_heads}), "
                             f"got {self.num_groups}")
        if self.low_rank_rank > self.state_dim:
            raise ValueError(f"low_rank_rank: must be <= state_dim ({self.state_dim}), got {self.low_rank_rank}")
        if self.hippo_init == "fourier" and self.state_dim % 2:
            raise ValueError(f"hippo_init: 'fourier' needs an even state_dim, got {self.state_dim}")
        if self.selective_param_class == "rotation" and self.state_dim % 2:
            raise ValueError(f"state_dim: 'rotation' pairs the states and needs an even state_dim, got {self.state_dim}")
        if self.eigenvalue_range == "signed" and not (self.is_diagonal or self.selective_param_class == "householder"):
            raise ValueError("eigenvalue_range: 'signed' applies to the diagonal structure (selective_param_class "
                             "'sparse' with blocks of 1) and to householder's decay; rotation blocks reach negative eigenvalues through their "
                             "angle, block/dense/low-rank ones through the bilinear discretisation, permutation ones "
                             "by moving the states")
        if self.rotation_angle_grid and self.selective_param_class != "rotation":
            raise ValueError(f"rotation_angle_grid: snaps the turns of rotation pairs (selective_param_class "
                             f"'rotation'); set it to 0 for '{self.selective_param_class}'")
        for key, is_set in (("exact_reflections", self.exact_reflections),
                            ("reflection_init_logit", self.reflection_init_logit != INITIAL_REFLECTION_LOGIT),
                            ("reflection_init_logit_last", self.reflection_init_logit_last is not None),
                            ("reflection_range", self.reflection_range != "open"),
                            ("reflection_input", self.reflection_input != "b"),
                            ("reflection_decay", not self.reflection_decay)):
            if is_set and self.selective_param_class != "householder":
                raise ValueError(f"{key}: applies to the reflections of selective_param_class 'householder'; "
                                 f"leave it at its default for '{self.selective_param_class}'")
        if self.exact_reflections and self.reflection_input != "b":
            raise ValueError("exact_reflections: snapped reflections take no input into the state, but "
                             f"reflection_input '{self.reflection_input}' writes it along their keys; use one of the two")
        if not self.reflection_decay and self.eigenvalue_range == "signed":
            raise ValueError("eigenvalue_range: 'signed' flips householder's decay (2 d - 1), which reflection_decay: "
                             "false holds at 1; use one of the two")
        if not self.reflection_decay and self.reflection_input != "delta":
            raise ValueError("reflection_decay: false holds every decay at 1, so only delta writes may enter the state "
                             f"(an input through B would add up without bound); set reflection_input: delta, not "
                             f"'{self.reflection_input}'")
        for key in ("rotation_angle_grid", "exact_reflections"):
            if getattr(self, key) and not self.learned_initial_state:
                raise ValueError(f"{key}: exact transitions take no inputs into the state (B = 0), so it only moves "
                                 f"where it starts; set learned_initial_state: true")
        if self.structured_layers is not None:
            self._check_structured_layers()
        if self.selective_param_class == "low_rank" and self.discretization == "zoh":
            raise ValueError("discretization: 'zoh' is not available for selective_param_class 'low_rank' (the "
                             "exponential of a diagonal-plus-low-rank matrix is dense); use 'bilinear' or 'gbt'")
        return self

    def _check_structured_layers(self):
        layers = self.structured_layers
        if not layers:
            raise ValueError("structured_layers: name at least one layer (an empty list leaves every layer "
                             "diagonal: set selective_param_class instead), or leave it unset for all")
        if any(not -self.num_layers <= i < self.num_layers for i in layers):
            raise ValueError(f"structured_layers: each index must be in [-{self.num_layers}, {self.num_layers}) "
                             f"for num_layers {self.num_layers}, got {layers}")
        if len(set(self.structured_indices)) != len(layers):
            raise ValueError(f"structured_layers: names a layer twice, got {layers}")


def complete_saved(data):
    """A saved model section with the keys added since it was written (SAVED_BEFORE_KEY) set to the
    values that describe it; anything that is not a mapping is returned as is (for the error)."""
    return {**SAVED_BEFORE_KEY, **data} if isinstance(data, dict) else data
