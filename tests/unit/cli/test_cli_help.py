"""What `fedlora --help` and each command's --help tell a user, -v anywhere, and `fedlora run --config FILE`
(TOML, or a run's config.json) giving the same validated config as the flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re

import pytest

from fedlora.cli import commands as cli
from fedlora.config.run import ConfigError, RunConfig
from fedlora.config.schema import flag, help_line

COMMANDS = ("run", "compare", "demo", "bench", "methods", "tasks")
# Every kind of field: a pairs dict, tuples, an optional float spelled 'iid', optional ints, bools, the knobs.
SET = dict(task="rte", max_length=40, rank=4, lora_alpha=8.0, client_ranks=(2, 4, 3), rank_map="svd",
           target_modules=("query", "key", "value"), local_steps=3, batch_size=6, grad_accum=2, lr=1e-3,
           lora_dropout=0.05, weight_decay=0.01, lr_schedule="cosine", warmup_steps=2, max_grad_norm=1.0,
           method="flora-na", method_options={"solver": "adamw", "steps": 7}, rounds=4, clients=3, alpha=None,
           fraction=0.5, min_clients=1, seed=11, eval_local_every=2, max_eval_examples=17, exact_match=True,
           device="cpu", precision="bf16", out="runs/x")
FLAGS = ["--task", "rte", "--max-length", "40", "--rank", "4", "--lora-alpha", "8", "--client-ranks", "2", "4", "3",
         "--rank-map", "svd", "--target-modules", "query", "key", "value", "--local-steps", "3", "--batch-size", "6",
         "--grad-accum", "2", "--lr", "1e-3", "--lora-dropout", "0.05", "--weight-decay", "0.01", "--lr-schedule",
         "cosine", "--warmup-steps", "2", "--max-grad-norm", "1", "--method", "flora-na", "--method-option",
         "solver=adamw", "--method-option", "steps=7", "--rounds", "4", "--clients", "3", "--alpha", "iid",
         "--fraction", "0.5", "--seed", "11", "--eval-local-every", "2", "--max-eval-examples", "17",
         "--exact-match", "--device", "cpu", "--precision", "bf16", "--out", "runs/x"]
TOML = """\
task = "rte"
max-length = 40
rank = 4
lora_alpha = 8                    # underscored keys work too; an int for a float field is read as the flag reads "8"
client-ranks = [2, 4, 3]
rank-map = "svd"
target-modules = "query key value"
method = "flora-na"
rounds = 4
clients = 3
alpha = "iid"
fraction = 0.5
seed = 11
exact-match = true

[training]
local-steps = 3
batch-size = 6
grad-accum = 2
lr = 1e-3
lora-dropout = 0.05
weight-decay = 0.01
lr-schedule = "cosine"
warmup-steps = 2
max-grad-norm = 1.0

[federation.method-options]
solver = "adamw"
steps = 7

[evaluation]
eval-local-every = 2
max-eval-examples = 17

[runtime]
device = "cpu"
precision = "bf16"
out = "runs/x"
"""


def parse_run(argv: list[str]) -> RunConfig:
    return cli.config_from_args(cli.build_parser().parse_args(["run", *argv]))


def subparser(name: str) -> argparse.ArgumentParser:
    action = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    return action.choices[name]


# --- help ----------------------------------------------------------------------------------------


def test_top_level_help_is_for_users_with_examples_of_every_command() -> None:
    text = cli.build_parser().format_help()
    description = text.split("\n\n")[1]
    assert "federated fine-tuning" in description.lower() and "see `fedlora --help`" not in text.lower()
    for command in COMMANDS:
        assert re.search(rf"^  fedlora {command}\b", text, re.M), command


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_help_has_an_example_and_describes_every_option(command: str) -> None:
    parser = subparser(command)
    text = parser.format_help()
    assert re.search(rf"^  fedlora {command}\b", text, re.M), "an example line in the epilog"
    for action in parser._actions:  # noqa: SLF001
        assert action.help and action.help.strip(), action.option_strings or action.dest


def test_run_help_shows_every_field_with_its_declared_default() -> None:
    parser = subparser("run")
    text = "".join(parser.format_help().split())  # unwrapped (lines break at spaces and hyphens)
    by_dest = {a.dest: a for a in parser._actions}  # noqa: SLF001
    for f in dataclasses.fields(RunConfig):
        assert f.name in by_dest, f"no flag for {f.name}"
        assert by_dest[f.name].help == help_line(f, "runs/<method>-<task>" if f.name == "out" else None)
        assert re.search(r"\(default: [^)]+\)$", by_dest[f.name].help % {}), f.name
        assert "".join((by_dest[f.name].help % {}).split()) in text, f"--{flag(f.name)}'s help is mangled"
    assert "~30%slower" in text  # a % in a help text is printed, not %-formatted
    assert "(default:0.005)" in text and "(default:flora-na-stable)" in text and "(default:false)" in text


def test_bench_help_names_the_default_preset_and_lists_the_presets() -> None:
    from fedlora.bench.presets import PRESETS

    text = subparser("bench").format_help()
    assert "(default: quick" in " ".join(text.split())
    assert all(re.search(rf"^  {name}\s", text, re.M) for name in PRESETS)


@pytest.mark.parametrize("argv", [["-v", "run"], ["run", "-v"], ["run", "--task", "toy", "--verbose"],
                                  ["compare", "a", "-v"], ["demo", "-v"], ["bench", "-v", "--dry-run"]])
def test_verbose_works_before_or_after_the_command(argv: list[str]) -> None:
    assert cli.build_parser().parse_args(argv).verbose is True


@pytest.mark.parametrize("argv", [["run"], ["compare", "a"], ["demo"], ["bench"]])
def test_verbose_is_off_unless_given(argv: list[str]) -> None:
    assert cli.build_parser().parse_args(argv).verbose is False


# --- misspelt and abbreviated options ------------------------------------------------------------

# (command's arguments before the bad option, the misspelt option, the option meant)
MISSPELT = [(["run"], "--local-step", "--local-steps"), (["run"], "--lr-shedule", "--lr-schedule"),
            (["compare", "runs/a"], "--ot", "--out"), (["demo"], "--round", "--rounds"),
            (["bench"], "--dryrun", "--dry-run"), (["methods"], "--formt", "--format"), (["tasks"], "--fromat", "--format")]


@pytest.mark.parametrize("before, wrong, meant", MISSPELT)
@pytest.mark.parametrize("with_value", [False, True])
def test_a_misspelt_option_gets_one_line_naming_the_closest_option(before, wrong, meant, with_value, capsys) -> None:
    argv = [*before, f"{wrong}=3" if with_value else wrong]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"fedlora {before[0]}: error: unknown option {wrong}; did you mean {meant}?\n"


def test_an_option_nothing_resembles_points_to_help_and_a_stray_word_is_named(capsys) -> None:
    for argv, expected in ((["run", "--zzzzzz"], "fedlora run: error: unknown option --zzzzzz; `fedlora run --help` "
                            "lists the options\n"),
                           (["run", "stray"], "fedlora run: error: unexpected argument 'stray'; `fedlora run --help` "
                            "lists what it takes\n")):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2 and capsys.readouterr().err == expected


@pytest.mark.parametrize("command", COMMANDS)
def test_no_prefix_of_an_option_is_accepted_for_it(command: str, capsys) -> None:
    # argparse's default took `--local-step 3` as --local-steps: a prefix must be an error, for every option
    parser = subparser(command)
    assert not parser.allow_abbrev and not cli.build_parser().allow_abbrev
    options = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}  # noqa: SLF001
    before = ["compare", "runs/a"] if command == "compare" else [command]
    for option in options:
        prefix = option[:-1]
        if any(o.startswith(prefix) and o != option for o in options) or prefix in options:
            continue  # ambiguous or itself an option: argparse never expanded these
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args([*before, prefix, "1"])
        assert f"unknown option {prefix};" in capsys.readouterr().err, option


def test_the_bench_entry_point_of_benchmarks_paper_py_refuses_prefixes_too(capsys) -> None:
    from fedlora.bench.cli import main as bench_main

    for argv, meant in ((["--dry"], "--dry-run"), (["--dryrun"], "--dry-run")):
        with pytest.raises(SystemExit) as info:
            bench_main(argv)
        assert info.value.code == 2
        assert capsys.readouterr().err == f"fedlora bench: error: unknown option {argv[0]}; did you mean {meant}?\n"


def test_bench_and_compare_options_still_parse_when_spelt_in_full() -> None:
    args = cli.build_parser().parse_args(
        ["bench", "--preset", "quick", "--data-dir", "d", "--out", "o", "--tasks", "sst2", "--methods", "fedit",
         "--seeds", "0", "1", "--set", "rounds=2", "--step-seconds", "0.5", "--calibrate", "--dry-run", "--report-only",
         "--progress", "--workers", "2", "--reuse", "r"])
    assert (args.preset, args.data_dir, args.out, args.tasks, args.methods, args.seeds) == \
        ("quick", "d", "o", ["sst2"], ["fedit"], [0, 1])
    assert args.overrides == [("rounds", 2)] and args.step_seconds == 0.5 and args.workers == 2
    assert args.calibrate and args.dry_run and args.report_only and args.progress and [str(p) for p in args.reuse] == ["r"]
    args = cli.build_parser().parse_args(["compare", "runs/a", "runs/b", "--out", "runs/cmp", "-v"])
    assert (args.runs, args.out, args.verbose) == (["runs/a", "runs/b"], "runs/cmp", True)


def test_the_first_examples_name_a_local_data_dir_and_say_what_happens_without_one() -> None:
    # A newcomer's first command, copied from --help, failed offline: it had no --data-dir.
    for text in (cli.build_parser().format_help(), subparser("demo").format_help(), subparser("run").format_help()):
        first = next(line for line in text.splitlines() if re.match(r"^  fedlora \w+ ", line))
        assert "--data-dir ../shared/data/glue" in first, first
        assert "$FEDLORA_DATA_DIR, else the Hugging Face hub" in " ".join(text.split()), "what happens without it"


# --- --config FILE -------------------------------------------------------------------------------


def test_flags_toml_and_config_json_give_the_same_config(tmp_path) -> None:
    from_flags = parse_run(FLAGS)
    assert from_flags == RunConfig(**SET)
    (tmp_path / "run.toml").write_text(TOML)
    assert parse_run(["--config", str(tmp_path / "run.toml")]) == from_flags
    (tmp_path / "config.json").write_text(from_flags.to_json())  # what a run directory holds
    from_json = parse_run(["--config", str(tmp_path / "config.json")])
    assert from_json == from_flags and from_json.to_json() == from_flags.to_json()


def test_flags_override_the_file_and_add_method_options(tmp_path) -> None:
    (tmp_path / "run.toml").write_text(TOML)
    config = parse_run(["--config", str(tmp_path / "run.toml"), "--rounds", "9", "--lr-schedule", "linear",
                        "--method-option", "steps=3"])
    assert (config.rounds, config.lr_schedule) == (9, "linear")
    assert config.method_options["steps"] == 3 and config.method_options["solver"] == "adamw"
    assert config.replace(rounds=4, lr_schedule="cosine", method_options={}) == \
        RunConfig(**SET).replace(method_options={})


def test_a_file_without_out_gets_the_default_run_directory(tmp_path) -> None:
    (tmp_path / "run.toml").write_text('task = "toy"\nmethod = "fedit"\n')
    assert parse_run(["--config", str(tmp_path / "run.toml")]).out == "runs/fedit-toy"


@pytest.mark.parametrize("text, match", [
    ("lrr = 0.1\n", r"unknown option 'lrr' \(did you mean 'lr'\?\)"),
    ("[training]\nwarmup = 3\n", r"unknown option 'warmup' \(did you mean 'warmup-steps'\?\)"),
    ("rounds = 2\nrounds_ = 3\n", "unknown option 'rounds_'"),
    ("local-steps = 2\nlocal_steps = 3\n", "local-steps is set twice"),
    ("rounds = 1.5\n", r"rounds = 1\.5 is invalid"),
    ("rounds = 0\n", "--rounds=0 is invalid"),  # the same validation as the flag
    ("lr-schedule = \"step\"\n", "--lr-schedule='step' is invalid"),
    ("task = [\"rte\"]\n", "a list is only accepted"),
    ("rounds = \n", "not valid TOML"),
])
def test_bad_config_files_are_refused_in_one_line(tmp_path, text: str, match: str) -> None:
    (tmp_path / "run.toml").write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        parse_run(["--config", str(tmp_path / "run.toml")])
    assert "\n" not in str(info.value)


def test_main_reports_a_bad_config_file_as_a_usage_error(tmp_path, capsys) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"task": "toy", "epochs": 3}))
    assert cli.main(["run", "--config", str(tmp_path / "run.json")]) == 2
    assert "fedlora run: error: --config" in capsys.readouterr().err
