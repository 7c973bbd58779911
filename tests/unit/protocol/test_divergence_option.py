"""``--divergence every|N|off`` (issue 23 §2): which rounds measure it, and what a round that does not records."""

from __future__ import annotations

import math

import pytest

from fedlora.aggregation import aggregate
from fedlora.bench.stats import summarize_records
from fedlora.config.run import ConfigError, RunConfig, divergence_due
from fedlora.util.jsonsafe import json_safe, measured_mean, restore_nan
from fedlora.testing.synthetic import random_clients


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


def test_a_run_measured_every_other_round_plots_and_summarises_its_measured_rounds(tmp_path, monkeypatch):
    import json

    import matplotlib.figure

    from fedlora.reporting.curves import plot_runs, summarize

    figures: list = []
    original = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    run = tmp_path / "run"
    run.mkdir()
    config = json.loads(RunConfig(task="toy", method="fedit", rounds=4, clients=4, divergence="2").to_json())
    (run / "config.json").write_text(json.dumps(config))
    divergences = [None, 0.1, None, 0.05]  # --divergence 2: rounds 1 and 3 not measured (null in metrics.jsonl)
    records = [{"round": t, "global_metric": 0.5, "divergence": d, "eckart_young_bound": None if d is None else d / 2,
                "divergence_measured": d is not None, "bytes_up": 1, "bytes_down": 1, "server_seconds": 0.1,
                "wall_seconds": 1.0, "local_metric_mean": None} for t, d in enumerate(divergences, 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plot_runs([run], tmp_path / "plots")
    curve = [line for line in figures[-1].axes[0].get_lines() if line.get_linestyle() == "-" and len(line.get_xdata())]
    assert [list(line.get_xdata()) for line in curve] == [[2, 4]]  # the measured rounds, joined by a line
    assert math.isclose(summarize(run)["divergence"], 0.075)
