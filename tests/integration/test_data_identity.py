"""A run trains on the data it names, and only on that (issue 21, items 10, 11 and 15).

A data file line that is not a JSON object is one line naming file and line, before the model loads;
the Flower data cache is keyed by the data's content, not its path; a resume on other data is refused,
while a moved copy of the same data resumes. Fast: no model is loaded (the engine is stubbed where the
property is about what happens before it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from fedlora.cli import commands as cli

from fedlora.engines import local as simulation
from fedlora.protocol.checkpoint import load_state
from fedlora.config.run import ConfigError, RunConfig


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: what is checked must be checked before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(simulation, "build_model", refuse)
    monkeypatch.setattr(cli, "quiet_libraries", lambda: None)


# -- item 10: a line that is not an object ---------------------------------------------------------
@pytest.mark.parametrize("line,kind", [('"a prompt on its own"', "string"), ("42", "number"), ("null", "null"),
                                       ('["prompt", "response"]', "list")])
def test_an_instruct_line_that_is_not_an_object_is_one_line_before_the_model_loads(tmp_path, capsys, no_model,
                                                                                  line, kind):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "Say hi.", "response": "hi"}\n' + line + "\n")
    assert cli.main(["run", "--task", "instruct", "--data-dir", str(data), "--out", str(tmp_path / "run")]) == 2
    assert f"{data / 'train.jsonl'}:2 is a JSON {kind}, not an object" in one_line_error(capsys)


def write_rows(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows))
    return path


# -- item 11: the Flower data cache is keyed by content ---------------------------------------------
def test_the_flower_data_cache_misses_after_an_in_place_edit_even_of_the_same_size_and_mtime(tmp_path):
    from fedlora.engines.flower.data_cache import federation_key

    class Tok:
        name_or_path = "tok"

        def __len__(self) -> int:
            return 10

    train = write_rows(tmp_path / "data" / "train.jsonl", [("What is 2 plus 2?", "4")] * 8)
    config = RunConfig(task="instruct", data_dir=str(tmp_path / "data"))
    key = federation_key(config, Tok())
    assert federation_key(config, Tok()) == key  # nothing changed: the cache is reused
    before = train.stat()
    train.write_text(train.read_text().replace('"4"', '"5"'))  # what the server evaluates from now on
    os.utime(train, ns=(before.st_atime_ns, before.st_mtime_ns))  # even the size and the mtime are the old ones
    assert train.stat().st_size == before.st_size
    assert federation_key(config, Tok()) != key


# -- item 15: --resume on the data it trained on ----------------------------------------------------
TINY = dict(task="instruct", method="fedit", clients=2, rounds=1, local_steps=1, batch_size=2, lr=1e-3, max_length=32,
            eval_local_every=0, max_eval_examples=2, max_local_eval_examples=1, alpha=None, seed=0, device="cpu")
ROWS = [(f"What is {i} plus 2?", str(i + 2)) for i in range(12)]


def test_resume_refuses_other_data_and_accepts_a_moved_copy_of_the_same(tmp_path, capsys, tiny_llama_path,
                                                                        monkeypatch):
    """A real one-round run records its data; a resume on another dataset is refused (CLI and engine)
    before the model loads, naming both folders; the same files moved elsewhere resume and train on."""
    first, other = tmp_path / "first", tmp_path / "other"
    write_rows(first / "train.jsonl", ROWS)
    write_rows(other / "train.jsonl", [(p, r + "0") for p, r in ROWS])  # another dataset, same shape
    out = tmp_path / "run"
    config = RunConfig(model=tiny_llama_path, data_dir=str(first), out=str(out), **TINY)
    simulation.run(config, progress=False)
    capsys.readouterr()  # the run's own progress output

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    with monkeypatch.context() as patched:
        patched.setattr(simulation, "build_model", refuse)
        patched.setattr(cli, "quiet_libraries", lambda: None)
        assert cli.main(["run", "--resume", str(out), "--rounds", "2", "--data-dir", str(other)]) == 2
        err = one_line_error(capsys)
        assert "data differs" in err and f"now {other} with train.jsonl" in err and f"was {first} with train.jsonl" in err
        with pytest.raises(ConfigError, match="data differs"):
            simulation.run(config.replace(data_dir=str(other), rounds=2), resume=True, progress=False)
        (first / "test.jsonl").write_text((first / "train.jsonl").read_text())  # a test split added: other data too
        with pytest.raises(ConfigError, match="data differs"):
            simulation.run(config.replace(rounds=2), resume=True, progress=False)
        (first / "test.jsonl").unlink()
    recorded = load_state(out).data
    assert load_state(out).round == 1 and [f["name"] for f in recorded["files"]] == ["train.jsonl"]

    moved = tmp_path / "elsewhere" / "mine"
    shutil.copytree(first, moved)  # a fresh copy: new path, new mtimes, same bytes
    shutil.rmtree(first)
    monkeypatch.setattr(cli, "quiet_libraries", lambda: None)
    assert cli.main(["run", "--resume", str(out), "--rounds", "2", "--data-dir", str(moved)]) == 0
    assert load_state(out).round == 2 and load_state(out).data["files"] == recorded["files"]


def test_a_flower_resume_refuses_other_data_before_loading(tmp_path):
    import dataclasses

    import torch
    from flwr.app import Context, RecordDict

    from fedlora.aggregation import LoraPair
    from fedlora.protocol.checkpoint import ServerState, save_state
    from fedlora.config.schema import flower_table
    from fedlora.tasks.fingerprint import record
    from fedlora.engines.flower import server_app

    write_rows(tmp_path / "first" / "train.jsonl", ROWS)
    write_rows(tmp_path / "other" / "train.jsonl", ROWS[:-1])
    out = tmp_path / "run"
    out.mkdir()
    config = RunConfig(data_dir=str(tmp_path / "first"), out=str(out), **{**TINY, "rounds": 3})
    (out / "config.json").write_text(config.to_json())
    save_state(ServerState(round=0, adapter={"q_proj": LoraPair(A=torch.zeros(2, 4), B=torch.zeros(4, 2))}, head={},
                           data=record(config)), out)
    table = flower_table(RunConfig, overrides=dataclasses.asdict(config.replace(data_dir=str(tmp_path / "other"))))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={**table, "resume": True})
    with pytest.raises(ConfigError, match=f"data differs.*now {tmp_path / 'other'}.*was {tmp_path / 'first'}"):
        server_app.main(grid=None, context=context)  # type: ignore[arg-type]  # refused before the grid is used


DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.mark.skipif(not (DATA / "gsm8k").is_dir(), reason=f"{DATA} not found (../shared beside the repo)")
def test_each_builtin_task_fingerprints_the_files_it_reads_from_the_data_root_or_its_folder():
    from fedlora.tasks.fingerprint import fingerprint

    expected = {"gsm8k": ["gsm8k/train.jsonl", "gsm8k/test.jsonl"], "mbpp": ["mbpp/mbpp.jsonl"],
                "humaneval": ["humaneval/HumanEval.jsonl.gz", "mbpp/mbpp.jsonl"],
                "mathcode": ["gsm8k/train.jsonl", "gsm8k/test.jsonl", "mbpp/mbpp.jsonl"],
                "rte": ["glue/RTE/train.tsv", "glue/RTE/dev.tsv"], "toy": []}
    for task, names in expected.items():
        assert [f.name for f in fingerprint(RunConfig(task=task, data_dir=str(DATA)))] == names, task
    root, folder = (fingerprint(RunConfig(task="gsm8k", data_dir=str(d))) for d in (DATA, DATA / "gsm8k"))
    assert [f.sha256 for f in root] == [f.sha256 for f in folder] and [f.name for f in folder] == ["train.jsonl", "test.jsonl"]


def test_a_custom_tasks_data_is_every_file_in_its_folder_but_hidden_ones_and_the_run_directory(tmp_path):
    from fedlora.tasks.fingerprint import fingerprint
    from fedlora.tasks import Task, register_task
    from fedlora.tasks.base import _REGISTRY
    from fedlora.tasks.toy import ToyTask

    @register_task("filesonly")
    class FilesOnly(ToyTask):  # a task that does not name the files it reads: the default applies
        data_files = Task.data_files

    try:
        write_rows(tmp_path / "b" / "train.jsonl", ROWS)
        write_rows(tmp_path / "a.jsonl", ROWS[:2])
        (tmp_path / ".git").mkdir()
        (tmp_path / ".git" / "index").write_text("not data")
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "checkpoint.safetensors").write_text("changes every round")
        config = RunConfig(task="filesonly", data_dir=str(tmp_path), out=str(tmp_path / "run"))
        assert [f.name for f in fingerprint(config)] == ["a.jsonl", "b/train.jsonl"]
    finally:
        _REGISTRY.pop("filesonly")
