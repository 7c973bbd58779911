"""Fast checks of the Flower glue: run-config mapping, wire format, certificates (no Ray, no processes)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch

from flwr.app import Array, RecordDict

from fedlora.aggregation import ClientUpdate, LoraPair, aggregate, get_method
from fedlora.aggregation.communication import round_bytes
from fedlora.config.run import ConfigError, RunConfig
from fedlora.engines.flower.client_app import _global_init
from fedlora.engines.flower.config import run_config_from_flower
from fedlora.engines.flower.wire import (
    content_bytes,
    deltas_record,
    model_record,
    payload_bytes,
    record_to_deltas,
    record_to_model,
    record_to_stacked_deltas,
    select_factors,
    stacked_record,
)

PYPROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"


def flower_defaults() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_are_the_fedlora_run_defaults():
    config, options = run_config_from_flower(flower_defaults())
    assert config == RunConfig().replace(out="runs/flower")
    assert options.min_train_nodes == 1 and options.min_available_nodes == 0


def test_overrides_use_the_cli_spellings():
    raw = flower_defaults() | {"alpha": "iid", "method": "flora-na", "method-options": "solver=adamw scope=global", "data-dir": "",
                               "max-eval-examples": "all", "target-modules": "query key value", "local-steps": 3}
    config, _ = run_config_from_flower(raw)
    assert config.alpha is None and config.data_dir is None and config.max_eval_examples is None
    assert config.method_options == {"solver": "adamw", "scope": "global"}
    assert config.target_modules == ("query", "key", "value") and config.local_steps == 3


@pytest.mark.parametrize("change, needle", [({"rounds-typo": 3}, "unknown keys"), ({"method": "nope"}, "--method"),
                                            ({"min-train-nodes": 0}, "min-train-nodes")])
def test_bad_config_is_named(change, needle):
    with pytest.raises(ConfigError, match=needle):
        run_config_from_flower(flower_defaults() | change)


def test_model_record_uses_peft_names_and_round_trips():
    adapter = {"bert.encoder.layer.0.attention.self.query": LoraPair(A=torch.randn(2, 5), B=torch.randn(4, 2))}
    head = {"classifier.weight": torch.randn(2, 4), "classifier.bias": torch.randn(2)}
    record = model_record(adapter, head)
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in record
    assert "base_model.model.classifier.weight" in record
    back, back_head = record_to_model(record)
    assert torch.equal(back["bert.encoder.layer.0.attention.self.query"].B, adapter["bert.encoder.layer.0.attention.self.query"].B)
    assert set(back_head) == set(head) and all(torch.equal(back_head[k], head[k]) for k in head)


def test_deltas_come_back_in_round_order():
    deltas = {3: {"m": torch.ones(2, 2)}, 1: {"m": torch.zeros(2, 2), "n": torch.eye(2)}}
    back = record_to_deltas(deltas_record(deltas))
    assert list(back) == [1, 3] and torch.equal(back[1]["n"], torch.eye(2))


def _model(d: int = 6, k: int = 5, r: int = 2) -> tuple[dict[str, LoraPair], dict[str, torch.Tensor]]:
    adapter = {m: LoraPair(A=torch.randn(r, k), B=torch.randn(d, r)) for m in ("layer.0.query", "layer.0.value")}
    return adapter, {"classifier.weight": torch.randn(3, d), "classifier.bias": torch.randn(3)}


@pytest.mark.parametrize("shape", [(), (7,), (2, 3), (1000, 17)])
def test_payload_bytes_is_the_float32_data_without_the_npy_header(shape):
    array = Array(torch.zeros(shape, dtype=torch.float32))
    assert payload_bytes(array) == 4 * torch.zeros(shape).numel()
    assert len(array.data) > payload_bytes(array)  # the header is real, and not counted


def test_content_bytes_splits_lora_head_delta_and_eval():
    adapter, head = _model()
    head_bytes = 4 * sum(t.numel() for t in head.values())
    B_bytes = 4 * sum(p.B.numel() for p in adapter.values())
    content = RecordDict({"arrays": model_record(adapter, head, A=False), "base-delta": deltas_record({1: {"m": torch.ones(6, 5)}}),
                          "eval-B": model_record(adapter, {}, A=False)})
    counted = content_bytes(content)
    assert (counted.lora, counted.head, counted.eval) == (B_bytes + 4 * 30, head_bytes, B_bytes)
    assert counted.serialized > counted.lora + counted.head + counted.eval
    assert (counted + counted).as_record("up")["wire_lora_bytes_up"] == 2 * counted.lora


@pytest.mark.parametrize("method", ["fedit", "ffa-lora", "fedsa-lora", "fedex-lora"])
def test_policy_trimmed_records_weigh_what_round_bytes_counts(method):
    """Per client, the uploaded factors are round_bytes' up; down is the same plus FedEx-LoRA's (d, k) residual."""
    policy = get_method(method).policy
    adapter, head = _model()
    clients = 3
    record = model_record(adapter, head, A=policy.upload_A, B=policy.upload_B)
    residual = deltas_record({1: {m: p.product() for m, p in adapter.items()}}) if policy.download_residual else None
    up = content_bytes(RecordDict({"arrays": record}))
    down = content_bytes(RecordDict({"arrays": record} | ({"base-delta": residual} if residual else {})))
    assert (clients * up.lora, clients * down.lora) == round_bytes(policy, adapter, clients)


def test_flora_downloads_stacked_factors_that_multiply_out_to_the_merge_and_weigh_round_bytes():
    """FLoRA's "base-factors": per client U·(r·k + d·r) floats (round_bytes' stacked download), and
    the client's product of them is the server's base_delta; its "arrays" carry no LoRA factor."""
    adapter, head = _model()
    clients = 3
    ups = [ClientUpdate({m: LoraPair(A=torch.randn_like(p.A), B=torch.randn_like(p.B)) for m, p in adapter.items()}, 10 + u, f"c{u}")
           for u in range(clients)]
    result = aggregate("flora", adapter, ups, seed=5)
    stacked = {m: LoraPair(A=p.A.float(), B=p.B.float()) for m, p in result.extras["stacked"].items()}
    record = stacked_record({2: stacked})
    back = record_to_stacked_deltas(record)
    assert list(back) == [2]
    for m in adapter:
        torch.testing.assert_close(back[2][m], result.base_delta[m], rtol=1e-5, atol=1e-6)  # (d, k), not transposed
    policy = get_method("flora").policy
    arrays = select_factors(model_record(result.adapter, head), A=False, B=False)  # what the strategy sends
    down = content_bytes(RecordDict({"arrays": arrays, "base-factors": record}))
    up = content_bytes(RecordDict({"arrays": model_record(adapter, head)}))
    assert (clients * up.lora, clients * down.lora) == round_bytes(policy, adapter, clients)
    # The client draws the re-initialised global adapter from the seed instead of downloading it.
    drawn = _global_init("flora", adapter, 5)
    for m in adapter:
        assert torch.equal(drawn[m].A, result.adapter[m].A) and torch.equal(drawn[m].B, result.adapter[m].B)
    assert _global_init("flora", adapter, -1) is adapter
    # a method that draws a seed but sends its adapter (FedASK's sketch seed) rebuilds nothing from it
    assert _global_init("fedask", adapter, 5) is adapter


def test_missing_factors_come_from_the_receivers_copy():
    adapter, head = _model()
    mine = {m: LoraPair(A=torch.zeros_like(p.A), B=torch.ones_like(p.B)) for m, p in adapter.items()}
    only_A = select_factors(model_record(adapter, head), B=False)
    assert not any(".lora_B." in k for k in only_A) and "base_model.model.classifier.bias" in only_A
    back, back_head = record_to_model(only_A, missing_from=mine)
    for m, p in adapter.items():
        assert torch.equal(back[m].A, p.A) and torch.equal(back[m].B, mine[m].B)
    assert torch.equal(back_head["classifier.weight"], head["classifier.weight"])
    with pytest.raises(KeyError, match="both A and B"):
        record_to_model(only_A)  # without a copy of its own the receiver cannot rebuild B


def test_certificates_are_for_loopback_and_signed_by_the_ca(tmp_path):
    from cryptography import x509

    from fedlora.engines.flower.local import generate_certificates

    paths = generate_certificates(tmp_path)
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


def test_the_train_task_is_one_typed_message_each_way():
    from fedlora.config.run import ConfigError
    from fedlora.engines.flower.messages import TrainTask

    task = TrainTask(server_round=3, local_eval=True, partition_id=1, init_seed=-1, client_rank=4, base_reset=True,
                     method_seed=77, dp_sgd_noise=1.5)
    assert TrainTask.from_config(task.to_config()) == task
    assert TrainTask.from_config(task.to_dict()) == task  # a secure round's legacy FitIns config
    older = {k: v for k, v in task.to_dict().items() if k not in ("method-seed", "dp-sgd-noise", "base-reset")}
    assert TrainTask.from_config(older) == TrainTask(3, True, 1, -1, 4)  # what a server without them meant
    with pytest.raises(ConfigError, match="lacks config 'partition-id'"):
        TrainTask.from_config({k: v for k, v in task.to_dict().items() if k != "partition-id"})
    with pytest.raises(ConfigError, match="'server-round'=True is not a int"):
        TrainTask.from_config(task.to_dict() | {"server-round": True})
    with pytest.raises(ConfigError, match="'dp-sgd-noise'='1' is not a float"):
        TrainTask.from_config(task.to_dict() | {"dp-sgd-noise": "1"})


# -- the typed messages: one type each way, written and read by wire.py only --------------------
def _download(rank: int) -> tuple:
    from fedlora.engines.flower.messages import RankBoundary, TrainDownload, TrainTask
    from fedlora.engines.flower.wire import model_tensors
    from fedlora.protocol.rounds import BaseMerge

    adapter, head = _model(r=4)  # the server's rank 4; the client's `rank`
    boundary = RankBoundary(client=rank, model=next(iter(adapter.values())).A.shape[0])
    stacked = {m: LoraPair(A=torch.randn(4, p.A.shape[1]), B=torch.randn(p.B.shape[0], 4)) for m, p in adapter.items()}
    merges = {2: BaseMerge(delta={m: torch.randn(p.B.shape[0], p.A.shape[1]) for m, p in adapter.items()}, stacked=None),
              3: BaseMerge(delta={m: s.product() for m, s in stacked.items()}, stacked=stacked)}
    task = TrainTask(server_round=4, local_eval=True, partition_id=1, init_seed=-1, client_rank=rank, method_seed=9)
    return TrainDownload(task, model_tensors(boundary.to_wire(adapter), head, B=False), merges), boundary, adapter


def test_a_download_reads_back_as_the_download_it_was():
    from fedlora.engines.flower.wire import download_content, read_download

    download, _, _ = _download(rank=2)
    back = read_download(download_content(download))
    assert back.task == download.task and back.arrays.keys() == download.arrays.keys()
    for key, tensor in download.arrays.items():
        torch.testing.assert_close(back.arrays[key], tensor, rtol=0, atol=0)
    assert list(back.merges) == [2, 3]  # in round order, each the product the server merged (not transposed)
    for r, merge in download.merges.items():
        for m, delta in merge.delta.items():
            torch.testing.assert_close(back.merges[r].delta[m], delta, rtol=1e-5, atol=1e-5)


@pytest.fixture
def task_identity():
    """What a running ServerApp sets (Messages need a run id); restored afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def test_a_reply_is_parsed_back_into_the_reply_the_client_built_and_crosses_the_rank_boundary_once(task_identity):
    """Client: to_wire before sending; server: the same reply out of parse_train_reply, then from_wire: the
    components the client trained come back in place, and the padding is zero."""
    from flwr.app import Message, MessageType
    from fedlora.engines.flower.messages import TrainReply
    from fedlora.engines.flower.replies import Expected, expected_arrays, parse_train_reply, to_result
    from fedlora.engines.flower.wire import model_tensors, reply_content

    _, boundary, adapter = _download(rank=2)
    _, head = _model()
    trained = {m: LoraPair(A=p.A * 0 + 1.5, B=p.B * 0 - 0.5) for m, p in boundary.to_wire(adapter).items()}  # rank 2
    reply = TrainReply(arrays=model_tensors(trained, head), eval_B=None, num_examples=12, loss=0.25,
                       local_metrics={"accuracy": 0.5}, base_version=3, partition_id=1)
    sent = boundary.to_wire(adapter)
    expected = Expected(partition=1, num_examples=12, arrays=expected_arrays(sent, head, A=True, B=True), eval_B=None,
                        max_version=3)
    request = Message(RecordDict(), 7, MessageType.TRAIN)
    parsed = parse_train_reply(Message(reply_content(reply), reply_to=request), expected)
    assert isinstance(parsed, TrainReply)
    assert (parsed.num_examples, parsed.loss, parsed.local_metrics, parsed.base_version, parsed.partition_id) == \
        (12, 0.25, {"accuracy": 0.5}, 3, 1)
    result = to_result(parsed, sent, boundary, client_id="c1")
    for m, pair in result.update.adapter.items():
        assert pair.A.shape == adapter[m].A.shape and pair.B.shape == adapter[m].B.shape  # the server's rank
        assert (pair.A[:2] == 1.5).all() and (pair.B[:, :2] == -0.5).all()
        assert not pair.A[2:].any() and not pair.B[:, 2:].any()
    round_trip = boundary.from_wire(boundary.to_wire(result.update.adapter))  # zero padding: nothing is lost
    for m, pair in result.update.adapter.items():
        assert torch.equal(round_trip[m].A, pair.A) and torch.equal(round_trip[m].B, pair.B)
