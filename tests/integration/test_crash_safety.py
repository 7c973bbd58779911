"""A run killed with SIGKILL anywhere resumes to exactly the uninterrupted result; no pickle is ever loaded.

The runs use the built-in ``toy`` task and the tiny random BERT (tests/conftest.py): the property is
about the engine, not the data or the model.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedlora.protocol.checkpoint import CHECKPOINT_FILE, load_state

TIMING = {"wall_seconds", "solve_seconds", "server_seconds"}
RUN = ["run", "--task", "toy", "--method", "fedex-lora", "--rounds", "2", "--clients", "2", "--local-steps", "2",
       "--batch-size", "4", "--max-length", "24", "--max-eval-examples", "16", "--eval-local-every", "1"]
# Where a kill leaves a distinct state on disk (train@2 would leave what aggregate@2 leaves: round 1's
# checkpoint, nothing of round 2):
KILLS = {
    "train@1": "after a client trained in round 1: only the round-0 checkpoint, the run resumes from the start",
    "aggregate@2": "after round 2's aggregation, before its merge or save: round 1's checkpoint with its merged "
                   "frozen weights (FedEx-LoRA)",
    "checkpoint@2": "round 2's checkpoint fully written to its temporary file, not renamed: round 1's is the one read",
}


def fedlora(*args: str, failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # one thread, as in_process below
    env.pop("FEDLORA_FAILPOINT", None)
    if failpoint:
        env["FEDLORA_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "-m", "fedlora", *args], env=env, capture_output=True, text=True, timeout=600)


def in_process(*args: str) -> int:
    """``fedlora ARGS`` in this process (no interpreter start, no imports: seconds less than a subprocess),
    on one thread like the subprocesses, so the float summation order, and so every bit, is the same."""
    from fedlora.cli import commands as cli

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli.main(list(args))
    finally:
        torch.set_num_threads(threads)


def history(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_bert_path) -> tuple[list[str], list[dict], bytes]:
    """The run's arguments (but --out), and its history and adapter bytes without a kill."""
    args = [*RUN, "--model", tiny_bert_path]
    reference = tmp_path_factory.mktemp("reference") / "run"
    assert in_process(*args, "--out", str(reference)) == 0
    return args, history(reference), (reference / "adapter" / "adapter_model.safetensors").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILLS))
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, uninterrupted, point):
    """A run SIGKILLed at ``point`` (a real process: no ``finally``, no flush) leaves a valid checkpoint,
    and `fedlora run --resume` then ends with the uninterrupted run's history and adapter, bit for bit."""
    args, expected, adapter_bytes = uninterrupted
    out = tmp_path / "run"
    crashed = fedlora(*args, "--out", str(out), failpoint=point)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    load_state(out)  # whatever was on disk at the kill is a valid checkpoint
    if point.startswith("checkpoint"):
        assert (out / (CHECKPOINT_FILE + ".tmp")).is_file()  # the kill came between write and rename
    assert in_process("run", "--resume", str(out)) == 0
    assert history(out) == expected, KILLS[point]
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter_bytes, KILLS[point]


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_posing_as_a_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / CHECKPOINT_FILE).write_bytes(pickle.dumps(_Exploit(marker)))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a fedlora checkpoint"):
        load_state(tmp_path)
    result = fedlora("run", "--resume", str(tmp_path))
    assert result.returncode == 2 and "error" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("filename", ["adapter_model.safetensors", "adapter_model.bin"])
def test_a_pickle_posing_as_an_adapter_is_refused_and_runs_nothing(tmp_path, filename):
    from fedlora.models.classifier import default_model_path, load_model
    from fedlora.runs.adapter_files import load_model_with_adapter, save_adapter

    model, _ = load_model(default_model_path(), 2, 2, 4.0, ["query"], seed=0)
    save_adapter(model, tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (tmp_path / "adapter" / filename).write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(Exception):
        load_model_with_adapter(tmp_path / "adapter")
    assert not marker.exists()
