"""The writer's lock of an output folder: one capture writes a folder at a time (`take_lock`), and a
second taker is told who holds it, this process included."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from qk_attn.errors import OutputLocked
from qk_attn.storage.layout import LOCK

ENV_OUTPUT = "QK_SNIFF_OUTPUT"  # a sink's output read from the environment (SniffConfig.setting_name)

# Lock descriptors `take_lock` returned -> the process that took the lock. A process forked while it
# was held inherits the descriptor but not the lock's ownership (`release_lock`).
_lock_holders: dict[int, int] = {}
# Lock descriptors -> who took them (`take_lock`'s `holder`), for the error of a second taker in this process.
_lock_labels: dict[int, str] = {}


def take_lock(output: Path, name: str = LOCK, holder: str | None = None) -> int:
    """flock OUT/name (created if absent). `release_lock` deletes the file, so a lock taken on a
    file that another process deleted meanwhile is taken again on the file now at that name.
    `holder` says who takes it (a sink's output setting), should this process try to take it again."""
    while True:
        fd = os.open(output / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            own = _held_here(fd)
            os.close(fd)
            if own is not None:
                raise OutputLocked(_held_here_message(output, output / name, _lock_labels.get(own))) from None
            raise OutputLocked(f"another qk-sniff capture is writing to {output} (it holds {output / name})") from None
        try:
            same = os.stat(output / name).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            _lock_holders[fd] = os.getpid()
            if holder is not None:
                _lock_labels[fd] = holder
            return fd
        os.close(fd)


def _held_here(fd: int) -> int | None:
    """The descriptor by which this process itself (not a process it was forked from) holds the lock on
    the file `fd` opened, None when another process holds it (flock locks belong to open files, so a
    second open of the file in the holding process is refused as another process's would be)."""
    try:
        wanted = os.fstat(fd)
    except OSError:
        return None
    for held, pid in list(_lock_holders.items()):
        if pid != os.getpid():
            continue
        try:
            there = os.fstat(held)
        except OSError:
            continue
        if (there.st_dev, there.st_ino) == (wanted.st_dev, wanted.st_ino):
            return held
    return None


def _held_here_message(output: Path, lock: Path, holder: str | None) -> str:
    """OUT's lock is held by this very process: which of its captures (as far as its sink said), and what to do."""
    close_session = "leave its with block (or call its close())"
    close_default = (
        "qk_attn.reload_env() closes the default session (qk_attn.flush() only commits; the next forward outside a "
        "session() opens it again)"
    )
    if holder is not None and holder.startswith(ENV_OUTPUT + "="):
        held_by = (
            f"its capture of {holder} (the default session that the variable configures, or a session() "
            "opened without output=, which takes the variable's folder)"
        )
        close = f"{close_default}; a session(): {close_session}"
    elif holder is not None:
        held_by, close = f"its capture of {holder} (a session() or ParquetSink still open)", close_session
    else:
        held_by, close = "one of its own captures or commands", f"a session(): {close_session}; {close_default}"
    return (
        f"this process (pid {os.getpid()}) is already writing to {output}: {held_by} holds {lock}, and a folder "
        f"takes one writer at a time; pass another output= (output=None records in memory), or close that capture "
        f"first: {close}"
    )


def lock_held(path: Path) -> bool:
    """Whether another process holds the writer's lock at `path` (a probe: the file is never
    created, and an absent or unreadable one is not held; the sink says more when it takes it)."""
    if not path.is_file():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the probe's lock
    return False


def lock_taken_here(fd: int) -> bool:
    """Whether this process took the lock of `fd` (False in a process forked after `take_lock`)."""
    return _lock_holders.get(fd, os.getpid()) == os.getpid()


def release_lock(output: Path, fd: int, name: str = LOCK) -> None:
    """Delete the lock file, then release it: a finished or failed command leaves no lock behind.
    In a process forked from the one that took the lock, only this copy of the descriptor is closed:
    the file stays, and the flock with it (it belongs to the open file, which the taker still holds)."""
    _lock_labels.pop(fd, None)
    if _lock_holders.pop(fd, None) not in (None, os.getpid()):
        os.close(fd)
        return
    path = Path(output) / name
    try:
        held, there = os.fstat(fd), path.stat()
        if (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino):  # not another writer's, in a new OUT
            path.unlink()
    except OSError:
        pass  # gone already, or a read-only folder: the flock is released all the same
    os.close(fd)
