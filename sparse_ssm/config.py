"""The whole configuration of a run: one typed section per floor, read from YAML.

    config = Config.load("config/small_cpu.yaml", ["training.max_steps=50"])   # --set overrides
    config.model, config.training, config.optimizer, config.scheduler, config.dataset,
    config.generation, config.synthetic, config.distillation

Each section is defined beside what it configures (`model.config`, `data.config`,
`generate.settings`, `train.config`, `teacher.config`); this module only aggregates them.
Unknown sections or keys, wrong types and invalid values raise a `ConfigError` that names the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .data.config import DatasetConfig
from .generate.settings import GenerationConfig
from .model.checkpoint import read_checkpoint_yaml
from .model.config import SparseSSMConfig, complete_saved
from .teacher.config import SyntheticConfig
from .train.config import DistillationConfig, OptimizerConfig, SchedulerConfig, TrainingConfig
from .util.errors import ConfigError
from .util.files import atomic_write_text
from .util.schema import config_error, load_yaml, parse_value

__all__ = ["Config", "ConfigError", "SparseSSMConfig", "load_yaml"]


class Config(BaseModel):
    """A whole configuration file: one typed section each (missing sections take their defaults)."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)

    model: SparseSSMConfig = Field(default_factory=SparseSSMConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    distillation: DistillationConfig = Field(default_factory=DistillationConfig)

    @model_validator(mode="after")
    def _check_consistency(self):
        if self.dataset.max_seq_len > self.model.max_seq_len:
            raise ValueError(f"dataset.max_seq_len: ({self.dataset.max_seq_len}) must not exceed model.max_seq_len "
                             f"({self.model.max_seq_len})")
        return self

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        data = {name: ({} if value is None else value) for name, value in data.items()}
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise config_error(e, cls, "") from None

    @classmethod
    def load(cls, path, overrides: Sequence[str] = (), saved: bool = False) -> "Config":
        """Read a YAML file and apply dotted overrides such as 'training.num_epochs=1'.  saved: the
        file is a run's or checkpoint's own config.yaml, whose model section lacks only keys added
        since it was written; those take the values that describe it (`model.config.SAVED_BEFORE_KEY`)."""
        data = read_checkpoint_yaml(path) if saved else load_yaml(path)
        if saved and "model" in data:
            data["model"] = complete_saved(data["model"])
        for item in overrides:
            key, sep, value = item.partition("=")
            parts = key.strip().split(".")
            if not sep or len(parts) != 2 or not all(parts):
                raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. training.num_epochs=1")
            section = data.setdefault(parts[0], {})
            if section is None:
                section = data[parts[0]] = {}
            if not isinstance(section, dict):
                raise ConfigError(f"{parts[0]}: expected a mapping, got {type(section).__name__}")
            section[parts[1]] = parse_value(value)
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return self.model_dump()

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path):
        atomic_write_text(path, self.to_yaml())
