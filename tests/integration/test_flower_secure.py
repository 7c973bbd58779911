"""Secure aggregation on Flower: the rounds through Flower's own SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``).

In this process, the real ServerApp and ClientApps, every message serialised (the fixture of
tests/integration/test_flower_simulation.py). Properties: a secure run ends where the plain run ends, within
SecAgg+'s quantisation (each of U clients' values is quantised to 2 × 8 / 2^22 ≈ 3.8e-6, so the mean is off by at
most that per coordinate and round; measured below); no message the server receives holds a client's factors in
the clear (a spy on the grid); a client dropping out above the reconstruction threshold does not stop the round;
user-level DP under it (clients clip, the server noises the mean) is the plain DP-FedAvg round within SecAgg+'s
steps; a method that needs individual updates is refused before anything loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlora.config.run import ConfigError, RunConfig
from fedlora.engines.flower.secure import check_secure

from tests.integration.test_flower_simulation import TINY, in_process_flower, sim_superlink  # noqa: F401  (fixtures)

SECURE = dict(TINY, clients=3, method="fedit", rounds=1)  # one round: the tolerance is the protocol's, not grown by training


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _products(adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{module: B @ A (d, k)} of a saved PEFT adapter."""
    return {k.replace(".lora_A.weight", ""): adapter[k.replace("lora_A", "lora_B")] @ adapter[k]
            for k in adapter if k.endswith(".lora_A.weight")}


@pytest.mark.slow  # ~10-25 s: SecAgg+'s four stages per round, several runs
# fedsa-lora: its private B summed for evaluation only; fedask: two secure sums per round, one per phase
@pytest.mark.parametrize("method", ["fedit", "fedsa-lora", "fedask"])
def test_a_secure_run_ends_where_the_plain_run_ends(in_process_flower, tmp_path, tiny_bert_path, monkeypatch,  # noqa: F811
                                                    method):
    import tests.integration.test_flower_simulation as sim

    plain = RunConfig(model=tiny_bert_path, out=str(tmp_path / "plain"), clip_factor=0.0,
                      method_options={"weighting": "examples"}, **(SECURE | {"method": method}))
    in_process_flower(plain)
    received: list = []
    deliver = sim.InProcessGrid.send_and_receive

    def spy(self, messages, *, timeout=None):  # every reply the server process gets
        replies = deliver(self, messages, timeout=timeout)
        received.extend(replies)
        return replies

    monkeypatch.setattr(sim.InProcessGrid, "send_and_receive", spy)
    secure = plain.replace(out=str(tmp_path / "secure"))
    in_process_flower(secure, secure_aggregation=True)

    a, b = _records(Path(plain.out)), _records(Path(secure.out))
    assert [r["round"] for r in b] == [1] and all(r["secure_aggregation"] == "SecAgg+" for r in b)
    assert "secure aggregation (SecAgg+ on Flower)" in (Path(secure.out) / "adapter" / "README.md").read_text()
    assert [r["clients"] for r in a] == [r["clients"] for r in b]
    for x, y in zip(a, b):
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-4)
        assert x["lora_bytes_up"] == y["lora_bytes_up"] and x["lora_bytes_down"] == y["lora_bytes_down"]
    plain_adapter, secure_adapter = _adapter(Path(plain.out)), _adapter(Path(secure.out))
    if method == "fedask":  # its factors are singular vectors (each up to sign): compare what the model uses, B A
        plain_adapter, secure_adapter = _products(plain_adapter), _products(secure_adapter)
    worst = max(float((plain_adapter[k] - secure_adapter[k]).abs().max()) for k in plain_adapter)
    print(f"largest difference, secure vs plain ({method}):", worst)
    assert 0 < worst < 8e-6, worst  # quantised, not bit-equal: within twice the protocol's step, 3.8e-6

    # the spy: no reply carries LoRA factors in an ArrayRecord (SecAgg+ sends masked integers in a ConfigRecord)
    assert received, "the spy saw no message"
    lora_arrays = [key for msg in received if msg.has_content()
                   for record in msg.content.array_records.values() for key in record.keys() if ".lora_" in key]
    assert lora_arrays == []


@pytest.mark.parametrize("changes, message", [
    (dict(method="flora-na"), "each client's update"),
    (dict(client_ranks=(8, 4, 4)), "mixed client ranks"),
])
def test_secure_aggregation_refuses_what_sums_cannot_carry(changes, message):
    with pytest.raises(ConfigError, match=message):
        check_secure(RunConfig(**(SECURE | changes)))
    check_secure(RunConfig(**SECURE))  # fedit: fine


@pytest.mark.slow  # ~10-25 s: SecAgg+'s four stages per round, several runs
def test_a_client_dropping_out_above_the_threshold_does_not_stop_the_round(in_process_flower, tmp_path,  # noqa: F811
                                                                            tiny_bert_path, monkeypatch):
    from flwr.app import Error, Message

    import tests.integration.test_flower_simulation as sim

    deliver = sim.InProcessGrid.send_and_receive
    dropped: list[int] = []

    def drop_one(self, messages, *, timeout=None):  # the last node vanishes when its masked vector is due
        messages = list(messages)
        replies = deliver(self, messages, timeout=timeout)
        if any("fitins.config" in m.content.config_records for m in messages if m.has_content()) and not dropped:
            victim = replies[-1]
            dropped.append(victim.metadata.src_node_id)
            replies[-1] = Message(Error(code=0, reason="node dropped out"), reply_to=messages[-1])
        return replies

    monkeypatch.setattr(sim.InProcessGrid, "send_and_receive", drop_one)
    config = RunConfig(model=tiny_bert_path, out=str(tmp_path / "secure"), **(SECURE | dict(clients=4)))
    in_process_flower(config, secure_aggregation=True, secagg_threshold=0.5)
    record, = _records(Path(config.out))
    assert dropped and len(record["clients"]) == 3 and not record["skipped"]
    assert record["failed_nodes"], "the dropped node is recorded"


@pytest.mark.slow  # ~10-25 s: SecAgg+'s four stages per round, several runs
def test_user_level_dp_under_secure_aggregation_is_the_plain_dp_round(in_process_flower, tmp_path,  # noqa: F811
                                                                       tiny_bert_path):
    """Clients clip their own updates (the server cannot), weigh 1 each; the server rescales the secure mean to the
    planned clients and adds the same seeded noise as the plain DP-FedAvg round: equal within SecAgg+'s steps."""
    dp = dict(dp_clip=0.02, dp_noise=0.5)  # C well below these clients' update norms: every client clips
    plain = RunConfig(model=tiny_bert_path, out=str(tmp_path / "plain"), **(SECURE | dp))
    in_process_flower(plain)
    secure = plain.replace(out=str(tmp_path / "secure"))
    in_process_flower(secure, secure_aggregation=True)
    a, b = _records(Path(plain.out))[0], _records(Path(secure.out))[0]
    assert a["dp_epsilon"] == b["dp_epsilon"] and len(a["clipped"]) == 3
    plain_adapter, secure_adapter = _adapter(Path(plain.out)), _adapter(Path(secure.out))
    worst = max(float((plain_adapter[k] - secure_adapter[k]).abs().max()) for k in plain_adapter)
    assert worst < 8e-6, worst


@pytest.mark.slow  # its own simulation SuperLink (this module's instance of the fixture, a free port): not pinned to
# the worker of test_flower_simulation.py's `flwr run` group, so xdist can run it beside them
def test_flwr_run_with_secure_aggregation(sim_superlink, tmp_path, tiny_bert_path):  # noqa: F811
    """The same through `flwr run` on a simulation SuperLink: Ray workers, the FAB, Flower's own config parsing.
    On the tiny random BERT (the real MiniLM goes through `flwr run` in test_flower_simulation.py)."""
    import subprocess

    from tests.integration.test_flower_simulation import FEDERATION, REPO, flower_overrides

    procs, env = sim_superlink
    config = RunConfig(out=str(tmp_path / "secure"), model=tiny_bert_path, **dict(SECURE, clients=2))
    cmd = ["flwr", "run", str(REPO), "sim", "--stream", "--run-config",
           flower_overrides(config, secure_aggregation=True), "--federation-config", FEDERATION]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=480)
    out = Path(config.out)
    assert (out / "adapter" / "adapter_model.safetensors").exists(), run.stdout[-4000:] + run.stderr[-4000:]
    record, = _records(out)
    assert record["secure_aggregation"] == "SecAgg+" and len(record["clients"]) == 2
