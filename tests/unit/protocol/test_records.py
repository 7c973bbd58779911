"""metrics.jsonl is strict JSON, and every reader takes its nulls: a skipped round must not break a report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from fedlora.aggregation import ClientUpdate, LoraPair
from fedlora.bench.stats import summarize_records
from fedlora.protocol.client import ClientResult
from fedlora.util.jsonsafe import json_safe, read_metrics
from fedlora.protocol.records import round_record
from fedlora.reporting.curves import compare_table, plot_runs


def _record(round_: int, skipped: bool) -> dict:
    pair = LoraPair(A=torch.zeros(2, 3), B=torch.zeros(4, 2))
    result = ClientResult(update=ClientUpdate({"m": pair}, 5, "c0"), head={}, loss=0.5, local_metrics=None)
    agg = {"divergence": math.nan if skipped else 0.1, "eckart_young_bound": math.nan if skipped else 0.05,
           "solve_seconds": 0.0, "bytes_up": 0, "bytes_down": 0, "rejected": [], "skipped": skipped}
    if skipped:
        agg["reason"] = "the aggregated adapter is not finite in float32 (module 'm', B)"
    else:
        agg["clipped"] = [{"client": "c0", "norm": 9.0, "bound": 3.0}]
    record = round_record(round_, [result], agg, {"main": 0.5 + round_ / 10}, 0.1, {})
    record["wall_seconds"] = 1.0  # added by the engine after the record is built
    return json_safe(record)


def _write_run(path: Path, records: list[dict]) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"task": "toy", "method": "fedit", "clients": 1, "rounds": 2}))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
    return path


def test_a_skipped_round_records_why_and_clipped_clients_are_named() -> None:
    skipped, clipped = _record(1, skipped=True), _record(2, skipped=False)
    assert skipped["skipped"] and "not finite" in skipped["skip_reason"]
    assert skipped["divergence"] is None  # strict JSON: null, never a bare NaN
    assert clipped["skip_reason"] is None and clipped["clipped"] == [{"client": "c0", "norm": 9.0, "bound": 3.0}]


def test_reports_read_a_run_whose_divergence_is_null(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run", [_record(1, skipped=True), _record(2, skipped=False)])
    records = read_metrics(run / "metrics.jsonl")
    assert math.isnan(records[0]["divergence"]) and records[1]["divergence"] == 0.1
    assert "| run |" in compare_table([run])  # raised TypeError on null before
    assert math.isfinite(summarize_records(records)["final"])
    assert all(p.is_file() for p in plot_runs([run], tmp_path, prefix="cmp_"))

