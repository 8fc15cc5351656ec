"""The sections that configure training: `training`, `optimizer`, `scheduler`, `distillation`."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from ..util.device import is_device_name
from ..util.schema import Section


class TrainingConfig(Section):
    section = "training"

    num_epochs: int = Field(3, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)         # optimizer steps; stops before num_epochs when reached
    batch_size: int = Field(8, ge=1)                     # sequences per process and micro-step
    gradient_accumulation_steps: int = Field(2, ge=1)
    max_grad_norm: float = Field(1.0, ge=0.0)            # 0 disables clipping
    logging_steps: int = Field(100, ge=1)
    save_steps: int = Field(1000, ge=1)
    eval_steps: int = Field(1000, ge=1)
    eval_max_batches: Optional[int] = Field(None, ge=1)  # cap on validation batches per evaluation
    save_total_limit: int = Field(3, ge=1)               # step checkpoints kept (best/ is kept apart)
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    gradient_checkpointing: bool = True
    compile: bool = False                                # torch.compile the model
    seed: int = 42
    output_dir: str = "outputs/sparse_ssm"
    device: str = "auto"                                 # auto | cpu | cuda | cuda:N | mps
    max_consecutive_nonfinite: int = Field(10, ge=1)     # stop after this many non-finite losses in a row
    distributed_timeout_s: int = Field(600, ge=1)        # torchrun: a collective waiting longer ends the job
    distributed: Literal["ddp", "fsdp"] = "ddp"          # torchrun: replicate (DDP) or shard (FSDP2) the model
    progress_bar: bool = True

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not is_device_name(value):
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps, got {value!r}")
        return value


class OptimizerConfig(Section):
    section = "optimizer"

    name: Literal["adamw"] = "adamw"
    learning_rate: float = Field(5e-4, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    use_param_groups: bool = True                        # no decay for norms/biases/embeddings/SSM bases
    selective_param_lr_multiplier: float = Field(1.5, gt=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    eps: float = Field(1e-8, gt=0.0)


class SchedulerConfig(Section):
    """Linear warm-up from 0, then cosine / linear decay to min_lr_ratio, or constant."""

    section = "scheduler"

    name: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(1000, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)


class DistillationConfig(Section):
    """Knowledge distillation from the teacher's stored top-k log-probabilities (a
    `create-synthetic --distillation` dataset):
    loss = (1 - alpha) * CE(labels) + alpha * temperature^2 * KL(teacher_T || student_T)."""

    section = "distillation"

    enabled: bool = False
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    temperature: float = Field(1.0, gt=0.0)      # > 1 softens, but then the unknown tail mass counts as one token
