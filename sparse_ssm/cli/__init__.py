"""Command-line interface: the parsers (`parser`) and one `cmd_*` per command (`commands`), each a
thin layer over the Python API; every `SparseSSMError` is reported in one place (`main`) without
a traceback.

    python main.py train --config config/small_cpu.yaml [--output-dir DIR] [--seed N] [--resume [latest|PATH]]
                         [--use-best-model] [--set training.num_epochs=1 ...]
    python main.py generate --config config/small_cpu.yaml --model-dir outputs/small_cpu --prompt "To be"
    python main.py evaluate --model-dir outputs/small_cpu --task perplexity --data FILE
    python main.py create-synthetic --config config/default_config.yaml [--distillation]
    python main.py inspect --config config/small_cpu.yaml      # build the model, report its cost,
                                                              # check prefill + recurrent decoding
    python main.py export --model-dir outputs/small_cpu --format hf --output hf/small_cpu
    python main.py serve --model-dir outputs/small_cpu [--host 127.0.0.1 --port 11434]
"""

from __future__ import annotations

import sys

from ..util.errors import SparseSSMError
from .parser import build_parser

__all__ = ["build_parser", "main"]


def _printable_output():
    """A terminal or file whose encoding cannot hold some characters (a Windows code page, an ASCII
    locale) shows them as '?' rather than ending a command (a generated text, a prompt) with a
    UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if encoding not in ("", "utf8", "utf8sig") and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _printable_output()
    try:
        return args.func(args)
    except SparseSSMError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        print(f"\n{e}" if str(e) else "\ninterrupted", file=sys.stderr)
        return 130
