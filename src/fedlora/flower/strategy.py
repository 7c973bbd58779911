"""``FedLoraStrategy``: Flower's FedAvg with the LoRA tensors aggregated by ``fedlora.aggregation``.

Round ``t`` mirrors :func:`fedlora.simulation.run` step by step: the clients are the local
engine's ``sample_clients(config, t)`` (partition ids, mapped to SuperNodes by one QUERY
message per new node), replies are sorted by partition id (the engine's order, so float sums
match), ``aggregate(method, previous global, updates)`` produces the next adapter, the head is
FedAvg-ed with example weights, and a ``base_delta`` is kept as round ``t``'s delta, sent to
every later-sampled client that has not merged it yet (clients report their base version):
FedEx-LoRA's dense (d, k) residual, FLoRA's stacked factors.

Messages carry only the LoRA factors the method's ``TrainingPolicy`` says travel (FFA-LoRA: B;
FedSA-LoRA: A, plus the clients' B as ``"eval-B"``, see :mod:`fedlora.flower.wire`); the strategy
rebuilds every reply's full adapter from the stashed global model, and measures each round's
array payloads both ways (``WireBytes``, written to ``metrics.jsonl`` as ``wire_*_bytes_*``).

Flower's ``aggregate_train`` is not given the previous global adapter; like Flower's own
FedOpt we stash it in ``configure_train``. Failed or missing replies are logged with their
node id and the round aggregates what arrived; with fewer than ``min_train_nodes`` replies the
round is skipped and the global state stays as it was.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log
from torch import Tensor

from fedlora.aggregation import Adapter, ClientUpdate, LoraPair, get_method
from fedlora.client import ClientResult, derived_seed
from fedlora.config import RunConfig
from fedlora.flower.wire import (WireBytes, content_bytes, deltas_record, model_record, record_to_model, select_factors,
                                 stacked_record)
from fedlora.server import server_step
from fedlora.simulation import HEAD_ROUND_SEED, sample_clients


class FedLoraStrategy(FedAvg):
    def __init__(self, config: RunConfig, *, min_train_nodes: int = 1, min_available_nodes: int = 0,
                 connect_timeout: float = 600.0) -> None:
        super().__init__(
            fraction_train=config.fraction,
            fraction_evaluate=0.0,  # the ServerApp evaluates centrally, as the local engine does
            min_train_nodes=min_train_nodes,
            min_available_nodes=min_available_nodes or config.clients,
        )
        self.config = config
        self.connect_timeout = connect_timeout  # how long round 1 waits for min_available_nodes SuperNodes
        self.spec = get_method(config.method)
        self.partition_of: dict[int, int] = {}  # node id -> partition id
        self.base_version: dict[int, int] = {}  # node id -> rounds of base_delta merged there
        self.base_deltas: dict[int, dict[str, Tensor]] = {}  # round -> {module: (d, k)}
        self.stacked: dict[int, dict[str, LoraPair]] = {}  # FLoRA: round -> {module: (A_stack, B_stack)}, float32
        self.init_seed = -1  # FLoRA: seed of the global adapter's re-init (-1: the initial adapter)
        self.current: ArrayRecord | None = None  # the global model sent this round (FedOpt's trick)
        self.sent: list[Message] = []  # this round's train messages, to name nodes that failed
        self.sent_bytes = WireBytes()  # what this round's train messages carry
        self.holds_local_B: set[int] = set()  # FedSA-LoRA: nodes that have trained, so keep their own B
        self.aggregated = False  # some round changed the global model (its B is no longer the clients' init)
        self.last_round: dict[str, Any] | None = None  # what the ServerApp needs for metrics.jsonl

    # -- sampling ---------------------------------------------------------------------------
    def _map_partitions(self, grid: Grid, timeout: float) -> None:
        """Ask every node we do not know yet for its partition id (one QUERY each)."""
        deadline = time.monotonic() + timeout
        # Only the first round waits; later rounds go on with whoever is connected.
        while (len(nodes := list(grid.get_node_ids())) < self.min_available_nodes and not self.partition_of
               and time.monotonic() < deadline):
            log(INFO, "waiting for SuperNodes: %d of %d connected", len(nodes), self.min_available_nodes)
            time.sleep(1)
        new = [n for n in nodes if n not in self.partition_of]
        if not new:
            return
        query = [Message(RecordDict({"config": ConfigRecord({"ask": "partition-id"})}), n, MessageType.QUERY) for n in new]
        for reply in grid.send_and_receive(query, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "node %d did not say its partition id: %s", node, reply.error.reason)
                continue
            self.partition_of[node] = int(reply.content["partition"]["partition-id"])
        log(INFO, "partition of each node: %s", self.partition_of)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.current = arrays
        self._map_partitions(grid, timeout=self.connect_timeout)
        live = set(grid.get_node_ids())
        node_for = {p: n for n, p in self.partition_of.items() if n in live}
        sampled = sample_clients(self.config, server_round)
        missing = [p for p in sampled if p not in node_for]
        if missing:
            log(WARNING, "round %d: partitions %s have no connected SuperNode; training without them", server_round, missing)
        every = self.config.eval_local_every
        local_eval = every > 0 and (server_round % every == 0 or server_round == self.config.rounds)
        messages = []
        for partition in (p for p in sampled if p in node_for):
            node = node_for[partition]
            have = self.base_version.get(node, 0)
            content = RecordDict({
                "arrays": self._download(arrays, node),
                "config": ConfigRecord({"server-round": server_round, "local-eval": local_eval, "partition-id": partition,
                                        "init-seed": self.init_seed}),
            })
            # FedEx-LoRA / FLoRA: the merges this client has not made yet, in round order
            if self.spec.policy.download_stacked and (pending := {r: f for r, f in self.stacked.items() if r > have}):
                content["base-factors"] = stacked_record(pending)
            elif pending := {r: d for r, d in self.base_deltas.items() if r > have}:
                content["base-delta"] = deltas_record(pending)
            messages.append(Message(content, node, MessageType.TRAIN))
        self.sent = messages
        self.sent_bytes = sum((content_bytes(m.content) for m in messages), WireBytes())
        log(INFO, "configure_train: round %d, partitions %s", server_round, [p for p in sampled if p in node_for])
        return messages

    def _download(self, arrays: ArrayRecord, node: int) -> ArrayRecord:
        """The global model with only the factors that travel down to ``node``.

        Down travels what goes up (``round_bytes``' convention). FFA-LoRA's frozen A is the
        seed-determined init every client builds itself, and so is FLoRA's re-initialised global
        adapter (its merges travel as stacked factors instead). FedSA-LoRA's B is the client's own, but a
        client without one starts from the server's B (as in the local engine): that B is sent
        once the global B has left the init every client has.
        """
        policy = self.spec.policy
        if policy.download_stacked:  # FLoRA: the global adapter is a re-init the client draws from init-seed
            return select_factors(arrays, A=False, B=False)
        catch_up_B = policy.local_B and self.aggregated and node not in self.holds_local_B
        return select_factors(arrays, A=policy.upload_A, B=policy.upload_B or catch_up_B)

    # -- aggregation ------------------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid, failed = self._check_and_log_replies(replies, is_train=True, validate=False)
        failed_nodes = self._log_failures(server_round, valid, failed)
        if len(valid) < self.min_train_nodes:
            log(WARNING, "round %d: %d replies < min-train-nodes=%d; global model unchanged", server_round, len(valid), self.min_train_nodes)
            self.last_round = None
            return None, None
        assert self.current is not None, "configure_train stashes the global model before aggregation"
        valid.sort(key=lambda m: int(m.content["metrics"]["partition-id"]))  # the local engine's order
        global_adapter, _ = record_to_model(self.current)
        results = [self._result(m, global_adapter) for m in valid]
        for msg in valid:
            self.base_version[msg.metadata.src_node_id] = int(msg.content["metrics"]["base-version"])
            if self.spec.policy.local_B:  # the client stored its B in its state before replying
                self.holds_local_B.add(msg.metadata.src_node_id)
        received = sum((content_bytes(m.content) for m in valid), WireBytes())

        start = time.perf_counter()
        options = dict(self.config.method_options)
        if self.config.method == "flora":  # the engine's server-side seed for the LoRA re-init
            options["seed"] = derived_seed(self.config.seed, server_round, HEAD_ROUND_SEED + 1)
        agg, head = server_step(self.config.method, global_adapter, results, min_clients=self.config.min_clients, **options)
        server_seconds = time.perf_counter() - start
        if head is None:
            log(WARNING, "round %d skipped: rejected %s; global model unchanged", server_round, agg.metrics["rejected"])
            self.last_round = None
            return None, None
        if agg.base_delta:
            self.base_deltas[server_round] = agg.base_delta
        if "stacked" in agg.extras:  # FLoRA: what its clients download instead of the dense base_delta
            self.stacked[server_round] = {m: LoraPair(A=p.A.float(), B=p.B.float()) for m, p in agg.extras["stacked"].items()}
            self.init_seed = options["seed"]
        self.aggregated = True

        wire = self.sent_bytes.as_record("down") | received.as_record("up")
        self.last_round = {"round": server_round, "results": results, "metrics": agg.metrics, "failed_nodes": failed_nodes,
                           "server_seconds": server_seconds, "head": head, "wire": wire}
        metrics = MetricRecord({
            "num-clients": len(results),
            "train-loss": float(sum(r.loss for r in results) / len(results)),
            "divergence": float(agg.metrics["divergence"]),
            "bytes-up": int(agg.metrics["bytes_up"]),
            "bytes-down": int(agg.metrics["bytes_down"]),
        })
        return model_record(agg.adapter, head), metrics

    def _log_failures(self, server_round: int, valid: list[Message], failed: list[Message]) -> list[dict[str, Any]]:
        """Name every node whose update is missing (error replies and silence alike); also returned
        as ``[{node, partition, reason}]`` for the round's ``metrics.jsonl`` record."""
        failures: list[dict[str, Any]] = []
        # SuperLink-made errors (e.g. NODE_UNAVAILABLE after missed heartbeats) come from the
        # SuperLink itself, so the failed node is found through the message they answer.
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent}
        answered = set()
        for msg in failed:
            node = dst.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            answered.add(node)
            log(WARNING, "round %d: node %d (partition %s) failed: %s", server_round, node, self.partition_of.get(node), msg.error.reason)
            failures.append({"node": int(node), "partition": self.partition_of.get(node), "reason": str(msg.error.reason)})
        answered |= {m.metadata.src_node_id for m in valid}
        for node in sorted(set(dst.values()) - answered):
            log(WARNING, "round %d: node %d (partition %s) sent no reply within round-timeout", server_round, node, self.partition_of.get(node))
            failures.append({"node": int(node), "partition": self.partition_of.get(node), "reason": "no reply within round-timeout"})
        return failures

    def _result(self, msg: Message, global_adapter: Adapter) -> ClientResult:
        # Factors that did not travel are the global ones (FFA-LoRA's frozen A is identical
        # everywhere); FedSA-LoRA's B comes in "eval-B", for the server's evaluation-only mean.
        own = global_adapter
        if "eval-B" in msg.content:
            own, _ = record_to_model(msg.content["eval-B"], missing_from=global_adapter)
        adapter, head = record_to_model(msg.content["arrays"], missing_from=own)
        m = msg.content["metrics"]
        local = {k.removeprefix("local."): float(v) for k, v in m.items() if k.startswith("local.")} or None
        partition = int(m["partition-id"])
        update = ClientUpdate(adapter=adapter, num_examples=int(m["num-examples"]), client_id=f"client-{partition}")
        return ClientResult(update=update, head=head, loss=float(m["train-loss"]), local_metrics=local)

    def summary(self) -> None:
        log(INFO, "\t├──> fedlora: method %s, %d clients, %d rounds", self.config.method, self.config.clients, self.config.rounds)
        super().summary()
