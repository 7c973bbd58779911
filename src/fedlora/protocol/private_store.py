"""Each client's private factors (FedSA-LoRA's B) on disk, one small safetensors file per client, not in RAM.

Why: a federation of 10,000 FedSA-LoRA clients on MiniLM holds 10,000 × 12 × (384 × 8) floats of private B
(1.5 GB); kept in the server's memory and rewritten into the checkpoint every round, that is the run's largest
cost. Here only an index lives in memory and in the checkpoint: client → (round its B was written, SHA-256 of
the file). A round writes the files of the clients it trained; nothing else is touched.

Crash safety, with the checkpoint as the source of truth: a client's B of round t goes to a new file
``<client>.r<t>.safetensors`` (temporary file, fsync, rename) and the index that names it is committed only by
the round's checkpoint. The file it replaces is deleted after that checkpoint (:meth:`PrivateStore.commit`), and
opening a store deletes every file its index does not name: after a crash, whatever a half-finished round wrote
is gone and the checkpoint's files are intact. A file is checked against its digest whenever it is read, so a
replaced or edited B is refused, not trained from.

Checkpoints written before this store hold the B tensors themselves; they are read into memory (``legacy``) and
move to disk as their clients train again.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from safetensors.torch import load, save
from torch import Tensor

from fedlora.util.atomic import atomic_write_bytes

PRIVATE_DIR = "private"  # under the run's --out
_SAFE_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class PrivateStoreError(ValueError):
    """A private-factor file is missing or does not match the digest the checkpoint recorded for it."""


class PrivateStore:
    """client id -> {module: (d, r) tensor}, on disk under ``directory`` (``None``: in memory, e.g. a dry run)."""

    def __init__(self, directory: Path | None, index: dict[str, tuple[int, str]] | None = None,
                 legacy: dict[str, dict[str, Tensor]] | None = None) -> None:
        self.directory = directory
        self.index: dict[str, tuple[int, str]] = dict(index or {})  # client -> (round written, sha256 of its file)
        self.legacy: dict[str, dict[str, Tensor]] = dict(legacy or {})  # from a checkpoint older than the store
        self.memory: dict[str, dict[str, Tensor]] = {}  # directory None: everything here
        self.superseded: list[Path] = []  # files replaced this round, deleted once the checkpoint commits

    # -- reading ----------------------------------------------------------------------------------
    def __contains__(self, client_id: object) -> bool:
        return client_id in self.index or client_id in self.legacy or client_id in self.memory

    def __len__(self) -> int:
        return len(set(self.index) | set(self.legacy) | set(self.memory))

    def get(self, client_id: str) -> dict[str, Tensor] | None:
        """The client's private factors, or None if it has none yet; checked against the recorded digest."""
        if client_id in self.memory:
            return self.memory[client_id]
        if client_id in self.index:
            assert self.directory is not None
            round_, digest = self.index[client_id]
            path = self._path(client_id, round_)
            try:
                data = path.read_bytes()  # read once: hashed, then decoded from the same bytes
            except FileNotFoundError:
                raise PrivateStoreError(f"{path} is missing: client {client_id!r}'s private factors of round {round_}, "
                                        "which the checkpoint names; restore the file or start the run again") from None
            if hashlib.sha256(data).hexdigest() != digest:
                raise PrivateStoreError(f"{path} does not match the digest the checkpoint recorded for it (edited or "
                                        "replaced); restore the file or start the run again")
            return load(data)
        return self.legacy.get(client_id)

    # -- writing ----------------------------------------------------------------------------------
    def put(self, client_id: str, factors: dict[str, Tensor], round_: int) -> None:
        """Store ``factors`` as the client's private factors of ``round_`` (committed by that round's checkpoint)."""
        if self.directory is None:
            self.memory[client_id] = factors
            return
        if not _SAFE_ID.fullmatch(client_id):
            raise ValueError(f"client id {client_id!r} cannot name a file; use letters, digits, '_', '.', '-'")
        self.directory.mkdir(parents=True, exist_ok=True)
        data = save({m: t.detach().contiguous() for m, t in factors.items()})
        atomic_write_bytes(self._path(client_id, round_), data)
        if client_id in self.index and self.index[client_id][0] != round_:
            self.superseded.append(self._path(client_id, self.index[client_id][0]))
        self.index[client_id] = (round_, hashlib.sha256(data).hexdigest())
        self.legacy.pop(client_id, None)

    def commit(self) -> None:
        """After the round's checkpoint: delete the files it no longer names."""
        for path in self.superseded:
            path.unlink(missing_ok=True)
        self.superseded.clear()

    def clean(self) -> None:
        """Delete every file under the directory that the index does not name (what a crashed round wrote)."""
        if self.directory is None or not self.directory.is_dir():
            return
        named = {self._path(c, r).name for c, (r, _) in self.index.items()}
        for path in self.directory.iterdir():
            if path.is_file() and path.name not in named:
                path.unlink()

    # -- the checkpoint's part ----------------------------------------------------------------------
    def to_meta(self) -> dict[str, list[Any]]:
        return {client: [round_, digest] for client, (round_, digest) in sorted(self.index.items())}

    @staticmethod
    def index_from_meta(meta: Any) -> dict[str, tuple[int, str]]:
        if not isinstance(meta, dict):
            raise ValueError("private index is not a mapping")
        index = {}
        for client, value in meta.items():
            round_, digest = value
            if not _SAFE_ID.fullmatch(str(client)) or not isinstance(digest, str):
                raise ValueError(f"private index entry {client!r} is malformed")
            index[str(client)] = (int(round_), digest)
        return index

    def _path(self, client_id: str, round_: int) -> Path:
        assert self.directory is not None
        return self.directory / f"{client_id}.r{round_}.safetensors"
