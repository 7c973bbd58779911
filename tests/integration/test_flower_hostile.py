"""Hostile and broken SuperNodes against the real FedLoraStrategy (issue 14, items 1-3 and the hang of 14).

A fake Grid stands in for the SuperLink: each node is a function from the message it is sent to
its reply (real ``flwr.app`` Messages and records), so crafted replies reach the strategy exactly
as Flower delivers them, with no Ray, no processes and no local training. The server is the real
:class:`fedlora.protocol.rounds.Server` on the tiny ``toy`` task (FedEx-LoRA: it merges into the frozen
weights, so base versions and resends are exercised); one model is built per module.
"""

from __future__ import annotations

import io
import os
import time
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedlora.config.run import RunConfig  # noqa: E402
from fedlora.engines.flower.config import FlowerOptions  # noqa: E402
from fedlora.engines.flower.merges import MergeLedger  # noqa: E402
from fedlora.engines.flower.nodes import FederationError  # noqa: E402
from fedlora.engines.flower.strategy import FedLoraStrategy  # noqa: E402
from fedlora.engines.flower.wire import record_tensors, record_to_deltas, round_record  # noqa: E402
from fedlora.protocol.rounds import BaseMerge, Server  # noqa: E402
from fedlora.runs.outputs import RunFolder  # noqa: E402

CLIENTS = 4
CONFIG = RunConfig(task="toy", method="fedex-lora", clients=CLIENTS, rank=2, rounds=50, local_steps=1, batch_size=4,
                   max_length=32, max_eval_examples=8, eval_local_every=0, seed=0)
LORA_A = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
HEAD_W = "base_model.model.classifier.weight"

Reply = RecordDict | Error | None  # None: the node stays silent


@pytest.fixture(scope="module", autouse=True)
def task_identity():
    """What a running ServerApp sets (Messages need a run id); restored afterwards."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture(scope="module")
def world():
    from fedlora.protocol.federation import build_federation
    from fedlora.tasks.build import build_model

    torch.manual_seed(0)
    model, tokenizer = build_model(CONFIG)
    return model, tokenizer, build_federation(CONFIG, tokenizer)


@pytest.fixture
def make_strategy(world, tmp_path):
    def make(**options) -> FedLoraStrategy:
        model, tokenizer, federation = world
        config = CONFIG.replace(out=str(tmp_path / "run"))
        server = Server.open(config, model, tokenizer, federation, RunFolder(config), keep_merges=True)
        strategy = FedLoraStrategy(server, FlowerOptions(**{"round_timeout": 5.0} | options))
        strategy.POLL_SECONDS = 0.05
        return strategy
    return make


# -- the fake SuperLink and SuperNodes --------------------------------------------------------
class FakeGrid:
    """``get_node_ids`` and ``send_and_receive`` of Flower's Grid; each node answers synchronously."""

    def __init__(self, nodes: dict[int, Callable[[Message], Reply]]) -> None:
        self.nodes = nodes
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what the SuperLink assigns
            self.sent.append(msg)
            answer = self.nodes[msg.metadata.dst_node_id](msg)
            if answer is not None:
                replies.append(Message(answer, reply_to=msg))
        return replies


def claim(partition, num_partitions=CLIENTS) -> RecordDict:
    return RecordDict({"partition": MetricRecord({"partition-id": partition, "num-partitions": num_partitions})})


@dataclass
class Node:
    """An honest SuperNode: says its partition, returns the global adapter slightly changed, reports
    its true count and the newest merge it has applied. ``tamper`` rewrites its TRAIN reply."""

    partition: int
    num_examples: int
    tamper: Callable[[RecordDict], RecordDict | None] = lambda content: content
    claims: object = None  # what it answers to the QUERY (default: its partition)
    version: int = 0
    received: list[Message] = field(default_factory=list)

    def __call__(self, msg: Message) -> Reply:
        if msg.metadata.message_type == MessageType.QUERY:
            return self.claims if self.claims is not None else claim(self.partition)
        self.received.append(msg)
        if "base-delta" in msg.content:
            self.version = max([self.version, *record_to_deltas(msg.content["base-delta"])])
        gen = torch.Generator().manual_seed(1000 * self.partition + len(self.received))
        arrays = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if ".lora_" in k else v
                  for k, v in record_tensors(msg.content["arrays"]).items()}
        metrics = MetricRecord({"num-examples": self.num_examples, "partition-id": self.partition, "train-loss": 0.5,
                                "base-version": self.version})
        return self.tamper(RecordDict({"arrays": round_record(arrays), "metrics": metrics}))


def federation_nodes(strategy: FedLoraStrategy, first_id: int = 10, **tampered) -> dict[int, Node]:
    """Node ``first_id + p`` serves partition p; ``tampered={"p3": fn}`` makes partition 3's node hostile."""
    clients = strategy.server.federation.clients
    return {first_id + p: Node(p, clients[p].num_examples, **tampered.get(f"p{p}", {})) for p in range(CLIENTS)}


def run_round(strategy: FedLoraStrategy, grid: FakeGrid, server_round: int) -> tuple[dict, MetricRecord]:
    messages = list(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
    _, metrics = strategy.aggregate_train(server_round, grid.send_and_receive(messages, timeout=1))
    return strategy.server.state.history[-1], metrics


# -- crafted replies ----------------------------------------------------------------------------
def without(name: str):
    def edit(content: RecordDict) -> RecordDict:
        del content[name]
        return content
    return edit


def metric(key: str, value):
    def edit(content: RecordDict) -> RecordDict:
        content["metrics"][key] = value
        return content
    return edit


def array(key: str, value: Array | None):
    def edit(content: RecordDict) -> RecordDict:
        if value is None:
            del content["arrays"][key]
        else:
            content["arrays"][key] = value
        return content
    return edit


def object_array() -> Array:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return Array(dtype="object", shape=(2,), stype="numpy.ndarray", data=buffer.getvalue())


def truncated_array() -> Array:
    whole = Array(np.zeros((2, 384), dtype=np.float32))
    return Array(dtype=whole.dtype, shape=whole.shape, stype=whole.stype, data=whole.data[:-8])


MALFORMED = {
    "no metrics record": (without("metrics"), "missing records ['metrics']"),
    "no arrays record": (without("arrays"), "missing records ['arrays']"),
    "metrics missing a key": (lambda c: (c["metrics"].pop("train-loss"), c)[1], "metrics miss ['train-loss']"),
    "NaN num-examples": (metric("num-examples", float("nan")), "num-examples=nan is not an integer"),
    "inf partition-id": (metric("partition-id", float("inf")), "partition-id=inf is not an integer"),
    "huge num-examples": (metric("num-examples", 10**9), "num-examples=1000000000 but partition 3 has"),
    "3-D lora_A": (array(LORA_A, Array(np.zeros((2, 384, 1), dtype=np.float32))), "has shape (2, 384, 1)"),
    "malformed head": (array(HEAD_W, Array(np.zeros((1, 384), dtype=np.float32))), "has shape (1, 384)"),
    "object dtype": (array(LORA_A, object_array()), "dtype object is not float"),
    "truncated array": (array(LORA_A, truncated_array()), "not the 3072 its header (2, 384) says"),
    "unicode array": (array(LORA_A, Array(np.array(["a", "b"]))), "dtype <U1 is not float"),
    "missing factor": (array(LORA_A, None), "'arrays' misses 1 arrays"),
    "unknown array": (array("base_model.model.evil.lora_A.weight", Array(np.zeros((2, 2), dtype=np.float32))),
                      "unknown arrays"),
    "NaN factor": (array(LORA_A, Array(np.full((2, 384), np.nan, dtype=np.float32))), "non-finite values"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_train_reply_costs_that_node_only(make_strategy, case):
    """Issue 14.1: the reply is logged, recorded with its reason and dropped; the round aggregates the rest."""
    tamper, reason = MALFORMED[case]
    strategy = make_strategy()
    grid = FakeGrid(federation_nodes(strategy, p3={"tamper": tamper}))
    record, metrics = run_round(strategy, grid, 1)
    assert metrics["num-clients"] == CLIENTS - 1 and not record["skipped"]
    [failure] = record["failed_nodes"]
    assert failure["node"] == 13 and failure["partition"] == 3
    assert failure["reason"].startswith("invalid reply: ") and reason in failure["reason"], failure["reason"]


def test_only_bad_replies_left_skip_the_round_under_min_train_nodes(make_strategy):
    strategy = make_strategy(min_train_nodes=2)
    bad = {f"p{p}": {"tamper": without("metrics")} for p in range(1, CLIENTS)}
    record, metrics = run_round(strategy, FakeGrid(federation_nodes(strategy, **bad)), 1)
    assert record["skipped"] and metrics["num-clients"] == 0
    assert sorted(f["partition"] for f in record["failed_nodes"]) == [1, 2, 3]


def test_partition_claims_are_bound_by_the_server(make_strategy):
    """Issue 14.2: 99, 0.7, a claim on a partition whose node is connected and a QUERY reply without
    a partition are refused with a reason; every honest node keeps its partition and gets its messages."""
    strategy = make_strategy()
    nodes: dict[int, Callable[[Message], Reply]] = dict(federation_nodes(strategy))
    impostors = {20: claim(0), 21: claim(99), 22: claim(0.7), 23: RecordDict({"metrics": MetricRecord({"x": 1})}),
                 24: claim(1, num_partitions=2)}
    for node, answer in impostors.items():
        nodes[node] = lambda msg, answer=answer: answer
    grid = FakeGrid(nodes)
    record, metrics = run_round(strategy, grid, 1)
    assert strategy.partition_of == {10 + p: p for p in range(CLIENTS)}
    assert sorted(m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == MessageType.TRAIN) == [10, 11, 12, 13]
    assert metrics["num-clients"] == CLIENTS and record["failed_nodes"] == []
    reasons = {r["node"]: r["reason"] for r in record["refused_nodes"]}
    assert reasons == {20: "partition 0 is already bound to node 10", 21: "partition-id=99 is out of range [0, 3]",
                       22: "partition-id=0.7 is not an integer", 23: "reply has no 'partition' MetricRecord",
                       24: "node-config num-partitions=2 does not fit clients=4"}


def test_a_train_reply_for_another_partition_is_rejected(make_strategy):
    """A node that reports another node's partition loses its own update; the real owner is aggregated."""
    strategy = make_strategy()
    record, metrics = run_round(strategy, FakeGrid(federation_nodes(strategy, p3={"tamper": metric("partition-id", 0)})), 1)
    assert metrics["num-clients"] == CLIENTS - 1
    [failure] = record["failed_nodes"]
    assert failure["node"] == 13 and "partition-id=0 but this node serves partition 3" in failure["reason"]


def test_a_gone_nodes_partition_can_be_served_by_a_new_node(make_strategy):
    strategy = make_strategy()
    nodes = federation_nodes(strategy)
    grid = FakeGrid(dict(nodes))
    run_round(strategy, grid, 1)
    del grid.nodes[13]  # partition 3's SuperNode disconnects; a restarted one comes back with a new id
    grid.nodes[33] = Node(3, nodes[13].num_examples)
    record, metrics = run_round(strategy, grid, 2)
    assert strategy.partition_of[33] == 3 and 13 not in strategy.partition_of and metrics["num-clients"] == CLIENTS


def test_a_reported_base_version_cannot_force_resends(make_strategy):
    """Issue 14.3: a node that always reports base-version 0 is still sent each merge once."""
    strategy = make_strategy()
    nodes = federation_nodes(strategy, p2={"tamper": metric("base-version", 0)})
    grid = FakeGrid(dict(nodes))
    for server_round in (1, 2, 3):
        run_round(strategy, grid, server_round)
    rounds_sent = [sorted(record_to_deltas(m.content["base-delta"])) if "base-delta" in m.content else []
                   for m in nodes[12].received]
    assert rounds_sent == [[], [1], [2]]  # the old code re-sent [1, 2] in round 3
    assert strategy.ledger.version[12] == 2 and not strategy.server.merges  # the ledger holds them, bounded


def _merge(value: float) -> BaseMerge:
    return BaseMerge(delta={"m": torch.full((3, 2), value)}, stacked=None)


def test_the_merge_ledger_bounds_memory_and_resends():
    """At most `keep` merges one by one plus their running sum; a node too far behind gets the sum once."""
    ledger = MergeLedger(keep=3)
    server_merges = {r: _merge(float(r)) for r in range(1, 11)}
    ledger.absorb(server_merges)
    assert server_merges == {} and sorted(ledger.window) == [8, 9, 10]
    torch.testing.assert_close(ledger.total["m"], torch.full((3, 2), 55.0))
    ledger.version.update({1: 9, 2: 7, 3: 2})
    assert sorted(ledger.download(1).merges) == [10] and not ledger.download(1).reset
    assert sorted(ledger.download(2).merges) == [8, 9, 10]
    for node in (3, 99):  # evicted merges needed, or a node new to the run: one dense set, from pristine
        sent = ledger.download(node)
        assert sent.reset and list(sent.merges) == [10] and sent.version == 10
        torch.testing.assert_close(sent.merges[10].delta["m"], torch.full((3, 2), 55.0))
    assert ledger.acknowledge(2, ledger.download(2), reported=0) == 10  # clamped up to what it was sent
    assert ledger.acknowledge(1, ledger.download(1), reported=10**6) == 10  # and down to what exists


def test_a_reset_download_restores_pristine_weights_then_merges_the_total(world):
    """The ClientApp's side of a reset: its own earlier merges are dropped, not added to the total."""
    from fedlora.engines.flower.client_app import _load, _sync_base
    from fedlora.models.lora_state import lora_layers, lora_scaling

    proc = _load(CONFIG)
    module = next(iter(proc.pristine))
    pristine = proc.pristine[module]
    shape = pristine.shape  # (d, k)
    state = RecordDict()
    assert _sync_base(proc, state, {1: {module: torch.ones(shape)}, 2: {module: torch.ones(shape)}}) == 2
    total = {module: torch.full(shape, 0.5)}
    assert _sync_base(proc, state, {7: total}, reset=True) == 7
    weight = lora_layers(proc.model)[module].get_base_layer().weight
    torch.testing.assert_close(weight, pristine + lora_scaling(proc.model, module) * 0.5)


# -- round 1 waits for SuperNodes, but not forever --------------------------------------------
def test_supernodes_that_do_not_fit_clients_stop_the_run_at_once(make_strategy):
    """Issue 14's hang: num-supernodes=2 with clients=4 waited forever; now a one-line error, at once."""
    strategy = make_strategy(round_timeout=3.0)
    grid = FakeGrid({1: lambda msg: claim(0, 2), 2: lambda msg: claim(1, 2)})
    started = time.monotonic()
    with pytest.raises(FederationError, match="all 2 SuperNodes report num-partitions=2 but clients=4"):
        strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
    assert time.monotonic() - started < 2.0


def test_too_few_supernodes_after_the_connect_timeout_stop_the_run(make_strategy):
    strategy = make_strategy(round_timeout=0.3, min_train_nodes=3)
    nodes = federation_nodes(strategy)
    grid = FakeGrid({10: nodes[10], 11: nodes[11]})
    with pytest.raises(FederationError, match=r"only partitions \[0, 1\] have a SuperNode \(min-train-nodes=3\)"):
        strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)


def test_enough_supernodes_go_on_without_the_missing_ones(make_strategy):
    strategy = make_strategy(round_timeout=0.3)
    nodes = federation_nodes(strategy)
    grid = FakeGrid({n: nodes[n] for n in (10, 11, 12)})
    record, metrics = run_round(strategy, grid, 1)
    assert metrics["num-clients"] == 3 and not record["skipped"]
    strategy.connect_timeout = 60.0
    started = time.monotonic()
    run_round(strategy, grid, 2)  # later rounds never wait for the missing partition
    assert time.monotonic() - started < 30


# -- the flwr CLI's connection file (issue 15.7) ------------------------------------------------
def test_writing_a_connection_twice_leaves_valid_toml_and_keeps_the_rest(tmp_path):
    from fedlora.engines.flower.local import main, write_connection

    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\noptions.num-supernodes = 10\n')
    for _ in range(2):
        write_connection(home, "sim", "127.0.0.1:9093")
    os.environ["FLWR_HOME"], saved = str(home), os.environ.get("FLWR_HOME")
    try:
        main(["connect", "deploy", "127.0.0.1:9093", "--root-certificates", str(tmp_path / "ca.crt")])
        main(["connect", "deploy", "127.0.0.1:9093", "--root-certificates", str(tmp_path / "ca.crt")])
    finally:
        os.environ.pop("FLWR_HOME") if saved is None else os.environ.update(FLWR_HOME=saved)
    superlink = tomllib.loads((home / "config.toml").read_text())["superlink"]
    assert superlink == {"default": "local", "local": {"options": {"num-supernodes": 10}},
                         "sim": {"address": "127.0.0.1:9093", "insecure": True},
                         "deploy": {"address": "127.0.0.1:9093", "root-certificates": str(tmp_path / "ca.crt")}}
    assert Path(home / "config.toml.tmp").exists() is False


# -- fuzz: no reply, however crafted, raises out of the parsing -------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fedlora.aggregation import LoraPair  # noqa: E402
from fedlora.engines.flower.messages import RankBoundary, TrainReply  # noqa: E402
from fedlora.engines.flower.replies import (Expected, expected_arrays, parse_query_reply,  # noqa: E402
                                            parse_train_reply, to_result)
from fedlora.engines.flower.wire import model_record  # noqa: E402

FUZZ_ADAPTER = {m: LoraPair(A=torch.randn(2, 5), B=torch.randn(6, 2)) for m in ("layer.0.query", "layer.0.value")}
FUZZ_HEAD = {"classifier.weight": torch.randn(3, 6), "classifier.bias": torch.randn(3)}
SERVER_RANK = 3  # the client trains at rank 2 (mixed ranks): its factors are padded back to 3


def fuzz_expected(private: bool) -> Expected:
    return Expected(partition=1, num_examples=40, max_version=4,
                    arrays=expected_arrays(FUZZ_ADAPTER, FUZZ_HEAD, A=True, B=not private),
                    eval_B=expected_arrays(FUZZ_ADAPTER, {}, A=False, B=True) if private else None)


def npy(value: np.ndarray) -> Array:
    return Array(value)


numbers = st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
                    st.lists(st.integers(-5, 5), max_size=2), st.lists(st.floats(), max_size=2))
config_values = st.one_of(numbers, st.text(max_size=5), st.booleans(), st.binary(max_size=5))
shapes = st.lists(st.integers(0, 7), max_size=3).map(tuple)
bad_arrays = st.one_of(
    st.tuples(shapes, st.sampled_from(["<f4", "<f8", "<f2", ">f4", "<i4", "|b1", "<c8", "<U2"])).map(
        lambda sd: npy(np.zeros(sd[0], dtype=sd[1]))),
    st.builds(lambda data: Array(dtype="float32", shape=(2, 5), stype="numpy.ndarray", data=data), st.binary(max_size=200)),
    st.just(object_array()), st.just(truncated_array()),
    st.just(npy(np.full((2, 5), np.inf, dtype=np.float32))),
    st.just(Array(dtype="float32", shape=(2, 5), stype="torch.Tensor", data=npy(np.zeros((2, 5), np.float32)).data)),
)
mutations = st.one_of(
    st.tuples(st.just("drop-record"), st.sampled_from(["arrays", "metrics", "eval-B"])),
    st.tuples(st.just("add-record"), st.sampled_from(["config", "base-delta", "extra"])),
    st.tuples(st.just("retype-record"), st.sampled_from(["arrays", "metrics", "eval-B"])),
    st.tuples(st.just("drop-metric"), st.sampled_from(["num-examples", "partition-id", "train-loss", "base-version"])),
    st.tuples(st.just("set-metric"), st.tuples(st.sampled_from(["num-examples", "partition-id", "train-loss",
                                                                 "base-version", "local.accuracy", "evil"]), numbers)),
    st.tuples(st.just("drop-array"), st.integers(0, 20)),
    st.tuples(st.just("set-array"), st.tuples(st.integers(0, 20), bad_arrays)),
    st.tuples(st.just("add-array"), st.sampled_from(["base_model.model.evil.lora_A.weight", "classifier.weight", ""])),
)
harmless = st.one_of(  # changes an honest client could make: the reply stays valid
    st.tuples(st.just("set-metric"), st.tuples(st.just("train-loss"), st.floats(-1e30, 1e30))),
    st.tuples(st.just("set-metric"), st.tuples(st.just("base-version"), st.integers(0, 4))),
    st.tuples(st.just("set-metric"), st.tuples(st.sampled_from(["local.accuracy", "local.f1"]), st.integers(-9, 9))),
    st.tuples(st.just("drop-metric"), st.just("local.accuracy")),
)
edit_lists = st.lists(st.one_of(harmless, mutations), max_size=3)


_CLIENT = {m: LoraPair(A=p.A[:2] + 0.1, B=p.B[:, :2]) for m, p in FUZZ_ADAPTER.items()}  # rank 2
VALID = {private: (dict(model_record(_CLIENT, FUZZ_HEAD, B=not private)), dict(model_record(_CLIENT, {}, A=False)))
         for private in (False, True)}  # serialised once; each example gets fresh records around them


def crafted(private: bool, edits: list) -> RecordDict:
    """A valid reply for fuzz_expected(private), then the edits applied in order."""
    arrays, eval_B = VALID[private]
    content = RecordDict({"arrays": ArrayRecord(dict(arrays)),
                          "metrics": MetricRecord({"num-examples": 40, "partition-id": 1, "train-loss": 0.3,
                                                   "base-version": 2, "local.accuracy": 0.5})})
    if private:
        content["eval-B"] = ArrayRecord(dict(eval_B))
    for kind, arg in edits:
        if kind == "drop-record" and arg in content:
            del content[arg]
        elif kind == "add-record":
            content[arg] = ConfigRecord({"x": 1})
        elif kind == "retype-record":
            content[arg] = ConfigRecord({"num-examples": "40"}) if arg == "metrics" else MetricRecord({"x": 1.0})
        elif kind == "drop-metric" and isinstance(content.get("metrics"), MetricRecord):
            content["metrics"].pop(arg, None)
        elif kind == "set-metric" and isinstance(content.get("metrics"), MetricRecord):
            content["metrics"][arg[0]] = arg[1]
        elif kind in ("drop-array", "set-array", "add-array") and isinstance(content.get("arrays"), ArrayRecord):
            arrays = content["arrays"]
            if kind == "add-array":
                arrays[arg] = npy(np.zeros((2, 5), np.float32))
            else:
                keys = sorted(arrays)
                index = (arg if kind == "drop-array" else arg[0]) % len(keys) if keys else None
                if index is not None and kind == "drop-array":
                    del arrays[keys[index]]
                elif index is not None:
                    arrays[keys[index]] = arg[1]
    return content


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(private=st.booleans(), edits=edit_lists)
def test_fuzzed_train_replies_are_parsed_or_refused_never_raised(private, edits):
    """Issue 14: every crafted TRAIN reply is either a valid ClientResult or refused with a reason."""
    expected = fuzz_expected(private)
    sent = Message(RecordDict({"config": ConfigRecord({"server-round": 5})}), 7, MessageType.TRAIN)
    parsed = parse_train_reply(Message(crafted(private, edits), reply_to=sent), expected)
    if isinstance(parsed, str):
        assert parsed and "\n" not in parsed
        return
    assert isinstance(parsed, TrainReply)
    assert {k: tuple(v.shape) for k, v in parsed.arrays.items()} == expected.arrays
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in parsed.arrays.values())
    assert parsed.num_examples == 40 and 0 <= parsed.base_version <= expected.max_version
    sent = RankBoundary(client=2, model=SERVER_RANK).to_wire(FUZZ_ADAPTER)
    result = to_result(parsed, sent, RankBoundary(client=2, model=SERVER_RANK), client_id="client-1")
    assert {m: (p.A.shape, p.B.shape) for m, p in result.update.adapter.items()} == {
        m: ((SERVER_RANK, 5), (6, SERVER_RANK)) for m in FUZZ_ADAPTER}
    assert set(result.head) == set(FUZZ_HEAD) and result.update.num_examples == 40


@settings(max_examples=300, deadline=None)
@given(record=st.one_of(st.none(), st.dictionaries(st.sampled_from(["partition-id", "num-partitions", "x"]), numbers)),
       as_config=st.booleans())
def test_fuzzed_query_replies_give_a_partition_or_a_reason(record, as_config):
    sent = Message(RecordDict({"config": ConfigRecord({"ask": "partition-id"})}), 7, MessageType.QUERY)
    content = RecordDict() if record is None else RecordDict(
        {"partition": ConfigRecord(record) if as_config else MetricRecord(record)})
    claimed = parse_query_reply(Message(content, reply_to=sent), CLIENTS)
    assert (isinstance(claimed, int) and 0 <= claimed < CLIENTS and not as_config) or (isinstance(claimed, str) and claimed)
