"""An on-disk cache of each client's tokenised data, for SuperNodes.

A SuperNode starts a fresh ClientApp process for every message, so an in-process cache does
not survive a round and each round would re-read, re-partition and re-tokenise the whole task
(~15 s for SST-2 on a laptop core). The first ClientApp to build the federation saves every
client's ``ClientData`` (Arrow files, exact round-trip); later ones memory-map their own.

The key covers every input of :func:`fedlora.protocol.federation.build_federation` -- the config fields
declared ``data=True`` in :class:`fedlora.config.run.RunConfig` (derived, never listed here), the
resolved data directory, the content of the task's data files (size, mtime and SHA-256 of each,
:mod:`fedlora.tasks.fingerprint`: not the path alone, or an edited file would train clients on the old
rows while the server evaluates the new ones), the tokenizer and the source of the data and task
code -- so a changed option, file or partitioner never reads stale data. Location: ``$FEDLORA_CACHE_DIR`` or
``~/.cache/fedlora``; delete it freely.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import shutil
import uuid
from pathlib import Path
from types import ModuleType

import datasets
from transformers import PreTrainedTokenizerBase

import fedlora.tasks.glue
import fedlora.protocol.federation
import fedlora.tasks
from fedlora.tasks import Task, task_for
from fedlora.config.run import RunConfig
from fedlora.config.schema import data_fields
from fedlora.tasks.glue.loading import resolve_data_dir
from fedlora.tasks.fingerprint import fingerprint
from fedlora.protocol.federation import ClientData, Federation, build_federation

CACHE_ENV = "FEDLORA_CACHE_DIR"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fedlora") / "clients"


def federation_key(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> str:
    fields = {name: getattr(config, name) for name in data_fields(RunConfig)}
    data_dir = resolve_data_dir(config.data_dir)
    fields |= {"data_dir": str(data_dir) if data_dir else None, "tokenizer": tokenizer.name_or_path, "vocab": len(tokenizer),
               "files": [[f.name, f.size, f.mtime_ns, f.sha256] for f in fingerprint(config)]}
    code = "".join(inspect.getsource(module) for module in _data_code())
    return hashlib.sha256((json.dumps(fields, sort_keys=True, default=str) + code).encode()).hexdigest()[:20]


def _data_code() -> list[ModuleType]:
    """Every module whose code decides what a client holds: the federation, the data and task packages.

    Listed from the packages themselves (not from what happens to be imported), so the ServerApp and
    every ClientApp compute the same key.
    """
    modules = [fedlora.protocol.federation]
    for package in (fedlora.tasks.glue, fedlora.tasks):
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            modules.append(importlib.import_module(f"{package.__name__}.{info.name}"))
    return modules


def client_data(config: RunConfig, tokenizer: PreTrainedTokenizerBase, partition: int) -> tuple[Task, ClientData]:
    """Client ``partition``'s data, identical to ``build_federation(config, tokenizer).clients[partition]``."""
    root = cache_root() / federation_key(config, tokenizer)
    if not (root / "complete").exists():
        _save(build_federation(config, tokenizer).clients, root)
    client = f"client-{partition}"
    return task_for(config), ClientData(
        client_id=client,
        train=datasets.load_from_disk(str(root / client / "train")),
        local_test=datasets.load_from_disk(str(root / client / "local_test")),
    )


def warm(config: RunConfig, tokenizer: PreTrainedTokenizerBase, federation: Federation) -> None:
    """Save an already built federation (the ServerApp has one): SuperNodes on this machine skip tokenising."""
    root = cache_root() / federation_key(config, tokenizer)
    if not (root / "complete").exists():
        _save(federation.clients, root)


def _save(clients: list[ClientData], root: Path) -> None:
    # Build in a private directory, then rename: two SuperNodes filling the cache at once
    # each write their own copy and the first rename wins; nobody reads a half-written one.
    tmp = root.with_name(f"{root.name}.{uuid.uuid4().hex}.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    for c in clients:
        c.train.save_to_disk(str(tmp / c.client_id / "train"))
        c.local_test.save_to_disk(str(tmp / c.client_id / "local_test"))
    (tmp / "complete").touch()
    try:
        os.rename(tmp, root)
    except OSError:  # another process got there first (or a stale partial directory exists)
        if not (root / "complete").exists():
            shutil.rmtree(root, ignore_errors=True)
            os.rename(tmp, root)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
