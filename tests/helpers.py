"""Small real-text corpora, tiny configs and the idioms the tests share (randomised selective
generators, waiting for a line of a child process's output)."""

import random
import selectors
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent          # the repository
FIXTURES = ROOT / "tests" / "fixtures"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
    "Call me Ishmael, some years ago, never mind how long precisely, having little money.",
    "In a hole in the ground there lived a small creature who liked quiet evenings.",
    "All happy families are alike; each unhappy family is unhappy in its own way.",
    "The sun rose slowly over the hills, and the village began to stir with life.",
    "She opened the old book and found a letter folded between the yellowed pages.",
    "A gentle rain fell on the roofs of the town while the children slept soundly.",
    "He walked along the shore, counting the waves and thinking of distant lands.",
    "The merchant sold spices, silk and tea to travellers who came from far away.",
    "Numbers like 42, 1984 and 3.14159 appear in stories, songs and equations.",
    "Café, naïve and coöperate keep their accents; emoji such as 🙂 survive too.",
]


def make_text(n_sentences: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for i in range(n_sentences):
        lines.append(rng.choice(SENTENCES))
        if i % 5 == 4:
            lines.append("")
    return "\n".join(lines) + "\n"


def tiny_config(data_path, output_dir, dataset_type="custom", tokenizer=None, **sections):
    """A small run's Config; `tokenizer`: an existing tokenizer.json (dataset.tokenizer_path), so
    that the run does not train its own (the `corpus_tokenizer` fixture)."""
    from sparse_ssm.config import Config

    data = {
        "model": dict(vocab_size=300, hidden_dim=32, state_dim=8, ffn_dim=32, num_layers=2, max_seq_len=32,
                      dropout=0.0, num_heads=2, scan_chunk_size=4),
        "training": dict(num_epochs=1, batch_size=4, gradient_accumulation_steps=1, logging_steps=2, save_steps=3,
                         eval_steps=3, eval_max_batches=4, mixed_precision="no", gradient_checkpointing=False,
                         output_dir=str(output_dir), device="cpu", progress_bar=False, seed=7),
        "optimizer": dict(learning_rate=3e-3),
        "scheduler": dict(warmup_steps=2),
        "dataset": dict(type=dataset_type, max_seq_len=32, stride=32, data_path=str(data_path), val_split=0.1,
                        test_split=0.1, cache_dir=str(output_dir) + "-cache",
                        tokenizer_path=str(tokenizer) if tokenizer else None),
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return Config.from_dict(data)


def write_checkpoint(folder, model, tokenizer):
    """A checkpoint directory as training writes one (model.safetensors, config.yaml, tokenizer.json)."""
    import yaml

    from sparse_ssm.data.tokenizer import save_tokenizer
    from sparse_ssm.model.checkpoint import save_weights, weights_of

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(folder / "model.safetensors", weights_of(model))
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": model.config.to_dict()}))
    save_tokenizer(tokenizer, folder / "tokenizer.json")
    return folder


def tiny_language_model(seed: int = 0, vocab: int = 300, **model):
    """A small model (random weights) and a BPE tokenizer trained on `make_text`."""
    import torch

    from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM
    from sparse_ssm.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([make_text(300, seed=seed)], vocab)
    config = dict(vocab_size=tokenizer.get_vocab_size(), hidden_dim=32, state_dim=8, ffn_dim=32, num_layers=2,
                  dropout=0.0, num_heads=2, scan_chunk_size=4, max_seq_len=256)
    config.update(model)
    torch.manual_seed(seed)
    return SparseSSMForCausalLM(SparseSSMConfig(**config)).eval(), tokenizer


def randomise_generators(model, std=0.3):
    """Input-dependent A_t and D_t: their generator rows start at zero, so at initialisation they
    are the same for every token whatever the model; tests of what depends on the token randomise them."""
    import torch

    for module in model.modules():
        if hasattr(module, "a_up"):
            torch.nn.init.normal_(module.a_up.weight, std=std)
            torch.nn.init.normal_(module.proj.weight, std=std)
    return model


def dead_pid() -> int:
    """The pid of a process that has ended (for files that a killed process left behind)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def wait_for_line(stream, text: str, timeout_s: float = 300.0) -> list[str]:
    """Read lines of a child process's text pipe until one contains `text` (returns the lines
    read); fails at end of output or when `timeout_s` passes without it (a hang guard, not a
    measurement).  The child must write unbuffered (PYTHONUNBUFFERED=1)."""
    deadline = time.monotonic() + timeout_s
    lines = []
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while True:
            if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                raise AssertionError(f"no line with {text!r} within {timeout_s}s; got: {''.join(lines)[-2000:]}")
            line = stream.readline()
            if not line:
                raise AssertionError(f"the output ended without a line with {text!r}: {''.join(lines)[-2000:]}")
            lines.append(line)
            if text in line:
                return lines


def requires_native_kernel():
    """A skip mark for tests of the native kernels, with the reason they are off here."""
    import pytest

    from sparse_ssm.ssm.kernels import native_library, unavailable_reason

    return pytest.mark.skipif(native_library() is None, reason=f"no native kernel here: {unavailable_reason()}")
