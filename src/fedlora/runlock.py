"""One run per run directory: an exclusive lock on ``RUN_DIR/.lock``, held for the whole run.

Two runs writing one ``--out`` interleave their checkpoints, config.json and metrics.jsonl, and
both exit 0 with one's results lost. The lock is ``fcntl.flock`` on an open file, so the kernel
releases it when the holder exits for any reason, SIGKILL included: a lock file left behind by a
dead process is stale by construction and is simply taken over (the file holds the holder's pid
only for the message). Re-entrant within one process (the CLI takes it before loading anything,
the engine again around the run). Where ``fcntl`` does not exist (Windows) runs are not locked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"
_held: dict[Path, tuple[IO[str], int]] = {}  # run dir -> (open lock file, nesting depth), this process


class RunLockedError(OSError):
    """Another live process holds the run directory."""


def _writable_dir(directory: Path) -> None:
    """Create ``directory``; a read-only or impossible ``--out`` fails here, before any loading."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create the run directory {directory} ({exc.strerror or exc}); choose another --out") \
            from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"the run directory {directory} is not writable; choose another --out")


def acquire(directory: str | Path) -> None:
    """Take the lock on ``directory`` (created if needed), or raise :class:`RunLockedError` naming the holder."""
    key = Path(directory).resolve()
    if key in _held:
        handle, depth = _held[key]
        _held[key] = (handle, depth + 1)
        return
    _writable_dir(key)
    try:
        handle = open(key / LOCK_FILE, "a+")
    except OSError as exc:
        raise OSError(f"cannot write {key / LOCK_FILE} ({exc.strerror or exc}); choose a writable --out") from None
    if fcntl is not None:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RunLockedError(f"{key} is in use by another fedlora run (pid {holder}); wait for it to finish "
                                 "or choose another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held[key] = (handle, 1)


def release(directory: str | Path) -> None:
    """Drop one hold on ``directory``; the lock is released with the last one. The file stays (harmless)."""
    key = Path(directory).resolve()
    if key not in _held:
        return
    handle, depth = _held[key]
    if depth > 1:
        _held[key] = (handle, depth - 1)
        return
    del _held[key]
    with contextlib.suppress(OSError):
        handle.truncate(0)
    handle.close()  # closing the descriptor releases the flock


@contextlib.contextmanager
def locked(directory: str | Path) -> Iterator[None]:
    """``with locked(out): ...``: the run directory is this process's for the block."""
    acquire(directory)
    try:
        yield
    finally:
        release(directory)
