"""What data a run trains on: its task's data files, identified by content (SHA-256).

:func:`fingerprint` lists the files the task reads (:meth:`fedlora.tasks.Task.data_files`, in the
task's order) with each one's SHA-256, size and mtime. Two uses:

* the checkpoint records the names and hashes (:func:`record`), never where the files were: a moved
  or copied folder holding the same bytes is the same data and resumes, while other content (another
  dataset, an edited file, train and test swapped) is refused naming both folders
  (:func:`check_same_data`), before any model loads;
* the Flower data cache keys each federation by every file's size, mtime and hash, so an in-place
  edit, even one that keeps the size and the mtime, is a new key (:mod:`fedlora.engines.flower.data_cache`).

Cost: each file is read once per fingerprint (hashlib streams it in C, ~1 GB/s; GSM8K's two files
take ~5 ms). A run fingerprints its data when it starts (twice on ``--resume``: the check, then the
engine's own) and every round's checkpoint reuses that record; nothing is hashed per round.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.config.run import ConfigError

if TYPE_CHECKING:
    from fedlora.config.run import RunConfig


@dataclass(frozen=True)
class DataFile:
    name: str  # relative to the data folder when inside it (messages only: the hash is the identity)
    sha256: str
    size: int
    mtime_ns: int


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def data_folder(config: RunConfig) -> Path | None:
    """The folder the data comes from (``--data-dir``, else ``$FEDLORA_DATA_DIR``); None: the hub or built in."""
    from fedlora.tasks.glue.loading import resolve_data_dir

    return resolve_data_dir(config.data_dir)


def fingerprint(config: RunConfig) -> list[DataFile]:
    """The run's data files (:meth:`~fedlora.tasks.Task.data_files`), each with its hash, size and mtime.

    Raises FileNotFoundError (with the task's hint) when a file the task needs is missing.
    """
    from fedlora.tasks import task_for

    root = data_folder(config)
    out = Path(config.out).resolve()
    files = []
    for path in task_for(config).data_files(config.data_dir):
        if path.resolve().is_relative_to(out):
            continue  # a run directory inside the data folder: its checkpoint is not data, and changes every round
        stat = path.stat()
        name = path.relative_to(root).as_posix() if root is not None and path.is_relative_to(root) else path.name
        files.append(DataFile(name=name, sha256=file_sha256(path), size=stat.st_size, mtime_ns=stat.st_mtime_ns))
    return files


def record(config: RunConfig) -> dict[str, Any]:
    """What the checkpoint keeps: the folder (for messages) and each file's name, size and hash."""
    folder = data_folder(config)
    return {"dir": None if folder is None else str(folder),
            "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in fingerprint(config)]}


def check_record(value: Any) -> dict[str, Any] | None:
    """``value`` if it has :func:`record`'s shape (or is None: a checkpoint from before fingerprints), else ValueError."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("dir"), (str, type(None))):
        raise ValueError("the data fingerprint is not {dir, files: [{name, size, sha256}]}")
    files = value.get("files")
    if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("sha256"), str)
                                              and isinstance(f.get("name"), str) for f in files):
        raise ValueError("the data fingerprint is not {dir, files: [{name, size, sha256}]}")
    return value


def _describe(folder: str | None, files: list[dict[str, Any]]) -> str:
    where = folder if folder is not None else "no data folder (the hub or built-in data)"
    if not files:
        return f"{where} with no data files"
    return f"{where} with " + ", ".join(f"{f['name']} (sha256 {f['sha256'][:12]})" for f in files)


def check_same_data(recorded: dict[str, Any] | None, config: RunConfig) -> None:
    """Refuse (ConfigError, one line naming both) to resume a checkpoint trained on data with another
    content than ``config``'s; ``recorded`` None (a checkpoint without a fingerprint) cannot be checked."""
    if recorded is None:
        return
    now = record(config)
    if [f["sha256"] for f in now["files"]] == [f["sha256"] for f in recorded["files"]]:
        return
    changed = [(old, new) for old, new in zip(recorded["files"], now["files"]) if old["sha256"] != new["sha256"]]
    if changed and len(recorded["files"]) == len(now["files"]):  # name the first file that differs
        old, new = changed[0]
        was, is_ = _describe(recorded.get("dir"), [old]), _describe(now["dir"], [new])
    else:
        was, is_ = _describe(recorded.get("dir"), recorded["files"]), _describe(now["dir"], now["files"])
    raise ConfigError(f"--resume: the data differs from the data the checkpoint was trained on: now {is_}, was "
                      f"{was}; resume on the same data (a moved copy is fine) or start a new run with another --out")
