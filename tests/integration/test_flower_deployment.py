"""Flower deployment on loopback: a TLS SuperLink with SuperNode authentication, two registered
SuperNodes, `flwr run`, real processes; and the SuperNodes that authentication refuses.

Every process is started in its own session and ended (with its children) in `finally`.
Only 127.0.0.1 is used; certificates are generated inside the test.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedlora.engines import local as simulation  # noqa: E402
from fedlora.config.run import RunConfig  # noqa: E402
from fedlora.engines.flower.local import (  # noqa: E402
    Processes,
    flower_env,
    free_port,
    generate_certificates,
    generate_supernode_keys,
    register_supernode,
    superlink_command,
    supernode_command,
    wait_for,
    write_connection,
)

from test_flower_auth import CONNECTION_REFUSED, NOT_ACTIVATED, SELF_REGISTRATION_DISABLED, exited  # noqa: E402
from test_flower_simulation import GLUE, REPO, TINY_SST2, assert_same_history, flower_overrides, records  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (GLUE / "SST-2").is_dir(), reason=f"real GLUE files expected at {GLUE}"),
]


@contextmanager
def tls_deployment(root: Path, supernodes: int = 2):
    """SuperLink (TLS, SuperNode authentication) + SuperNodes with partition ids 0..n-1, each
    authorised by registering its public key (`flwr supernode register`) and started with its
    private key, and a `flwr` connection named "loopback". Yields the processes, the environment,
    the registered node ids by SuperNode name, and a function starting one more SuperNode (name, partition,
    private key or None) against the same SuperLink."""
    certs = generate_certificates(root / "certs")
    keys = generate_supernode_keys(root / "keys", [f"supernode-{i}" for i in range(supernodes)])
    port = free_port()
    write_connection(root / "flwr-home", "loopback", f"127.0.0.1:{port}", root_certificates=certs["ca"])
    env = flower_env(root / "flwr-home") | {"FEDLORA_CACHE_DIR": str(root / "cache")}
    procs = Processes(root / "logs", env)
    try:
        procs.start("superlink", superlink_command(port, certs, supernode_auth=True))
        wait_for(lambda: "Uvicorn running" in procs.log("superlink"), 60, "the SuperLink to listen")
        node_ids = {name: register_supernode(key["public"], "loopback", env) for name, key in keys.items()}
        for i, (name, key) in enumerate(keys.items()):
            procs.start(name, supernode_command(f"127.0.0.1:{port}", certs["ca"], i, supernodes, key["private"]))

        def start_another(name: str, partition: int, private_key: Path | None) -> None:
            procs.start(name, supernode_command(f"127.0.0.1:{port}", certs["ca"], partition, supernodes, private_key))

        yield procs, env, node_ids, start_another, keys
    finally:
        procs.stop_all()


def submit(procs: Processes, env: dict, config: RunConfig, extra: str = "") -> None:
    """`flwr run . loopback --stream`: the ServerApp's log streams into logs/flwr-run.log."""
    procs.start("flwr-run", ["flwr", "run", str(REPO), "loopback", "--stream",
                             "--run-config", f"{flower_overrides(config)} {extra}".strip()], cwd=REPO)


def test_tls_deployment_two_rounds_survives_a_killed_supernode(tmp_path):
    """TLS + SuperNode authentication: round 1 equals the local engine's; SuperNode 1 is SIGKILLed
    at the start of round 2, which then completes with client 0 alone; the global state and the
    PEFT adapter are written. While the SuperLink waits out node 1's heartbeats, authentication refuses a
    SuperNode with an unregistered key, one without a key, and a copy of SuperNode 0's key while it is online:
    they exit with Flower's connection error and never become nodes (the run goes on unaffected)."""
    config = RunConfig(method="fedex-lora", out=str(tmp_path / "local"), **TINY_SST2)  # base_delta travels too
    flower = config.replace(out=str(tmp_path / "flower"))
    intruder_key = generate_supernode_keys(tmp_path / "intruder-keys", ["intruder"])["intruder"]["private"]
    with tls_deployment(tmp_path / "deploy") as (procs, env, node_ids, start_another, keys):
        submit(procs, env, flower, extra="min-train-nodes=1")
        metrics = Path(flower.out) / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, 180,
                 f"round 1; run log:\n{procs.log('flwr-run')[-3000:]}")
        procs.kill("supernode-1")  # a crash: no goodbye, the SuperLink notices missed heartbeats
        killed_at = time.monotonic()
        # The SuperLink needs ~1 min of missed heartbeats to give up on node 1: meanwhile the SuperNodes that
        # authentication must refuse, and the local engine's run (the CPUs are idle).
        start_another("intruder", 0, intruder_key)
        start_another("keyless", 1, None)
        start_another("impostor", 0, keys["supernode-0"]["private"])  # supernode-0 is online and training
        local = simulation.run(config, progress=False)
        exited(procs, ["intruder", "keyless", "impostor"])
        for name, reason in (("intruder", NOT_ACTIVATED), ("keyless", SELF_REGISTRATION_DISABLED),
                             ("impostor", NOT_ACTIVATED)):
            log = procs.log(name)
            assert procs.procs[name].returncode == 1, log[-3000:]
            assert CONNECTION_REFUSED in log and reason in log, log[-3000:]
            assert "SuperNode ID:" not in log  # never got a node id
        done = Path(flower.out) / "adapter" / "adapter_model.safetensors"
        wait_for(lambda: done.exists() or procs.procs["flwr-run"].poll() is not None, 240, "round 2 without node 1")
        assert done.exists(), procs.log("flwr-run")[-4000:]
        print(f"round 2 finished {time.monotonic() - killed_at:.0f}s after the kill")

    history = records(flower.out)
    assert [r["round"] for r in history] == [1, 2]
    assert_same_history(history[:1], local[:1])  # same numbers as `fedlora run`, over TLS
    assert history[1]["clients"] == ["client-0"]  # round 2 completed with the remaining client
    assert history[1]["lora_bytes_up"] == local[1]["lora_bytes_up"] // 2  # the library's formula, one client
    # The failure is recorded by node id in metrics.jsonl (the streamed server log may lag or be
    # buffered by `flwr run --stream`, so the file is the reliable witness).
    assert [(f["node"], f["partition"]) for f in history[1]["failed_nodes"]] == [(node_ids["supernode-1"], 1)]
    assert history[0]["failed_nodes"] == []

    from fedlora.protocol.checkpoint import load_state
    from fedlora.runs.adapter_files import load_model_with_adapter

    assert load_state(Path(flower.out)).round == 2  # no global state lost
    adapter = Path(flower.out) / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "base_weights.safetensors"} <= {p.name for p in adapter.iterdir()}
    load_model_with_adapter(adapter)  # a loadable PEFT adapter (+ the merged FedEx-LoRA residuals)
