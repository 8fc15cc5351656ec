"""One writing process per directory: a lock file that names its owner.

    lock = DirectoryLock.acquire(output_dir, command="main.py train ...", log=print)
    ...                              # write into output_dir
    lock.release()                   # also done at interpreter exit

The lock file, DIR/run.lock, is created with O_CREAT | O_EXCL (of two processes only one can
create it) and holds JSON: the owner's pid, host, the start time of that process (so that a
reused pid is not taken for the owner), the time the lock was taken and the command.  Another
process is refused with a `DirectoryLockedError` that names the owner.  A lock whose owner is
gone (no process with its pid runs on this host, or one started at another time) is stale and
is taken over with a note; a lock from another host is never taken over (its process cannot be
checked from here).

The lock belongs to a process: a process that holds it may acquire it again (the file goes when
the last of its holders releases it, or when the process exits; after a kill -9 it stays and is
stale).
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import socket
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ConfigError, DirectoryLockedError

LOCK_FILE = "run.lock"
_held: dict[Path, list] = {}          # lock file -> [its Owner (this process), number of holders]


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, from /proc), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


@dataclass(frozen=True)
class Owner:
    pid: int
    host: str
    process_start: str | None
    since: str
    command: str
    token: str

    @classmethod
    def me(cls, command: str) -> "Owner":
        return cls(os.getpid(), socket.gethostname(), _process_start(os.getpid()),
                   datetime.datetime.now().astimezone().isoformat(timespec="seconds"), command, uuid.uuid4().hex)

    @classmethod
    def read(cls, path: Path) -> "Owner | None":
        """The owner written in lock file `path`; None when it is missing, being written or damaged."""
        try:
            owner = cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        return owner if isinstance(owner.pid, int) and owner.pid > 0 else None

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, since {self.since}, running: {self.command}"

    def is_gone(self) -> bool:
        """True when the owner's process has certainly ended (only decidable on its own host)."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:          # a process of another user: it runs
            pass
        now = _process_start(self.pid)
        return self.process_start is not None and now is not None and now != self.process_start


def _create(path: Path, owner: Owner) -> bool:
    """Create lock file `path` for `owner` unless it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(asdict(owner), indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return True


def _remove_stale(path: Path, stale: Owner) -> bool:
    """Delete lock file `path` if it still names `stale`; a guard file makes sure that of several
    processes that found the same stale lock only one deletes it (and no newer lock)."""
    guard = path.with_name(f".{path.name}.takeover")
    if not _create(guard, Owner.me("taking over a stale lock")):
        holder = Owner.read(guard)
        if holder is not None and holder.is_gone():
            guard.unlink(missing_ok=True)         # left by a process that died during its takeover
        return False
    try:
        if Owner.read(path) == stale:
            path.unlink()
        return True
    finally:
        guard.unlink(missing_ok=True)


class DirectoryLock:
    """This process's hold on the lock of a directory (see the module docstring)."""

    def __init__(self, path: Path):
        self.path, self.released = path, False

    @classmethod
    def acquire(cls, directory: str | Path, command: str, log=print) -> "DirectoryLock":
        """Take the lock of `directory` (created if missing) before anything is written into it."""
        directory = Path(directory).resolve()
        path = directory / LOCK_FILE
        if path in _held:
            _held[path][1] += 1
            return cls(path)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"output directory {directory}: cannot create it ({e.strerror}); choose another one") from None
        me = Owner.me(command)
        for _ in range(5):
            try:
                created = _create(path, me)
            except OSError as e:
                raise ConfigError(f"output directory {directory}: cannot write in it ({e.strerror}); choose another "
                                  f"one") from None
            if created:
                _held[path] = [me, 1]
                return cls(path)
            owner = Owner.read(path)
            if owner is None:
                raise DirectoryLockedError(
                    f"{directory} is locked by another run ({path} is being written or is damaged). Wait for that "
                    f"run or choose another output directory; if no run writes to {directory}, delete {path}")
            if not owner.is_gone():
                raise DirectoryLockedError(
                    f"{directory} is in use by another run ({owner.describe()}); two runs in one directory would "
                    f"overwrite each other's checkpoints. Wait for it to finish (then --resume continues it), stop it, "
                    f"or choose another output directory; if that process is gone (e.g. its machine crashed), delete "
                    f"{path}")
            if _remove_stale(path, owner):
                log(f"note: {path} was left by a run that is no longer running ({owner.describe()}); taking it over")
        raise DirectoryLockedError(f"{directory}: could not take its lock {path} (other processes keep taking it); "
                                   f"try again, or choose another output directory")

    def release(self):
        """Give up this hold (once); the file goes with the process's last hold."""
        if self.released:
            return
        self.released = True
        entry = _held.get(self.path)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            _unlock(self.path)


def _unlock(path: Path):
    owner, _ = _held.pop(path)
    if owner.pid == os.getpid() and Owner.read(path) == owner:    # never a lock that is not ours
        path.unlink(missing_ok=True)


@atexit.register
def _release_all():
    for path in list(_held):
        _unlock(path)
