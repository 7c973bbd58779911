"""Every reply a SuperNode sends, checked field by field before the server uses any of it.

A reply is untrusted input: a broken or hostile ClientApp can send any RecordDict. Parsing is
one pure function per message kind that returns either the parsed values or a one-line reason,
and never raises, so one bad node costs that node only (the strategy logs the reason with the
node id, records it in the round's ``failed_nodes`` and aggregates the others).

The reply's type is :class:`fedlora.engines.flower.messages.TrainReply`; this module is the only way the server
makes one. What is checked here is *structure*: which records and keys are present (exactly the ones the
server expects: the factors the method's policy uploads this round, the server's head keys),
types, ranges, shapes against the server's own copy, and that every array is a plain float
``.npy`` buffer whose header agrees with its length (decoded here, never by ``np.load``, so a
forged header cannot make the server allocate what the message does not hold). The values'
numerical sanity (norm bounds, outliers) is :func:`fedlora.aggregation.aggregate`'s job;
non-finite arrays are already refused here because nothing downstream needs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from torch import Tensor

from fedlora.aggregation import Adapter, ClientUpdate
from fedlora.engines.flower.messages import LOCAL_PREFIX, PHASE_UPLOAD, TRAIN_METRICS, RankBoundary, TrainReply
from fedlora.engines.flower.wire import npy_header, tensors_to_model
from fedlora.models.lora_state import PEFT_PREFIX, adapter_to_state_dict
from fedlora.protocol.client import ClientResult



@dataclass(frozen=True)
class Expected:
    """What one node's TRAIN reply must hold, from the server's own state (nothing the node said)."""

    partition: int  # the partition the server sent this node
    num_examples: int  # that partition's training examples in the server's federation
    arrays: dict[str, tuple[int, ...]]  # "arrays": key -> shape (the uploaded factors and the head)
    eval_B: dict[str, tuple[int, ...]] | None  # "eval-B" (private-factor methods), else must be absent
    max_version: int  # the newest merge that can exist while the round runs (round - 1)
    phase_upload: dict[str, tuple[int, ...]] | None = None  # a phased method's phase-1 upload, else must be absent


def expected_arrays(adapter: Adapter, head: dict[str, Tensor], *, A: bool, B: bool) -> dict[str, tuple[int, ...]]:
    """Key -> shape of :func:`fedlora.engines.flower.wire.model_record` for these factors and head."""
    wanted = {k: tuple(v.shape) for k, v in adapter_to_state_dict(adapter).items()
              if (".lora_A." in k and A) or (".lora_B." in k and B)}
    return wanted | {f"{PEFT_PREFIX}{k}": tuple(v.shape) for k, v in head.items()}


def parse_train_reply(msg: Message, expected: Expected) -> TrainReply | str:
    """The reply's values, or why it is refused (one line). Never raises."""
    try:
        return _parse_train(msg, expected)
    except Exception as exc:  # noqa: BLE001 -- a last line of defence: a reply must never crash the server
        return f"unreadable reply ({type(exc).__name__}: {str(exc)[:200]})"


def _parse_train(msg: Message, expected: Expected) -> TrainReply | str:
    if not msg.has_content():
        return "reply has no content"
    content = msg.content
    allowed = ({"arrays", "metrics"} | ({"eval-B"} if expected.eval_B is not None else set())
               | ({PHASE_UPLOAD} if expected.phase_upload is not None else set()))
    if unknown := sorted(set(content) - allowed):
        return f"unexpected records {unknown}; a TRAIN reply holds {sorted(allowed)}"
    if missing := sorted(allowed - set(content)):
        return f"missing records {missing}"
    metrics = content["metrics"]
    if not isinstance(metrics, MetricRecord):
        return f"'metrics' is a {type(metrics).__name__}, not a MetricRecord"
    values = _metrics(metrics, expected)
    if isinstance(values, str):
        return values
    arrays = decode_record(content["arrays"], expected.arrays, "arrays")
    if isinstance(arrays, str):
        return arrays
    eval_B: dict[str, Tensor] | None = None
    if expected.eval_B is not None:
        decoded = decode_record(content["eval-B"], expected.eval_B, "eval-B")
        if isinstance(decoded, str):
            return decoded
        eval_B = decoded
    upload: dict[str, Tensor] | None = None
    if expected.phase_upload is not None:
        decoded = decode_record(content[PHASE_UPLOAD], expected.phase_upload, PHASE_UPLOAD)
        if isinstance(decoded, str):
            return decoded
        upload = decoded
    num_examples, loss, base_version, local = values
    return TrainReply(arrays, eval_B, num_examples, loss, local, base_version, upload, partition_id=expected.partition)


def parse_phase_reply(msg: Message, expected: dict[str, tuple[int, ...]]) -> dict[str, Tensor] | str:
    """A later phase's reply (:mod:`fedlora.engines.flower.phases`): its upload, or why it is refused. Never raises."""
    try:
        if msg.has_error():
            return str(msg.error.reason)
        if not msg.has_content():
            return "reply has no content"
        if set(msg.content) != {PHASE_UPLOAD}:
            return f"a phase reply holds exactly {[PHASE_UPLOAD]}, not {sorted(msg.content)}"
        return decode_record(msg.content[PHASE_UPLOAD], expected, PHASE_UPLOAD)
    except Exception as exc:  # noqa: BLE001 -- as in parse_train_reply
        return f"unreadable reply ({type(exc).__name__}: {str(exc)[:200]})"


def _metrics(record: MetricRecord, expected: Expected) -> tuple[int, float, int, dict[str, float] | None] | str:
    keys = set(record)
    if missing := sorted(set(TRAIN_METRICS) - keys):
        return f"metrics miss {missing}"
    if unknown := sorted(k for k in keys - set(TRAIN_METRICS) if not k.startswith(LOCAL_PREFIX)):
        return f"unknown metrics {unknown}"
    partition = _integer(record["partition-id"], "partition-id", 0, None)
    if isinstance(partition, str):
        return partition
    if partition != expected.partition:
        return f"partition-id={partition} but this node serves partition {expected.partition}"
    num_examples = _integer(record["num-examples"], "num-examples", 1, None)
    if isinstance(num_examples, str):
        return num_examples
    if num_examples != expected.num_examples:
        return (f"num-examples={num_examples} but partition {expected.partition} has {expected.num_examples} "
                "training examples")
    version = _integer(record["base-version"], "base-version", 0, expected.max_version)
    if isinstance(version, str):
        return version
    # Loss and local metrics are only recorded (the local engine records a NaN too: a causal-LM
    # client whose local split has no response tokens reports loss NaN), so they need only be numbers.
    loss = _real(record["train-loss"], "train-loss")
    if isinstance(loss, str):
        return loss
    local: dict[str, float] = {}
    for key in sorted(keys):
        if key.startswith(LOCAL_PREFIX):
            value = _real(record[key], key)
            if isinstance(value, str):
                return value
            local[key.removeprefix(LOCAL_PREFIX)] = value
    return num_examples, loss, version, local or None


def _integer(value: Any, name: str, low: int, high: int | None) -> int | str:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{name}={value!r} is not an integer"
    if value < low or (high is not None and value > high):
        return f"{name}={value} is out of range [{low}, {'inf' if high is None else high}]"
    return value


def _real(value: Any, name: str) -> float | str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name}={value!r} is not a number"
    return float(value)


def decode_record(record: Any, expected: dict[str, tuple[int, ...]], name: str) -> dict[str, Tensor] | str:
    """``record``'s arrays as float32 tensors if its keys and shapes are exactly ``expected``."""
    if not isinstance(record, ArrayRecord):
        return f"'{name}' is a {type(record).__name__}, not an ArrayRecord"
    keys = set(record)
    if missing := sorted(set(expected) - keys):
        return f"'{name}' misses {len(missing)} arrays, e.g. {missing[0]!r}"
    if unknown := sorted(keys - set(expected)):
        return f"'{name}' has {len(unknown)} unknown arrays, e.g. {unknown[0]!r}"
    out: dict[str, Tensor] = {}
    for key in sorted(expected):
        array = decode_array(record[key])
        if isinstance(array, str):
            return f"'{name}' {key!r}: {array}"
        if array.shape != expected[key]:
            return f"'{name}' {key!r} has shape {array.shape}; expected {expected[key]}"
        if not np.isfinite(array).all():
            return f"'{name}' {key!r} has non-finite values"
        out[key] = torch.from_numpy(array)
    return out


def decode_array(array: Any) -> np.ndarray | str:
    """A float32 copy of a serialised ``.npy`` Array, or why it is not a plain float array."""
    if not isinstance(array, Array):
        return f"is a {type(array).__name__}, not an Array"
    if array.stype != "numpy.ndarray" or not isinstance(array.data, bytes):
        return f"serialisation {array.stype!r} is not numpy.ndarray"
    try:
        version, shape, fortran, dtype, offset = npy_header(array.data)
    except Exception as exc:  # noqa: BLE001 -- any malformed header is a refusal, whatever numpy raises
        return f"is not a .npy buffer ({str(exc)[:120]})"
    if version not in ((1, 0), (2, 0)):
        return f".npy version {version} is not supported"
    if dtype.hasobject or dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
        return f"dtype {dtype} is not float16/32/64"
    count = math.prod(shape)
    if count * dtype.itemsize != len(array.data) - offset:
        return f"holds {len(array.data) - offset} bytes, not the {count * dtype.itemsize} its header {shape} says"
    flat = np.frombuffer(array.data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C").astype(np.float32)  # a copy: writable


def to_result(reply: TrainReply, sent: Adapter, boundary: RankBoundary, client_id: str) -> ClientResult:
    """A parsed reply as the :class:`ClientResult` the local engine would have produced.

    ``sent``: the adapter this client was sent, on the wire side of ``boundary`` (the client's rank); factors
    that did not travel back are taken from it (FFA-LoRA's frozen A), private ones from "eval-B". The result
    crosses ``boundary`` once, back to the server's rank.
    """
    start = sent
    if reply.eval_B is not None:
        start, _ = tensors_to_model(reply.eval_B, missing_from=start)
    adapter, head = tensors_to_model(reply.arrays, missing_from=start)
    update = ClientUpdate(adapter=boundary.from_wire(adapter), num_examples=reply.num_examples, client_id=client_id)
    return ClientResult(update=update, head=head, loss=reply.loss, local_metrics=reply.local_metrics,
                        first_upload=reply.phase_upload)


def parse_query_reply(msg: Message, clients: int) -> int | str:
    """The partition a node says it serves (its ``--node-config``), or why that claim is refused."""
    try:
        if not msg.has_content():
            return "reply has no content"
        record = msg.content.get("partition")
        if not isinstance(record, MetricRecord):
            return "reply has no 'partition' MetricRecord"
        for key in ("partition-id", "num-partitions"):
            if key not in record:
                return f"'partition' misses {key!r}"
        total = _integer(record["num-partitions"], "num-partitions", 1, None)
        if isinstance(total, str):
            return total
        if total != clients:
            return f"node-config num-partitions={total} does not fit clients={clients}"
        return _integer(record["partition-id"], "partition-id", 0, clients - 1)
    except Exception as exc:  # noqa: BLE001 -- as in parse_train_reply
        return f"unreadable reply ({type(exc).__name__}: {str(exc)[:200]})"
