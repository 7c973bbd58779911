"""The Flower app reproduces `fedlora run`: in process for every method, and through `flwr run`.

Same RunConfig, same seed: the per-round global metrics, divergence and byte counts written by
the ServerApp equal the local engine's (within float tolerance: Ray workers may use another
thread count), and the final adapter is a loadable PEFT adapter. The array bytes measured in the
run's messages (``wire_*_bytes_*``) equal the closed form of
:func:`fedlora.aggregation.communication.round_bytes` (``lora_bytes_*``), up to the documented
offsets asserted in :func:`assert_wire_matches_formula`.

Two ways to run the apps. Every method case runs the real ``ServerApp`` and ``ClientApp`` objects in
this process (:class:`InProcessGrid`: each SuperNode keeps its own Context across rounds, as Flower's
simulation does, and every message is serialised to protobuf and back each way, so only what survives
the wire arrives), in seconds. One case and one resume also go through `flwr run` on a simulation
SuperLink (Ray, a process per app, the FAB, Flower's own run-config parsing), ~1 min each; the TLS
deployment (tests/integration/test_flower_deployment.py) runs real SuperNodes.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flwr.app import Context, Message, RecordDict  # noqa: E402

from fedlora.engines import local as simulation  # noqa: E402
from fedlora.config.run import RunConfig  # noqa: E402
from fedlora.engines.flower.config import run_config_overrides  # noqa: E402
from fedlora.engines.flower.local import simulation_superlink  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GLUE = Path(__file__).resolve().parents[3] / "shared" / "data" / "glue"
FEDERATION = "num-supernodes=2 client-resources-num-cpus=1 init-args-num-cpus=2"  # `flwr run`'s simulation
# The built-in `toy` task: the same engines and messages as a GLUE task, without tokenising 67k rows
# in every process; the real-data Flower path is tests/integration/test_flower_deployment.py (SST-2).
TINY = dict(task="toy", rounds=2, clients=2, alpha=0.5, local_steps=2, batch_size=4, lr=1e-3,
            max_length=32, eval_local_every=1, max_eval_examples=32, max_local_eval_examples=8, seed=0)
TINY_SST2 = TINY | dict(task="sst2", data_dir=str(GLUE))
# A decoder LLM (the tiny GQA Llama of conftest.py) on MBPP: generation, the sandbox and the causal-LM
# adapter through Flower's messages.
TINY_MBPP = TINY | dict(task="mbpp", data_dir=str(GLUE.parent), max_length=96, max_eval_examples=4,
                        max_eval_generations=2, max_new_tokens=6, max_local_eval_examples=2, batch_size=2)


def flower_overrides(config: RunConfig, **flower) -> str:
    """The same run, as `flwr run --run-config` (the `fedlora run` option names, from the one declaration)."""
    return run_config_overrides(config, **flower)


def records(out: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def assert_same_history(flower: list[dict], local: list[dict], rel: float = 1e-5) -> None:
    """Keys both engines write are equal (the local engine has no ``wire_*`` keys: it sends no messages)."""
    assert [r["round"] for r in flower] == [r["round"] for r in local]
    for f, l in zip(flower, local):
        assert f["clients"] == l["clients"]
        assert f["global_metric"] == pytest.approx(l["global_metric"], abs=1e-6)
        assert f["global"] == pytest.approx(l["global"], abs=1e-6)
        assert f["train_loss"] == pytest.approx(l["train_loss"], rel=rel)
        for key in ("divergence", "eckart_young_bound"):  # None (null) where not measured, e.g. under DP
            assert (f[key] is None) == (l[key] is None), key
            if l[key] is not None:
                assert f[key] == pytest.approx(l[key], rel=max(rel, 1e-4), abs=1e-12), key
        for key in ("bytes_up", "bytes_down", "lora_bytes_up", "lora_bytes_down"):
            assert f[key] == l[key], key
        assert f["local_metric"] == pytest.approx(l["local_metric"], abs=1e-6)
        for key in ("dp_epsilon", "dp_sgd_epsilon"):
            assert f.get(key) == l.get(key)  # None for both without differential privacy


def run_locally(config: RunConfig) -> list[dict]:
    """The local engine on one thread, as in the Ray workers (1 CPU each): the same float summation order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return simulation.run(config, progress=False)
    finally:
        torch.set_num_threads(threads)


# -- the apps in this process -------------------------------------------------------------------
class InProcessGrid:
    """Flower's Grid as ``ServerApp.main`` uses it, delivering each message to the real ClientApp here.

    One Context per SuperNode (its node config and a ``state`` kept across rounds, as Flower's
    simulation keeps it); both directions go through Flower's protobuf serialisation, so the client
    and the server only see what the wire carries (no shared tensors, no unserialisable records).
    """

    def __init__(self, run_config: dict, supernodes: int, first_id: int = 100) -> None:
        self.contexts = {first_id + p: Context(run_id=RUN_ID, node_id=first_id + p, state=RecordDict(), run_config=run_config,
                                               node_config={"partition-id": p, "num-partitions": supernodes})
                         for p in range(supernodes)}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    @property
    def run(self):  # what Flower's legacy workflows (SecAgg+) read off a Grid
        from types import SimpleNamespace

        return SimpleNamespace(run_id=RUN_ID)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        from fedlora.engines.flower.client_app import app as client_app

        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what the SuperLink assigns
            reply = client_app(over_the_wire(msg), self.contexts[msg.metadata.dst_node_id])
            replies.append(over_the_wire(reply))
        return replies


def over_the_wire(msg: Message) -> Message:
    """``msg`` as the other side receives it: Flower's protobuf message, serialised and parsed."""
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    return message_from_proto(ProtoMessage.FromString(message_to_proto(msg).SerializeToString()))


RUN_ID = 1


@pytest.fixture
def in_process_flower(monkeypatch, tmp_path):
    """Run the ServerApp and ClientApps in this process like one `flwr run`: ``run(config, **flower)``.

    The run config is built as `flwr run` builds it (the app's pyproject table fused with the
    ``--run-config`` string, both parsed by Flower). Each call is a new run: new SuperNode contexts
    and no ClientApp model left from an earlier run (a new `flwr run` starts new processes).
    """
    from flwr.common.config import get_fused_config_from_dir, parse_config_args
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.engines.flower import client_app
    from fedlora.engines.flower.server_app import app as server_app

    monkeypatch.setenv("FEDLORA_CACHE_DIR", str(tmp_path / "cache"))  # as the simulation SuperLink's
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1  # what a running ServerApp sets

    def run(config: RunConfig, **flower) -> None:
        run_config = get_fused_config_from_dir(REPO, parse_config_args([flower_overrides(config, **flower)]))
        client_app._CACHE.clear()
        grid = InProcessGrid(run_config, config.clients)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as run_locally: the same float summation order
        try:
            server_app(grid, Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
        finally:
            torch.set_num_threads(threads)

    try:
        yield run
    finally:
        client_app._CACHE.clear()  # the model of the last run: not kept for the rest of the session
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


# -- `flwr run` ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sim_superlink(tmp_path_factory):
    """A simulation-mode SuperLink on a free loopback port, and the `flwr` connection to it."""
    with simulation_superlink(tmp_path_factory.mktemp("flower-sim")) as (procs, env):
        yield procs, env


def assert_wire_matches_formula(method: str, flower: list[dict], adapter: Path) -> None:
    """Measured array payloads per round against ``round_bytes``, all modules, all the round's clients."""
    B_bytes, dense_bytes = client_sizes(adapter)  # one client's
    for r in flower:
        up, down = r["lora_bytes_up"], r["lora_bytes_down"]
        U = len(r["clients"])
        if method == "fedex-lora" and r["round"] == 1:
            # A round's residual travels in the next round's messages: round 1's carry none (its
            # formula counts round 1's own residual, which reaches the clients in round 2).
            down = up
        if method == "flora" and r["round"] == 1:
            # The same shift for FLoRA's stacked factors; and no A, B at all: the global adapter is the
            # init (round 1) or a re-init every client draws from the seed the server names.
            down = 0
        # a phased method's (FedASK) sketches and broadcasts count as LoRA bytes in the formula, as "phase" on the wire
        assert r["wire_lora_bytes_up"] + r["wire_phase_bytes_up"] == up, r["round"]
        assert r["wire_lora_bytes_down"] + r["wire_phase_bytes_down"] == down, r["round"]
        assert (r["wire_phase_bytes_up"] > 0) == (method == "fedask")
        if method == "fedask":  # the server is sent sketches and heads only: no client factor ever travels up
            assert r["wire_lora_bytes_up"] == 0
        assert r["wire_head_bytes_up"] == r["bytes_up"] - r["lora_bytes_up"]  # the head both ways, as round_record counts it
        assert r["wire_head_bytes_down"] == r["bytes_down"] - r["lora_bytes_down"]
        # FedSA-LoRA's B goes up outside the protocol, for the server's evaluation-only global B
        assert r["wire_eval_bytes_up"] == (U * B_bytes if method == "fedsa-lora" else 0)
        assert r["wire_eval_bytes_down"] == 0
        measured = sum(r[f"wire_{kind}_bytes_up"] for kind in ("lora", "head", "eval"))
        assert measured < r["wire_serialized_bytes_up"]  # + one .npy header per array


# Every engine path: the methods' policies (frozen, private, residual, stacked; an alternating upload, a factor
# downloaded but not uploaded, server-side state) and mixed client ranks (only r_u components travel): the same
# history, adapter and wire bytes as the local engine.
FLOWER_CASES = {
    "fedit": ("fedit", {}), "fedex-lora": ("fedex-lora", {}),
    "fedsa-lora": ("fedsa-lora", {}), "flora": ("flora", {}),
    "fedsvd": ("fedsvd", {}), "rolora": ("rolora", {}),
    "flora-na-stable-mixed-ranks": ("flora-na-stable", {"client_ranks": (8, 3)}),
    # DP-FedAvg: the seeded noise and the accountant's ε are the server's, so both engines agree exactly
    "rolora-dp": ("rolora", {"dp_clip": 0.5, "dp_epsilon": 8.0}),
    # record-level DP-SGD: the server calibrates the noise and sends it; the client's Opacus steps are seeded
    "fedit-dp-sgd": ("fedit", {"dp_sgd_clip": 1.0, "dp_sgd_epsilon": 8.0, "dp_sgd_delta": 1e-3}),
    # two round trips per round: the phase-1 sketch with the training reply, phase 2 in its own messages
    "fedask": ("fedask", {"method_options": {"sketch": 12}}),
}
# Not here, to keep CI under 30 minutes: ffa-lora (its frozen A is rebuilt by the client from the init seed, the
# mechanism flora's re-init uses; its trimmed records are weighed in tests/unit/engines/test_flower_units.py), svd-ef (its state lives in the server's checkpoint, which both engines share:
# tests/integration/test_end_to_end.py resumes it), fedrot-lora (a pure function of the default policy, like fedit) and the SVD
# rank map (server-side, before the same wire truncation; tests/unit/aggregation/test_mixed_ranks.py runs it in the local engine).


def assert_flower_run_matches(flower_config: RunConfig, local_config: RunConfig, local: list[dict]) -> None:
    """The Flower run in ``flower_config.out``: the local engine's history, config, adapter and bytes."""
    out = Path(flower_config.out)
    assert_same_history(records(out), local)
    assert RunConfig.from_json((out / "config.json").read_text()) == flower_config
    assert_same_adapter(out / "adapter", Path(local_config.out) / "adapter")
    assert_wire_matches_formula(flower_config.method, records(out), out / "adapter")


@pytest.mark.parametrize("method, changes", list(FLOWER_CASES.values()), ids=list(FLOWER_CASES))
def test_flower_apps_match_local_engine(in_process_flower, tmp_path, tiny_bert_path, method, changes):
    config = RunConfig(method=method, model=tiny_bert_path, out=str(tmp_path / "local"), **(TINY | changes))
    local = run_locally(config)
    flower_config = config.replace(out=str(tmp_path / "flower"))
    in_process_flower(flower_config)
    assert_flower_run_matches(flower_config, config, local)


def test_flower_runs_an_llm_task_like_the_local_engine(in_process_flower, tmp_path, tiny_llama_path):
    config = RunConfig(method="flora-na", model=tiny_llama_path, out=str(tmp_path / "local"), **TINY_MBPP)
    local = run_locally(config)
    flower = config.replace(out=str(tmp_path / "flower"))
    in_process_flower(flower)
    out = Path(flower.out)
    assert_same_history(records(out), local)
    assert {"loss", "pass@1"} <= set(records(out)[-1]["global"])
    assert (out / "generations" / "round-002.jsonl").read_text() == (Path(config.out) / "generations" / "round-002.jsonl").read_text()
    assert_same_adapter(out / "adapter", Path(config.out) / "adapter")


def assert_resumed_like_local(method: str, flower: RunConfig, local_config: RunConfig, local: list[dict]) -> None:
    history = records(flower.out)
    # After the resume the catch-up merge is the checkpoint's merged weights as one delta: equal to
    # the replayed merges up to float32 rounding, hence approx where the frozen weights changed.
    assert_same_history(history, local, rel=1e-3 if method == "fedex-lora" else 1e-5)
    assert_same_adapter(Path(flower.out) / "adapter", Path(local_config.out) / "adapter")


@pytest.mark.parametrize("method", ["fedex-lora", "fedsa-lora"])
def test_flower_resume_continues_the_run(in_process_flower, tmp_path, tiny_bert_path, method):
    """A ServerApp that stops after round 1 (a crash, or a shorter run) and is started again with
    resume=true ends like an uninterrupted run: the new SuperNodes (a new run has fresh node state)
    catch up on the frozen-weight merges (FedEx-LoRA) and get their own private B back (FedSA-LoRA)
    from the server's checkpoint."""
    config = RunConfig(method=method, model=tiny_bert_path, out=str(tmp_path / "local"), **TINY)
    local = run_locally(config)
    flower = config.replace(out=str(tmp_path / "flower"))
    for rounds, resume in ((1, False), (2, True)):
        in_process_flower(flower.replace(rounds=rounds), resume=resume)
        assert len(records(flower.out)) == rounds
    assert_resumed_like_local(method, flower, config, local)


@pytest.mark.slow
@pytest.mark.xdist_group("flwr-simulation")  # one worker, one SuperLink (module fixture)
def test_flwr_run_matches_the_local_engine_and_resumes(sim_superlink, tmp_path):
    """The in-process cases above through `flwr run` with the real MiniLM: new processes and the real transport.

    FedSA-LoRA, three rounds: the first `flwr run` trains rounds 1-2 (each SuperNode's private B lives in its
    context between rounds) and must equal the local engine's first two rounds; a second `flwr run` with
    resume=true trains round 3 on fresh SuperNodes, which get their B back from the server's checkpoint. (The
    catch-up of frozen-weight merges over the real transport is the TLS deployment test's FedEx-LoRA.)
    """
    procs, env = sim_superlink
    config = RunConfig(method="fedsa-lora", out=str(tmp_path / "local"), **(TINY | {"rounds": 3}))
    local = run_locally(config)
    flower = config.replace(out=str(tmp_path / "flower"))
    for rounds, resume in ((2, False), (3, True)):
        overrides = flower_overrides(flower.replace(rounds=rounds), resume=resume)
        run = subprocess.run(["flwr", "run", str(REPO), "sim", "--stream", "--run-config", overrides,
                              "--federation-config", FEDERATION], env=env, capture_output=True, text=True, timeout=480)
        assert len(records(flower.out)) == rounds, run.stdout[-4000:] + run.stderr[-4000:]
        if rounds == 2:  # one uninterrupted Flower run: the local engine's rounds, to float32 rounding
            assert_same_history(records(flower.out), local[:2])
    assert_resumed_like_local("fedsa-lora", flower, config, local)
    # config.json is the run's first configuration (a resumed run keeps it: fedlora.runs.outputs)
    assert RunConfig.from_json((Path(flower.out) / "config.json").read_text()) == flower.replace(rounds=2)
    # The formula for rounds 1-2; in round 3 the fresh SuperNodes are also sent their B, which they no longer hold.
    assert_wire_matches_formula("fedsa-lora", records(flower.out)[:2], Path(flower.out) / "adapter")


def client_sizes(adapter: Path) -> tuple[int, int]:
    """One client's bytes of B (d·r) and of a dense (d, k) delta, summed over modules, from a saved adapter."""
    from safetensors.torch import load_file

    state = load_file(str(adapter / "adapter_model.safetensors"))
    B = {k.replace(".lora_B.", "."): t for k, t in state.items() if ".lora_B." in k}
    A = {k.replace(".lora_A.", "."): t for k, t in state.items() if ".lora_A." in k}
    return 4 * sum(t.numel() for t in B.values()), 4 * sum(B[m].shape[0] * A[m].shape[1] for m in B)


def assert_same_adapter(flower: Path, local: Path) -> None:
    """Both engines saved the same PEFT adapter (and the same merged frozen weights, if any)."""
    from safetensors.torch import load_file

    for name in ("adapter_model.safetensors", "base_weights.safetensors"):
        assert (flower / name).exists() == (local / name).exists(), name
        if (local / name).exists():
            a, b = load_file(str(flower / name)), load_file(str(local / name))
            assert a.keys() == b.keys()
            assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a), name
