"""Typed, validated configuration.

Each section is a dataclass; `from_dict` rejects unknown keys, wrong types and invalid values
with a `ConfigError` that names the offending key (``model.state_dim: ...``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the key."""


def _check_type(key: str, value, annotation):
    origin = typing.get_origin(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        annotation = next(a for a in options if a is not type(None))
    if origin is list:
        item = typing.get_args(annotation)[0]
        if not isinstance(value, list) or not all(isinstance(v, item) for v in value):
            raise ConfigError(f"{key}: expected a list of {item.__name__}, got {value!r}")
        return value
    if origin is typing.Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(annotation))}")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool) and (not isinstance(value, annotation)
                                                  or (annotation is int and isinstance(value, bool))):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls, data: dict | None, section: str):
    """Build dataclass `cls` from a mapping, validating keys and types; then `cls.validate()`."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{section}: expected a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}: unknown key; valid keys are: {', '.join(names)}")
    values = {k: _check_type(f"{section}.{k}", v, hints[k]) for k, v in data.items()}
    obj = cls(**values)
    obj.validate(section)
    return obj


def _require(cond: bool, key: str, message: str):
    if not cond:
        raise ConfigError(f"{key}: {message}")


@dataclass
class SparseSSMConfig:
    """The `model` section.  Defaults are the seed document's (a GPU-size model)."""

    vocab_size: int = 50000
    hidden_dim: int = 768
    state_dim: int = 128
    ffn_dim: int = 2048                      # 0: no feed-forward sublayer (a pure Mamba-style block)
    num_layers: int = 12
    max_seq_len: int = 1024
    dropout: float = 0.1
    activation: typing.Literal["gelu", "gelu_tanh", "silu", "relu"] = "gelu"
    selective_param_class: typing.Literal["dense", "sparse", "low_rank"] = "sparse"
    sparsity_level: float = 0.9
    sparsity_pattern: typing.Literal["block", "banded"] = "block"
    low_rank_rank: int = 2
    use_parallel_scan: bool = True
    selective: bool = True                   # false: the time-invariant ablation (dt, A, B, C, D not input-dependent)
    scan_chunk_size: int = 8
    expand: int = 2
    num_heads: typing.Optional[int] = None   # None: expand * hidden_dim / 64
    num_groups: int = 1                      # B_t, C_t are shared by the heads of a group
    a_generator_rank: typing.Optional[int] = None  # bottleneck of the A_t generator; None: ceil(hidden/16)
    conv_kernel: int = 4
    hippo_init: typing.Literal["legs", "legt", "fourier", "random"] = "legs"
    discretization: typing.Literal["zoh", "bilinear", "gbt"] = "zoh"
    gbt_alpha: float = 0.5
    dt_min: float = 0.001
    dt_max: float = 0.1
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    initializer_range: float = 0.02

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

    def validate(self, section: str = "model"):
        k = lambda name: f"{section}.{name}"
        for name in ("vocab_size", "hidden_dim", "state_dim", "num_layers", "max_seq_len", "expand",
                     "conv_kernel", "scan_chunk_size", "low_rank_rank"):
            _require(getattr(self, name) >= 1, k(name), f"must be >= 1, got {getattr(self, name)}")
        _require(self.a_generator_rank is None or self.a_generator_rank >= 1, k("a_generator_rank"),
                 f"must be >= 1 (or null for ceil(hidden_dim / 16)), got {self.a_generator_rank}")
        _require(self.ffn_dim >= 0, k("ffn_dim"), f"must be >= 0 (0 disables the FFN), got {self.ffn_dim}")
        _require(0.0 <= self.dropout < 1.0, k("dropout"), f"must be in [0, 1), got {self.dropout}")
        _require(0.0 <= self.sparsity_level < 1.0, k("sparsity_level"), f"must be in [0, 1), got {self.sparsity_level}")
        _require(0.0 <= self.gbt_alpha <= 1.0, k("gbt_alpha"), f"must be in [0, 1], got {self.gbt_alpha}")
        _require(0.0 < self.dt_min <= self.dt_max, k("dt_min"), f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        if self.num_heads is not None:
            _require(self.num_heads >= 1 and self.inner_dim % self.num_heads == 0, k("num_heads"),
                     f"must divide expand * hidden_dim = {self.inner_dim}, got {self.num_heads}")
        _require(self.num_groups >= 1 and self.resolved_num_heads % self.num_groups == 0, k("num_groups"),
                 f"must divide the number of heads ({self.resolved_num_heads}), got {self.num_groups}")
        _require(self.low_rank_rank <= self.state_dim, k("low_rank_rank"),
                 f"must be <= state_dim ({self.state_dim}), got {self.low_rank_rank}")
        _require(not (self.hippo_init == "fourier" and self.state_dim % 2), k("hippo_init"),
                 f"'fourier' needs an even state_dim, got {self.state_dim}")
        _require(not (self.selective_param_class == "low_rank" and self.discretization == "zoh"),
                 k("discretization"), "'zoh' is not available for selective_param_class 'low_rank' (the "
                 "exponential of a diagonal-plus-low-rank matrix is dense); use 'bilinear' or 'gbt'")

    @classmethod
    def from_dict(cls, data: dict | None, section: str = "model") -> "SparseSSMConfig":
        return from_dict(cls, data, section)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_yaml(path) -> dict:
    """Read a YAML config file into a dict, with errors that name the file."""
    import yaml
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist; pass an existing YAML file with --config "
                                f"(for example config/default_config.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, training, ...), got {type(data).__name__}")
    return data


@dataclass
class TrainingConfig:
    """The `training` section."""

    num_epochs: int = 3
    max_steps: typing.Optional[int] = None          # optimizer steps; stops before num_epochs when reached
    batch_size: int = 8
    gradient_accumulation_steps: int = 2
    max_grad_norm: float = 1.0                      # 0 disables clipping
    logging_steps: int = 100
    save_steps: int = 1000
    eval_steps: int = 1000
    eval_max_batches: typing.Optional[int] = None   # cap on validation batches per evaluation
    save_total_limit: int = 3                       # step checkpoints kept (best/ is kept apart)
    mixed_precision: typing.Literal["no", "fp16", "bf16"] = "fp16"
    gradient_checkpointing: bool = True
    compile: bool = False                           # torch.compile the model
    seed: int = 42
    output_dir: str = "outputs/sparse_ssm"
    device: str = "auto"                            # auto | cpu | cuda | cuda:N | mps
    max_consecutive_nonfinite: int = 10             # stop after this many non-finite losses in a row
    distributed_timeout_s: int = 600                # torchrun: a collective waiting longer ends the job
    distributed: typing.Literal["ddp", "fsdp"] = "ddp"   # torchrun: replicate (DDP) or shard (FSDP2) the model
    progress_bar: bool = True

    def validate(self, section: str = "training"):
        k = lambda name: f"{section}.{name}"
        for name in ("num_epochs", "batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps",
                     "eval_steps", "save_total_limit", "max_consecutive_nonfinite", "distributed_timeout_s"):
            _require(getattr(self, name) >= 1, k(name), f"must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_max_batches"):
            value = getattr(self, name)
            _require(value is None or value >= 1, k(name), f"must be >= 1 or null, got {value}")
        _require(self.max_grad_norm >= 0, k("max_grad_norm"), f"must be >= 0, got {self.max_grad_norm}")
        _require(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"), k("device"),
                 f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")


@dataclass
class OptimizerConfig:
    """The `optimizer` section."""

    name: typing.Literal["adamw"] = "adamw"
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    use_param_groups: bool = True
    selective_param_lr_multiplier: float = 1.5
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8

    def validate(self, section: str = "optimizer"):
        _require(self.learning_rate > 0, f"{section}.learning_rate", f"must be > 0, got {self.learning_rate}")
        _require(self.weight_decay >= 0, f"{section}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.selective_param_lr_multiplier > 0, f"{section}.selective_param_lr_multiplier",
                 f"must be > 0, got {self.selective_param_lr_multiplier}")
        for name in ("beta1", "beta2"):
            _require(0 <= getattr(self, name) < 1, f"{section}.{name}", f"must be in [0, 1), got {getattr(self, name)}")


@dataclass
class SchedulerConfig:
    """The `scheduler` section: linear warmup, then cosine / linear decay to min_lr_ratio, or constant."""

    name: typing.Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.1

    def validate(self, section: str = "scheduler"):
        _require(self.warmup_steps >= 0, f"{section}.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(0 <= self.min_lr_ratio <= 1, f"{section}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class DatasetConfig:
    """The `dataset` section."""

    type: typing.Literal["synthetic", "wikitext103", "pile", "custom"] = "synthetic"
    max_seq_len: int = 1024
    stride: int = 512
    data_path: typing.Optional[str] = "data/synthetic/phi4_dataset.json"
    val_split: float = 0.1
    test_split: float = 0.1
    text_field: str = "text"
    tokenizer_path: typing.Optional[str] = None     # an existing tokenizer.json; None: train a byte-level BPE
    tokenizer_vocab_size: typing.Optional[int] = None  # None: model.vocab_size (capped for small data)
    cache_dir: str = "data/cache"
    split_seed: int = 1234
    max_documents: typing.Optional[int] = None      # cap on documents read (streamed datasets: required)

    def validate(self, section: str = "dataset"):
        k = lambda name: f"{section}.{name}"
        _require(self.max_seq_len >= 2, k("max_seq_len"), f"must be >= 2, got {self.max_seq_len}")
        _require(1 <= self.stride <= self.max_seq_len, k("stride"),
                 f"must be in [1, max_seq_len = {self.max_seq_len}], got {self.stride}")
        _require(0 <= self.val_split < 1 and 0 <= self.test_split < 1 and self.val_split + self.test_split < 1,
                 k("val_split"), f"val_split + test_split must be < 1, got {self.val_split} + {self.test_split}")
        _require(self.tokenizer_vocab_size is None or self.tokenizer_vocab_size >= 260, k("tokenizer_vocab_size"),
                 f"must be >= 260 (bytes + special tokens), got {self.tokenizer_vocab_size}")
        _require(self.type in ("wikitext103", "pile") or self.data_path, k("data_path"),
                 f"is required for dataset type {self.type!r}")


@dataclass
class GenerationConfig:
    """The `generation` section: defaults of `main.py generate` (its flags override them)."""

    max_length: int = 100                  # new tokens
    temperature: float = 1.0               # 0: greedy
    top_k: int = 0                         # 0: off
    top_p: float = 1.0                     # 1: off
    repetition_penalty: float = 1.0        # 1: off
    seed: typing.Optional[int] = None
    stop_strings: typing.List[str] = dataclasses.field(default_factory=list)
    num_return_sequences: int = 1

    def validate(self, section: str = "generation"):
        from .generation import SamplingSettings
        try:
            SamplingSettings(self.max_length, self.temperature, self.top_k, self.top_p, self.repetition_penalty).validate()
        except ConfigError as e:
            raise ConfigError(f"{section}.{e}") from None
        _require(self.num_return_sequences >= 1, f"{section}.num_return_sequences",
                 f"must be >= 1, got {self.num_return_sequences}")


DEFAULT_TOPICS = ["the ocean", "a small village", "space travel", "ancient history", "cooking", "music",
                  "a rainy day", "friendship", "mathematics", "a lost key", "gardening", "the railway",
                  "a market town", "winter", "a young inventor", "the forest", "a letter from abroad", "bees",
                  "a storm at sea", "learning to read", "the moon", "a river journey", "an old clock", "chess"]
DEFAULT_STYLES = ["short story", "encyclopedia entry", "letter", "news report", "dialogue", "lesson for children",
                  "diary entry", "description"]
DEFAULT_OPENINGS = ["Once upon a time, in a story about {topic},", "The following is a {style} about {topic}.\n\n",
                    "Chapter 1\n\nIt all began with {topic}.", "{Topic} has always fascinated people because",
                    "Dear friend,\n\nI am writing to tell you about {topic}.", "Here is what everyone should know "
                    "about {topic}:", "It was early morning when the subject of {topic} first came up."]


@dataclass
class SyntheticConfig:
    """The `synthetic` section: settings of `main.py create-synthetic` (its flags override them).

    Prompts: each sample draws a topic and a style; `prompt_style` "instruction" asks an
    instruction-tuned teacher (Ollama's phi4-mini) with `instruction` ("Write a {style} about
    {topic}."), "opening" gives a base model (the bundled Gemma 3 270M) the start of a text from
    `openings` to continue; "auto" picks instruction for ollama and opening for the local GGUF backends.

    backend "auto": the Ollama server when one answers with the model, otherwise a local GGUF
    teacher (llama.cpp when llama-cpp-python is installed, else transformers): the Ollama model's
    own blob when the local model store has it, else the bundled Gemma 3 270M.
    """

    backend: typing.Literal["auto", "ollama", "llama_cpp", "transformers"] = "auto"
    model: typing.Optional[str] = None  # ollama: a model name (None: phi4-mini); llama_cpp/transformers: a .gguf
                                        # path or "gemma3-270m" (None: that bundled Gemma 3 270M)
    host: typing.Optional[str] = None  # ollama server; None: $OLLAMA_HOST or http://127.0.0.1:11434
    num_samples: int = 1000
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    max_new_tokens: int = 256
    seed: int = 42
    output_dir: str = "data/synthetic"
    output_file: str = "phi4_dataset.json"
    distillation: bool = False        # also store the teacher's top-k token ids and log-probabilities
    top_logprobs: int = 8             # k of the distillation targets (Ollama allows at most 20)
    workers: int = 1                  # concurrent requests (ollama); the local backends run one at a time
    threads: int = 1                  # CPU threads of the local backends (1 is fastest on a busy machine)
    batch_size: int = 8               # transformers backend: samples decoded together (llama_cpp: one at a time)
    timeout_s: float = 600.0          # per request (ollama)
    prompt_style: typing.Literal["auto", "instruction", "opening"] = "auto"
    instruction: str = "Write a {style} about {topic}. Use plain prose, about 150 words."
    topics: typing.List[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_TOPICS))
    styles: typing.List[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_STYLES))
    openings: typing.List[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_OPENINGS))
    prompts_file: typing.Optional[str] = None  # one prompt per line (or JSONL with "prompt"): used in turn instead
    min_words: int = 20               # shorter samples are rejected
    near_duplicate_threshold: float = 0.8   # Jaccard similarity of word 5-gram sets above which a sample is dropped
    max_attempts_factor: int = 3      # stop after num_samples * this many requests

    def validate(self, section: str = "synthetic"):
        k = lambda name: f"{section}.{name}"
        for name in ("num_samples", "max_new_tokens", "workers", "threads", "batch_size", "max_attempts_factor"):
            _require(getattr(self, name) >= 1, k(name), f"must be >= 1, got {getattr(self, name)}")
        _require(self.temperature >= 0, k("temperature"), f"must be >= 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, k("top_p"), f"must be in (0, 1], got {self.top_p}")
        _require(self.top_k >= 0, k("top_k"), f"must be >= 0 (0: off), got {self.top_k}")
        _require(1 <= self.top_logprobs <= 20, k("top_logprobs"), f"must be in [1, 20], got {self.top_logprobs}")
        _require(self.timeout_s > 0, k("timeout_s"), f"must be > 0, got {self.timeout_s}")
        _require(self.min_words >= 0, k("min_words"), f"must be >= 0, got {self.min_words}")
        _require(0 < self.near_duplicate_threshold <= 1, k("near_duplicate_threshold"),
                 f"must be in (0, 1], got {self.near_duplicate_threshold}")
        _require(bool(self.output_file) and "/" not in self.output_file and self.output_file.endswith(".json"),
                 k("output_file"), f"must be a file name ending in .json (the folder is output_dir), got {self.output_file!r}")
        for name in ("topics", "styles", "openings"):
            _require(len(getattr(self, name)) > 0, k(name), "must not be empty")

    def resolved_model(self, backend: str) -> str:
        if self.model:
            return self.model
        return "phi4-mini" if backend in ("ollama", "auto") else "gemma3-270m"

    def resolved_prompt_style(self, backend: str) -> str:
        """The prompt style for the teacher's actual backend."""
        if self.prompt_style != "auto":
            return self.prompt_style
        return "instruction" if backend == "ollama" else "opening"


@dataclass
class DistillationConfig:
    """The `distillation` section: knowledge distillation from the teacher's stored top-k
    log-probabilities (a `create-synthetic --distillation` dataset).  The loss is
    (1 - alpha) * CE(labels) + alpha * temperature^2 * KL(teacher_T || student_T)."""

    enabled: bool = False
    alpha: float = 0.5
    temperature: float = 1.0          # > 1 softens, but then the unknown tail mass counts as one token

    def validate(self, section: str = "distillation"):
        _require(0 <= self.alpha <= 1, f"{section}.alpha", f"must be in [0, 1], got {self.alpha}")
        _require(self.temperature > 0, f"{section}.temperature", f"must be > 0, got {self.temperature}")


SECTIONS = {"model": SparseSSMConfig, "training": TrainingConfig, "optimizer": OptimizerConfig,
            "scheduler": SchedulerConfig, "dataset": DatasetConfig, "generation": GenerationConfig,
            "synthetic": SyntheticConfig, "distillation": DistillationConfig}


@dataclass
class Config:
    """A whole configuration file: one typed section each."""

    model: SparseSSMConfig
    training: TrainingConfig
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig
    dataset: DatasetConfig
    generation: GenerationConfig
    synthetic: SyntheticConfig
    distillation: DistillationConfig

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown section; valid sections are: {', '.join(SECTIONS)}")
        sections = {name: from_dict(kind, data.get(name), name) for name, kind in SECTIONS.items()}
        config = cls(**sections)
        config.check_consistency()
        return config

    def check_consistency(self):
        _require(self.dataset.max_seq_len <= self.model.max_seq_len, "dataset.max_seq_len",
                 f"({self.dataset.max_seq_len}) must not exceed model.max_seq_len ({self.model.max_seq_len})")

    @classmethod
    def load(cls, path, overrides: typing.Sequence[str] = ()) -> "Config":
        """Read a YAML file and apply dotted overrides such as 'training.num_epochs=1'."""
        import yaml

        data = load_yaml(path)
        for item in overrides:
            key, sep, value = item.partition("=")
            parts = key.strip().split(".")
            if not sep or len(parts) != 2 or not all(parts):
                raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. training.num_epochs=1")
            section = data.setdefault(parts[0], {})
            if not isinstance(section, dict):
                raise ConfigError(f"{parts[0]}: expected a mapping, got {type(section).__name__}")
            section[parts[1]] = yaml.safe_load(value)
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path):
        from pathlib import Path

        Path(path).write_text(self.to_yaml())
