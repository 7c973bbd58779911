"""``FedLoraStrategy``: Flower's FedAvg as a thin translation of :class:`fedlora.rounds.Server`.

The round itself is the server's (the same object the local engine loops over): ``configure_train``
turns :meth:`Server.plan` into one TRAIN message per planned client, ``aggregate_train`` turns the
replies into :class:`~fedlora.client.ClientResult` s and hands them to :meth:`Server.finish`, which
aggregates, merges, evaluates, records and checkpoints. What is left here is Flower's part:

* which SuperNode is which client (one QUERY per new node: its ``partition-id``);
* what each node still lacks: frozen-weight merges it has not made (clients report the rounds they
  have merged as ``base-version``), and, for methods with private factors, its own factors when
  it does not hold them (a node new to the run, e.g. after ``resume``);
* failed or silent nodes (logged with their node id and recorded in ``failed_nodes``; the round
  aggregates what arrived) and the array bytes measured on the wire both ways (``wire_*``).

Messages carry only the factors the method's ``TrainingPolicy`` says travel (:mod:`fedlora.flower.wire`).
Flower numbers its rounds from 1 in every ``flwr run``; after a resume the server's rounds go on
from the checkpoint (``round = server_round + rounds already done``).
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

from fedlora.aggregation import ClientUpdate
from fedlora.aggregation.ranks import pad, truncate
from fedlora.client import ClientResult
from fedlora.flower.config import FlowerOptions
from fedlora.flower.wire import WireBytes, content_bytes, deltas_record, model_record, record_to_model, stacked_record
from fedlora.rounds import BaseMerge, RoundPlan, Server


class FedLoraStrategy(FedAvg):
    def __init__(self, server: Server, options: FlowerOptions) -> None:
        config = server.config
        super().__init__(
            fraction_train=config.fraction,
            fraction_evaluate=0.0,  # the server evaluates centrally (Server.finish), as the local engine does
            min_train_nodes=options.min_train_nodes,
            min_available_nodes=options.min_available_nodes or config.clients,
        )
        self.server = server
        self.policy = server.spec.policy  # the run's; a round's is self.policy.for_round(t) (RoLoRA alternates)
        self.offset = server.state.round  # rounds completed before this Flower run (resume)
        self.connect_timeout = options.round_timeout  # how long round 1 waits for min_available_nodes SuperNodes
        self.partition_of: dict[int, int] = {}  # node id -> partition id
        self.base_version: dict[int, int] = {}  # node id -> last round whose merge the node has made
        self.holds_private: set[int] = set()  # nodes that keep their own private factors (they have trained)
        self.plan: RoundPlan | None = None
        self.sent: list[Message] = []  # this round's train messages, to name nodes that failed
        self.sent_bytes = WireBytes()
        self.started = time.perf_counter()

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
        self.started = time.perf_counter()
        self._map_partitions(grid, timeout=self.connect_timeout)
        self.plan = plan = self.server.plan(server_round + self.offset)
        live = set(grid.get_node_ids())
        node_for = {p: n for n, p in self.partition_of.items() if n in live}
        missing = [p for p in plan.clients if p not in node_for]
        if missing:
            log(WARNING, "round %d: partitions %s have no connected SuperNode; training without them", plan.round, missing)
        messages = [Message(self._content(plan, partition, node_for[partition]), node_for[partition], MessageType.TRAIN)
                    for partition in plan.clients if partition in node_for]
        self.sent = messages
        self.sent_bytes = sum((content_bytes(m.content) for m in messages), WireBytes())
        log(INFO, "configure_train: round %d, partitions %s", plan.round, [p for p in plan.clients if p in node_for])
        return messages

    def _content(self, plan: RoundPlan, partition: int, node: int) -> RecordDict:
        """One client's download: the factors that travel, its missing merges, and the round's config."""
        client_id = self.server.federation.clients[partition].client_id
        adapter, head = self.server.client_start(client_id)
        rank = self.server.rank_of[client_id]
        # Down travels what goes up (round_bytes' convention), or both factors where the policy says
        # so (FedSVD, RoLoRA). A factor that does not travel the client builds itself: FFA-LoRA's
        # frozen A is the seeded init, a stacking method's global adapter is the re-init drawn from
        # init-seed, private factors are the client's own. Mixed ranks: only the client's r_u components.
        policy = self.policy.for_round(plan.round)
        send_private = node not in self.holds_private and self.server.sends_private(client_id)
        factors = not policy.download_stacked
        full = policy.download_full_adapter
        content = RecordDict({
            "arrays": model_record(truncate(adapter, rank), head, A=factors and (policy.upload_A or full),
                                   B=factors and (policy.upload_B or full or send_private)),
            "config": ConfigRecord({"server-round": plan.round, "local-eval": plan.local_eval, "partition-id": partition,
                                    "init-seed": self.server.state.init_seed, "client-rank": rank}),
        })
        content.update(_merge_records(self.server.pending_merges(self.base_version.get(node, 0))))
        return content

    # -- aggregation ------------------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.plan is not None, "configure_train plans the round before its replies arrive"
        replies = list(replies)
        valid, failed = self._check_and_log_replies(replies, is_train=True, validate=False)
        failed_nodes = self._log_failures(self.plan.round, valid, failed)
        if len(valid) < self.min_train_nodes:
            log(WARNING, "round %d: %d replies < min-train-nodes=%d; the round is skipped", self.plan.round, len(valid),
                self.min_train_nodes)
            valid = []
        valid.sort(key=lambda m: int(m.content["metrics"]["partition-id"]))  # the local engine's order
        results = [self._result(m) for m in valid]
        for msg in valid:
            self.base_version[msg.metadata.src_node_id] = int(msg.content["metrics"]["base-version"])
            if self.policy.private_factors:  # the client stored its own factors before replying
                self.holds_private.add(msg.metadata.src_node_id)
        received = sum((content_bytes(m.content) for m in valid), WireBytes())
        wire = self.sent_bytes.as_record("down") | received.as_record("up")
        record = self.server.finish(self.plan, results, self.started, extra={"failed_nodes": failed_nodes, **wire})
        log(INFO, "round %d: main metric %.4f, divergence %.4g", record["round"], record["global_metric"], record["divergence"])
        metrics = MetricRecord({"num-clients": len(results), "global-metric": float(record["global_metric"]),
                                "divergence": float(record["divergence"]), "skipped": int(record["skipped"])})
        return model_record(self.server.state.adapter, self.server.state.head), metrics

    def _log_failures(self, round_: int, valid: list[Message], failed: list[Message]) -> list[dict[str, Any]]:
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
            log(WARNING, "round %d: node %d (partition %s) failed: %s", round_, node, self.partition_of.get(node), msg.error.reason)
            failures.append({"node": int(node), "partition": self.partition_of.get(node), "reason": str(msg.error.reason)})
        answered |= {m.metadata.src_node_id for m in valid}
        for node in sorted(set(dst.values()) - answered):
            log(WARNING, "round %d: node %d (partition %s) sent no reply within round-timeout", round_, node, self.partition_of.get(node))
            failures.append({"node": int(node), "partition": self.partition_of.get(node), "reason": "no reply within round-timeout"})
        return failures

    def _result(self, msg: Message) -> ClientResult:
        m = msg.content["metrics"]
        client_id = self.server.federation.clients[int(m["partition-id"])].client_id
        # Factors that did not travel are the ones the client started from (FFA-LoRA's frozen A);
        # private ones come in "eval-B", for the server's evaluation-only global model.
        own, _ = self.server.client_start(client_id)
        rank = self.server.rank_of[client_id]
        own = truncate(own, rank)  # what travels is the client's r_u components; padded back below
        if "eval-B" in msg.content:
            own, _ = record_to_model(msg.content["eval-B"], missing_from=own)
        adapter, head = record_to_model(msg.content["arrays"], missing_from=own)
        adapter = pad(adapter, self.server.config.rank)
        local = {k.removeprefix("local."): float(v) for k, v in m.items() if k.startswith("local.")} or None
        update = ClientUpdate(adapter=adapter, num_examples=int(m["num-examples"]), client_id=client_id)
        return ClientResult(update=update, head=head, loss=float(m["train-loss"]), local_metrics=local)

    def summary(self) -> None:
        config = self.server.config
        log(INFO, "\t├──> fedlora: method %s, %d clients, %d rounds", config.method, config.clients, config.rounds)
        super().summary()


def _merge_records(pending: dict[int, BaseMerge]) -> dict[str, ArrayRecord]:
    """Missed merges as records: stacked factors where the method sends those, dense deltas otherwise."""
    stacked = {r: m.stacked for r, m in pending.items() if m.stacked is not None}
    dense = {r: m.delta for r, m in pending.items() if m.stacked is None}
    records = {}
    if stacked:
        records["base-factors"] = stacked_record(stacked)
    if dense:
        records["base-delta"] = deltas_record(dense)
    return records
