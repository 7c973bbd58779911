"""Runs do nothing silently wrong and lose nothing (issue 14, items 9-14).

Resume is the same experiment or is refused; one run per directory; a checkpoint that is not
what was written is refused; options that would train nothing are refused; bad input is one line,
never a traceback. Fast: tiny synthetic checkpoints and the engine replaced by a stub where the
property is about the command line, not training.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedlora.cli import commands as cli

from fedlora.engines import local as simulation
from fedlora.aggregation import LoraPair
from fedlora.protocol.checkpoint import CHECKPOINT_FILE, CheckpointError, ServerState, load_state, save_state
from fedlora.config.run import ConfigError, RunConfig

RECORD = {"round": 1, "global": {"main": 0.5}, "global_metric": 0.5, "skipped": False, "divergence": 0.1}


def make_run(out: Path, rounds_done: int = 1, **changes) -> RunConfig:
    """A finished-looking run directory: config.json and a small checkpoint after ``rounds_done`` rounds."""
    config = RunConfig(task="toy", rounds=3, clients=2, out=str(out), **changes)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.to_json())
    state = ServerState(round=rounds_done, adapter={"layer.query": LoraPair(A=torch.randn(2, 4), B=torch.zeros(4, 2))},
                        head={"classifier.weight": torch.randn(2, 4)},
                        history=[{**RECORD, "round": r} for r in range(1, rounds_done + 1)])
    save_state(state, out)
    return config


@pytest.fixture
def engine(monkeypatch):
    """Replace the engine by a stub that records what it was asked to run (no model is loaded)."""
    calls: list[tuple[RunConfig, bool]] = []

    def fake_run(config, resume=False, progress=True):
        calls.append((config, resume))
        return [{**RECORD, "round": r} for r in range(1, config.rounds + 1)]

    monkeypatch.setattr(simulation, "run", fake_run)
    monkeypatch.setattr(cli, "quiet_libraries", lambda: None)
    return calls


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# -- item 9: --resume is the same experiment ------------------------------------------------------
@pytest.mark.parametrize("option,value,field", [("--method", "fedit", "method"), ("--seed", "7", "seed"),
                                                 ("--task", "rte", "task"), ("--clients", "3", "clients"),
                                                 ("--method", "flora-na-stable", None)])
def test_resume_refuses_a_command_line_that_changes_the_experiment(tmp_path, capsys, engine, option, value, field):
    make_run(tmp_path / "run", method="fedit" if field is None else "flora-na-stable")
    assert cli.main(["run", "--resume", str(tmp_path / "run"), option, value]) == 2
    err = one_line_error(capsys)
    assert f"{field or 'method'}=" in err and "only rounds" in err  # names the field, old and new values
    assert not engine


def test_resume_refuses_a_config_file_that_changes_the_experiment(tmp_path, capsys, engine):
    make_run(tmp_path / "run")
    (tmp_path / "run.toml").write_text('method = "fedit"\nrounds = 9\n')
    assert cli.main(["run", "--resume", str(tmp_path / "run"), "--config", str(tmp_path / "run.toml")]) == 2
    assert "method='fedit'" in one_line_error(capsys) and not engine


def test_resume_refuses_an_edited_config_json(tmp_path, capsys, engine):
    make_run(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps({**saved, "method": "fedit"}))
    assert cli.main(["run", "--resume", str(tmp_path / "run")]) == 2
    assert "method='fedit'" in one_line_error(capsys) and not engine


def test_the_engine_refuses_to_resume_another_experiment(tmp_path):
    config = make_run(tmp_path / "run")
    with pytest.raises(ConfigError, match="seed=5"):
        simulation.run(config.replace(seed=5), resume=True, progress=False)


def test_a_flower_resume_refuses_another_experiment_before_loading(tmp_path):
    from flwr.app import Context, RecordDict

    from fedlora.engines.flower import server_app
    from fedlora.config.schema import flower_table

    config = make_run(tmp_path / "run")
    changed = {**flower_table(RunConfig, overrides=dataclasses.asdict(config.replace(method="fedit"))), "resume": True}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=changed)
    with pytest.raises(ConfigError, match="method"):
        server_app.main(grid=None, context=context)  # type: ignore[arg-type]  # refused before the grid is used


def test_resume_with_more_rounds_extends_the_run(tmp_path, engine):
    make_run(tmp_path / "run")
    assert cli.main(["run", "--resume", str(tmp_path / "run"), "--rounds", "20", "--device", "cpu"]) == 0
    (config, resume), = engine
    assert resume and (config.rounds, config.device, config.method) == (20, "cpu", "flora-na-stable")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["rounds"] == 20


def test_resume_cannot_shrink_below_the_completed_rounds(tmp_path, capsys, engine):
    make_run(tmp_path / "run", rounds_done=2)
    assert cli.main(["run", "--resume", str(tmp_path / "run"), "--rounds", "1"]) == 2
    assert "already completed 2 rounds" in one_line_error(capsys)


def test_a_fresh_run_refuses_an_existing_run_directory_unless_overwrite(tmp_path, capsys, engine):
    make_run(tmp_path / "run")
    (tmp_path / "run" / "generations").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    argv = ["run", "--task", "toy", "--rounds", "1", "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    assert "--overwrite" in one_line_error(capsys) and not engine
    assert cli.main([*argv, "--overwrite"]) == 0 and len(engine) == 1
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists() and not (tmp_path / "run" / "generations").exists()
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # only fedlora's own outputs are removed


# -- item 10: one run per directory ---------------------------------------------------------------
def test_a_second_run_on_a_locked_directory_fails_naming_the_holder(tmp_path, capsys, engine):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from fedlora.runs.lock import acquire; "
                               f"acquire({str(out)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert cli.main(["run", "--task", "toy", "--rounds", "1", "--out", str(out)]) == 2
        assert f"pid {holder.pid}" in one_line_error(capsys) and not engine
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock file is stale and the next run takes it over.
    assert cli.main(["run", "--task", "toy", "--rounds", "1", "--out", str(out)]) == 0 and len(engine) == 1


# -- item 11: checkpoint integrity ----------------------------------------------------------------
def _rewrite(path: Path, tensors=None, meta=None) -> None:
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    if meta is not None:
        metadata["fedlora"] = meta(metadata["fedlora"])
    save_file(tensors(load_file(str(path))) if tensors else load_file(str(path)), str(path), metadata=metadata)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40  # the last bytes are tensor data (the header comes first)
    path.write_bytes(bytes(data))


TAMPERING = {
    "flipped data byte": _flip_last_byte,
    "float16 rewrite": lambda p: _rewrite(p, tensors=lambda t: {k: v.half() for k, v in t.items()}),
    "changed round": lambda p: _rewrite(p, meta=lambda m: m.replace('"round": 1', '"round": 0', 1)),
    "garbage metadata": lambda p: _rewrite(p, meta=lambda m: "[1]"),
}


@pytest.mark.parametrize("tamper", list(TAMPERING))
def test_a_tampered_checkpoint_is_refused_in_one_line(tmp_path, capsys, engine, tamper):
    make_run(tmp_path / "run")
    load_state(tmp_path / "run")  # intact: loads
    TAMPERING[tamper](tmp_path / "run" / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match="corrupt or was modified"):
        load_state(tmp_path / "run")
    assert cli.main(["run", "--resume", str(tmp_path / "run")]) == 2
    assert "corrupt" in one_line_error(capsys) and not engine


# -- item 12: options that train nothing ----------------------------------------------------------
def test_min_clients_above_the_clients_sampled_is_refused():
    with pytest.raises(ConfigError, match="--min-clients=5.*every round would be skipped"):
        RunConfig(task="toy", clients=2, min_clients=5)
    with pytest.raises(ConfigError, match="--min-clients"):
        RunConfig(task="toy", clients=10, fraction=0.2, min_clients=3)
    RunConfig(task="toy", clients=10, fraction=0.2, min_clients=2)


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(RunConfig) if isinstance(f.default, float)])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_every_float_option_must_be_finite(name, value):
    with pytest.raises(ConfigError, match=f"--{name.replace('_', '-')}"):
        RunConfig(task="toy", **{name: value})


def test_max_length_too_small_for_a_sentence_pair_is_refused():
    with pytest.raises(ConfigError, match="--max-length=1 .*special tokens"):
        RunConfig(task="rte", max_length=1)


def test_a_run_where_every_round_was_skipped_exits_non_zero(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(simulation, "run", lambda config, resume=False: [{**RECORD, "skipped": True}])
    monkeypatch.setattr(cli, "quiet_libraries", lambda: None)
    assert cli.main(["run", "--task", "toy", "--rounds", "1", "--out", str(tmp_path / "run")]) == 1
    assert "every round was skipped" in capsys.readouterr().err


# -- item 13: one line, not a traceback -----------------------------------------------------------
def test_a_tsv_field_over_csvs_default_limit_is_read(tmp_path):
    from fedlora.tasks.glue.loading import load_glue

    (tmp_path / "SST-2").mkdir()
    rows = [("sentence", "label"), ("good " * 40_000, "1"), ("bad", "0")]  # 200,000 characters > 131,072
    for name in ("train.tsv", "dev.tsv"):
        with open(tmp_path / "SST-2" / name, "w", newline="") as f:
            csv.writer(f, delimiter="\t").writerows(rows)
    data = load_glue("sst2", tmp_path)
    assert len(data["train"]) == 2 and len(data["train"][0]["sentence"]) > 131_072


def test_max_length_above_the_models_positions_and_missing_target_modules_are_refused():
    from fedlora.tasks.build import build_model

    with pytest.raises(ValueError, match="--max-length 1024 .*512 positions"):
        build_model(RunConfig(task="toy", max_length=1024, device="cpu"))
    with pytest.raises(ValueError, match="'nonexistent'.*query"):  # names the missing one and the available ones
        build_model(RunConfig(task="toy", target_modules=("query", "nonexistent"), device="cpu"))


def test_a_model_folder_with_only_pickled_weights_is_refused_in_one_line(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    assert cli.main(["run", "--task", "toy", "--model", str(folder), "--out", str(tmp_path / "run")]) == 2
    assert "pickled weights" in one_line_error(capsys)


@pytest.mark.parametrize("parent", ["file", pytest.param("read-only", marks=pytest.mark.skipif(
    os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions"))])
def test_an_unwritable_out_is_refused_before_loading(tmp_path, capsys, engine, parent):
    if parent == "file":
        tmp_path.joinpath("ro").write_text("a file, not a folder")
    else:
        tmp_path.joinpath("ro").mkdir(mode=0o555)
    assert cli.main(["run", "--task", "toy", "--out", str(tmp_path / "ro" / "run")]) == 2
    assert "--out" in one_line_error(capsys) and not engine


def test_metrics_are_strict_json(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    state = ServerState(round=1, adapter={}, head={"w": torch.zeros(2)},
                        history=[{**RECORD, "divergence": math.nan, "train_loss": math.inf, "local": [-math.inf]}])
    save_state(state, out)
    text = json.dumps(state.history, allow_nan=False)  # what metrics.jsonl is written from
    assert json.loads(text)[0]["divergence"] is None
    assert load_state(out).history == state.history
    (out / "metrics.jsonl").write_text(json.dumps(state.history[0], allow_nan=False) + "\n")
    from fedlora.util.jsonsafe import read_metrics  # readers get NaN back where a number is always expected

    assert math.isnan(read_metrics(out / "metrics.jsonl")[0]["divergence"])


# -- item 14: what a new user hits ----------------------------------------------------------------
def test_offline_without_data_dir_is_one_line_naming_data_dir(monkeypatch):
    import datasets

    from fedlora.tasks.glue.loading import load_glue

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)\n" * 20)

    monkeypatch.delenv("FEDLORA_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(OSError) as info:  # main turns OSError into one line and exit 2
        load_glue("rte", None)
    message = str(info.value)
    assert "--data-dir" in message and "HF_HUB_OFFLINE" in message and "\n" not in message


def test_a_dirichlet_split_with_more_clients_than_a_draw_can_fill_works():
    import datasets

    from fedlora.tasks.partitioning import partition

    train = datasets.Dataset.from_dict({"label": np.arange(60) % 2})  # 20 clients on 60 rows, alpha 0.1
    parts = partition(train, 20, 0.1, seed=0)
    assert all(len(p) >= 2 for p in parts)
    assert sorted(np.concatenate([p["label"] for p in parts]).tolist()) == sorted(train["label"])


def test_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    def interrupted(config, resume=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(simulation, "run", interrupted)
    monkeypatch.setattr(cli, "quiet_libraries", lambda: None)
    out = tmp_path / "run"
    assert cli.main(["run", "--task", "toy", "--out", str(out)]) == 130
    assert f"fedlora run --resume {out}" in one_line_error(capsys)


def test_an_uncached_hub_model_offline_says_what_is_missing_without_the_hub(tmp_path, capsys, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was contacted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert cli.main(["run", "--task", "toy", "--model", "no-such-org/no-such-model", "--out", str(tmp_path / "r")]) == 2
    err = one_line_error(capsys)
    assert "no-such-org/no-such-model" in err and "HF_HUB_OFFLINE" in err and "cache" in err


# -- issue 21, item 12: --overwrite replaces a fedlora run, never another folder's files ------------
FOREIGN = {"config.json": '{"name": "my web app"}', "wandb/run.log": "mine", "adapter/weights.bin": "mine",
           "generations/notes.txt": "mine", "tensorboard/events": "mine", "metrics.jsonl": "mine\n"}


def _plant(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def _unchanged(folder: Path, files: dict[str, str]) -> bool:
    return all((folder / name).read_text() == text for name, text in files.items())


@pytest.mark.parametrize("config_json", ["foreign", "fedlora-shaped, no checkpoint"])
def test_overwrite_refuses_a_folder_that_is_not_a_fedlora_run(tmp_path, capsys, engine, config_json):
    out = tmp_path / "project"
    files = dict(FOREIGN)
    if config_json != "foreign":  # someone's --config file kept next to their own logs: still not a run
        files["config.json"] = RunConfig(task="toy").to_json()
    _plant(out, files)
    for extra in ([], ["--overwrite"]):
        assert cli.main(["run", "--task", "toy", "--rounds", "1", "--out", str(out), *extra]) == 2
        err = one_line_error(capsys)
        assert "not a fedlora run directory" in err and "nothing was changed" in err
    assert _unchanged(out, files) and not engine


def test_the_python_api_refuses_a_foreign_folder_before_loading(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(simulation, "build_model", no_loading)
    _plant(tmp_path / "project", FOREIGN)
    with pytest.raises(ConfigError, match="not a fedlora run directory"):
        simulation.run(RunConfig(task="toy", out=str(tmp_path / "project")), progress=False)
    assert _unchanged(tmp_path / "project", FOREIGN)


def test_a_run_marks_its_directory_and_overwrite_then_replaces_it(tmp_path, capsys, engine):
    from fedlora.runs.run_dir import RUN_MARKER, is_run

    out = tmp_path / "run"
    argv = ["run", "--task", "toy", "--rounds", "1", "--out", str(out)]
    assert cli.main(argv) == 0 and (out / RUN_MARKER).is_file() and is_run(out)
    _plant(out, {"metrics.jsonl": "{}\n", "wandb/run.log": "the run's own", "mine.txt": "mine"})
    assert cli.main(argv) == 2 and "--overwrite" in one_line_error(capsys)
    assert cli.main([*argv, "--overwrite"]) == 0 and len(engine) == 2
    assert not (out / "wandb").exists() and not (out / "metrics.jsonl").exists() and (out / "mine.txt").exists()


# -- item 13: the run lock never writes through a link --------------------------------------------
@pytest.mark.parametrize("kind", ["symlink", "hard link", "fifo", "symlink to a folder"])
def test_the_run_lock_refuses_a_lock_file_that_is_not_its_own(tmp_path, capsys, engine, kind):
    precious = tmp_path / "precious.txt"
    precious.write_text("someone's data\n")
    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".lock"
    if kind == "symlink":
        lock.symlink_to(precious)
    elif kind == "hard link":
        os.link(precious, lock)
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.symlink_to(tmp_path)
    assert cli.main(["run", "--task", "toy", "--rounds", "1", "--out", str(out)]) == 2
    assert ".lock" in one_line_error(capsys) and not engine
    assert precious.read_text() == "someone's data\n"


def test_the_run_lock_reuses_its_own_file_without_truncating_it(tmp_path):
    from fedlora.runs import lock as runlock

    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("4242\n")  # an older fedlora's stale record
    with runlock.locked(out):
        assert (out / ".lock").read_text().split() == [str(os.getpid())]
    assert (out / ".lock").read_text().split() == [str(os.getpid())]  # left behind, harmless: no lock held


# -- item 14: fedlora demo refuses to replace its runs unless --overwrite -------------------------
def test_demo_refuses_to_replace_existing_runs_unless_overwrite(tmp_path, capsys, engine, monkeypatch):
    monkeypatch.setattr(cli, "compare_runs", lambda runs, out: 0)
    make_run(tmp_path / "demo" / "fedit")
    argv = ["demo", "--methods", "flora-na-stable", "fedit", "--rounds", "1", "--out", str(tmp_path / "demo")]
    assert cli.main(argv) == 2
    err = one_line_error(capsys)
    assert "fedit already holds a run" in err and "--overwrite" in err and "--resume" not in err
    assert not engine and (tmp_path / "demo" / "fedit" / CHECKPOINT_FILE).exists()
    assert not (tmp_path / "demo" / "flora-na-stable" / ".fedlora-run").exists()  # all checked before any change
    capsys.readouterr()
    assert cli.main([*argv, "--overwrite"]) == 0
    assert [c.method for c, _ in engine] == ["flora-na-stable", "fedit"]
    assert not (tmp_path / "demo" / "fedit" / CHECKPOINT_FILE).exists()  # replaced (the stub writes nothing)


# -- item 16: "no cap" is spelled all everywhere; 0 is refused everywhere -------------------------
@pytest.mark.parametrize("name", ["max_eval_examples", "max_eval_generations"])
def test_a_zero_cap_is_refused_everywhere_and_all_means_no_cap(tmp_path, capsys, name):
    from fedlora.config.schema import flag

    message = f"--{flag(name)}=0 is invalid: .*write all"
    with pytest.raises(ConfigError, match=message):
        RunConfig(task="toy", **{name: 0})
    with pytest.raises(ConfigError, match=message):
        cli.config_from_args(cli.build_parser().parse_args(["run", "--task", "toy", f"--{flag(name)}", "0"]))
    (tmp_path / "run.toml").write_text(f'task = "toy"\n{flag(name)} = 0\n')
    with pytest.raises(ConfigError, match=message):
        cli.config_from_args(cli.build_parser().parse_args(["run", "--config", str(tmp_path / "run.toml")]))
    from fedlora.engines.flower.config import run_config_from_flower

    with pytest.raises(ConfigError, match=message):
        run_config_from_flower({"task": "toy", flag(name): 0})
    assert cli.main(["run", "--task", "toy", f"--{flag(name)}", "0", "--out", str(tmp_path / "x")]) == 2
    assert "write all" in one_line_error(capsys)
    for spelled in ("all", "ALL"):
        assert getattr(RunConfig(task="toy", **{name: spelled}), name) is None  # the Python API spells it too
        parsed = cli.config_from_args(cli.build_parser().parse_args(["run", f"--{flag(name)}", spelled]))
        assert getattr(parsed, name) is None


# -- item 17: a config file's null or boolean, an unknown tracker, an impossible rank -------------
@pytest.mark.parametrize("key,value", [("device", None), ("device", True), ("target-modules", None),
                                       ("target-modules", False), ("method-options", None), ("method-options", True),
                                       ("model", True), ("data-dir", True), ("log-to", None), ("rounds", None),
                                       ("out", False)])
def test_a_config_files_null_or_boolean_is_one_line_before_loading(tmp_path, capsys, engine, key, value):
    out = [] if key == "out" else ["--out", str(tmp_path / "x")]  # a typed --out would override the file's
    (tmp_path / "run.json").write_text(json.dumps({"task": "toy", key: value}))
    assert cli.main(["run", "--config", str(tmp_path / "run.json"), *out]) == 2
    assert f"--{key}=" in one_line_error(capsys) and not engine
    if isinstance(value, bool):  # TOML has booleans but no null
        (tmp_path / "run.toml").write_text(f'task = "toy"\n{key} = {str(value).lower()}\n')
        assert cli.main(["run", "--config", str(tmp_path / "run.toml"), *out]) == 2
        assert f"--{key}=" in one_line_error(capsys) and not engine


def test_an_unknown_tracker_is_refused_when_the_config_is_built(capsys, tmp_path, engine):
    with pytest.raises(ConfigError, match="--log-to tensorbord: unknown tracker"):
        RunConfig(task="toy", log_to="tensorboard,tensorbord")
    assert cli.main(["run", "--task", "toy", "--log-to", "wandbb", "--out", str(tmp_path / "x")]) == 2
    assert "unknown tracker" in one_line_error(capsys) and not engine


def test_a_missing_tracker_package_is_refused_before_loading(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(simulation, "build_model", no_loading)
    with pytest.raises(ConfigError, match="the mlflow package is not installed"):
        simulation.run(RunConfig(task="toy", log_to="mlflow", out=str(tmp_path / "run")), progress=False)


def test_a_rank_above_the_sanity_bound_is_refused_before_loading():
    with pytest.raises(ConfigError, match="--rank=100000 is invalid: must be <= "):
        RunConfig(task="toy", rank=100_000)  # a typo for 10: refused in a second, not after loading
    RunConfig(task="toy", rank=1024)


def test_a_rank_above_a_layers_min_d_k_is_refused_once_the_shapes_are_known():
    from peft import LoraConfig, get_peft_model

    from fedlora.models.checks import check_built

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.value = torch.nn.Linear(16, 6), torch.nn.Linear(16, 16)  # min(d, k): 6 and 16

    def adapted(rank: int):
        return get_peft_model(Tiny(), LoraConfig(r=rank, target_modules=["query", "value"]))

    with pytest.raises(ValueError, match=r"--rank 8 is more than tiny's layer .*query allows .*min\(d, k\) = 6"):
        check_built(adapted(8), ("query", "value"), 16, "tiny")
    check_built(adapted(6), ("query", "value"), 16, "tiny")  # full rank is the largest a layer allows


# -- item 19: fedlora compare on files that are not a run's ---------------------------------------
@pytest.mark.parametrize("file,text,where", [
    ("metrics.jsonl", json.dumps(RECORD) + "\n[1, 2]\n", "metrics.jsonl, line 2"),
    ("metrics.jsonl", '"a string"\n', "metrics.jsonl, line 1"),
    ("metrics.jsonl", "{not json\n", "metrics.jsonl, line 1"),
    ("config.json", "[1, 2]", "config.json"),
    ("config.json", "null", "config.json"),
    ("config.json", "{not json", "config.json"),
])
def test_compare_names_the_file_and_line_that_is_not_a_json_object(tmp_path, capsys, file, text, where):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(RunConfig(task="toy").to_json())
    (run / "metrics.jsonl").write_text(json.dumps(RECORD) + "\n")
    (run / file).write_text(text)
    assert cli.main(["compare", str(run)]) == 2
    err = one_line_error(capsys)
    assert str(run / where.split(",")[0]) in err and where.split(", ")[-1] in err


def test_a_planted_tmp_symlink_is_replaced_not_followed(tmp_path: Path) -> None:
    # config.json.tmp / checkpoint.safetensors.tmp pointing at a file of the user's: the write must not touch it.
    from fedlora.protocol.checkpoint import ServerState, save_state
    from fedlora.util.atomic import atomic_write_text

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json.tmp", "checkpoint.safetensors.tmp"):
        (run / name).symlink_to(victim)
    atomic_write_text(run / "config.json", "{}")
    save_state(ServerState(round=1, adapter={}, head={}), run)
    assert victim.read_text() == "keep me"
    assert (run / "config.json").read_text() == "{}" and (run / "checkpoint.safetensors").is_file()
    assert not (run / "config.json.tmp").exists() and not (run / "checkpoint.safetensors.tmp").is_symlink()
