"""Strict JSON for run records: NaN and ±Inf are written as ``null``.

Python's ``json.dumps`` writes bare ``NaN``/``Infinity``, which is not JSON: ``jq``, JavaScript and
most JSON-lines tools reject the whole file. A round record holds such values where a quantity was
not measured or blew up (a skipped round's divergence, a NaN training loss), so records are made
strict before they are written: a non-finite float becomes ``null``, the JSON for "no value".
Readers that compute with a field map ``null`` back to NaN with :func:`number`.
"""

from __future__ import annotations

import math
from typing import Any


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (nested in dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def make_json_safe(records: list[dict[str, Any]]) -> None:
    """Replace, in place, each record of ``records`` by its :func:`json_safe` form.

    In place because the engine's history list is shared: the checkpoint metadata and the
    ``metrics.jsonl`` rewritten from the same list must both be strict JSON.
    """
    for i, record in enumerate(records):
        records[i] = json_safe(record)


def number(value: Any) -> float:
    """A record's numeric field as a float: ``null`` (not measured, or not finite) reads as NaN."""
    return math.nan if value is None else float(value)
