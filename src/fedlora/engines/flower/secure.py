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

Every method whose server needs only sums qualifies (fedit, ffa-lora, fedsa-lora, fedsvd, rolora, fedask); the
others are refused in one line before anything loads (:func:`check_secure`). A phased method (FedASK) runs each
phase as one SecAgg+ sum: :class:`PhasedFit` calls the workflow again within the round, to the clients of phase 1. FedSA-LoRA's private B joins the masked
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
from fedlora.aggregation.phased import PhasedAggregation
from fedlora.config.run import ConfigError, RunConfig
from fedlora.engines.flower.messages import train_task
from fedlora.engines.flower.nodes import NodeMap
from fedlora.engines.flower.wire import model_record, record_tensors, record_to_model, round_record
from fedlora.privacy.gaussian import clip_update
from fedlora.protocol.client import ClientResult
from fedlora.protocol.plan import RoundPlan
from fedlora.protocol.rounds import Server

CLIPPING_RANGE = 8.0  # SecAgg+'s default: every uploaded value is clipped to [-8, 8] before quantisation


def check_secure(config: RunConfig) -> None:
    """Refuse, in one line, a run secure aggregation cannot carry."""
    fits = [m for m in available_methods() if _fits(m)]
    if not _fits(config.method):
        raise ConfigError(f"secure-aggregation=true: method {config.method!r} cannot run on sums alone (it needs each "
                          f"client's update); use one of {', '.join(fits)}")
    if any(r != config.rank for r in config.client_ranks):
        raise ConfigError("secure-aggregation=true: mixed client ranks are not supported (every client's upload "
                          "must have the same shapes to be summed); drop client-ranks")


def _fits(method: str) -> bool:
    return not get_method(method).policy.needs_individual_updates


PHASE_KEY = "phase-upload/"  # a phased method's upload inside a masked vector: PHASE_KEY + its name


def phase_keys(phased: PhasedAggregation, phase: int, adapter: Adapter, options: dict[str, Any]) -> list[str]:
    """The names of a phase's upload in a masked vector, in order (FedASK: one sketch per module)."""
    return sorted(PHASE_KEY + name for name in phased.shapes(phase, adapter, options))


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
        # A phased method (FedASK): each phase is one SecAgg+ sum (PhasedFit calls the workflow again while
        # ``pending``); what the server broadcast last, the mean head and the clients of phase 1 are kept between.
        self.phase = 1
        self.pending = False
        self.broadcast: dict[str, Tensor] = {}
        self.phase_head: dict[str, Tensor] = {}
        self.phase_clients: list[ClientResult] = []
        self.phase_bytes = [0, 0]  # up, down of the round's phases, measured from what was sent and unmasked

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters([])  # every round's FitIns carries the server's own state, not this

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        proxies = {proxy.node_id: proxy for proxy in client_manager.all().values()}
        if self.pending:  # a phased method's later phase: the broadcast to the clients of phase 1
            return self._configure_phase(proxies)
        self.started = time.perf_counter()
        self.plan = plan = self.server.plan(server_round + self.offset)
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
        if self.pending:
            return self._aggregate_phase(results, failures)
        phased = self.server.spec.phased
        if phased is not None and results:  # phase 1's sum: the mean head and Σ w Y; the server's step, then phase 2
            keys = sorted(upload_keys(policy, start, head) + phase_keys(phased, 1, start, plan.options))
            arrays = record_tensors(record_from_parameters(results[0][1].parameters, keys))
            _, self.phase_head = record_to_model(round_record({k: v for k, v in arrays.items()
                                                               if not k.startswith(PHASE_KEY)}), missing_from=start)
            total = {k.removeprefix(PHASE_KEY): v.double() for k, v in arrays.items() if k.startswith(PHASE_KEY)}
            g64 = {m: p.to(torch.float64) for m, p in start.items()}
            self.broadcast = phased.server(1, g64, total, {}, plan.options)
            self.phase_clients, self.phase, self.pending = clients, 2, True
            self.phase_bytes = [sum(t.numel() for t in total.values()) * 4 * len(clients), 0]
            return None, {}
        summed = None
        if results:  # every result carries the same unmasked mean
            keys = upload_keys(policy, start, head)
            summed = from_parameters(results[0][1].parameters, keys, like=start)
        self._finish(clients, failures, summed)
        return None, {}

    def _finish(self, clients: list[ClientResult], failures: list[Any], summed: Any) -> None:
        assert self.plan is not None
        extra = {"failed_nodes": [{"node": None, "partition": None, "reason": str(f)} for f in failures],
                 "secure_aggregation": "SecAgg+"}
        self.server.finish(self.plan, clients, self.started, extra=extra, summed=summed)

    # -- a phased method's later phases, one SecAgg+ sum each ----------------------------------------------
    def _configure_phase(self, proxies: dict[int, ClientProxy]) -> list[tuple[ClientProxy, FitIns]]:
        assert self.plan is not None
        names = sorted(self.broadcast)
        parameters = ndarrays_to_parameters([self.broadcast[m].float().numpy() for m in names])
        out = []
        for node, partition in sorted(self.partition_of_node.items(), key=lambda kv: kv[1]):
            client_id = self.server.federation.clients[partition].client_id
            if node in proxies and any(c.update.client_id == client_id for c in self.phase_clients):
                config: dict[str, Scalar] = {"server-round": self.plan.round, "phase": self.phase,
                                             "partition-id": partition}
                out.append((proxies[node], FitIns(parameters, config)))
        self.phase_bytes[1] += sum(t.numel() for t in self.broadcast.values()) * 4 * len(out)
        return out

    def _aggregate_phase(self, results: list[tuple[ClientProxy, FitRes]],
                         failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        assert self.plan is not None
        phased = self.server.spec.phased
        assert phased is not None
        start = self.server.state.adapter
        self.pending = False
        if not results:  # every client dropped out of the phase: the round is skipped, nothing changes
            self._finish([], failures, None)
            return None, {}
        keys = phase_keys(phased, self.phase, start, self.plan.options)
        arrays = record_tensors(record_from_parameters(results[0][1].parameters, keys))
        total = {k.removeprefix(PHASE_KEY): v.double() for k, v in arrays.items()}
        self.phase_bytes[0] += sum(t.numel() for t in total.values()) * 4 * len(results)
        g64 = {m: p.to(torch.float64) for m, p in start.items()}
        if self.phase < phased.phases:  # a method with more phases: the next broadcast, the next sum
            self.broadcast = phased.server(self.phase, g64, total, self.broadcast, self.plan.options)
            self.phase, self.pending = self.phase + 1, True
            return None, {}
        result = phased.finish(g64, total, self.broadcast, self.plan.options)
        summed = ({m: p.to(torch.float32) for m, p in result.adapter.items()}, self.phase_head)
        self.phase = 1
        self.server.finish(self.plan, self.phase_clients, self.started,
                           extra={"failed_nodes": [{"node": None, "partition": None, "reason": str(f)} for f in failures],
                                  "secure_aggregation": "SecAgg+", "phases": phased.phases},
                           summed=summed, summed_is_result=True, summed_bytes=tuple(self.phase_bytes))
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


class PhasedFit:
    """The fit workflow of a secure run: one SecAgg+ sum, then one more per later phase of a phased method (FedASK)."""

    def __init__(self, secagg: Any, strategy: SecureStrategy) -> None:
        self.secagg, self.strategy = secagg, strategy

    def __call__(self, grid: Any, context: Any) -> None:
        self.secagg(grid, context)
        while self.strategy.pending:
            self.secagg(grid, context)
