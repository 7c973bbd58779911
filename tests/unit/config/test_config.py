"""One config source: every RunConfig field is declared once; CLI flags, the Flower app config and the
data-cache key are derived from it, and bad values (method options included) fail before anything loads."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from fedlora.cli import commands as cli
from fedlora.config.run import ConfigError, RunConfig
from fedlora.config.schema import data_fields, flag
from fedlora.engines.flower.config import FLOWER_OUT, FlowerOptions, app_config_table, run_config_from_flower, run_config_overrides

REPO = Path(__file__).resolve().parents[3]
NON_DEFAULT = dict(task="rte", max_length=40, rank=4, lora_alpha=8.0, client_ranks=(2, 4, 3), rank_map="svd", target_modules=("query", "key", "value"),
                   local_steps=3, batch_size=5, lr=1e-3, method="flora-na",
                   method_options={"solver": "adamw", "steps": 7, "weighting": "authors"}, rounds=4, clients=3,
                   alpha=None, fraction=0.5, min_clients=2, seed=11, eval_local_every=2, local_test_fraction=0.3,
                   max_eval_examples=17, max_local_eval_examples=9, device="cpu", precision="bf16", out="runs/x")


def parse_run(argv: list[str]) -> RunConfig:
    return cli.config_from_args(cli.build_parser().parse_args(["run", *argv]))


def as_cli(config: RunConfig) -> list[str]:
    """``config`` spelled as `fedlora run` flags, from the same declarations."""
    argv: list[str] = []
    for f in dataclasses.fields(RunConfig):
        value = getattr(config, f.name)
        if f.metadata["pairs"]:
            for k, v in value.items():
                argv += ["--method-option", f"{k}={v}"]
        elif f.metadata["many"]:
            argv += [f"--{flag(f.name)}", *map(str, value)] if value else []  # empty: the default, no flag
        elif value is not None or f.metadata["show"]:  # unset without a spelling: leave the flag out
            shown = f.metadata["show"](value) if f.metadata["show"] else value
            argv += [f"--{flag(f.name)}", str(shown)]
    return argv


def test_every_field_has_a_flag_with_help_and_default():
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["run"].format_help()  # noqa: SLF001
    for f in dataclasses.fields(RunConfig):
        option = "--method-option" if f.name == "method_options" else f"--{flag(f.name)}"
        assert option in help_text, f.name
    assert help_text.count("(default:") >= len(dataclasses.fields(RunConfig))
    for section in ("data", "model", "training", "federation", "evaluation", "runtime"):
        assert f"{section} options" in help_text


def test_cli_round_trips_every_field():
    config = RunConfig(**NON_DEFAULT)
    assert parse_run(as_cli(config)) == config
    assert parse_run([]) == RunConfig(out="runs/flora-na-stable-sst2")  # defaults are the declaration's


def test_pyproject_flower_table_is_the_declared_one():
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table == app_config_table(), "regenerate with fedlora.engines.flower.config.print_app_config_table()"
    config, options = run_config_from_flower(table)
    assert config == RunConfig(out=FLOWER_OUT) and options == FlowerOptions()


def test_flower_run_config_round_trips_every_field():
    from flwr.common.config import parse_config_args

    config = RunConfig(**NON_DEFAULT)
    overrides = parse_config_args([run_config_overrides(config, round_timeout=30.0, resume=True)])
    parsed, options = run_config_from_flower(app_config_table() | overrides)
    assert parsed == config
    assert options == FlowerOptions(round_timeout=30.0, resume=True)


def test_flower_refuses_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="unknown keys"):
        run_config_from_flower(app_config_table() | {"local-step": 3})
    with pytest.raises(ConfigError, match="rounds"):
        run_config_from_flower(app_config_table() | {"rounds": "many"})
    with pytest.raises(ConfigError, match="min-train-nodes"):
        run_config_from_flower(app_config_table() | {"min-train-nodes": 0})


def test_data_cache_key_follows_the_data_fields_only():
    from fedlora.engines.flower.data_cache import federation_key

    class Tok:
        name_or_path = "tok"

        def __len__(self) -> int:
            return 10

    base = RunConfig()
    key = federation_key(base, Tok())
    assert set(data_fields(RunConfig)) >= {"task", "clients", "alpha", "seed", "max_length"}
    assert federation_key(base.replace(lr=0.1, rounds=3, method="fedit"), Tok()) == key
    for name, value in {"clients": 3, "alpha": None, "seed": 5, "max_length": 20, "task": "rte",
                        "local_test_fraction": 0.5, "max_local_eval_examples": 3}.items():
        assert name in data_fields(RunConfig)
        assert federation_key(base.replace(**{name: value}), Tok()) != key, name


@pytest.mark.parametrize("options,needle", [
    ({"solver": "bogus"}, "solver='bogus' is invalid: use one of als, adamw"),
    ({"steps": -1}, "steps=-1 is invalid: must be >= 0"),
    ({"max_sweeps": "abc"}, "max_sweeps='abc' is invalid: expected a number"),
    ({"lr": float("inf")}, "must be finite"),
    ({"nope": 1}, "has no option nope"),
    ({"weighting": "authorz"}, "weighting='authorz' is invalid"),
])
def test_bad_method_options_fail_when_the_config_is_built(options, needle):
    with pytest.raises(ConfigError, match="--method-option") as info:
        RunConfig(method="flora-na", method_options=options)
    assert needle in str(info.value)


def test_method_options_are_converted_to_their_declared_types():
    config = parse_run(["--method", "flora-na", "--method-option", "steps=5", "--method-option", "solver=adamw",
                        "--method-option", "tol=1e-9"])
    assert config.method_options == {"steps": 5, "solver": "adamw", "tol": 1e-9}
    with pytest.raises(ConfigError, match="seed"):  # drawn by the server each round, not the user's
        RunConfig(method="flora", method_options={"seed": 3})


def test_cli_refuses_a_bad_option_before_loading_anything(monkeypatch, capsys, tmp_path):
    import fedlora.tasks.build
    import fedlora.engines.local

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(fedlora.tasks.build, "build_model", no_loading)
    monkeypatch.setattr(fedlora.engines.local, "build_model", no_loading)
    code = cli.main(["run", "--method", "flora-na", "--method-option", "solver=bogus", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "solver" in err and "als, adamw" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()  # nothing half-written


@pytest.mark.parametrize("argv,needle", [
    (["--device", "gpu"], "--device"), (["--precision", "fp8"], "--precision"), (["--lr", "inf"], "--lr"),
    (["--lora-alpha", "nan"], "--lora-alpha"), (["--alpha", "inf"], "--alpha"), (["--task", "nope"], "--task"),
])
def test_every_field_is_validated_up_front(argv, needle, capsys, tmp_path):
    assert cli.main(["run", *argv, "--out", str(tmp_path / "x")]) == 2
    assert needle in capsys.readouterr().err
