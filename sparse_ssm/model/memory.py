"""The memory a model needs, from its config alone (nothing is allocated), against the memory the
machine has free: a config too large to run fails at once with both numbers, instead of
allocating for minutes and ending in an out-of-memory traceback.

    needed = MemoryNeed.inference(config, tokens=256)           # or .training(config, batch, seq, ...)
    needed.check("inspect", device, fix="lower model.hidden_dim or model.num_layers")

The estimates are lower bounds: float32 weights, and of the activations only the tensors every
layer keeps (not the scan's intermediate states or the allocator's slack).  A refused config
cannot run; one that passes may still run out of memory later.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..util.errors import ConfigError
from .config import SparseSSMConfig

GIB = 1024 ** 3
FLOAT32 = 4
_EXACT_STRUCTURE_UP_TO = 4096     # state_dim up to which the structure is built for its size (cheap)


def _raw_size(config: SparseSSMConfig) -> int:
    """Values per head of A_t's structure (its exact size up to a moderate state_dim, above it the
    smallest any structure has: state_dim)."""
    N = config.state_dim
    if N > _EXACT_STRUCTURE_UP_TO:
        return N
    from ..ssm.structures import make_structure

    return make_structure(config.selective_param_class, N, config.sparsity_level, config.low_rank_rank,
                          config.sparsity_pattern).raw_size


def parameter_count(config: SparseSSMConfig) -> int:
    """The parameters of `SparseSSMForCausalLM(config)` (exact up to a state_dim of 4096)."""
    D, E, H, N, G = config.hidden_dim, config.inner_dim, config.resolved_num_heads, config.state_dim, config.num_groups
    r, F, L = config.resolved_a_generator_rank, config.ffn_dim, config.num_layers
    raw = sum(count * size for count, size in _raw_sizes(config))     # A_t's values per head, over the layers
    mixer = (D + 2 * D * E + E * config.conv_kernel + E + E * D       # norm, in_proj, conv, out_proj
             + E * (2 * H + r + 2 * G * N) + 2 * H                      # generator: proj, D, dt
             + (0 if config.selective else E) + (N * E if config.learned_initial_state else 0))
    ffn = D + 2 * D * F + F + D if F else 0
    embeddings = config.vocab_size * D * (1 if config.tie_embeddings else 2)
    return embeddings + L * (mixer + ffn) + (r * H + H) * raw + D      # + a_up and A_base of every layer


def _kept_per_token(config: SparseSSMConfig) -> int:
    """Activations one layer keeps for backward per token (a lower bound: of a hybrid's layer kinds,
    the one with the fewest A_t values): the block's and the norms' inputs, in_proj's and the conv's
    outputs, the generator's outputs, the scan's output and the FFN's hidden values."""
    D, E, H, G = config.hidden_dim, config.inner_dim, config.resolved_num_heads, config.num_groups
    return (3 * D + 4 * E + 2 * config.ffn_dim + 2 * H + config.resolved_a_generator_rank
            + 2 * G * config.state_dim + H * min(size for _, size in _raw_sizes(config)))


def _raw_sizes(config: SparseSSMConfig) -> list[tuple[int, int]]:
    """[(layers, A_t's values per head)]: the structured layers' and the diagonal ones' (`structured_layers`)."""
    structured = config.num_layers if config.structured_layers is None else len(config.structured_layers)
    diagonal = config.num_layers - structured
    return [(structured, _raw_size(config))] + ([(diagonal, _raw_size(config.diagonal_layer()))] if diagonal else [])


@dataclass
class MemoryNeed:
    """Bytes a use of a model needs at least, and what they are (for the message)."""

    bytes: int
    detail: str

    @classmethod
    def inference(cls, config: SparseSSMConfig, tokens: int = 1) -> "MemoryNeed":
        """Building the model and a forward pass (no gradients) over `tokens` tokens of one
        sequence."""
        n = parameter_count(config)
        init = config.state_dim ** 2 * 8                  # the float64 HiPPO matrix each layer starts from
        activations = tokens * (_kept_per_token(config) + config.vocab_size) * FLOAT32
        return cls(n * FLOAT32 + init + activations,
                   f"{n:,} parameters: {n * FLOAT32 / GIB:,.1f} GiB of float32 weights"
                   + (f"; the {config.state_dim} x {config.state_dim} HiPPO matrix each layer starts from: "
                      f"{init / GIB:,.1f} GiB" if init > GIB / 10 else ""))

    @classmethod
    def training(cls, config: SparseSSMConfig, batch_size: int, seq_len: int, gradient_checkpointing: bool,
                 mixed_precision: bool, shards: int = 1) -> "MemoryNeed":
        """One optimizer step: float32 weights, gradients and AdamW's two moments (16 bytes a
        parameter, split over `shards` FSDP processes) and the activations of batch x seq tokens."""
        n = parameter_count(config)
        tokens, per_layer = batch_size * seq_len, _kept_per_token(config)
        kept = (config.num_layers * config.hidden_dim + per_layer if gradient_checkpointing
                else config.num_layers * per_layer)
        activations = tokens * kept * (2 if mixed_precision else FLOAT32)
        states = 4 * n * FLOAT32 // shards
        return cls(states + activations,
                   f"{n:,} parameters: {states / GIB:,.1f} GiB of weights, gradients and AdamW states; "
                   f"activations of {batch_size} x {seq_len} tokens: {activations / GIB:,.1f} GiB")

    def check(self, what: str, device: torch.device | str, fix: str, error=ConfigError):
        """Raise `error` when the machine (`device`'s memory) has less free than this needs."""
        free = available_memory(torch.device(device))
        if free is not None and self.bytes > free[0]:
            raise error(f"{what} needs at least {self.bytes / GIB:,.1f} GiB ({self.detail}), but {free[1]} has "
                        f"{free[0] / GIB:,.1f} GiB available; {fix}")


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """(bytes free, where) for `device`: a CUDA device's free memory, else the machine's
    MemAvailable (/proc/meminfo, or psutil where installed); None where neither can be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"the GPU {device}"
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "this machine (MemAvailable)"
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return psutil.virtual_memory().available, "this machine"
