"""The train floor: training / optimizer / scheduler / distillation config, optimizer and
schedule, distributed helpers, batch order, checkpoint manager, monitor, evaluation, losses,
and the Trainer that composes them.  Never imports `teacher` or `tasks` (the synthetic tasks
that evaluate a layer live on their own floor above this one)."""

from .checkpoints import CheckpointManager
from .config import DistillationConfig, OptimizerConfig, SchedulerConfig, TrainingConfig
from .distributed import Processes, shutdown_distributed
from .trainer import Trainer

__all__ = ["CheckpointManager", "DistillationConfig", "OptimizerConfig", "SchedulerConfig", "TrainingConfig",
           "Processes", "shutdown_distributed", "Trainer"]
