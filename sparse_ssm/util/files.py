"""Atomic writes: readers never see half a file, half a directory or a dangling link.

Every writer goes through a temporary sibling that is renamed into place (a rename within one
directory is atomic on POSIX file systems):

    atomic_write_text(path, text)
    with atomic_path(path) as tmp: save_file(tensors, tmp)      # any writer that takes a path
    with atomic_directory(folder) as tmp: ... fill tmp ...       # replaces folder as a whole
    atomic_symlink(target, link)

No command deletes what it did not write (see `check_output_file`, `output_folder`): a folder a
command writes holds a marker file naming the command and its files, and an interrupted writer's
temporaries are cleaned up by the next one (`remove_stale_temporaries`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError

MARKER = ".sparse-ssm-output.json"          # {"command": ..., "files": [...]}: what wrote this folder
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)(?P<pid>\d+)$")


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def remove_path(path: Path):
    """Remove a file, link or folder tree (nothing when missing)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; rename it to `path` when the block succeeds, remove it
    when the block fails."""
    path = Path(path)
    tmp = _temporary_sibling(path)
    remove_path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            remove_path(tmp)


def atomic_write_text(path: str | Path, text: str):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | Path, data: bytes):
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@contextmanager
def atomic_directory(path: str | Path, keep_existing: bool = False):
    """Yield a fresh temporary directory beside `path`; when the block succeeds it replaces `path`
    (an existing one is removed first, or kept and the new one dropped with `keep_existing`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    remove_path(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists() and keep_existing:
            return
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        remove_path(old)
        if path.exists() or path.is_symlink():
            path.rename(old)              # two renames: `path` is missing only between them
        tmp.rename(path)
        remove_path(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def atomic_symlink(target: str, link: str | Path):
    """Point `link` at `target` (a relative path is relative to the link's folder)."""
    with atomic_path(link) as tmp:
        os.symlink(target, tmp)


# --- outputs that never replace what the command did not write -------------------------------
def overlaps(a: str | Path, b: str | Path) -> bool:
    """Whether paths `a` and `b` are the same, or one lies inside the other (links resolved)."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def read_marker(folder: str | Path) -> dict | None:
    """The marker of a folder a command wrote ({"command", "files"}), None without a valid one.
    Its file names are plain names of entries of `folder` (nothing else is ever taken from it)."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
        files = [f for f in marker["files"] if isinstance(f, str) and f not in ("", ".", "..") and "/" not in f]
        return {"command": str(marker["command"]), "files": files}
    except (OSError, ValueError, TypeError, KeyError):
        return None


def write_marker(folder: str | Path, command: str, files):
    atomic_write_text(Path(folder) / MARKER, json.dumps({"command": command, "files": sorted(files)}, indent=1) + "\n")


def listing(names, most: int = 5) -> str:
    """The first `most` of `names` for a message: 'a, b, c, ...'."""
    names = sorted(names)
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def check_output_file(path: str | Path, overwrite: bool, flag: str, inputs=()) -> Path:
    """Refuse to write file `path` over an existing one without `overwrite`, over a folder, or over
    (or inside) one of the command's `inputs` (even with `overwrite`); `flag` names the option."""
    path = Path(path)
    for source in inputs:
        if overlaps(path, source):
            raise OutputError(f"{flag} {path}: it would overwrite the command's own input {source}; choose another "
                              f"{flag}")
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; give the path of a file to write")
    if path.exists() and not overwrite:
        raise OutputError(f"{flag} {path} already exists: pass --overwrite to replace it, or choose another {flag}")
    return path


@contextmanager
def output_folder(path: str | Path, command: str):
    """Yield a temporary folder beside `path`; when the block succeeds its entries move into `path`
    (created if missing): entries of the same names are replaced, the files an earlier run of
    `command` wrote there (named in its marker) and this one does not are removed, every other
    entry is kept; the marker is written last.  The caller decides first whether `path` may be
    written (see `check_output_file` for files; a folder that is empty, marked by `command`, or
    given with --overwrite).  Each entry is replaced atomically, the folder as a whole is not: a
    reader during the moves may see entries of both writes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, log=lambda *_: None, name=path.name)     # of a killed earlier write
    tmp = _temporary_sibling(path)
    remove_path(tmp)
    tmp.mkdir()
    try:
        yield tmp
        names = {p.name for p in tmp.iterdir()}
        if not path.exists():
            write_marker(tmp, command, names)
            tmp.rename(path)
            return
        previous = read_marker(path)
        for name in sorted(names):
            target = path / name
            if target.is_dir() or (tmp / name).is_dir():
                remove_path(target)
            os.replace(tmp / name, target)
        if previous and previous["command"] == command:
            for name in set(previous["files"]) - names:
                remove_path(path / name)
        write_marker(path, command, names)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def remove_stale_temporaries(folder: str | Path, log=print, name: str | None = None) -> list[str]:
    """Undo what writers that died left in `folder` (`.NAME.tmpPID` / `.NAME.oldPID` of a process
    that no longer runs; only those of NAME `name` when given): a temporary is removed; a replaced
    `.NAME.old*` is renamed back to NAME when NAME is missing (the writer died between its two
    renames), else removed.  Returns the notes it logged."""
    folder, notes = Path(folder), []
    if not folder.is_dir():
        return notes
    stale = [(p, m) for p in sorted(folder.iterdir()) if (m := _TEMPORARY.match(p.name))
             and name in (None, m["name"]) and int(m["pid"]) != os.getpid() and _pid_gone(int(m["pid"]))]
    for path, match in sorted(stale, key=lambda pm: pm[1]["kind"] == "old"):   # temporaries first
        final = folder / match["name"]
        if match["kind"] == "old" and not (final.exists() or final.is_symlink()):
            path.rename(final)
            notes.append(f"restored {final} from {path.name}, left by a process that stopped while replacing it")
        else:
            remove_path(path)
            notes.append(f"removed {path}, left by a process that stopped while writing it")
    for note in notes:
        log(f"note: {note}")
    return notes
