"""What produced a results file: code version, packages, machine, command, seeds and every model's
resolved config (`common.write_results` stores it under "provenance"), and the check a resumed grid
makes before it keeps cells that an earlier run wrote.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "transformers", "mambapy", "numpy")


def git_state() -> dict:
    """{"commit", "dirty", "diff_sha1"} of the repository's code (bench/results excluded: a run
    rewrites its own results files); diff_sha1 tells two dirty trees apart.  Commit None outside git."""
    def git(*args):
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return out.stdout if out.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "diff_sha1": None}
    diff = git("diff", "HEAD", "--", ".", ":(exclude)bench/results") or ""
    return {"commit": commit.strip(), "dirty": bool(diff),
            "diff_sha1": hashlib.sha1(diff.encode()).hexdigest() if diff else None}


AT_START = git_state()      # the code as the run found it (edits made while it runs are not what ran)


def code_version(git: dict | None = None) -> str:
    """'<commit>' or '<commit>+dirty.<diff hash>': equal exactly when the code is the same."""
    git = git or AT_START
    if git["commit"] is None:
        return "unknown (not a git checkout)"
    return git["commit"] + (f"+dirty.{git['diff_sha1'][:10]}" if git["dirty"] else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def model_record(model) -> dict:
    """A model's resolved config (ours: `SparseSSMConfig.to_dict()`; transformers: `config.to_dict()`;
    mamba.py: its dataclass), its class, mode (train/eval) and the dropout probabilities it holds."""
    import torch.nn as nn
    inner = getattr(model, "_orig_mod", model)                       # torch.compile'd
    cfg = getattr(inner, "config", None) or getattr(getattr(inner, "mamba", None), "config", None)
    if hasattr(cfg, "to_dict"):
        config = cfg.to_dict()
    elif dataclasses.is_dataclass(cfg):
        config = dataclasses.asdict(cfg)
    else:
        config = None
    return {"class": f"{type(inner).__module__}.{type(inner).__qualname__}",
            "mode": "train" if inner.training else "eval",
            "dropout_p": sorted({m.p for m in inner.modules() if isinstance(m, nn.Dropout)}),
            "config": config}


def provenance(models: dict | None = None, seeds=None, **conditions) -> dict:
    """Everything a reviewer needs to tell what produced a results file.  `models`: name -> module;
    `conditions`: anything else the run fixed (loss path, rounds...)."""
    import torch
    return {"command": [Path(sys.executable).name, *sys.argv], "git": AT_START, "code_version": code_version(),
            "versions": versions(), "torch_threads": torch.get_num_threads(),
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "arch": platform.machine(),
                        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None},
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")} or "unset (glibc defaults)",
            "seeds": seeds, **conditions,
            "models": {name: model_record(m) for name, m in (models or {}).items()}}


def summary_line(prov: dict) -> str:
    """One Markdown line under a results table: commit, packages, threads, CPU, malloc, command."""
    v = prov["versions"]
    pkgs = ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "mambapy") if v.get(k))
    return (f"Produced by `{' '.join(prov['command'][1:])}` at {prov['code_version'][:12]}"
            f"{' (dirty tree)' if prov['git']['dirty'] else ''}; python {v['python']}, {pkgs}; "
            f"{prov['torch_threads']} torch thread(s) on {prov['machine']['cpu']} ({prov['machine']['cores']} cores); "
            f"MALLOC_*: {prov['malloc_env']}.")


def mixed_records(records: list[dict], version: str, key) -> list[str]:
    """Descriptions of the earlier records that another code version or model config made:
    `key(record)` names a record and gives the config this run would use for it (or None to skip
    the config check); a record without "code_version" predates this check and counts as mixed."""
    found = []
    for record in records:
        name, config = key(record)
        config = None if config is None else json.loads(json.dumps(config, default=str))   # tuples -> lists
        made_by = record.get("code_version", "unrecorded")
        if made_by != version:
            found.append(f"{name}: made by code {made_by[:18]}, this is {version[:18]}")
        elif config is not None and record.get("config") != config:
            differ = sorted(k for k in {*config, *(record.get("config") or {})}
                            if config.get(k) != (record.get("config") or {}).get(k))
            found.append(f"{name}: model config differs in {', '.join(differ[:6])}")
    return found


def refuse_mixed(path: Path, found: list[str]):
    """Exit (status 1, no traceback) naming the records of `path` that another commit or config made."""
    shown = "\n  ".join(found[:10]) + (f"\n  ... and {len(found) - 10} more" if len(found) > 10 else "")
    sys.exit(f"{path} holds {len(found)} result(s) that another code version or model config made:\n  {shown}\n"
             f"Pass --allow-mixed to keep them beside new ones (the file then records every version), "
             f"another --out, or delete the file to start over.")


def load_grid_cells(path: Path, setup: dict, config_of, allow_mixed: bool = False) -> list[dict]:
    """The cells of a resumable grid's earlier run (`path`: its JSON with "setup" and "cells"), if
    it had the same setup and this code version made every cell with the model config it would build
    now (`config_of(cell)`: that config's dict); [] when there is none.  Another setup exits naming
    the keys that differ; mixed cells exit naming them unless `allow_mixed`."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    if data["setup"] != setup:
        differ = sorted(k for k in {*setup, *data["setup"]} if setup.get(k) != data["setup"].get(k))
        sys.exit(f"{path} holds results of another setup (differs in: {', '.join(differ)}); pass another --out "
                 f"or delete the file to start over")
    key = lambda c: (f"{c['task']}/{c['variant']}/seed {c['seed']}", config_of(c))
    mixed = mixed_records(data["cells"], code_version(), key)
    if mixed and not allow_mixed:
        refuse_mixed(path, mixed)
    return data["cells"]
