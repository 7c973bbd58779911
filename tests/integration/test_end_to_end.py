"""End-to-end runs of the local engine on the real MiniLM, at a tiny size.

Most runs use the built-in ``toy`` task (generated sentences: nothing to read or tokenise at
scale); two keep real SST-2 rows so the GLUE path stays covered end to end, in fp32 and bf16.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedlora.engines import local as simulation  # noqa: E402
from fedlora.cli.commands import main  # noqa: E402
from fedlora.config.run import ConfigError, RunConfig  # noqa: E402
from fedlora.models.lora_state import get_adapter  # noqa: E402
from fedlora.runs.adapter_files import load_model_with_adapter  # noqa: E402
from fedlora.util.progress import on_phase  # noqa: E402
from fedlora.tasks import get_task, register_task  # noqa: E402
from fedlora.tasks.classification import SequenceClassificationTask, accuracy  # noqa: E402

GLUE = Path(__file__).resolve().parents[3] / "shared" / "data" / "glue"
needs_sst2 = pytest.mark.skipif(not (GLUE / "SST-2").is_dir(), reason=f"real GLUE files expected at {GLUE}")
pytestmark = pytest.mark.slow
TIMING = {"wall_seconds", "solve_seconds", "server_seconds"}


@register_task("colours")
class Colours(SequenceClassificationTask):
    """20 rows, three classes, no partition key (IID only): a task the engine has never seen."""

    num_labels = 3
    metric = "hit_rate"

    def load(self, data_dir):
        names = ["red", "green", "blue"]
        rows = [(f"the {names[i % 3]} one, number {i}", i % 3) for i in range(20)]
        full = datasets.Dataset.from_dict({"sentence": [t for t, _ in rows], "label": [y for _, y in rows]})
        return datasets.DatasetDict(train=full.select(range(14)), test=full.select(range(14, 20)))

    def partition_key(self, train):
        return None

    def score(self, predictions, labels):
        value = accuracy(predictions, labels)
        return {"hit_rate": value, "main": value}


def tiny(tmp_path: Path, method: str = "flora-na", **changes) -> RunConfig:
    base = RunConfig(
        task="toy", method=method, rounds=2, clients=2, alpha=0.5, local_steps=2, batch_size=4, lr=1e-3,
        max_length=24, eval_local_every=1, max_eval_examples=32, max_local_eval_examples=8, device="cpu",
        out=str(tmp_path / method),
    )
    return base.replace(**changes)


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


def check_outputs_and_reload(config: RunConfig, history: list[dict]) -> None:
    """Every output file is written, and the saved adapter reproduces the final global metric exactly."""
    out = Path(config.out)
    assert [r["round"] for r in history] == list(range(1, config.rounds + 1))
    for record in history:
        assert 0 <= record["global_metric"] <= 1 and record["train_loss"] > 0
        assert record["eckart_young_bound"] <= record["divergence"] + 1e-9
        assert set(record["local_metric"]) == {f"client-{i}" for i in range(config.clients)}
        assert record["bytes_up"] > record["lora_bytes_up"] > 0  # head bytes counted on top
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [r["round"] for r in history]
    assert RunConfig.from_json((out / "config.json").read_text()) == config
    assert (out / "global_accuracy.png").stat().st_size > 0 and (out / "divergence.png").stat().st_size > 0
    model, tokenizer = load_model_with_adapter(out / "adapter")
    from fedlora.protocol.client import evaluate_on
    from fedlora.protocol.federation import build_federation

    federation = build_federation(config, tokenizer)
    assert evaluate_on(model, federation.test, federation.task, tokenizer)["main"] == history[-1]["global_metric"]


def test_tiny_toy_run_writes_every_output_and_the_adapter_reloads(tmp_path, capsys):
    config = tiny(tmp_path)
    seen: list[str] = []
    with on_phase(seen.append):
        history = simulation.run(config, progress=True)
    check_outputs_and_reload(config, history)
    # every phase is named where the user sees progress: the bar's postfix says who runs which phase
    assert [s for s in dict.fromkeys(seen) if s] == ["training", "local evaluation", "aggregation", "global evaluation"]
    bar = capsys.readouterr().err
    for shown in ("round 1 client-0: training", "round 2 client-1: local evaluation", "round 2 server: global evaluation"):
        assert shown in bar


@needs_sst2
def test_tiny_sst2_run_writes_every_output_and_the_adapter_reloads(tmp_path):
    config = tiny(tmp_path, task="sst2", data_dir=str(GLUE), max_length=32)
    check_outputs_and_reload(config, simulation.run(config, progress=False))


def test_a_task_registered_in_this_file_runs_end_to_end(tmp_path):
    config = tiny(tmp_path, "fedit", task="colours", alpha=None, batch_size=2, max_eval_examples=None)
    history = simulation.run(config, progress=False)
    assert [r["round"] for r in history] == [1, 2]
    for record in history:
        assert set(record["global"]) == {"hit_rate", "main"} and record["global_metric"] == record["global"]["hit_rate"]
        assert record["global_metric"] in {k / 6 for k in range(7)}  # 6 test rows
    with pytest.raises(ValueError, match="--alpha iid"):  # no partition key: no mix to skew
        simulation.run(tiny(tmp_path / "skewed", "fedit", task="colours", alpha=0.5, skew="key"), progress=False)


def test_same_seed_same_run_and_other_seed_differs(tmp_path):
    a = simulation.run(tiny(tmp_path / "a", rounds=1), progress=False)
    b = simulation.run(tiny(tmp_path / "b", rounds=1), progress=False)
    c = simulation.run(tiny(tmp_path / "c", rounds=1, seed=1), progress=False)
    assert without_timing(a) == without_timing(b)
    assert without_timing(a) != without_timing(c)


@pytest.mark.parametrize("method", ["fedex-lora", "fedsa-lora", "svd-ef"])
def test_resume_after_a_crash_ends_like_an_uninterrupted_run(tmp_path, monkeypatch, method):
    # fedex-lora changes the frozen weights, fedsa-lora keeps private B per client, svd-ef keeps its residual on
    # the server: all must survive.
    full = simulation.run(tiny(tmp_path / "full", method), progress=False)
    crashing = tiny(tmp_path / "crash", method)
    calls = {"global": 0}
    real = get_task("toy").evaluate

    def crash_in_round_two(model, data, tokenizer, runtime, samples=None):
        # The 32-row global test set (local test splits hold 8): crash in round 2's global evaluation,
        # after aggregation and the frozen-weight merge, before the checkpoint.
        calls["global"] += len(data) == crashing.max_eval_examples
        if calls["global"] == 2:
            raise KeyboardInterrupt("simulated crash during round 2")
        return real(model, data, tokenizer, runtime, samples)

    monkeypatch.setattr(get_task("toy"), "evaluate", crash_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        simulation.run(crashing, progress=False)
    monkeypatch.undo()
    assert len((Path(crashing.out) / "metrics.jsonl").read_text().splitlines()) == 1
    private = Path(crashing.out) / "private"
    if method == "fedsa-lora":  # round 2 wrote its clients' B before crashing; the checkpoint names round 1's
        assert {p.name.split(".")[1] for p in private.iterdir()} == {"r1", "r2"}
    resumed = simulation.run(crashing, resume=True, progress=False)
    assert without_timing(resumed) == without_timing(full)
    if method == "fedsa-lora":  # one file per client, the last round's: nothing of the crashed round is left
        assert sorted(p.name for p in private.iterdir()) == [f"client-{u}.r2.safetensors" for u in range(crashing.clients)]
    else:
        assert not private.exists()
    a, _ = load_model_with_adapter(Path(crashing.out) / "adapter")
    b, _ = load_model_with_adapter(Path(tmp_path / "full" / method) / "adapter")
    for module, pair in get_adapter(a).items():
        assert torch.equal(pair.A, get_adapter(b)[module].A) and torch.equal(pair.B, get_adapter(b)[module].B)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if "original_module" not in name:  # PEFT's unused copy of the head is re-drawn at every load
            assert torch.equal(p, q), name  # merged frozen weights included


SMALL = ["--rounds", "1", "--clients", "2", "--local-steps", "1", "--batch-size", "4", "--max-length", "24",
         "--max-eval-examples", "16", "--eval-local-every", "0"]


def test_cli_run_compare_and_resume(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["run", "--task", "toy", "--method", "fedit", *SMALL, "--out", str(out)]) == 0
    assert main(["compare", str(out), "--out", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    assert "| cli | fedit |" in table and (tmp_path / "cmp" / "compare.md").is_file()
    before = (out / "metrics.jsonl").read_text()
    assert main(["run", "--resume", str(out)]) == 0  # nothing left to do: finishes at once, same result
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("task", ["toy", pytest.param("sst2", marks=needs_sst2)])
def test_cli_runs_in_bf16_on_the_cpu(tmp_path, task):
    out = tmp_path / task
    data = ["--data-dir", str(GLUE)] if task == "sst2" else []
    assert main(["run", "--task", task, *data, "--device", "cpu", "--precision", "bf16", *SMALL, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["device"], config["precision"]) == ("cpu", "bf16")
    record = json.loads((out / "metrics.jsonl").read_text())
    assert 0 <= record["global_metric"] <= 1 and record["train_loss"] > 0


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"task": "nope"}, "--task"),
        ({"method": "fedavg"}, "--method"),
        ({"rounds": -1}, "--rounds"),
        ({"alpha": 0.0}, "--alpha"),
        ({"rank": 0}, "--rank"),
        ({"data_dir": "/no/such/dir"}, "--data-dir"),
        ({"method_options": {"solver": "x", "bogus": 1}}, "bogus"),
        ({"precision": "fp8"}, "--precision"),
        ({"device": "tpu"}, "--device"),
    ],
)
def test_bad_options_are_refused_up_front_naming_the_option(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        RunConfig(**changes)


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    assert main(["run", "--task", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "--task" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "missing")]) == 2
