"""One run per run directory: an exclusive lock on ``RUN_DIR/.lock``, held for the whole run.

Two runs writing one ``--out`` interleave their checkpoints, config.json and metrics.jsonl, and
both exit 0 with one's results lost. The lock is ``fcntl.flock`` on an open file, so the kernel
releases it when the holder exits for any reason, SIGKILL included: a lock file left behind by a
dead process is stale by construction and is simply taken over (the file holds the holder's pid
only for the message). Re-entrant within one process (the CLI takes it before loading anything,
the engine again around the run). Where ``fcntl`` does not exist (Windows) runs are not locked.

The lock file is opened without following a symlink (``O_NOFOLLOW``), never truncated, and refused
unless it is a regular file with one link: ``RUN_DIR/.lock`` pointing at someone's file (a symlink
or a hard link) must not let a run empty or rewrite that file. The holder's pid is written over the
first bytes as a fixed-width record, so the file never needs truncating.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"
PID_WIDTH = 20  # the pid record: left-aligned in this many bytes, then a newline (old files: "pid\n")
_held: dict[Path, tuple[int, int]] = {}  # run dir -> (lock file descriptor, nesting depth), this process


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


def _open_lock_file(path: Path) -> int:
    """A descriptor on ``path``, created if missing: never through a symlink, never truncated, and only a
    regular file with a single link (anything else may be another file of the user's)."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) \
        | getattr(os, "O_CLOEXEC", 0)  # O_NONBLOCK: a FIFO planted there must not hang the run
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        why = "it is a symbolic link" if path.is_symlink() else exc.strerror or str(exc)
        raise OSError(f"cannot use {path} as the run lock ({why}); remove it or choose another --out") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(info.st_mode) else f"a file with {info.st_nlink} hard links"
        raise OSError(f"cannot use {path} as the run lock (it is {what}); remove it or choose another --out")
    return fd


def _holder(fd: int) -> str:
    """The pid recorded in the lock file (its first word), or 'unknown'."""
    os.lseek(fd, 0, os.SEEK_SET)  # lseek + read, not pread: Windows has no pread
    words = os.read(fd, 64).decode(errors="replace").split()
    return words[0] if words and words[0].isdigit() else "unknown"


def acquire(directory: str | Path) -> None:
    """Take the lock on ``directory`` (created if needed), or raise :class:`RunLockedError` naming the holder."""
    key = Path(directory).resolve()
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        return
    _writable_dir(key)
    fd = _open_lock_file(key / LOCK_FILE)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunLockedError(f"{key} is in use by another fedlora run (pid {holder}); wait for it to finish "
                                 "or choose another --out") from None
    with contextlib.suppress(OSError):  # over the first bytes, no truncation (older "pid\n" records are shorter)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid():<{PID_WIDTH}}\n".encode())
    _held[key] = (fd, 1)


def release(directory: str | Path) -> None:
    """Drop one hold on ``directory``; the lock is released with the last one. The file stays (harmless)."""
    key = Path(directory).resolve()
    if key not in _held:
        return
    fd, depth = _held[key]
    if depth > 1:
        _held[key] = (fd, depth - 1)
        return
    del _held[key]
    os.close(fd)  # closing the descriptor releases the flock; the pid left behind names no holder (no lock)


@contextlib.contextmanager
def locked(directory: str | Path) -> Iterator[None]:
    """``with locked(out): ...``: the run directory is this process's for the block."""
    acquire(directory)
    try:
        yield
    finally:
        release(directory)
