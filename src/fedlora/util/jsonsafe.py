"""Strict JSON for run records: NaN and ±Inf are written as ``null``.

Python's ``json.dumps`` writes bare ``NaN``/``Infinity``, which is not JSON: ``jq``, JavaScript and
most JSON-lines tools reject the whole file. A round record holds such values where a quantity was
not measured or blew up (a skipped round's divergence, a NaN training loss), so records are made
strict before they are written: a non-finite float becomes ``null``, the JSON for "no value".
Readers that compute with a field map ``null`` back to NaN with :func:`number`, or read a whole
``metrics.jsonl`` with :func:`read_metrics`, which restores NaN in the fields that are always
numbers (so ``np.mean``/``max`` over them behave as they did with bare NaN).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# Round-record fields that are always numbers: null there can only mean "not finite" (NaN before).
# Fields where null means "not measured" (local_metric_mean, train_loss of an empty round...) stay None.
ALWAYS_NUMERIC = ("global_metric", "divergence", "eckart_young_bound", "solve_seconds", "server_seconds",
                  "wall_seconds")


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


def measured_mean(values: Any) -> float:
    """Mean of the finite values (NaN / null: not measured, e.g. ``--divergence`` every N or off); NaN if none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(finite) / len(finite) if finite else math.nan


def restore_nan(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with null read back as NaN in :data:`ALWAYS_NUMERIC` fields and in ``global`` metrics."""
    record = dict(record)
    for key in ALWAYS_NUMERIC:
        if key in record and record[key] is None:
            record[key] = math.nan
    if isinstance(record.get("global"), dict):
        record["global"] = {k: math.nan if v is None else v for k, v in record["global"].items()}
    return record


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (old files with bare NaN read too), NaN restored (:func:`restore_nan`).

    A line that is not JSON, or JSON but not an object, is a ValueError naming the file and the line: such a
    file was edited or is not a run's (one line for the user, not a traceback from deep in a report)."""
    records = []
    for number_, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}, line {number_}: not valid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number_}: a round record must be a JSON object, got "
                             f"{type(record).__name__}")
        records.append(restore_nan(record))
    return records
