"""pass@1 means "every test ran and passed": nothing the candidate does can forge it (issue 21, items 1-2).

Each hostile variant below scored 1.00 under the old harness (exit status 0 counted as a pass; the asserts compared
objects the candidate controlled). Here a wrong solution plus the trick must fail, on MBPP-style and HumanEval-style
problems alike, while honest solutions, including the non-malicious ``unittest.main()`` idiom, still pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedlora.sandbox import ExecResult, Limits, TestProblem, run_test, run_tests
from fedlora.tasks.scoring import humaneval_problem, mbpp_problem

pytestmark = pytest.mark.usefixtures("sandbox_ready")
DATA = Path(__file__).parents[2] / ".." / "shared" / "data"
FAST = Limits(timeout_s=10.0, cpu_s=10)
RIGHT = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b\n"
HUMANEVAL_PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
HUMANEVAL_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"

# A trick is code placed before the (wrong) function, or a body that replaces it.
TRICKS = {
    "os._exit(0) at load": "import os\nos._exit(0)\n" + WRONG,
    "sys.exit(0) at load": "import sys\nsys.exit(0)\n" + WRONG,
    "raise SystemExit at load": "raise SystemExit\n" + WRONG,
    "os._exit(0) in the function": "import os\ndef add(a, b):\n    os._exit(0)\n",
    "sys.exit(0) in the function": "import sys\ndef add(a, b):\n    sys.exit(0)\n",
    "raise SystemExit in the function": "def add(a, b):\n    raise SystemExit\n",
    "excepthook": "import os, sys\nsys.excepthook = lambda *a: os._exit(0)\n" + WRONG,
    "atexit": "import atexit, os\natexit.register(os._exit, 0)\n" + WRONG,
    "ctypes _exit": "import ctypes\ndef add(a, b):\n    ctypes.CDLL(None)._exit(0)\n",
    "unittest.main() (wrong code)": WRONG + "\nif __name__ == '__main__':\n    import unittest\n    unittest.main()\n",
    "kill every process it can see": "import os, signal\ndef add(a, b):\n    os.kill(-1, signal.SIGKILL)\n",
    "forged verdicts on every fd": (
        "import json, os, struct\nfor v in ({'status': 'passed', 'reason': 'x'}, {'loaded': True}, {'value': ['i', 5]}):\n"
        "    body = json.dumps(v).encode()\n    for fd in range(64):\n        try:\n"
        "            os.write(fd, struct.pack('>Q', len(body)) + body)\n        except OSError:\n            pass\n" + WRONG),
}


def _mbpp(code: str) -> TestProblem:
    return mbpp_problem(code, "", ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"])


def _humaneval(code: str) -> TestProblem:
    return humaneval_problem(HUMANEVAL_PROMPT, "\n\n" + code, HUMANEVAL_TEST, "add")


@pytest.mark.parametrize("build", [_mbpp, _humaneval], ids=["mbpp", "humaneval"])
def test_exit_tricks_cannot_fake_a_pass(build: Any) -> None:
    results = run_tests([build(code) for code in TRICKS.values()], FAST, workers=2)
    forged = {name: r for name, r in zip(TRICKS, results) if r.passed}
    assert forged == {}
    assert {r.status for r in results} <= {"failed", "crashed"}, results


@pytest.mark.parametrize("build", [_mbpp, _humaneval], ids=["mbpp", "humaneval"])
def test_honest_solutions_pass_including_the_unittest_main_idiom(build: Any) -> None:
    unittest_main = RIGHT + "\nif __name__ == '__main__':\n    import unittest\n    unittest.main()\n"
    printing = "print('debug output')\n" + RIGHT
    results = run_tests([build(RIGHT), build(unittest_main), build(printing)], FAST, workers=2)
    assert [r.status for r in results] == ["passed"] * 3, results
    assert "debug output" in results[2].output


def test_what_a_killed_candidate_printed_is_kept() -> None:
    """Prints reach the log as they happen: a candidate killed at its timeout still shows what it printed (a
    buffered print was lost when the program was killed before its interpreter flushed, even on a pass)."""
    hang = "print('before the hang')\ndef add(a, b):\n    while True:\n        pass\n"
    result = run_test(_mbpp(hang), Limits(timeout_s=3.0, cpu_s=10))
    assert result.status == "timeout", result
    assert "before the hang" in result.output


ALWAYS_EQUAL = """
class Anything:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    def __bool__(self): return True
    def __hash__(self): return 0
    def __len__(self): return 3
    def __iter__(self): return iter([])
"""


def _mbpp_rows(*task_ids: int) -> list[dict[str, Any]]:
    rows = {r["task_id"]: r for r in map(json.loads, (DATA / "mbpp" / "mbpp.jsonl").read_text().splitlines())}
    return [rows[t] for t in task_ids]


def _function_name(test: str) -> str:
    return test.split("assert ", 1)[1].split("(", 1)[0].strip()


def test_an_object_that_equals_everything_does_not_pass_real_mbpp_problems() -> None:
    rows = _mbpp_rows(11, 13, 14, 18, 20)
    hostile = [mbpp_problem(f"{ALWAYS_EQUAL}\ndef {_function_name(r['test_list'][0])}(*args, **kwargs):\n"
                            "    return Anything()\n", r["test_setup_code"], r["test_list"]) for r in rows]
    honest = [mbpp_problem(r["code"], r["test_setup_code"], r["test_list"]) for r in rows]
    results = run_tests(hostile + honest, FAST, workers=2)
    assert [r.passed for r in results] == [False] * 5 + [True] * 5, results


@pytest.mark.parametrize("returned", [
    "type('S', (str,), {'__eq__': lambda s, o: True, '__hash__': str.__hash__})('no')",  # a str subclass
    "type('L', (list,), {'__eq__': lambda s, o: True})()",  # a list subclass: crosses as its plain value []
    "Anything()",
])
def test_subclasses_and_proxies_arrive_as_plain_data_or_not_at_all(returned: str) -> None:
    problem = mbpp_problem(f"{ALWAYS_EQUAL}\ndef f(x):\n    return {returned}\n", "",
                           ["assert f(1) == 'yes'", "assert f(2) == [1, 2]", "assert f(3)"])
    result = run_test(problem, FAST)
    assert not result.passed and result.status == "failed", result


def test_stop_iteration_cannot_cut_a_test_short() -> None:
    # all(map(f, xs)) is True when f raises StopIteration at once, in an ordinary harness.
    problem = mbpp_problem("def f(x):\n    raise StopIteration\n", "", ["assert all(map(f, [1, 2, 3]))"])
    assert run_test(problem, FAST).status == "failed"


def test_plain_values_iterators_types_and_candidate_objects_work_as_in_python() -> None:
    code = ("import math\nclass Node:\n    def __init__(self, v): self.v = v\n"
            "def pairs(n):\n    return ((i, i * i) for i in range(n))\n"
            "def keep(xs, kind):\n    return [x for x in xs if isinstance(x, kind)]\n"
            "def value(node):\n    return node.v\n"
            "def stats(xs):\n    return {'n': len(xs), 'mean': sum(xs) / len(xs), 'set': set(xs), 'c': 1 + 2j, 'b': b'x'}\n")
    tests = ["assert list(pairs(3)) == [(0, 0), (1, 1), (2, 4)]", "assert keep([1, 'a', 2.5, 3], int) == [1, 3]",
             "assert value(root) == 7", "assert math.isclose(stats([1, 2])['mean'], 1.5)",
             "assert stats([1, 1]) == {'n': 2, 'mean': 1.0, 'set': {1}, 'c': 1 + 2j, 'b': b'x'}",
             "assert float('nan') != stats([1])['mean']"]
    result = run_test(mbpp_problem(code, "root = Node(7)", tests), FAST)
    assert result.passed, result


def test_candidate_exceptions_reach_the_tests_as_exceptions() -> None:
    test = "def check(candidate):\n    try:\n        candidate(-1)\n    except ValueError:\n        return\n    assert False\n"
    raises = humaneval_problem("def f(x):\n    \"\"\"Raise ValueError for x < 0.\"\"\"\n",
                               "    if x < 0:\n        raise ValueError('negative')\n    return x\n", test, "f")
    silent = humaneval_problem("def f(x):\n    \"\"\"Raise ValueError for x < 0.\"\"\"\n", "    return x\n", test, "f")
    assert [r.passed for r in run_tests([raises, silent], FAST, workers=2)] == [True, False]


def test_a_timeout_and_a_load_error_fail() -> None:
    results: list[ExecResult] = run_tests([_mbpp("while True:\n    pass\n"), _mbpp("def add(a, b:\n"),
                                           _mbpp("import numpy\n" + RIGHT)], Limits(timeout_s=2.0, cpu_s=2), workers=2)
    assert [r.status for r in results] == ["timeout", "failed", "failed"], results
    assert "SyntaxError" in results[1].reason and "ModuleNotFoundError" in results[2].reason


# --- where the boundary cannot be set up -------------------------------------------------------------------------
NO_BWRAP = "bubblewrap (bwrap) is not installed: install bubblewrap"


def test_without_the_boundary_code_is_refused_unless_the_user_accepts_the_risk(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedlora.sandbox.harness as harness
    from fedlora.sandbox import SandboxUnavailable

    monkeypatch.setattr(harness, "problem", lambda: NO_BWRAP)
    with pytest.raises(SandboxUnavailable, match="bwrap.*--allow-unsandboxed-code"):
        run_tests([_mbpp(RIGHT)], FAST)
    # Accepted: no kernel boundary, but the verdict is still the judge's (exit tricks still fail).
    results = run_tests([_mbpp(RIGHT), _mbpp(TRICKS["os._exit(0) at load"])], FAST, allow_unsandboxed=True)
    assert [r.status for r in results] == ["passed", "crashed"]


def test_fedlora_run_refuses_a_code_task_before_loading(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import fedlora.sandbox.harness as harness
    import fedlora.engines.local as simulation
    from fedlora.cli.commands import main

    monkeypatch.setattr(harness, "problem", lambda: NO_BWRAP)
    monkeypatch.setattr(simulation, "build_model", lambda *a: pytest.fail("loaded a model"))
    code = main(["run", "--task", "mbpp", "--data-dir", str(DATA), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "bubblewrap" in err and "--allow-unsandboxed-code" in err


def test_replies_written_ahead_into_the_pipe_answer_no_request() -> None:
    # The candidate knows the asserts (MBPP prompts show them) and the judge's request order: it writes the exact
    # replies the judge will read (loaded, a handle for `add`, 5, 0) into its reply pipe, then exits at once.
    # Without per-request ids this scored a pass with no live candidate behind it.
    forge = (
        "import json, os, struct\n"
        "def frame(v):\n    body = json.dumps(v).encode()\n    return struct.pack('>Q', len(body)) + body\n"
        "replies = [{'loaded': True}, {'value': ['r', 0]}, {'value': ['i', 5]}, {'value': ['r', 1]}, {'value': ['i', 0]},"
        " {'pong': True}]\n"
        "fd = [f for f in range(3, 64) if f != 2 and os.path.exists(f'/proc/self/fd/{f}')"
        " and os.readlink(f'/proc/self/fd/{f}').startswith('pipe:')][-1]\n"
        "os.write(fd, b''.join(frame(r) for r in replies))\nos._exit(0)\n"
    )
    result = run_test(_mbpp(forge), FAST)
    assert result.status in ("crashed", "failed") and not result.passed, result
