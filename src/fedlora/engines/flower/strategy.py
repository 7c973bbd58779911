"""``FedLoraStrategy``: a Flower ``Strategy`` that is a thin translation of :class:`fedlora.protocol.rounds.Server`.

The round itself is the server's (the same object the local engine loops over): ``configure_train``
turns :meth:`Server.plan` into one TRAIN message per planned client, ``aggregate_train`` turns the
replies into :class:`~fedlora.protocol.client.ClientResult` s and hands them to :meth:`Server.finish`, which
aggregates, merges, evaluates, records and checkpoints. What is left here is Flower's part:

* which SuperNode is which client: one QUERY per new node, bound by the server
  (:mod:`fedlora.engines.flower.nodes`; refused claims are recorded in ``refused_nodes``);
* what each node still lacks: frozen-weight merges it has not made (the server's ledger,
  :mod:`fedlora.engines.flower.merges`: bounded memory and resends), and, for methods with private factors,
  its own factors when it does not hold them (a node new to the run, e.g. after ``resume``);
* every reply checked before use (:mod:`fedlora.engines.flower.replies`); failed, invalid or silent nodes
  are logged with their node id and recorded in ``failed_nodes`` with the reason, and the round
  aggregates what is valid; the array bytes measured on the wire both ways (``wire_*``).

One typed message each way (:mod:`fedlora.engines.flower.messages`): a ``TrainDownload`` per node, a ``TrainReply``
back; messages carry only the factors the method's ``TrainingPolicy`` says travel (:mod:`fedlora.engines.flower.wire`),
at the client's rank (one :class:`RankBoundary` per node: crossed on send and on receipt). ``aggregate_train``
returns no arrays: the global model is the server's state, and Flower's loop would only carry a copy.
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
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedlora.aggregation import Adapter
from fedlora.protocol.client import ClientResult
from fedlora.engines.flower.config import FlowerOptions
from fedlora.engines.flower.merges import Download, MergeLedger
from fedlora.engines.flower.messages import RankBoundary, TrainDownload, TrainReply, train_task
from fedlora.engines.flower.nodes import NodeMap
from fedlora.engines.flower.phases import FlowerChannel
from fedlora.engines.flower.replies import Expected, expected_arrays, parse_train_reply, to_result
from fedlora.engines.flower.wire import WireBytes, content_bytes, download_content, model_tensors
from fedlora.protocol.plan import RoundPlan
from fedlora.protocol.rounds import Server


class FedLoraStrategy(Strategy):
    """Flower's ``Strategy`` interface (``start`` drives it) over the round protocol: nothing of FedAvg is used, the
    server samples, aggregates and evaluates (centrally) itself."""

    POLL_SECONDS = 1.0  # how often round 1 looks for newly connected SuperNodes

    def __init__(self, server: Server, options: FlowerOptions) -> None:
        config = server.config
        self.min_train_nodes = options.min_train_nodes  # fewer valid replies: the round is skipped
        self.min_available_nodes = options.min_available_nodes or config.clients  # round 1 waits for these
        self.server = server
        self.policy = server.spec.policy  # the run's; a round's is self.policy.for_round(t) (RoLoRA alternates)
        self.offset = server.state.round  # rounds completed before this Flower run (resume)
        self.connect_timeout = options.round_timeout  # how long round 1 waits for min_available_nodes SuperNodes
        self.nodes = NodeMap(config.clients)  # node id <-> partition id, bound by the server
        self.connected = False  # round 1 has waited for its SuperNodes
        self.ledger = MergeLedger()  # which frozen-weight merges each node holds (bounded memory)
        self.ledger.absorb(server.merges)  # a resumed run's catch-up merge
        self.holds_private: set[int] = set()  # nodes that keep their own private factors (they have trained)
        self.plan: RoundPlan | None = None
        self.sent: list[Message] = []  # this round's train messages, to name nodes that failed
        self.expected: dict[int, Expected] = {}  # node -> what its TRAIN reply must hold
        self.downloads: dict[int, Download] = {}  # node -> the merges its TRAIN message carried
        self.sent_adapters: dict[int, Adapter] = {}  # node -> the adapter it was sent, at its rank (wire side)
        self.boundaries: dict[int, RankBoundary] = {}  # node -> its client's rank against the server's
        self.sent_bytes = WireBytes()
        self.started = time.perf_counter()
        self.grid: Grid | None = None  # the round's grid (configure_train), for a phased method's later phases

    @property
    def partition_of(self) -> dict[int, int]:
        """Node id -> the partition the server bound to it."""
        return self.nodes.partition_of

    # -- sampling ---------------------------------------------------------------------------
    def _map_partitions(self, grid: Grid, timeout: float) -> None:
        """Bind new nodes to their partitions; round 1 first waits for SuperNodes (:class:`NodeMap`)."""
        self.nodes.new_round()
        if self.connected:
            self.nodes.update(grid, timeout)
        else:
            self.nodes.wait_for(grid, want=self.min_available_nodes, need=self.min_train_nodes, timeout=timeout,
                                poll=self.POLL_SECONDS)
            self.connected = True
        for node in self.nodes.replaced:
            self.ledger.forget(node)
            self.holds_private.discard(node)
        self.nodes.replaced.clear()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.started = time.perf_counter()
        self.grid = grid  # a phased method's later phases go through it (aggregate_train)
        self._map_partitions(grid, timeout=self.connect_timeout)
        self.plan = plan = self.server.plan(server_round + self.offset)
        node_for = self.nodes.node_for(set(grid.get_node_ids()))
        missing = [p for p in plan.clients if p not in node_for]
        if missing:
            log(WARNING, "round %d: partitions %s have no connected SuperNode; training without them", plan.round, missing)
        self.expected, self.downloads, self.sent_adapters, self.boundaries = {}, {}, {}, {}
        messages = [Message(self._content(plan, partition, node_for[partition]), node_for[partition], MessageType.TRAIN)
                    for partition in plan.clients if partition in node_for]
        self.sent = messages
        self.sent_bytes = sum((content_bytes(m.content) for m in messages), WireBytes())
        log(INFO, "configure_train: round %d, partitions %s", plan.round, [p for p in plan.clients if p in node_for])
        return messages

    def _content(self, plan: RoundPlan, partition: int, node: int) -> RecordDict:
        """One client's :class:`TrainDownload`: the factors that travel, its missing merges, and the round's task."""
        client_id = self.server.federation.clients[partition].client_id
        adapter, head = self.server.client_start(client_id)  # once per node and round
        boundary = self.boundaries[node] = RankBoundary(client=self.server.rank_of[client_id], model=self.server.config.rank)
        # Mixed ranks: only the client's r_u components travel. The reply's factors that did not travel are the ones
        # sent here (FFA-LoRA's frozen A), so they are kept on the wire side of the boundary.
        sent = self.sent_adapters[node] = boundary.to_wire(adapter)
        # Down travels what goes up (round_bytes' convention), or both factors where the policy says
        # so (FedSVD, RoLoRA). A factor that does not travel the client builds itself: FFA-LoRA's
        # frozen A is the seeded init, a stacking method's global adapter is the re-init drawn from
        # init-seed, private factors are the client's own.
        policy = self.policy.for_round(plan.round)
        send_private = node not in self.holds_private and self.server.sends_private(client_id)
        factors = not policy.download_stacked
        full = policy.download_full_adapter
        download = self.downloads[node] = self.ledger.download(node)
        self.expected[node] = Expected(
            partition=partition, num_examples=self.server.federation.clients[partition].num_examples,
            arrays=expected_arrays(sent, head, A=policy.upload_A, B=policy.upload_B),
            eval_B=expected_arrays(sent, {}, A=False, B=True) if policy.private_factors else None,
            max_version=plan.round - 1,
            phase_upload=phased.shapes(1, adapter, plan.options) if (phased := self.server.spec.phased) else None)
        arrays = model_tensors(sent, head, A=factors and (policy.upload_A or full),
                               B=factors and (policy.upload_B or full or send_private))
        task = train_task(self.server, plan, partition, boundary.client, base_reset=download.reset)
        return download_content(TrainDownload(task, arrays, download.merges))

    # -- aggregation ------------------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.plan is not None, "configure_train plans the round before its replies arrive"
        plan = self.plan
        accepted, failures = self._sort_replies(plan.round, list(replies))
        if len(accepted) < self.min_train_nodes:
            log(WARNING, "round %d: %d valid replies < min-train-nodes=%d; the round is skipped", plan.round,
                len(accepted), self.min_train_nodes)
            accepted = {}
        order = sorted(accepted, key=lambda n: self.expected[n].partition)  # the local engine's order
        results = [self._result(node, accepted[node][1]) for node in order]
        for node in order:
            self.ledger.acknowledge(node, self.downloads[node], accepted[node][1].base_version)
            if self.policy.private_factors:  # the client stored its own factors before replying
                self.holds_private.add(node)
        received = sum((content_bytes(msg.content) for msg, _ in accepted.values()), WireBytes())
        channel = self._phase_channel(plan, order)

        def extra() -> dict[str, Any]:  # after the aggregation: a phased method's later phases are on the wire too
            sent, got = (self.sent_bytes, received) if channel is None else (self.sent_bytes + channel.sent,
                                                                              received + channel.received)
            return {"failed_nodes": failures + (channel.failures if channel else []),
                    "refused_nodes": self.nodes.refused_records(), **sent.as_record("down"), **got.as_record("up")}

        record = self.server.finish(plan, results, self.started, extra=extra, channel=channel)
        self.ledger.absorb(self.server.merges)  # the round's merge, if any: kept bounded from here on
        log(INFO, "round %d: main metric %.4f, divergence %.4g", record["round"], record["global_metric"], record["divergence"])
        metrics = MetricRecord({"num-clients": len(results), "global-metric": float(record["global_metric"]),
                                "divergence": float(record["divergence"]), "skipped": int(record["skipped"])})
        return None, metrics  # the global model is the server's state (Server.finish), not Flower's loop arrays

    def _phase_channel(self, plan: RoundPlan, nodes: list[int]) -> FlowerChannel | None:
        """Phases 2..P of a phased method (FedASK) to the nodes whose training replies were accepted."""
        phased = self.server.spec.phased
        if phased is None:
            return None
        assert self.grid is not None, "configure_train stores the round's grid"
        clients = {node: self.server.federation.clients[self.expected[node].partition].client_id for node in nodes}
        return FlowerChannel(self.grid, phased, {c: n for n, c in clients.items()},
                             {c: self.expected[n].partition for n, c in clients.items()}, plan.round,
                             self.server.state.adapter, plan.options, self.connect_timeout)

    def _sort_replies(self, round_: int, replies: list[Message]) -> tuple[dict[int, tuple[Message, TrainReply]], list[dict[str, Any]]]:
        """Valid replies by node, and ``[{node, partition, reason}]`` for every node whose update is
        missing: error replies, invalid replies (:func:`parse_train_reply`) and silence alike."""
        accepted: dict[int, tuple[Message, TrainReply]] = {}
        failures: list[dict[str, Any]] = []
        answered: set[int] = set()

        def fail(node: int, reason: str) -> None:
            partition = self.expected[node].partition if node in self.expected else None
            log(WARNING, "round %d: node %d (partition %s) failed: %s", round_, node, partition, reason)
            failures.append({"node": int(node), "partition": partition, "reason": reason})

        # SuperLink-made errors (e.g. NODE_UNAVAILABLE after missed heartbeats) come from the
        # SuperLink itself, so the failed node is found through the message they answer.
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent}
        for msg in replies:
            node = int(dst.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id))
            if node not in self.expected:
                log(WARNING, "round %d: ignored a reply from node %d, which was sent no TRAIN message", round_, node)
                continue
            if node in answered:
                fail(node, "a second reply to one TRAIN message")
                continue
            answered.add(node)
            if msg.has_error():
                fail(node, str(msg.error.reason))
                continue
            parsed = parse_train_reply(msg, self.expected[node])
            if isinstance(parsed, str):
                fail(node, f"invalid reply: {parsed}")
            else:
                accepted[node] = (msg, parsed)
        for node in sorted(set(self.expected) - answered):
            fail(node, "no reply within round-timeout")
        return accepted, failures

    def _result(self, node: int, reply: TrainReply) -> ClientResult:
        client_id = self.server.federation.clients[self.expected[node].partition].client_id
        return to_result(reply, self.sent_adapters[node], self.boundaries[node], client_id)

    # -- evaluation: central, in Server.finish; no client evaluates for the strategy -----------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        config = self.server.config
        log(INFO, "\t├──> fedlora: method %s, %d clients (%d sampled per round), %d rounds; min-train-nodes %d, "
            "min-available-nodes %d", config.method, config.clients, config.num_sampled, config.rounds,
            self.min_train_nodes, self.min_available_nodes)
