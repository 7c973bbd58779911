"""The typed TRAIN instruction between the ServerApp and a ClientApp: one dataclass, written once each way.

The server's side (:class:`fedlora.engines.flower.strategy.FedLoraStrategy`, and the secure rounds'
:class:`fedlora.engines.flower.secure.SecureStrategy`) builds a :class:`TrainTask` and writes it with
:meth:`TrainTask.to_config`; the client reads it back with :meth:`TrainTask.from_config`, which checks every key's
presence and type and names what is wrong. The reply is typed by :class:`fedlora.engines.flower.replies.TrainReply`.
Keys on the wire are the dashed names below; a phased method's later round trips carry only ``server-round`` and
``phase`` (:mod:`fedlora.engines.flower.phases`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any

from flwr.app import ConfigRecord

from fedlora.config.run import ConfigError


@dataclass(frozen=True)
class TrainTask:
    """What one client is told to do in one round, besides the arrays it is sent."""

    server_round: int  # the run's round (continues after a resume)
    local_eval: bool  # evaluate on the local test split after training
    partition_id: int  # the partition the server bound to this node
    init_seed: int  # the seed of the global adapter the client rebuilds (FLoRA's re-init); -1: the initial one
    client_rank: int  # the client's LoRA rank (mixed ranks: only that many components travel)
    base_reset: bool = False  # the merges sent are the sum of all: restore the pristine frozen weights first
    method_seed: int = -1  # the round's method seed (FedASK's sketch); -1: the method draws none
    dp_sgd_noise: float = 0.0  # record-level DP-SGD's noise multiplier; 0: off

    def to_config(self) -> ConfigRecord:
        return ConfigRecord({_key(f.name): getattr(self, f.name) for f in fields(self)})

    def to_dict(self) -> dict[str, Any]:
        """The same as a plain dict (the legacy ``FitIns.config`` of a secure round)."""
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_config(cls, record: Mapping[str, Any]) -> TrainTask:
        """The task in ``record``; a :class:`ConfigError` naming the missing or mistyped key otherwise."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = _key(f.name)
            if key not in record:
                if f.default is not MISSING:  # has a default: an older server may omit it
                    continue
                raise ConfigError(f"TRAIN message lacks config {key!r}")
            value, kind = record[key], {"int": int, "bool": bool, "float": float}[str(f.type)]
            ok = isinstance(value, kind) if kind is not float else isinstance(value, (int, float))
            if not ok or (kind is int and isinstance(value, bool)):
                raise ConfigError(f"TRAIN message config {key!r}={value!r} is not a {kind.__name__}")
            values[f.name] = kind(value)
        return cls(**values)


def _key(name: str) -> str:
    return name.replace("_", "-")


def train_task(server: Any, plan: Any, partition: int, rank: int, *, base_reset: bool = False) -> TrainTask:
    """The :class:`TrainTask` of ``partition`` in ``plan`` (a :class:`fedlora.protocol.plan.RoundPlan` of ``server``)."""
    return TrainTask(server_round=plan.round, local_eval=plan.local_eval, partition_id=partition,
                     init_seed=server.state.init_seed, client_rank=rank, base_reset=base_reset,
                     method_seed=int(plan.options.get("seed", -1)), dp_sgd_noise=float(plan.dp_sgd_noise))
