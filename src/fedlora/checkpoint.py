"""Server state between rounds, saved atomically in one safetensors file (never pickle).

The checkpoint holds everything a round depends on: the global adapter and head, the frozen
weights changed by merged ``base_delta`` (FedEx-LoRA, FLoRA), every FedSA-LoRA client's private
B, a stateful method's server-side tensors (svd-ef's residual), and the metrics history (so ``metrics.jsonl`` can be rewritten exactly on resume). JSON
fields live in the safetensors metadata. Writes go to a temporary file then ``os.replace``, so a
crash leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from fedlora.aggregation import Adapter, LoraPair
from fedlora.failpoints import failpoint

CHECKPOINT_FILE = "checkpoint.safetensors"


@dataclass
class ServerState:
    round: int  # rounds completed
    adapter: Adapter
    head: dict[str, Tensor]
    base_weights: dict[str, Tensor] = field(default_factory=dict)  # module -> merged W0 (d, k)
    local_B: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # client -> module -> (d, r)
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics record per round
    init_seed: int = -1  # seed of the last server-drawn adapter re-init (FLoRA); -1: the initial adapter
    method_state: dict[str, Tensor] = field(default_factory=dict)  # a stateful method's tensors (svd-ef's residual)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_state(state: ServerState, directory: Path) -> Path:
    """Write the checkpoint atomically: a temporary file, fsync, then ``os.replace``."""
    tensors: dict[str, Tensor] = {}
    for module, pair in state.adapter.items():
        tensors[f"adapter/{module}/A"] = pair.A
        tensors[f"adapter/{module}/B"] = pair.B
    tensors.update({f"head/{k}": v for k, v in state.head.items()})
    tensors.update({f"base/{k}": v for k, v in state.base_weights.items()})
    for client, Bs in state.local_B.items():
        tensors.update({f"localB/{client}/{m}": B for m, B in Bs.items()})
    tensors.update({f"method/{k}": v for k, v in state.method_state.items()})
    meta = {"round": state.round, "history": state.history, "init_seed": state.init_seed}
    path = directory / CHECKPOINT_FILE
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"fedlora": json.dumps(meta)})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    failpoint("checkpoint", state.round)
    os.replace(tmp, path)
    return path


def load_state(directory: Path) -> ServerState:
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; --resume needs the --out directory of an earlier run")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["fedlora"])
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as exc:
        raise ValueError(f"{path} is not a fedlora checkpoint (safetensors with fedlora metadata): {exc}") from exc
    adapter: dict[str, dict[str, Tensor]] = {}
    state = ServerState(round=int(meta["round"]), adapter={}, head={}, history=list(meta["history"]),
                        init_seed=int(meta.get("init_seed", -1)))
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
            state.local_B.setdefault(client, {})[module] = value
    state.adapter = {m: LoraPair(A=f["A"], B=f["B"]) for m, f in adapter.items()}
    return state
