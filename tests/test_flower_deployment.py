"""Flower deployment on loopback: a TLS SuperLink, two SuperNodes, `flwr run`, real processes.

Every process is started in its own session and ended (with its children) in `finally`.
Only 127.0.0.1 is used; certificates are generated inside the test.
"""

from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedlora import simulation  # noqa: E402
from fedlora.config import RunConfig  # noqa: E402
from fedlora.flower.local import Processes, flower_env, free_port, generate_certificates, wait_for, write_connection  # noqa: E402

from test_flower_simulation import GLUE, REPO, TINY, assert_same_history, flower_overrides, records  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (GLUE / "SST-2").is_dir(), reason=f"real GLUE files expected at {GLUE}"),
]


@contextmanager
def tls_deployment(root: Path, supernodes: int = 2):
    """SuperLink (TLS) + SuperNodes with partition ids 0..n-1, and a `flwr` connection named "loopback"."""
    certs = generate_certificates(root / "certs")
    port = free_port()
    write_connection(root / "flwr-home", "loopback", f"127.0.0.1:{port}", root_certificates=certs["ca"])
    env = flower_env(root / "flwr-home") | {"FEDLORA_CACHE_DIR": str(root / "cache")}
    procs = Processes(root / "logs", env)
    try:
        procs.start("superlink", [
            "flower-superlink", "--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile", str(certs["cert"]),
            "--ssl-keyfile", str(certs["key"]), "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation",
        ])
        wait_for(lambda: "Uvicorn running" in procs.log("superlink"), 60, "the SuperLink to listen")
        for i in range(supernodes):
            procs.start(f"supernode-{i}", [
                "flower-supernode", "--root-certificates", str(certs["ca"]), "--superlink", f"127.0.0.1:{port}",
                "--host", "127.0.0.1", "--port", str(free_port()),
                "--node-config", f"partition-id={i} num-partitions={supernodes}",
            ])
        yield procs, env
    finally:
        procs.stop_all()


def submit(procs: Processes, env: dict, config: RunConfig, extra: str = "") -> None:
    """`flwr run . loopback --stream`: the ServerApp's log streams into logs/flwr-run.log."""
    procs.start("flwr-run", ["flwr", "run", str(REPO), "loopback", "--stream",
                             "--run-config", f"{flower_overrides(config)} {extra}".strip()], cwd=REPO)


def test_tls_deployment_two_rounds_survives_a_killed_supernode(tmp_path):
    """Round 1 over TLS equals the local engine's; SuperNode 1 is SIGKILLed at the start of round 2,
    which then completes with client 0 alone; the global state and the PEFT adapter are written."""
    config = RunConfig(method="fedex-lora", out=str(tmp_path / "local"), **TINY)  # base_delta travels too
    flower = config.replace(out=str(tmp_path / "flower"))
    with tls_deployment(tmp_path / "deploy") as (procs, env):
        submit(procs, env, flower, extra="min-train-nodes=1")
        metrics = Path(flower.out) / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, 180,
                 f"round 1; run log:\n{procs.log('flwr-run')[-3000:]}")
        procs.kill("supernode-1")  # a crash: no goodbye, the SuperLink notices missed heartbeats
        killed_at = time.monotonic()
        # The SuperLink needs ~1 min of missed heartbeats to give up on node 1: run the local
        # engine meanwhile (the CPUs are idle) instead of before the deployment.
        local = simulation.run(config, progress=False)
        done = Path(flower.out) / "adapter" / "adapter_model.safetensors"
        wait_for(lambda: done.exists() or procs.procs["flwr-run"].poll() is not None, 240, "round 2 without node 1")
        log = procs.log("flwr-run")
        assert done.exists(), log[-4000:]
        print(f"round 2 finished {time.monotonic() - killed_at:.0f}s after the kill")

    history = records(flower.out)
    assert [r["round"] for r in history] == [1, 2]
    assert_same_history(history[:1], local[:1])  # same numbers as `fedlora run`, over TLS
    assert history[1]["clients"] == ["client-0"]  # round 2 completed with the remaining client
    assert history[1]["lora_bytes_up"] == local[1]["lora_bytes_up"] // 2  # the library's formula, one client
    assert re.search(r"round 2: node \d+ \(partition 1\) (failed|sent no reply)", log), log[-4000:]

    from fedlora.checkpoint import load_state
    from fedlora.peft_bridge import load_model_with_adapter

    assert load_state(Path(flower.out)).round == 2  # no global state lost
    adapter = Path(flower.out) / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "base_weights.safetensors"} <= {p.name for p in adapter.iterdir()}
    load_model_with_adapter(adapter)  # a loadable PEFT adapter (+ the merged FedEx-LoRA residuals)
