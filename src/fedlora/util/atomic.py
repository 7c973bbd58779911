"""Atomic file writes: a temporary sibling, fsync, then ``os.replace``, so a crash leaves the old file or the new one.

Used for everything a run writes that a resume or a reader relies on (the checkpoint, config.json, metrics.jsonl,
FedSA-LoRA's per-client files).
"""

from __future__ import annotations

import os
from pathlib import Path


def fresh_tmp(path: Path) -> Path:
    """``path``'s temporary sibling, with whatever stood there removed first: a planted ``*.tmp`` symlink is
    unlinked (never followed), so the write that follows cannot truncate the file it pointed to."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise OSError(f"{tmp} is a folder: remove it; fedlora writes its temporary file there") from None
    return tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = fresh_tmp(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
