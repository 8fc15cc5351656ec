"""Whether a training run may write into its output directory, and cleaning up after killed runs.

A fresh run writes only into a folder that is new or empty, or that a training run made (its
marker file) and that holds no checkpoints yet; a folder with a run's checkpoints is continued with
`--resume` or replaced with `--overwrite`, which removes the entries a run writes (below) and keeps
every other file.  Neither ever removes the run's own inputs (dataset.data_path,
dataset.tokenizer_path), and no run writes into the folder of its data.  Every writer first cleans
up what killed runs left (`util.files.remove_stale_temporaries`: temporaries removed, a `best/`
caught between its two renames restored).
"""

from __future__ import annotations

from pathlib import Path

from ..model.checkpoint import CONFIG, TOKENIZER
from ..util.errors import ConfigError, OutputError
from ..util.files import MARKER, listing, read_marker, remove_path, remove_stale_temporaries, write_marker
from ..util.lock import LOCK_FILE

COMMAND = "train"
RUN_ENTRIES = ("checkpoints", "best", "latest", CONFIG, TOKENIZER, "vocab_map.json", "metrics.json", "tensorboard")


def describe_run(output_dir: Path) -> str | None:
    """'checkpoints step-200, step-300, best/' when `output_dir` holds a training run's
    checkpoints, else None."""
    steps = sorted(p.name for p in (output_dir / "checkpoints").glob("step-*") if p.name[5:].isdigit())
    parts = [f"checkpoints {', '.join(f'step-{int(s[5:])}' for s in steps[-3:])}"] if steps else []
    if (output_dir / "best").exists():
        parts.append("best/")
    if not parts and (output_dir / "latest").is_symlink():
        parts.append("latest")
    return ", ".join(parts) or None


def _check_inputs(output_dir: Path, inputs: dict[str, str | None], overwrite: bool):
    """Refuse an output directory inside (or the same as) a folder the run reads, and an
    `overwrite` that would remove an input (one that lies in an entry a run writes)."""
    out = output_dir.resolve()
    for key, value in inputs.items():
        source = Path(value).resolve() if value else None
        if source is None:
            continue
        if source.is_dir() and out.is_relative_to(source):
            raise OutputError(f"training.output_dir {output_dir} is inside {key} {value}: the run's files would mix "
                              f"with what it reads; choose an output directory outside it")
        for name in RUN_ENTRIES if overwrite else ():
            if source.is_relative_to((output_dir / name).resolve()):
                raise OutputError(f"--overwrite would remove {output_dir / name}, which holds this run's {key} "
                                  f"{value}: copy it out of {output_dir} first, or choose another --output-dir")


def claim_output_dir(output_dir: Path, resume: bool, overwrite: bool, inputs: dict[str, str | None], log=print):
    """Make `output_dir` (whose lock this process holds) ready for a run, or refuse with the way
    out: clean up after killed runs; a fresh run needs a folder that is empty or a run's without
    checkpoints, or `overwrite` (the earlier run's entries are removed); `inputs`: {config key:
    path} of the files the run reads."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite: give one (--resume continues the run in the output directory, "
                          "--overwrite replaces it)")
    remove_stale_temporaries(output_dir, log)
    remove_stale_temporaries(output_dir / "checkpoints", log)
    if not resume:
        _check_fresh_run(output_dir, overwrite, inputs, log)
    write_marker(output_dir, COMMAND, RUN_ENTRIES)


def _check_fresh_run(output_dir: Path, overwrite: bool, inputs: dict[str, str | None], log):
    """Refuse a fresh run into a folder with another run's checkpoints or other files, unless
    `overwrite`: then remove the entries a run writes."""
    _check_inputs(output_dir, inputs, overwrite)
    run = describe_run(output_dir)
    others = [p.name for p in output_dir.iterdir() if p.name not in (LOCK_FILE, MARKER)]
    ours = (read_marker(output_dir) or {}).get("command") == COMMAND
    if not overwrite:
        if run:
            raise OutputError(f"{output_dir} already holds a training run ({run}): pass --resume to continue it, "
                              f"--overwrite to replace it, or another --output-dir")
        if others and not ours:
            raise OutputError(f"{output_dir} is not empty ({listing(others)}) and was not made by a training run: pass "
                              f"--overwrite to train into it (train's own files are replaced, the others kept), or "
                              f"choose another --output-dir")
        return
    removed = [name for name in RUN_ENTRIES if (output_dir / name).exists() or (output_dir / name).is_symlink()]
    for name in removed:
        remove_path(output_dir / name)
    if removed:
        log(f"--overwrite: removed the earlier run's {', '.join(removed)} from {output_dir}")
