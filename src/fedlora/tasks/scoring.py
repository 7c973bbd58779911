"""Scoring generated answers: GSM8K exact match of the final number; MBPP / HumanEval programs for pass@1.

Pure string functions (no torch, nothing executed here). Code is run by :mod:`fedlora.sandbox`, never in-process:
build the problem with :func:`mbpp_problem` / :func:`humaneval_problem` (the candidate's code apart from the trusted
tests), score it with :func:`fedlora.sandbox.run_tests`, and the ``passed`` flags with :func:`pass_at_1`.

Numbers are normalised so that "1,200", "1200.00" and "$1200" compare equal: commas between digit groups are
dropped, trailing fractional zeros removed ("5.0" -> "5", "1234.50" -> "1234.5"), a leading minus kept.
"""

from __future__ import annotations

import ast
import builtins
import math
import re
import warnings
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

from fedlora.sandbox.harness import TestProblem

# An optional minus, then digits in comma groups ("1,000,000") or plain ("1000"), then an optional fraction.
# "3,4" is two numbers (3 and 4), not 34: commas only join groups of exactly three digits.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3", "py3"}


def _normalise(number: str) -> str:
    """Canonical text of one matched number: no commas, no trailing fractional zeros, "-0" -> "0"."""
    try:
        value = Decimal(number.replace(",", ""))
    except InvalidOperation as exc:
        raise ValueError(f"not a number: {number!r}") from exc
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _numbers(text: str) -> list[str]:
    """Every number in ``text``, normalised. A '-' right after a letter or digit ("10-5") is a hyphen, not a sign."""
    found = []
    for match in _NUMBER.finditer(text):
        number = match.group()
        if number.startswith("-") and match.start() > 0 and text[match.start() - 1].isalnum():
            number = number[1:]
        found.append(_normalise(number))
    return found


def gsm8k_reference(answer: str) -> str:
    """The reference of a GSM8K worked solution: the number after its last '####', normalised."""
    if "####" not in answer:
        raise ValueError("a GSM8K answer ends with '#### <number>'; this one has no '####'")
    numbers = _numbers(answer.rsplit("####", 1)[1])
    if not numbers:
        raise ValueError(f"no number after '####' in {answer[-80:]!r}")
    return numbers[0]


def last_number(text: str) -> str | None:
    """The model's final answer: the last number of ``text``, normalised; None if it has no number.

    When the text has a '####' (the GSM8K answer format the model was trained on), the first number after the
    last '####' wins over anything later (models often keep talking after the answer line). Fractions are not
    evaluated: "3/4" yields "4", its last number. "$18.00" -> "18", "1,000,000" -> "1000000".
    """
    if "####" in text:
        after = _numbers(text.rsplit("####", 1)[1])
        if after:
            return after[0]
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def numbers_equal(a: str | None, b: str) -> bool:
    """Whether two normalised numbers are equal within 1e-6 (relative for large magnitudes); None is never equal."""
    if a is None:
        return False
    x, y = float(a), float(b)
    return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-6)


def extract_code(generation: str) -> str:
    """The code in a model answer: the first ```python fenced block, else the first fenced block of any kind
    (an unclosed fence, as when generation stopped at max tokens, runs to the end), else the text itself."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(generation)]
    for tag, body in blocks:
        if tag in _PYTHON_TAGS:
            return body
    return blocks[0][1] if blocks else generation


def _crlf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def mbpp_problem(code: str, test_setup_code: str, test_list: Sequence[str],
                 shadows: Sequence[str] = ()) -> TestProblem:
    """An MBPP candidate and its tests: the asserts run in the judge; the setup code (which builds inputs from the
    candidate's own classes, e.g. a tree of ``Node``) runs after the code in the candidate's namespace.
    ``shadows``: the built-in names the reference solution redefines (:func:`shadowed_builtins`), which the tests
    then take from the candidate (task 126 asks for a function called ``sum``); every other built-in stays real."""
    return TestProblem(candidate=_crlf(code).rstrip() + "\n", setup=_crlf(test_setup_code).strip(),
                       test="\n".join(_crlf(t).strip() for t in test_list) + "\n", candidate_builtins=tuple(shadows))


def shadowed_builtins(code: str) -> list[str]:
    """Built-in names that ``code`` defines at its top level (functions, classes, assignments), sorted."""
    try:
        with warnings.catch_warnings():  # old references hold invalid escapes such as "\w" in plain strings
            warnings.simplefilter("ignore")
            tree = ast.parse(_crlf(code))
    except SyntaxError:
        return []
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return sorted(n for n in names if hasattr(builtins, n))


def _entry_point_of(prompt: str) -> str:
    names = re.findall(r"^def\s+(\w+)\s*\(", prompt, re.MULTILINE)
    if not names:
        raise ValueError("the HumanEval prompt defines no function")
    return names[-1]


def humaneval_completion(prompt: str, generation: str, entry_point: str | None = None) -> str:
    """Turn a model answer into a completion to append after the HumanEval ``prompt``.

    The rule: take :func:`extract_code` of the answer. If it defines the entry point at top level (the model
    rewrote the whole function, imports and helpers included), return it on fresh lines: appended after the
    prompt, it redefines the prompt's function, which is valid Python since a docstring alone is a function body,
    and the prompt's imports and helpers stay available. Otherwise it is the body that continues the prompt and is
    returned as is. ``entry_point`` defaults to the last function the prompt defines.
    """
    code = _crlf(extract_code(generation))
    entry = entry_point or _entry_point_of(prompt)
    if re.search(rf"^def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
        return "\n\n" + code.strip("\n") + "\n"
    return code


def humaneval_problem(prompt: str, completion: str, test: str, entry_point: str) -> TestProblem:
    """A HumanEval candidate (prompt + completion) and its tests: the judge runs the prompt's helpers and the test's
    ``check`` in its own namespace and calls ``check`` with the candidate's ``entry_point``."""
    return TestProblem(candidate=f"{_crlf(prompt)}{_crlf(completion)}\n", test=_crlf(test), prompt=_crlf(prompt),
                       entry_point=entry_point)


def pass_at_1(results: Sequence[bool]) -> float:
    """The share of problems whose (single) sample passed. Empty input is an error, not 0: nothing was scored."""
    if not results:
        raise ValueError("pass@1 of no results is undefined")
    return sum(bool(r) for r in results) / len(results)
