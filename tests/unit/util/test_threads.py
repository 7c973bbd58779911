"""``--threads N|auto`` and the OpenMP wait policy (fedlora.util.threads): what auto picks, when the policy can be set."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

from fedlora.util import threads
from fedlora.cli.commands import build_parser, main


@pytest.mark.parametrize("passive", [False, True])
@pytest.mark.parametrize("cpus", [1, 2, 4, 16])
def test_auto_uses_every_cpu_of_an_idle_machine(cpus: int, passive: bool) -> None:
    assert threads.auto_threads(cpus, load=0.0, passive=passive) == cpus


@pytest.mark.parametrize("cpus", [2, 4, 16])
def test_auto_with_spinning_waits_leaves_a_busy_core_to_its_process(cpus: int) -> None:
    # one competing process keeps a core busy: a thread on it would collapse every parallel region
    assert threads.auto_threads(cpus, load=1.0, passive=False) == cpus - 1


@pytest.mark.parametrize("load", [0.0, 1.0, 9.5])
def test_auto_with_passive_waits_uses_every_cpu_at_any_load(load: float) -> None:
    assert threads.auto_threads(2, load=load, passive=True) == 2


@pytest.mark.parametrize("cpus, load", [(1, 0.0), (1, 5.0), (2, 2.0), (2, 9.0), (8, 100.0), (3, 0.7)])
def test_auto_is_between_one_and_the_cpus_at_any_load(cpus: int, load: float) -> None:
    assert 1 <= threads.auto_threads(cpus, load) <= cpus


def test_auto_never_adds_threads_as_the_load_grows() -> None:
    picks = [threads.auto_threads(8, load / 4) for load in range(0, 48)]
    assert picks == sorted(picks, reverse=True)


@pytest.mark.parametrize("text, value", [("auto", "auto"), ("AUTO", "auto"), ("1", "1"), (" 3 ", "3")])
def test_threads_accepts_auto_or_a_positive_integer(text: str, value: str) -> None:
    assert threads.parse_threads(text) == value


@pytest.mark.parametrize("text", ["0", "-1", "two", "1.5", ""])
def test_threads_refuses_anything_else(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="positive integer or 'auto'"):
        threads.parse_threads(text)


@pytest.mark.parametrize("command", ["run", "demo", "bench"])
def test_every_torch_command_takes_threads_with_auto_by_default(command: str) -> None:
    assert build_parser().parse_args([command]).threads == "auto"
    assert build_parser().parse_args([command, "--threads", "1"]).threads == "1"


def test_a_bad_thread_count_is_a_one_line_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--task", "toy", "--threads", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--threads" in err and "positive integer or 'auto'" in err and "Traceback" not in err


def test_apply_sets_torch_threads_and_says_so(monkeypatch) -> None:
    before = torch.get_num_threads()
    try:
        line = threads.apply_threads("1", interop=False)
        assert torch.get_num_threads() == 1 and line.startswith("torch threads: 1 ")
        monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
        monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))
        monkeypatch.setattr(threads, "_policy_at_start", None)  # torch loaded before the policy could be set
        assert threads.apply_threads("auto", interop=False).startswith("torch threads: 1 (auto: 2 usable CPUs, load 1.0")
        monkeypatch.setattr(threads, "_policy_at_start", "PASSIVE")
        assert threads.apply_threads("auto", interop=False).endswith("OMP_WAIT_POLICY=PASSIVE")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_passive_wait_is_set_only_before_torch_and_never_over_the_users_choice(monkeypatch) -> None:
    monkeypatch.setattr(threads, "_policy_at_start", None)
    monkeypatch.delenv(threads.WAIT_POLICY, raising=False)
    assert not threads.prefer_passive_wait()  # torch is imported in this process: too late, leave it alone
    assert threads.WAIT_POLICY not in os.environ
    monkeypatch.delitem(sys.modules, "torch")
    assert threads.prefer_passive_wait() and os.environ[threads.WAIT_POLICY] == "PASSIVE"
    assert threads.passive_wait()
    monkeypatch.setenv(threads.WAIT_POLICY, "ACTIVE")
    assert not threads.prefer_passive_wait() and os.environ[threads.WAIT_POLICY] == "ACTIVE"
    assert not threads.passive_wait()  # the user's spinning policy: auto counts the load


def test_the_cli_entry_imports_no_torch_so_the_wait_policy_still_counts() -> None:
    # main() is entered with a usage error, so nothing heavy runs: only whether the policy was set before torch
    code = "\n".join([
        "import os, sys",
        "import fedlora.__main__, fedlora.cli.commands, fedlora.bench.cli",
        "assert 'torch' not in sys.modules, 'torch imported before main() could set OMP_WAIT_POLICY'",
        "try:",
        "    fedlora.cli.commands.main(['run', '--threads', 'none'])",
        "except SystemExit:",
        "    pass",
        "print(os.environ.get('OMP_WAIT_POLICY'))",
    ])
    env = {k: v for k, v in os.environ.items() if k != threads.WAIT_POLICY}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "PASSIVE"
