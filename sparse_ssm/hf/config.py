"""`SparseSSMHFConfig`: the `model` section (`SparseSSMConfig`) as a transformers `PretrainedConfig`
(model_type "sparse_ssm"), so that `config.json` holds every model key and `AutoConfig` reads it.

The keys are taken from `SparseSSMConfig.model_fields`, whatever they are, so a key added to the
model section is exported without a change here."""

from __future__ import annotations

from transformers import PretrainedConfig

from ..model import SparseSSMConfig

MODEL_TYPE = "sparse_ssm"


class SparseSSMHFConfig(PretrainedConfig):
    model_type = MODEL_TYPE
    # the names transformers and lm-evaluation-harness look for
    attribute_map = {"hidden_size": "hidden_dim", "num_hidden_layers": "num_layers",
                     "max_position_embeddings": "max_seq_len", "tie_word_embeddings": "tie_embeddings"}

    def __init__(self, **kwargs):
        for name, field in SparseSSMConfig.model_fields.items():
            setattr(self, name, kwargs.pop(name, field.get_default(call_default_factory=True)))
        super().__init__(**kwargs)

    def to_sparse_ssm(self) -> SparseSSMConfig:
        """The `model` section these values describe (validated: a bad config.json is a ConfigError)."""
        return SparseSSMConfig.from_dict({name: getattr(self, name) for name in SparseSSMConfig.model_fields})

    @classmethod
    def from_sparse_ssm(cls, config: SparseSSMConfig, **kwargs) -> "SparseSSMHFConfig":
        """From a `model` section; kwargs: transformers' own keys (eos_token_id, pad_token_id, ...)."""
        return cls(**config.to_dict(), **kwargs)
