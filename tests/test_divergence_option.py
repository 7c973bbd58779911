"""``--divergence every|N|off`` (issue 23 §2): which rounds measure it, and what a round that does not records."""

from __future__ import annotations

import math

import pytest

from fedlora.aggregation import aggregate
from fedlora.bench.stats import summarize_records
from fedlora.config import ConfigError, RunConfig, divergence_due
from fedlora.jsonsafe import json_safe, measured_mean, restore_nan
from fedlora.synthetic import random_clients


def test_every_n_measures_multiples_of_n_and_the_last_round():
    assert [r for r in range(1, 8) if divergence_due("3", r, 7)] == [3, 6, 7]
    assert all(divergence_due("every", r, 7) for r in range(1, 8))
    assert not any(divergence_due("off", r, 7) for r in range(1, 8))


@pytest.mark.parametrize("value", ["0", "-2", "sometimes", "2.5", ""])
def test_bad_settings_are_refused_by_name(value):
    with pytest.raises(ConfigError, match="--divergence"):
        RunConfig(divergence=value)


def test_default_is_every_round_and_n_is_accepted():
    assert RunConfig().divergence == "every"
    assert RunConfig(divergence="4").divergence == "4"


def test_unmeasured_round_records_null_and_the_aggregate_is_unchanged():
    g, ups = random_clients({"m": (6, 5)}, 2, 4)
    measured = aggregate("fedit", g, ups)
    skipped = aggregate("fedit", g, ups, measure_divergence=False)
    assert math.isfinite(measured.metrics["divergence"]) and measured.metrics["divergence_measured"]
    assert math.isnan(skipped.metrics["divergence"]) and not skipped.metrics["divergence_measured"]
    assert json_safe(skipped.metrics["divergence"]) is None  # metrics.jsonl: null, strict JSON
    assert (skipped.adapter["m"].A == measured.adapter["m"].A).all()


def test_readers_average_over_the_measured_rounds_only():
    assert measured_mean([0.5, None, float("nan"), 0.25]) == 0.375
    assert math.isnan(measured_mean([None, None]))
    records = [restore_nan({"round": r, "global_metric": 0.5, "divergence": d, "eckart_young_bound": d,
                            "lora_bytes_up": 1, "lora_bytes_down": 1, "server_seconds": 0.1, "wall_seconds": 1.0})
               for r, d in ((1, None), (2, 0.2), (3, None), (4, 0.4))]
    summary = summarize_records(records)  # the bench table's "mean divergence"
    assert math.isclose(summary["divergence"], 0.3) and math.isclose(summary["bound"], 0.3)
