"""Which SuperNode serves which partition: asked once per node, bound by the server, never re-claimed.

A SuperNode says its partition once, in its answer to a QUERY (its ``--node-config
partition-id``). The server binds that partition to the node id the SuperLink gave the node
(with ``--enable-supernode-auth``: the id registered for the node's key) and from then on sends
that partition's TRAIN messages to that node only; a TRAIN reply is checked against the binding
(:mod:`fedlora.engines.flower.replies`). A claim is refused, with a logged and recorded reason, when it is
not an integer partition of this run, its ``num-partitions`` differs from ``clients``, or the
partition is bound to another node that is still connected: the honest node keeps its partition.
A partition whose node has disconnected can be claimed by a new node (a restarted SuperNode
without authentication gets a new id).

Round 1 first waits for SuperNodes (:meth:`NodeMap.wait_for`): until ``min-available-nodes``
partitions are bound, or ``round-timeout`` seconds; then it goes on with the partitions bound if
there are at least ``min-train-nodes``, and otherwise stops the run with a message saying what is
missing. When every connected SuperNode reports the same wrong ``num-partitions`` and there are
exactly that many (a simulation whose ``num-supernodes`` differs from ``clients``), it stops at once.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from fedlora.engines.flower.replies import parse_query_reply

MISMATCH = "node-config num-partitions="  # parse_query_reply's reason for a wrong num-partitions


class FederationError(RuntimeError):
    """Too few usable SuperNodes to run: the message says which are missing and how to fix it."""


class NodeMap:
    def __init__(self, clients: int) -> None:
        self.clients = clients
        self.partition_of: dict[int, int] = {}  # node id -> partition id
        self.refused: dict[int, str] = {}  # node id -> why its claim was refused (this round)
        self.asked: set[int] = set()  # nodes queried this round (each at most once a round)
        self.replaced: list[int] = []  # nodes whose partition went to a new node (their state is stale)

    def new_round(self) -> None:
        self.refused, self.asked = {}, set()

    def node_for(self, live: set[int]) -> dict[int, int]:
        """Partition -> the connected node bound to it."""
        return {p: n for n, p in self.partition_of.items() if n in live}

    def refused_records(self) -> list[dict[str, object]]:
        """``[{node, reason}]`` for the round's ``metrics.jsonl`` record."""
        return [{"node": int(n), "reason": r} for n, r in sorted(self.refused.items())]

    # -- asking -------------------------------------------------------------------------------
    def update(self, grid: Grid, timeout: float) -> None:
        """Ask every connected node not yet bound (and not asked this round) for its partition."""
        live = set(grid.get_node_ids())
        new = sorted(n for n in live if n not in self.partition_of and n not in self.asked)
        if not new:
            return
        self.asked.update(new)
        for node, claim in _ask(grid, new, self.clients, timeout).items():
            reason = claim if isinstance(claim, str) else self._bind(node, claim, live)
            if reason is not None:
                self.refused[node] = reason
                log(WARNING, "node %d refused: %s", node, reason)
        log(INFO, "partition of each node: %s", self.partition_of)

    def _bind(self, node: int, partition: int, live: set[int]) -> str | None:
        owner = next((n for n, p in self.partition_of.items() if p == partition), None)
        if owner is not None and owner != node:
            if owner in live:
                return f"partition {partition} is already bound to node {owner}"
            log(WARNING, "partition %d: node %d is gone; node %d serves it now", partition, owner, node)
            del self.partition_of[owner]
            self.replaced.append(owner)
        self.partition_of[node] = partition
        return None

    # -- round 1 -------------------------------------------------------------------------------
    def wait_for(self, grid: Grid, *, want: int, need: int, timeout: float, poll: float = 1.0) -> None:
        """Wait until ``want`` partitions are bound or ``timeout`` s pass; fail below ``need``."""
        deadline = time.monotonic() + timeout
        next_log = 0.0
        while True:
            self.update(grid, timeout=max(deadline - time.monotonic(), poll))
            if len(self.partition_of) >= want:
                return
            self._check_misconfigured(grid)
            now = time.monotonic()
            if now >= deadline:
                break
            if now >= next_log:
                log(INFO, "waiting for SuperNodes: %d of %d partitions bound (%d nodes connected); giving up in %.0f s",
                    len(self.partition_of), want, len(list(grid.get_node_ids())), deadline - now)
                next_log = now + 10
            time.sleep(min(poll, max(deadline - now, 0.0)))
        bound, refused = sorted(self.partition_of.values()), self._why()
        if len(bound) < need:
            raise FederationError(
                f"after round-timeout={timeout:g} s only partitions {bound} have a SuperNode (min-train-nodes={need})"
                f"{refused}; start one SuperNode per client with --node-config 'partition-id=<i> "
                f"num-partitions={self.clients}' (simulation: num-supernodes={self.clients})")
        log(WARNING, "only %d of %d partitions have a SuperNode after %g s%s; going on with partitions %s",
            len(bound), want, timeout, refused, bound)

    def _check_misconfigured(self, grid: Grid) -> None:
        live = set(grid.get_node_ids())
        claims = {self.refused.get(n, "") for n in live}
        if self.partition_of or not live or len(claims) != 1:
            return
        claim = claims.pop()
        if claim.startswith(MISMATCH) and claim.removeprefix(MISMATCH).split()[0] == str(len(live)):
            raise FederationError(
                f"all {len(live)} SuperNodes report num-partitions={len(live)} but clients={self.clients}: "
                f"run with clients={len(live)} or start {self.clients} SuperNodes "
                f"(simulation: --federation-config 'num-supernodes={self.clients}')")

    def _why(self) -> str:
        if not self.refused:
            return ""
        return " (refused: " + "; ".join(f"node {n}: {r}" for n, r in sorted(self.refused.items())) + ")"


def _ask(grid: Grid, nodes: list[int], clients: int, timeout: float) -> dict[int, int | str]:
    """One QUERY per node: node -> the partition it claims, or why the claim is refused."""
    messages = [Message(RecordDict({"config": ConfigRecord({"ask": "partition-id"})}), n, MessageType.QUERY)
                for n in nodes]
    answers: dict[int, int | str] = {n: "no answer to the partition QUERY" for n in nodes}
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    dst = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    for reply in replies:
        node = dst.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if node not in answers or not isinstance(answers[node], str) or answers[node] != "no answer to the partition QUERY":
            continue  # not asked, or a second answer: the first one counts
        if reply.has_error():
            answers[node] = f"QUERY failed: {reply.error.reason}"
        else:
            answers[node] = parse_query_reply(reply, clients)
    return answers
