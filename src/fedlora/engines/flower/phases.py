"""A phased method's later phases on Flower (:class:`fedlora.protocol.phases.PhaseChannel`): one TRAIN message
per client and phase, carrying the server's broadcast; the client answers from the adapter it kept after training.

The message's ``config`` says ``phase`` (>= 2) and ``server-round``; ``phase`` holds the broadcast
({module: tensor}, float32). The reply holds exactly ``phase-upload`` with the shapes the method declares
(:func:`fedlora.engines.flower.replies.parse_phase_reply`); a node that errs, answers wrongly or not within
``round-timeout`` drops out of the round's later phases and is recorded in the round's ``failed_nodes`` with
its ``phase``. The phase messages' array bytes count as ``wire_phase_bytes_*`` (:class:`WireBytes`).
"""

from __future__ import annotations

from logging import WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log
from torch import Tensor

from fedlora.aggregation.phased import PhasedAggregation
from fedlora.engines.flower.replies import parse_phase_reply
from fedlora.engines.flower.wire import PHASE_RECORDS, WireBytes, content_bytes, tensors_record

PHASE_BROADCAST = PHASE_RECORDS[0]  # the record of a phase message that holds the server's broadcast


class FlowerChannel:
    """Phases 2..P of one round through ``grid``; ``node_of`` / ``partition_of``: client id -> its node / partition."""

    def __init__(self, grid: Grid, phased: PhasedAggregation, node_of: dict[str, int], partition_of: dict[str, int],
                 round_: int, global_adapter: Any, options: dict[str, Any], timeout: float) -> None:
        self.grid, self.phased, self.node_of, self.partition_of, self.round = grid, phased, node_of, partition_of, round_
        self.global_adapter, self.options, self.timeout = global_adapter, options, timeout
        self.failures: list[dict[str, Any]] = []
        self.sent, self.received = WireBytes(), WireBytes()

    def exchange(self, phase: int, clients: list[str], broadcast: dict[str, Tensor]) -> dict[str, Any]:
        content = RecordDict({PHASE_BROADCAST: tensors_record(broadcast),
                              "config": ConfigRecord({"server-round": self.round, "phase": phase})})
        messages = {self.node_of[c]: Message(content, self.node_of[c], MessageType.TRAIN) for c in clients}
        for _ in messages:
            self.sent += content_bytes(content)
        client_of = {node: c for c, node in self.node_of.items()}
        dst = {m.metadata.message_id: node for node, m in messages.items()}
        shapes = self.phased.shapes(phase, self.global_adapter, self.options)
        uploads: dict[str, Any] = {}
        for reply in self.grid.send_and_receive(list(messages.values()), timeout=self.timeout):
            node = int(dst.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id))
            if node not in client_of or client_of[node] in uploads:
                log(WARNING, "round %d phase %d: ignored an unexpected reply from node %d", self.round, phase, node)
                continue
            parsed = parse_phase_reply(reply, shapes)
            if isinstance(parsed, str):
                self._fail(node, client_of[node], phase, parsed)
                continue
            self.received += content_bytes(reply.content)
            uploads[client_of[node]] = parsed
        for client in clients:
            if client not in uploads and not any(f["client"] == client for f in self.failures):
                self._fail(self.node_of[client], client, phase, "no reply within round-timeout")
        return {c: uploads[c] for c in clients if c in uploads}  # in the order asked: the sum's order

    def _fail(self, node: int, client: str, phase: int, reason: str) -> None:
        log(WARNING, "round %d phase %d: node %d (%s) failed: %s", self.round, phase, node, client, reason)
        self.failures.append({"node": int(node), "partition": self.partition_of[client], "phase": phase,
                              "reason": reason})
