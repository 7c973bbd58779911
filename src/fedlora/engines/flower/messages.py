"""The typed messages of a Flower round: one type down, one type up, and the rank boundary between them.

* :class:`TrainDownload` (server → client): a :class:`TrainTask` (what to do), the factors and head that travel,
  and the frozen-weight merges the node has not made. The strategy builds it
  (:class:`fedlora.engines.flower.strategy.FedLoraStrategy`); :func:`fedlora.engines.flower.wire.download_content`
  writes it and :func:`~fedlora.engines.flower.wire.read_download` reads it back on the client, checking every
  config key's presence and type (:meth:`TrainTask.from_config`).
* :class:`TrainReply` (client → server): the shared factors and head, FedSA-LoRA's evaluation-only B, a phased
  method's first upload, and the client's counts. The client builds it and
  :func:`~fedlora.engines.flower.wire.reply_content` writes it; the server reads it back only through
  :func:`fedlora.engines.flower.replies.parse_train_reply`, which checks everything an untrusted node could get wrong.
* :class:`RankBoundary`: mixed ranks travel as the client's r_u components and are zero-padded to the model's
  rank R on arrival; each side crosses the boundary with this one object (the server: ``to_wire`` on send,
  ``from_wire`` on receipt; the client: the reverse), nowhere else.

Config keys on the wire are the dashed field names; a phased method's later round trips carry only
``server-round`` and ``phase`` (:mod:`fedlora.engines.flower.phases`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any

from flwr.app import ConfigRecord
from torch import Tensor

from fedlora.aggregation import Adapter
from fedlora.aggregation.ranks import pad, truncate
from fedlora.config.run import ConfigError
from fedlora.protocol.rounds import BaseMerge

TRAIN_METRICS = ("num-examples", "partition-id", "train-loss", "base-version")  # what every TRAIN reply reports
LOCAL_PREFIX = "local."  # the client's metrics on its local test split
PHASE_UPLOAD = "phase-upload"  # a phased method's upload (FedASK's sketches), {name: tensor}


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


@dataclass(frozen=True)
class TrainDownload:
    """One node's TRAIN message: the task, what it is sent, and the merges it still lacks."""

    task: TrainTask
    arrays: dict[str, Tensor]  # PEFT state-dict names: the factors that travel (at the client's rank) and the head
    merges: dict[int, BaseMerge]  # round -> the frozen-weight merge this node has not made; {} for most methods


@dataclass(frozen=True)
class TrainReply:
    """One client's TRAIN reply. Built by the client; on the server only ever the output of
    :func:`fedlora.engines.flower.replies.parse_train_reply`, so every field has been checked."""

    arrays: dict[str, Tensor]  # the factors the policy uploads (at the client's rank) and the head, PEFT names
    eval_B: dict[str, Tensor] | None  # FedSA-LoRA's private B, for the server's evaluation-only mean; else None
    num_examples: int
    loss: float
    local_metrics: dict[str, float] | None  # on the client's local test split, when asked for
    base_version: int  # the newest frozen-weight merge the client has made
    phase_upload: dict[str, Tensor] | None = None  # a phased method's phase-1 upload (FedASK's sketches)
    partition_id: int = -1  # the partition the client trained (checked against the server's binding)


@dataclass(frozen=True)
class RankBoundary:
    """Where a client's rank r_u meets the model's rank R (mixed ranks; r_u = R otherwise).

    The wire carries the first r_u components, (r_u, k) and (d, r_u); the model holds R, zero-padded. A client
    trained at r_u leaves the padding at zero (:mod:`fedlora.aggregation.ranks`), so ``from_wire(to_wire(x))``
    loses nothing it trained.
    """

    client: int  # r_u
    model: int  # R

    def to_wire(self, adapter: Adapter) -> Adapter:
        return truncate(adapter, self.client)

    def from_wire(self, adapter: Adapter) -> Adapter:
        return pad(adapter, self.model)
