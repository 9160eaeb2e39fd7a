"""One server per state directory: an exclusive lock held for the life of the process.

Two servers writing one SQLite file would both run, each with its own in-memory view and
dedup bookkeeping, and their counts would diverge from the file and from each other. The lock
is ``flock`` on a file beside the state (not on the database itself, whose files SQLite opens and
closes on its own terms, and which ``--reset_state`` moves): the kernel releases it when the
process dies, however it dies, so a crashed server never leaves a stale lock behind. The holder
writes its PID into the file so that the refusal can name it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from adserver.errors import StartupError

LOCK_SUFFIX = ".lock"

_held: dict[Path, int] = {}  # lock file -> descriptor, kept open until the process exits


class StateLockError(StartupError):
    """Another running server owns the state directory."""


def hold_state_lock(state_file: Path) -> Path:
    """Lock ``state_file``'s directory for this process (a no-op if it already holds it).

    Call before anything reads, creates or moves the state file.
    """
    lock_path = (state_file.parent / (state_file.name + LOCK_SUFFIX)).resolve()
    if lock_path in _held:
        return lock_path
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StartupError(f"cannot create the state lock file {lock_path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        os.close(fd)
        raise StateLockError(
            f"the state directory {lock_path.parent} is in use by another running server"
            f"{f' (pid {holder})' if holder.isdigit() else ''}: one state directory serves "
            "one process; stop the other server or give this one another --state_dir"
        ) from None
    except OSError as exc:
        os.close(fd)
        raise StartupError(f"cannot lock {lock_path}: {exc}") from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[lock_path] = fd
    return lock_path
