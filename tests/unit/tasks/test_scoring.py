"""fedlora.tasks.scoring on hand-written cases and on the real GSM8K / MBPP / HumanEval files (../shared/data).

The MBPP and HumanEval checks score every reference solution that pass@1 scores (MBPP's test split, all of HumanEval)
through the sandbox and its judge (about a minute on 2 cores)."""

from __future__ import annotations

import ast
import gzip
import json
import time
from pathlib import Path
from typing import Any

import pytest

from fedlora.sandbox import ExecResult, Limits, run_tests
from fedlora.tasks.scoring import (
    extract_code,
    gsm8k_reference,
    humaneval_completion,
    humaneval_problem,
    last_number,
    mbpp_problem,
    numbers_equal,
    pass_at_1,
    shadowed_builtins,
)

DATA = Path(__file__).parents[3] / ".." / "shared" / "data"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        pytest.skip(f"{path} is not here (the shared offline data sets are not checked out)")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --- GSM8K ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is $1,234.50.", "1234.5"),
        ("no digits here", None),
        ("It drops to -3 degrees.", "-3"),
        ("from 10-5 we get 5", "5"),
        ("pages 10-15", "15"),
        ("$18.00", "18"),
        ("1,000,000 ants", "1000000"),
        ("3, 4 and 5.0", "5"),
        ("She has 3/4 of a pie", "4"),  # fractions are not evaluated: the last number
        ("so 5 + 7 = 12\n#### 72\nI hope this helps, 3 cheers!", "72"),  # the '####' answer wins
        ("#### none given, but 9 later", "9"),  # nothing after '####': the last number
        ("a 0.5 chance, so .25", "0.25"),
        ("-0.0", "0"),
    ],
)
def test_last_number(text: str, expected: str | None) -> None:
    assert last_number(text) == expected


def test_gsm8k_reference_and_comparison() -> None:
    assert gsm8k_reference("48/2 = <<48/2=24>>24\n#### 1,200") == "1200"
    assert gsm8k_reference("x\n#### 5.0") == "5"
    assert gsm8k_reference("x\n#### -3") == "-3"
    with pytest.raises(ValueError):
        gsm8k_reference("the answer is 5")
    assert numbers_equal("1200", "1200") and numbers_equal("0.1", "0.1000000001")
    assert not numbers_equal("1200", "1201") and not numbers_equal(None, "5")
    assert numbers_equal(last_number("That costs $1,200.00 in total."), gsm8k_reference("#### 1,200"))


def test_gsm8k_test_split_references() -> None:
    rows = _jsonl(DATA / "gsm8k" / "test.jsonl")
    assert len(rows) == 1319
    refs = [gsm8k_reference(r["answer"]) for r in rows]  # every row has a number after '####'
    assert all(last_number(r["answer"]) == ref for r, ref in zip(rows, refs))
    # Without the '####' line, the worked solution's last number is the answer in 1,283 of 1,319 rows; the others
    # end on a unit or remark ("... out of the 24 liters"): why '####' is preferred when the model writes it.
    body_last = [last_number(r["answer"].rsplit("####", 1)[0]) for r in rows]
    assert sum(b == ref for b, ref in zip(body_last, refs)) == 1283


# --- code extraction and pass@1 -------------------------------------------------------------------------------


def test_extract_code() -> None:
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n```\n```python\ny = 2\n```") == "y = 2\n"  # a python block is preferred
    assert extract_code("```js\nlet a\n```") == "let a\n"
    assert extract_code("```python\ndef f():\n    return") == "def f():\n    return"  # cut off at max tokens
    assert extract_code("    return x + 1\n") == "    return x + 1\n"


def test_pass_at_1() -> None:
    assert pass_at_1([True, False, True, True]) == 0.75
    with pytest.raises(ValueError):
        pass_at_1([])


@pytest.mark.usefixtures("sandbox_ready")
def test_humaneval_completion_handles_bodies_and_rewrites() -> None:
    prompt = 'import math\n\n\ndef helper(x):\n    return x\n\n\ndef add(a, b):\n    """Add."""\n'
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
    body = humaneval_completion(prompt, "    return helper(a) + b\n")
    rewrite = humaneval_completion(prompt, "Sure!\n```python\ndef add(a, b):\n    return helper(a) + b\n```")
    assert body == "    return helper(a) + b\n" and rewrite.startswith("\n\ndef add(")
    wrong = humaneval_completion(prompt, "```python\ndef add(a, b):\n    return a - b\n```", entry_point="add")
    results = run_tests([humaneval_problem(prompt, c, test, "add") for c in (body, rewrite, wrong)], workers=2)
    assert [r.passed for r in results] == [True, True, False]


# --- MBPP -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mbpp() -> list[dict[str, Any]]:
    rows = _jsonl(DATA / "mbpp" / "mbpp.jsonl")
    assert [r["task_id"] for r in rows] == list(range(1, 975))
    return rows


def _mbpp(row: dict[str, Any], code: str | None = None, setup: str | None = None) -> Any:
    return mbpp_problem(row["code"] if code is None else code, row["test_setup_code"] if setup is None else setup,
                        row["test_list"], shadowed_builtins(row["code"]))


@pytest.fixture(scope="module")
def mbpp_references(mbpp: list[dict[str, Any]], sandbox_ready: None) -> list[ExecResult]:
    # Task 123 (amicable numbers below 9999) needs several CPU-seconds: limits with room for a loaded CI machine.
    # The test split (what pass@1 scores) plus task 927, the other task with setup code.
    start = time.monotonic()
    rows = [r for r in mbpp if 11 <= r["task_id"] <= 510 or r["task_id"] == 927]
    results = run_tests([_mbpp(r) for r in rows], Limits(timeout_s=60.0, cpu_s=60), workers=2)
    slowest = max(zip(results, rows), key=lambda rr: rr[0].seconds)
    print(f"\nMBPP: {len(rows)} references in {time.monotonic() - start:.1f} s; slowest task {slowest[1]['task_id']}: {slowest[0].seconds:.2f} s")
    return results


@pytest.mark.slow
def test_mbpp_references_pass(mbpp: list[dict[str, Any]], mbpp_references: list[ExecResult]) -> None:
    rows = [r for r in mbpp if 11 <= r["task_id"] <= 510 or r["task_id"] == 927]
    failed = {r["task_id"]: res.reason for r, res in zip(rows, mbpp_references) if not res.passed}
    assert failed == {}  # every reference passes, setup-code tasks and task 126 (a function named `sum`) included
    assert len(rows) == 501 and pass_at_1([res.passed for res in mbpp_references]) == 1.0


@pytest.mark.usefixtures("sandbox_ready")
def test_mbpp_setup_code_is_needed(mbpp: list[dict[str, Any]]) -> None:
    # SOURCES.md's "tasks 367 and 927 fail": they are the only tasks with test_setup_code (the trees the asserts
    # use); a harness that drops it fails exactly them. mbpp_problem runs it in the candidate's namespace.
    with_setup = [r for r in mbpp if r["test_setup_code"].strip()]
    assert [r["task_id"] for r in with_setup] == [367, 927]
    results = run_tests([_mbpp(r, setup="") for r in with_setup], workers=2)
    assert [res.status for res in results] == ["failed", "failed"]
    assert all("NameError" in res.reason for res in results)


@pytest.mark.usefixtures("sandbox_ready")
def test_only_builtins_the_reference_redefines_come_from_the_candidate(mbpp: list[dict[str, Any]]) -> None:
    # Task 126 asks for a function called `sum`: the tests take it from the candidate. Elsewhere a candidate that
    # redefines a built-in the tests use cannot change what the tests compute with it.
    assert shadowed_builtins(mbpp[125]["code"]) == ["sum"]
    honest = _mbpp(mbpp[125])
    forged = mbpp_problem("def len(x):\n    return 3\ndef f(x):\n    return x\n", "", ["assert len(f([1])) == 3"])
    assert [r.passed for r in run_tests([honest, forged], workers=2)] == [True, False]


def _empty_bodies(code: str) -> str:
    """The reference with every function body replaced by ``pass`` (classes and imports kept)."""
    tree = ast.parse(code.replace("\r\n", "\n").replace("\t", "    "))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            node.body = [ast.Pass()]
    return ast.unparse(tree)


@pytest.mark.usefixtures("sandbox_ready")
def test_mbpp_empty_functions_score_zero(mbpp: list[dict[str, Any]]) -> None:
    sample = [r for r in mbpp if 11 <= r["task_id"] <= 510][::10]
    assert len(sample) == 50
    results = run_tests([_mbpp(r, code=_empty_bodies(r["code"])) for r in sample], workers=2)
    assert pass_at_1([res.passed for res in results]) == 0.0
    assert {res.status for res in results} == {"failed"}


# --- HumanEval ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("sandbox_ready")
def test_humaneval_canonical_solutions_pass_and_pass_bodies_fail() -> None:
    problems = _jsonl(DATA / "humaneval" / "HumanEval.jsonl.gz")
    assert len(problems) == 164
    canonical = [humaneval_problem(p["prompt"], p["canonical_solution"], p["test"], p["entry_point"]) for p in problems]
    stub = [humaneval_problem(p["prompt"], humaneval_completion(p["prompt"], "    pass\n", p["entry_point"]), p["test"], p["entry_point"]) for p in problems]
    results = run_tests(canonical + stub, Limits(timeout_s=60.0, cpu_s=60), workers=2)
    good, bad = results[:164], results[164:]
    assert [p["task_id"] for p, r in zip(problems, good) if not r.passed] == []
    assert [p["task_id"] for p, r in zip(problems, bad) if r.passed] == []  # no check accepts None from every call
    # A whole-function rewrite of the canonical solution scores the same as the body.
    rewritten = [
        humaneval_problem(p["prompt"], humaneval_completion(p["prompt"], f"```python\n{p['prompt']}{p['canonical_solution']}```"), p["test"], p["entry_point"])
        for p in problems[:20]
    ]
    assert all(r.passed for r in run_tests(rewritten, workers=2))
