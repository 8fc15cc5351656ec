"""Atomic writes: readers never see half a file, half a directory or a dangling link.

Every writer goes through a temporary sibling that is renamed into place (a rename within one
directory is atomic on POSIX file systems):

    atomic_write_text(path, text)
    with atomic_path(path) as tmp: save_file(tensors, tmp)      # any writer that takes a path
    with atomic_directory(folder) as tmp: ... fill tmp ...       # replaces folder as a whole
    atomic_symlink(target, link)
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _remove(path: Path):
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
    _remove(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


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
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists() and keep_existing:
            return
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        _remove(old)
        if path.exists() or path.is_symlink():
            path.rename(old)              # two renames: `path` is missing only between them
        tmp.rename(path)
        _remove(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def atomic_symlink(target: str, link: str | Path):
    """Point `link` at `target` (a relative path is relative to the link's folder)."""
    with atomic_path(link) as tmp:
        os.symlink(target, tmp)
