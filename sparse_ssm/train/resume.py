"""What a resumed run keeps from its checkpoint, and which config values may change on resume.

A resumed run continues the checkpoint's weights, optimizer moments and step counts, schedule
position, gradient scaler, random state, data position (epoch and sequence), best validation loss
and tokenizer.  Its config is the checkpoint's own with the `--set` changes; a changed value
applies from the first resumed step (learning rate, weight decay, betas, eps, the schedule and
its length, batch size, evaluation and saving intervals, precision, dropout, the dataset ...), so
config.yaml never records a value that was not used.  The values that the checkpoint itself
fixes cannot change; `resume_changes` refuses them with the reason.
"""

from __future__ import annotations

from ..util.errors import ConfigError

_WEIGHTS = "the checkpoint's weights were trained with it"
_TOKENIZER = "a resumed run uses its checkpoint's tokenizer"
FIXED_ON_RESUME = {
    "training.seed": "the data order and the random state of a run come from its checkpoint",
    "optimizer.use_param_groups": "the checkpoint's optimizer state is stored per parameter group",
    "dataset.tokenizer_path": _TOKENIZER,
    "dataset.tokenizer_vocab_size": _TOKENIZER,
    "distillation.enabled": "the checkpoint's model and tokenizer were made for the other setting",
}
MODEL_KEYS_FREE_ON_RESUME = {"dropout", "use_parallel_scan", "scan_chunk_size", "max_seq_len"}
DERIVED = {"model.vocab_size"}       # set from the tokenizer, which a resumed run takes from its checkpoint


def fixed_on_resume(key: str) -> str | None:
    """Why the dotted config `key` cannot change on resume, or None when it may."""
    section, name = key.split(".", 1)
    if section == "model" and name not in MODEL_KEYS_FREE_ON_RESUME:
        return _WEIGHTS
    return FIXED_ON_RESUME.get(key)


def resume_changes(saved: dict, new: dict) -> list[str]:
    """The values of config `new` that differ from the checkpoint's config `saved` (both as
    {section: {key: value}}), as 'section.key old -> new'; a ConfigError for one that cannot change."""
    changes = []
    for section, values in new.items():
        for name, value in values.items():
            key, old = f"{section}.{name}", saved.get(section, {}).get(name)
            if key in DERIVED or value == old:
                continue
            reason = fixed_on_resume(key)
            if reason:
                raise ConfigError(f"{key}: cannot change when resuming ({old!r} in the checkpoint, {value!r} now): "
                                  f"{reason}. Resume without changing it, or start a new run in another output "
                                  f"directory")
            changes.append(f"{key} {old!r} -> {value!r}")
    return changes
