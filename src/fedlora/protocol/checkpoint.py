"""Server state between rounds, saved atomically in one safetensors file (never pickle).

The checkpoint holds everything a round depends on: the global adapter and head, the frozen
weights changed by merged ``base_delta`` (FedEx-LoRA, FLoRA), the index of every FedSA-LoRA client's private
B (the files themselves are one per client under ``private/``: :mod:`fedlora.protocol.private_store`), a stateful method's server-side tensors (svd-ef's residual), and the metrics history (so ``metrics.jsonl`` can be rewritten exactly on resume). JSON
fields live in the safetensors metadata. Writes go to a temporary file then ``os.replace``, so a
crash leaves either the previous checkpoint or the new one, never half of one.

Integrity: the metadata also holds the run's config (config.json as it was when the round was
saved), the fingerprint of the data it trained on (:mod:`fedlora.tasks.fingerprint`) and a SHA-256
digest over every tensor (name, dtype, shape, bytes) and the rest of the metadata. :func:`load_state`
recomputes it, so flipped bytes, a float16 rewrite, an edited round number or history, or a
checkpoint spliced from another run are refused with one line instead of resuming as a different
experiment. The digest detects accidents and careless edits; it is not a
signature (anyone who can write the file can recompute it).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from fedlora.aggregation import Adapter, LoraPair
from fedlora.protocol.private_store import PRIVATE_DIR, PrivateStore
from fedlora.testing.failpoints import failpoint
from fedlora.util.atomic import fresh_tmp
from fedlora.util.jsonsafe import make_json_safe

CHECKPOINT_FILE = "checkpoint.safetensors"
CONFIG_FILE = "config.json"
DIGEST_KEY = "fedlora-sha256"


class CheckpointError(ValueError):
    """The checkpoint is missing, unreadable, corrupt or was modified; the message says which and where."""


@dataclass
class ServerState:
    """The whole server side of a run after ``round`` rounds: the single source of truth for ``--resume``.

    Saved atomically each round as one safetensors file (tensors) with its JSON metadata (history,
    seeds, data fingerprint) and a digest; ``metrics.jsonl`` is rewritten from ``history``.
    ``private`` holds each client's private factor (FedSA-LoRA; on disk, indexed here), ``method_state`` what a stateful
    method carries between rounds, ``base_weights`` the frozen weights merges have changed.
    """

    round: int  # rounds completed
    adapter: Adapter
    head: dict[str, Tensor]
    base_weights: dict[str, Tensor] = field(default_factory=dict)  # module -> merged W0 (d, k)
    private: PrivateStore = field(default_factory=lambda: PrivateStore(None))  # client -> module -> (d, r)
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics record per round
    init_seed: int = -1  # seed of the last server-drawn adapter re-init (FLoRA); -1: the initial adapter
    method_state: dict[str, Tensor] = field(default_factory=dict)  # a stateful method's tensors (svd-ef's residual)
    config: str | None = None  # the run's config.json when this round was saved (None: not recorded)
    data: dict[str, Any] | None = None  # fedlora.tasks.fingerprint.record of the data trained on (None: not recorded)


def save_state(state: ServerState, directory: Path) -> Path:
    """Write the checkpoint atomically: a temporary file, fsync, then ``os.replace``."""
    tensors: dict[str, Tensor] = {}
    for module, pair in state.adapter.items():
        tensors[f"adapter/{module}/A"] = pair.A
        tensors[f"adapter/{module}/B"] = pair.B
    tensors.update({f"head/{k}": v for k, v in state.head.items()})
    tensors.update({f"base/{k}": v for k, v in state.base_weights.items()})
    for client, Bs in (state.private.legacy | state.private.memory).items():  # not (yet) in files of their own
        tensors.update({f"localB/{client}/{m}": B for m, B in Bs.items()})
    tensors.update({f"method/{k}": v for k, v in state.method_state.items()})
    make_json_safe(state.history)  # strict JSON here and in the metrics.jsonl written from the same list
    config_file = directory / CONFIG_FILE
    if config_file.is_file():
        state.config = config_file.read_text()
    meta = {"round": state.round, "history": state.history, "init_seed": state.init_seed, "config": state.config,
            "data": state.data, "private": state.private.to_meta()}
    text = json.dumps(meta, allow_nan=False)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    path = directory / CHECKPOINT_FILE
    tmp = fresh_tmp(path)  # the run lock keeps anyone else from planting a new one before save_file opens it
    save_file(tensors, str(tmp), metadata={"fedlora": text, DIGEST_KEY: state_digest(tensors, text)})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    failpoint("checkpoint", state.round)
    os.replace(tmp, path)
    return path


def state_digest(tensors: dict[str, Tensor], meta_text: str) -> str:
    """SHA-256 over each tensor's name, dtype, shape and bytes (sorted by name), then the metadata text."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes, any dtype (bf16 too)
    digest.update(meta_text.encode())
    return digest.hexdigest()


def load_state(directory: Path) -> ServerState:
    """The checkpoint in ``directory``, verified against its digest; :class:`CheckpointError` if it is not intact."""
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; --resume needs the --out directory of an earlier run")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        text, stored = metadata["fedlora"], metadata.get(DIGEST_KEY)
    except (SafetensorError, KeyError, OSError) as exc:
        raise CheckpointError(f"{path} is not a fedlora checkpoint (safetensors with fedlora metadata): "
                              f"{type(exc).__name__}: {exc}") from None
    if stored is None:
        raise CheckpointError(f"{path} has no integrity digest ({DIGEST_KEY}): it was written by an older fedlora "
                              "or edited; it cannot be verified, so it is not resumed")
    if state_digest(tensors, text) != stored:
        raise CheckpointError(f"{path} is corrupt or was modified: its tensors or metadata do not match the "
                              "digest written with it; restore the file or start the run again")
    try:
        return _state_from(tensors, json.loads(text), directory / PRIVATE_DIR)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise CheckpointError(f"{path} has malformed fedlora metadata ({type(exc).__name__}: {exc})") from None


def _state_from(tensors: dict[str, Tensor], meta: dict[str, Any], private_dir: Path) -> ServerState:
    from fedlora.tasks.fingerprint import check_record

    adapter: dict[str, dict[str, Tensor]] = {}
    legacy: dict[str, dict[str, Tensor]] = {}
    history = meta["history"]
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise ValueError("history is not a list of round records")
    state = ServerState(round=int(meta["round"]), adapter={}, head={}, history=list(history),
                        init_seed=int(meta.get("init_seed", -1)), config=meta.get("config"),
                        data=check_record(meta.get("data")))
    if state.round < 0 or len(history) != state.round:
        raise ValueError(f"round {state.round} but {len(history)} round records")
    for key, value in tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "adapter":
            module, _, factor = rest.rpartition("/")
            adapter.setdefault(module, {})[factor] = value
        elif kind == "head":
            state.head[rest] = value
        elif kind == "base":
            state.base_weights[rest] = value
        elif kind == "method":
            state.method_state[rest] = value
        elif kind == "localB":
            client, _, module = rest.partition("/")
            legacy.setdefault(client, {})[module] = value
        else:
            raise ValueError(f"unknown tensor {key!r}")
    state.adapter = {m: LoraPair(A=f["A"], B=f["B"]) for m, f in adapter.items()}
    state.private = PrivateStore(private_dir, PrivateStore.index_from_meta(meta.get("private", {})), legacy=legacy)
    return state
