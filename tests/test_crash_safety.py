"""A run killed with SIGKILL anywhere resumes to exactly the uninterrupted result; no pickle is ever loaded.

The runs use the built-in ``toy`` task: the property is about the engine, not the data.
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

from fedlora.checkpoint import CHECKPOINT_FILE, load_state

TIMING = {"wall_seconds", "solve_seconds", "server_seconds"}
RUN = ["run", "--task", "toy", "--method", "fedex-lora", "--rounds", "2", "--clients", "2", "--local-steps", "2",
       "--batch-size", "4", "--max-length", "24", "--max-eval-examples", "16", "--eval-local-every", "1"]


def fedlora(*args: str, failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("FEDLORA_FAILPOINT", None)
    if failpoint:
        env["FEDLORA_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "-m", "fedlora", *args], env=env, capture_output=True, text=True, timeout=600)


def history(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.mark.slow
def test_sigkill_at_any_point_then_resume_matches_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    assert fedlora(*RUN, "--out", str(reference)).returncode == 0
    expected = history(reference)
    adapter_bytes = (reference / "adapter" / "adapter_model.safetensors").read_bytes()
    for point in ("train@1", "aggregate@2", "checkpoint@2", "train@2"):
        out = tmp_path / point.replace("@", "-")
        crashed = fedlora(*RUN, "--out", str(out), failpoint=point)
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
        load_state(out)  # whatever was on disk at the kill is a valid checkpoint
        resumed = fedlora("run", "--resume", str(out))
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert history(out) == expected, point
        assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter_bytes, point


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
    from fedlora.model import default_model_path, load_model
    from fedlora.peft_bridge import load_model_with_adapter, save_adapter

    model, _ = load_model(default_model_path(), 2, 2, 4.0, ["query"], seed=0)
    save_adapter(model, tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (tmp_path / "adapter" / filename).write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(Exception):
        load_model_with_adapter(tmp_path / "adapter")
    assert not marker.exists()
