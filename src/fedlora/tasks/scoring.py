"""Scoring generated answers: GSM8K exact match of the final number; MBPP / HumanEval programs for pass@1.

Pure string functions (no torch, nothing executed here). Code is run by :mod:`fedlora.sandbox`, never in-process:
build the program with :func:`mbpp_program` / :func:`humaneval_program`, run it with
:func:`fedlora.sandbox.run_programs`, and score the ``passed`` flags with :func:`pass_at_1`.

Numbers are normalised so that "1,200", "1200.00" and "$1200" compare equal: commas between digit groups are
dropped, trailing fractional zeros removed ("5.0" -> "5", "1234.50" -> "1234.5"), a leading minus kept.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

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


def mbpp_program(code: str, test_setup_code: str, test_list: Sequence[str]) -> str:
    """The program that scores MBPP code: the code, the setup code, then each assert (line ends normalised)."""
    parts = [_crlf(code).rstrip(), _crlf(test_setup_code).rstrip(), *(_crlf(t).strip() for t in test_list)]
    return "\n\n".join(p for p in parts if p) + "\n"


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


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program that scores a HumanEval completion: prompt + completion + the test's ``check`` + the call."""
    return f"{_crlf(prompt)}{_crlf(completion)}\n\n{_crlf(test)}\n\ncheck({entry_point})\n"


def pass_at_1(results: Sequence[bool]) -> float:
    """The share of problems whose (single) sample passed. Empty input is an error, not 0: nothing was scored."""
    if not results:
        raise ValueError("pass@1 of no results is undefined")
    return sum(bool(r) for r in results) / len(results)
