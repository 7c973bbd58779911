"""Secure aggregation on Flower: the rounds run through Flower's own SecAgg+ (``SecAggPlusWorkflow`` on the
server, ``secaggplus_mod`` on every client), so the server learns only the weighted sum of the clients' uploads.

Route. Flower 1.42 ships SecAgg+ on the legacy ``fitins``/``fitres`` record layout and the legacy ``Strategy``
interface; fedlora's Message-API strategy cannot host it. So with ``secure-aggregation = true`` the ServerApp
runs its rounds through Flower's ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` with
:class:`SecureStrategy`, a legacy ``Strategy`` that is a thin translation of the same
:class:`fedlora.protocol.rounds.Server`: ``configure_fit`` is :meth:`Server.plan` + :meth:`Server.client_start`
as ``FitIns`` (the factors in :func:`wire_keys` order), ``aggregate_fit`` hands the unmasked weighted mean to
:meth:`Server.finish` (``summed=``), which aggregates the method from that one sum, evaluates, records and
checkpoints exactly as every other round. No cryptography is written here.

What the workflow computes: each client's uploaded arrays (the factors the method shares this round, and its
head) are clipped to ``[-clipping_range, clipping_range]`` (8), quantised to 2^22 levels, weighted by the
example count the client reports and masked; the server unmasks Σ_u n_u x_u / Σ_u n_u. Quantisation steps are
2 × 8 / 2^22 ≈ 3.8e-6 per value (the weights are quantised too): after one round the largest difference from the
plain weighted mean was 5.3e-6 (tests/integration/test_flower_secure.py asserts < 8e-6). Weights are
the clients' *claims* (bounded by ``max_weight``, the largest partition), not the server's partition table, and
nothing can be clipped or rejected per client: the weaker threat model (docs/failure-modes.md).

Only methods whose server needs one upload's weighted sum qualify (fedit, ffa-lora, fedsa-lora, fedsvd, rolora); the
others are refused in one line before anything loads (:func:`check_secure`). FedSA-LoRA's private B joins the masked
vector, so the server learns only the clients' mean B (for its evaluation-only global model) and no client's B is
ever stored on the server: a client that loses its state starts its B again from the init.

With user-level DP (``dp-clip``) the clipping moves to the clients, which the server cannot check: each client
clips its own update (uploaded factors and head, jointly) to the announced C (:func:`clip_upload`) and reports a
weight of 1, so the unmasked mean is Σ_u clip(Δ_u) / |active|; the server rescales it to the fixed denominator m
of the planned clients and adds the noise (:func:`fedlora.protocol.private.summed_server_step`), the DP-FedAvg of
the plain path with its accounting unchanged. ``max_weight`` is then 1, so no precision is lost to the weights.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.common import (EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters,
                         parameters_to_ndarrays)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from torch import Tensor

from fedlora.aggregation import Adapter, ClientUpdate, TrainingPolicy, available_methods, get_method
from fedlora.config.run import ConfigError, RunConfig
from fedlora.engines.flower.messages import train_task
from fedlora.engines.flower.nodes import NodeMap
from fedlora.engines.flower.wire import model_record, record_to_model, round_record
from fedlora.privacy.gaussian import clip_update
from fedlora.protocol.client import ClientResult
from fedlora.protocol.rounds import RoundPlan, Server

CLIPPING_RANGE = 8.0  # SecAgg+'s default: every uploaded value is clipped to [-8, 8] before quantisation


def check_secure(config: RunConfig) -> None:
    """Refuse, in one line, a run secure aggregation cannot carry."""
    spec = get_method(config.method)
    fits = [m for m in available_methods() if _fits(m)]
    if not _fits(config.method):
        why = ("it needs each client's update" if spec.policy.needs_individual_updates else
               "its two phases of sums are not wired to SecAgg+")
        raise ConfigError(f"secure-aggregation=true: method {config.method!r} cannot run on sums alone ({why}); "
                          f"use one of {', '.join(fits)}")
    if any(r != config.rank for r in config.client_ranks):
        raise ConfigError("secure-aggregation=true: mixed client ranks are not supported (every client's upload "
                          "must have the same shapes to be summed); drop client-ranks")


def _fits(method: str) -> bool:
    spec = get_method(method)
    return not spec.policy.needs_individual_updates and spec.phased is None


def upload_keys(policy: TrainingPolicy, adapter: Adapter, head: dict[str, Tensor]) -> list[str]:
    """What a client's masked vector holds: the factors it shares this round, its head, and a private B for the
    server's evaluation-only mean (FedSA-LoRA: under secure aggregation that mean is all the server learns of it)."""
    return wire_keys(adapter, head, A=policy.upload_A, B=policy.upload_B or bool(policy.private_factors))


def wire_keys(adapter: Adapter, head: dict[str, Tensor], *, A: bool, B: bool) -> list[str]:
    """The order in which factors and head travel as a legacy ``Parameters`` list (keys of ``model_record``)."""
    return sorted(model_record(adapter, head, A=A, B=B).keys())


def to_parameters(adapter: Adapter, head: dict[str, Tensor], *, A: bool, B: bool) -> Parameters:
    record = model_record(adapter, head, A=A, B=B)
    return ndarrays_to_parameters([record[k].numpy() for k in sorted(record.keys())])


def from_parameters(parameters: Parameters, keys: list[str], like: Adapter) -> tuple[Adapter, dict[str, Tensor]]:
    """The arrays of ``parameters`` under ``keys``, as (adapter, head); factors absent from ``keys`` from ``like``."""
    return record_to_model(record_from_parameters(parameters, keys), missing_from=like)


class SecureStrategy(Strategy):
    """The legacy ``Strategy`` SecAgg+ drives: :class:`Server`'s plan out, the unmasked weighted mean in."""

    def __init__(self, server: Server, nodes: NodeMap) -> None:
        self.server, self.nodes = server, nodes
        self.offset = server.state.round  # rounds completed before this Flower run (resume)
        self.plan: RoundPlan | None = None
        self.started = time.perf_counter()
        self.partition_of_node: dict[int, int] = {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters([])  # every round's FitIns carries the server's own state, not this

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        self.started = time.perf_counter()
        self.plan = plan = self.server.plan(server_round + self.offset)
        proxies = {proxy.node_id: proxy for proxy in client_manager.all().values()}
        node_for = self.nodes.node_for(set(proxies))
        policy = self.server.spec.policy.for_round(plan.round)
        full = policy.download_full_adapter
        out = []
        for partition in plan.clients:
            if partition not in node_for:
                continue
            client_id = self.server.federation.clients[partition].client_id
            adapter, head = self.server.client_start(client_id)
            config: dict[str, Scalar] = train_task(self.server, plan, partition, self.server.config.rank).to_dict()
            fit = FitIns(to_parameters(adapter, head, A=policy.upload_A or full, B=policy.upload_B or full), config)
            out.append((proxies[node_for[partition]], fit))
            self.partition_of_node[node_for[partition]] = partition
        return out

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        assert self.plan is not None, "configure_fit plans the round before its results arrive"
        plan = self.plan
        policy = self.server.spec.policy.for_round(plan.round)
        start, head = self.server.state.adapter, self.server.state.head
        clients = []
        for proxy, fitres in sorted(results, key=lambda r: self.partition_of_node.get(r[0].node_id, -1)):
            partition = self.partition_of_node[proxy.node_id]
            client = self.server.federation.clients[partition]
            metrics = {k.removeprefix("local."): float(v) for k, v in fitres.metrics.items() if k.startswith("local.")}
            clients.append(ClientResult(update=ClientUpdate(start, client.num_examples, client.client_id), head=head,
                                        loss=float(fitres.metrics.get("train-loss", float("nan"))),
                                        local_metrics=metrics or None))
        summed = None
        if results:  # every result carries the same unmasked mean
            keys = upload_keys(policy, start, head)
            summed = from_parameters(results[0][1].parameters, keys, like=start)
        extra = {"failed_nodes": [{"node": None, "partition": None, "reason": str(f)} for f in failures],
                 "secure_aggregation": "SecAgg+"}
        self.server.finish(plan, clients, self.started, extra=extra, summed=summed)
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []  # the server evaluates centrally (Server.finish), as in every engine

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[Any]) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None


def record_from_parameters(parameters: Parameters, keys: list[str]) -> ArrayRecord:
    """A legacy ``Parameters`` list as the ArrayRecord the Message-API client path reads."""
    arrays = parameters_to_ndarrays(parameters)
    if len(arrays) != len(keys):
        raise ValueError(f"{len(arrays)} arrays where {len(keys)} were expected")
    return round_record({k: torch.from_numpy(np.array(a, dtype=np.float32)) for k, a in zip(keys, arrays)})


def clip_upload(arrays: ArrayRecord, start: ArrayRecord, clip: float) -> ArrayRecord:
    """A client's upload with its change from ``start`` clipped to L2 norm ``clip`` jointly over every array
    (user-level DP under secure aggregation: the client clips, since the server never sees the update)."""
    keys = sorted(arrays.keys())
    new = {k: torch.from_numpy(np.array(arrays[k].numpy(), dtype=np.float64)) for k in keys}
    old = {k: torch.from_numpy(np.array(start[k].numpy(), dtype=np.float64)) for k in keys}
    deltas = {k: new[k] - old[k] for k in keys}
    clipped, _ = clip_update(deltas, clip)
    return round_record({k: (old[k] + clipped[k]).float() for k in keys})
