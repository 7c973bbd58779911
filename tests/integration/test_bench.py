"""`fedlora bench`: the quick preset end to end, skip-finished reruns, seed statistics, byte accounting."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedlora.bench import comm, get_preset, stats  # noqa: E402
from fedlora.bench.grid import completed_rounds, expand, finished_runs, run_jobs, select, slug, status  # noqa: E402
from fedlora.cli.commands import main  # noqa: E402

GLUE = Path(__file__).resolve().parents[3] / "shared" / "data" / "glue"
needs_glue = pytest.mark.skipif(not (GLUE / "RTE").is_dir(), reason=f"real GLUE files expected at {GLUE}")


def record(round_: int, metric: float, local: float | None = None, divergence: float = 0.5) -> dict:
    return {"round": round_, "clients": ["client-0", "client-1"], "global_metric": metric, "local_metric_mean": local,
            "divergence": divergence, "eckart_young_bound": divergence / 2, "lora_bytes_up": 2_000_000,
            "lora_bytes_down": 4_000_000, "server_seconds": 0.1, "wall_seconds": 3.0}


def test_run_summary_and_mean_std_over_seeds_on_hand_made_records():
    a = stats.summarize_records([record(1, 0.5, 0.7, 0.2), record(2, 0.6, None, 0.4), record(3, 0.55, 0.75, 0.6)])
    assert a["final"] == 0.55 and a["best"] == 0.6
    assert a["local"] == pytest.approx(0.725)  # only rounds that evaluated locally
    assert a["gap"] == pytest.approx(((0.7 - 0.5) + (0.75 - 0.55)) / 2)  # against the same rounds' global
    assert a["divergence"] == pytest.approx(0.4) and a["bound"] == pytest.approx(0.2)
    assert a["mb_up"] == 2.0 and a["mb_down"] == 4.0
    finals = [0.55, 0.61, 0.70]
    runs = [{**a, "final": f, "task": "sst2", "label": "fedit", "seed": s} for s, f in enumerate(finals)]
    runs.append({**a, "task": "sst2", "label": "svd", "seed": 0})
    rows = stats.aggregate_rows(runs)
    assert [(r["label"], r["n"]) for r in rows] == [("fedit", 3), ("svd", 1)]
    assert rows[0]["final"] == pytest.approx(statistics.fmean(finals))
    assert rows[0]["final_std"] == pytest.approx(statistics.stdev(finals))  # sample std, ddof=1
    assert math.isnan(rows[1]["final_std"])  # one seed: no spread claimed
    table = stats.markdown_table(rows, {"sst2": "accuracy"})
    assert f"{statistics.fmean(finals):.4f} ± {statistics.stdev(finals):.4f}" in table
    assert "| sst2 (accuracy) | svd | 1 | 0.5500 |" in table


def test_llm_runs_get_loss_columns_and_paired_loss_differences_glue_runs_do_not():
    def run(label: str, seed: int, loss: float) -> dict:
        records = [{**record(1, 0.0, 0.0), "global": {"loss": loss + 0.1}, "local_loss_mean": loss + 0.2},
                   {**record(2, 0.0, 0.0), "global": {"loss": loss}, "local_loss_mean": loss + 0.1}]
        return {**stats.summarize_records(records), "task": "gsm8k", "label": label, "seed": seed}

    runs = [run("fedit", 0, 1.30), run("fedit", 1, 1.20), run("flora-na", 0, 1.25), run("flora-na", 1, 1.21)]
    assert runs[0]["final_loss"] == 1.30 and runs[0]["local_loss"] == pytest.approx(1.45)
    table = stats.markdown_table(stats.aggregate_rows(runs), {"gsm8k": "exact_match"})
    assert "final loss" in table and "1.2500 ± 0.0707" in table
    paired = stats.paired_rows(runs)
    assert paired[0]["d_final_loss"] == pytest.approx(-0.02) and paired[0]["loss_wins"] == 1  # lower on seed 0 only
    assert "Δ final loss vs fedit" in stats.paired_table(paired, {"gsm8k": "exact_match"})
    glue = [{**stats.summarize_records([record(1, 0.5)]), "task": "sst2", "label": "fedit", "seed": 0}]
    assert "loss" not in stats.markdown_table(stats.aggregate_rows(glue), {"sst2": "accuracy"})


def test_closed_form_bytes_equal_round_bytes_at_paper_shapes():
    rows = {(r["model"], r["method"]): r for r in comm.formula_rows(list(comm.CLOSED_FORM))}  # asserts inside
    fedit = rows[("RoBERTa-large", "fedit")]
    assert fedit["mb_up"] == pytest.approx(48 * 2 * 16 * 1024 * 10 * 4 / 1e6)
    assert rows[("LLaMA-2-7B", "flora-na")] == {**rows[("LLaMA-2-7B", "fedit")], "method": "flora-na"}
    assert rows[("RoBERTa-large", "flora")]["mb_down"] == pytest.approx(10 * fedit["mb_down"])


def test_slugs_and_selection():
    assert slug("flora-na (adamw 50)") == "flora-na_adamw_50"
    assert slug("fedit [alpha=0.1]") == "fedit_alpha-0.1"
    preset = select(get_preset("headline"), ["sst2"], ["fedit", "flora-na_adamw"], [0])
    assert [v.label for v in preset.methods] == ["fedit", "flora-na (adamw)"] and preset.tasks == ("sst2",)
    with pytest.raises(ValueError, match="no method"):
        select(get_preset("headline"), None, ["nope"], None)


@pytest.mark.slow
@needs_glue
def test_quick_preset_end_to_end_then_rerun_skips_finished_runs(tmp_path, capsys):
    out = tmp_path / "quick"
    assert main(["bench", "--preset", "quick", "--data-dir", str(GLUE), "--out", str(out)]) == 0
    for name in ("results.md", "results.csv", "runs.csv", "global_metric.png", "divergence.png", "local_vs_global.png",
                 "frontier.png"):
        assert (out / name).stat().st_size > 0, name
    preset = get_preset("quick")
    jobs = expand(preset, out, str(GLUE))
    assert all(status(job) == "done" and completed_rounds(job.path) == job.config.rounds for job in jobs)
    assert (out / "runs" / "rte" / "flora-na" / "seed0" / "metrics.jsonl").is_file()
    with (out / "results.csv").open() as f:
        labels = [row["label"] for row in csv.DictReader(f)]
    assert labels == [v.label for v in preset.methods]
    text = (out / "results.md").read_text()
    assert "fedlora bench --preset quick" in text and "matched the closed form exactly" in text
    # Measured bytes of every real run == round_bytes == closed form at MiniLM shapes.
    for job in jobs:
        rows = comm.check_measured(job.path)
        assert rows and rows[0]["shape"] == "r=8 d=384 k=384" and rows[0]["modules"] == 12

    # Second invocation: nothing retrains (the runner is never called) and no metrics file is rewritten.
    mtimes = {job.path: (job.path / "metrics.jsonl").stat().st_mtime_ns for job in jobs}
    calls = []
    counts = run_jobs(jobs, 0.35, runner=lambda *a, **k: calls.append(a))
    assert counts == {"skipped": len(jobs), "resumed": 0, "new": 0, "reused": 0} and calls == []
    assert main(["bench", "--preset", "quick", "--data-dir", str(GLUE), "--out", str(out)]) == 0
    assert "0 new, 0 resumed, 0 reused, 3 skipped" in capsys.readouterr().out
    assert {job.path: (job.path / "metrics.jsonl").stat().st_mtime_ns for job in jobs} == mtimes

    # --reuse: another grid holding the same configs copies them (byte-identical metrics, its own
    # config.json); only the config that differs (a changed lr) would need training.
    other = tmp_path / "other"
    reused_jobs = expand(preset, other, str(GLUE))
    changed = expand(select(preset, None, ["fedit"], None), tmp_path / "changed", str(GLUE), {"lr": 0.01})
    calls = []
    counts = run_jobs(reused_jobs + changed, 0.35, runner=lambda config, **k: calls.append(config),
                      reuse=finished_runs([out]), log=lambda line: None)
    assert counts == {"skipped": 0, "resumed": 0, "new": 1, "reused": len(jobs)}
    assert [c.lr for c in calls] == [0.01]
    for job, copy in zip(jobs, reused_jobs):
        assert (copy.path / "metrics.jsonl").read_bytes() == (job.path / "metrics.jsonl").read_bytes()
        assert status(copy) == "done" and '"out": "%s"' % copy.path in (copy.path / "config.json").read_text()
    assert not list(other.glob("runs/*/*/*.copying"))
    with pytest.raises(ValueError, match="no such results directory"):
        finished_runs([tmp_path / "missing"])

    # --workers 2: the same grid in two spawned processes with one torch thread each gives the numbers
    # of the sequential run above to float rounding (another thread count sums in another order), and
    # the report says how it ran.
    parallel = tmp_path / "parallel"
    assert main(["bench", "--preset", "quick", "--data-dir", str(GLUE), "--out", str(parallel), "--workers", "2"]) == 0
    assert "3 new, 0 resumed, 0 reused, 0 skipped" in capsys.readouterr().out
    assert "with 2 runs at a time" in (parallel / "results.md").read_text()
    for job, twin in zip(jobs, expand(preset, parallel, str(GLUE))):
        assert _close(_without_timings(twin.path), _without_timings(job.path)), job.label


def _close(a: object, b: object, rel: float = 1e-5) -> bool:
    """Equal structure and non-float values; floats equal to ``rel`` (pytest.approx does not nest)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)
    return a == b


def _without_timings(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in records]


@pytest.mark.slow
@needs_glue
def test_parallel_grid_names_the_failed_run(tmp_path, capsys):
    preset = select(get_preset("quick"), None, ["fedit", "svd"], None)
    empty = tmp_path / "glue-without-rte"  # exists, so the config is valid; the run fails at loading
    empty.mkdir()
    jobs = expand(preset, tmp_path, str(empty))
    with pytest.raises(RuntimeError, match=r"rte (fedit|svd) seed0 failed .*RTE"):
        run_jobs(jobs, 0.35, workers=2, log=lambda line: None)
    assert main(["bench", "--preset", "quick", "--data-dir", str(GLUE), "--out", str(tmp_path / "w0"), "--workers", "0"]) == 2
    assert "--workers must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
@needs_glue
def test_interrupted_run_resumes_and_a_changed_config_is_refused(tmp_path):
    preset = select(get_preset("quick"), None, ["fedit"], None)
    [job] = expand(preset, tmp_path, str(GLUE), {"rounds": 2})
    from fedlora.engines.local import run

    run(job.config.replace(rounds=1), progress=False)  # as if killed after round 1 (checkpoint on disk)
    (job.path / "config.json").write_text(job.config.to_json())  # the grid wrote the 2-round config
    assert status(job) == "resume"
    seen = []
    counts = run_jobs([job], 0.35, runner=lambda config, resume, progress: seen.append(resume) or run(config, resume=resume, progress=False))
    assert counts["resumed"] == 1 and seen == [True] and completed_rounds(job.path) == 2
    [other] = expand(preset, tmp_path, str(GLUE), {"rounds": 2, "lr": 0.01})
    with pytest.raises(ValueError, match="different"):
        status(other)


def test_paired_differences_match_by_task_setting_and_seed():
    def run(label: str, seed: int, final: float, divergence: float = 0.1, task: str = "sst2") -> dict:
        return {"task": task, "label": label, "seed": seed, "final": final, "best": final + 0.1, "divergence": divergence}

    runs = [run("fedit", 0, 0.50), run("fedit", 1, 0.60), run("flora-na", 0, 0.55, 0.05), run("flora-na", 1, 0.60, 0.07),
            run("flora-na", 2, 0.99),  # no fedit seed 2: unpaired, must not count
            run("fedit [alpha=0.1]", 0, 0.70), run("svd [alpha=0.1]", 0, 0.65),
            run("fedit", 0, 0.10, task="rte"), run("svd", 0, 0.20, task="rte")]
    rows = {(r["task"], r["label"]): r for r in stats.paired_rows(runs)}
    assert set(rows) == {("sst2", "flora-na"), ("sst2", "svd [alpha=0.1]"), ("rte", "svd")}
    na = rows[("sst2", "flora-na")]
    assert na["n"] == 2 and (na["wins"], na["ties"], na["losses"]) == (1, 1, 0)
    assert na["d_final"] == pytest.approx(0.025) and na["d_divergence"] == pytest.approx(-0.04)
    assert rows[("sst2", "svd [alpha=0.1]")]["d_final"] == pytest.approx(-0.05)  # against fedit [alpha=0.1], not fedit
    assert rows[("rte", "svd")]["d_final"] == pytest.approx(0.1)
    table = stats.paired_table(list(rows.values()), {"sst2": "accuracy"})
    assert "| sst2 (accuracy) | flora-na | 2 | +0.0250 ± 0.0354 |" in table and "| 1 / 1 / 0 |" in table


def test_gap_closed_is_zero_at_fedit_one_at_svd_and_pairs_by_setting_and_seed():
    def run(label: str, seed: int, divergence: float, objectives: list[tuple[float, float]] = ()) -> dict:
        records = [{"objective": o, "objective_fedit": f} for o, f in objectives]
        return {"task": "sst2", "label": label, "seed": seed, "divergence": divergence, "records": records}

    runs = [run("fedit", 0, 0.30), run("svd", 0, 0.10), run("fedit", 1, 0.20), run("svd", 1, 0.10),
            run("flora-na", 0, 0.25, [(0.5, 1.0), (0.9, 1.0)]), run("flora-na", 1, 0.20, [(1.2, 1.0)]),
            run("flora-na", 2, 0.01),  # no fedit/svd for seed 2: must not count
            run("flora", 0, 1e-17), run("flora", 1, 0.0),
            run("fedit [r=4]", 0, 0.40), run("svd [r=4]", 0, 0.20), run("flora-na [r=4]", 0, 0.20)]
    rows = {r["label"]: r for r in stats.gap_rows(runs)}
    assert set(rows) == {"flora-na", "flora", "flora-na [r=4]"}  # fedit and svd are the yardsticks
    na = rows["flora-na"]
    assert na["n"] == 2 and na["closed"] == pytest.approx((0.25 + 0.0) / 2)  # 25 % on seed 0, 0 % (= FedIT) on seed 1
    assert (na["rounds_not_worse"], na["rounds"], na["median_ratio"]) == (2, 3, pytest.approx(0.9))
    assert rows["flora-na [r=4]"]["closed"] == pytest.approx(1.0)  # against its own setting's fedit/svd
    assert rows["flora"]["exact"] and not na["exact"]
    table = stats.gap_table(list(rows.values()), {"sst2": "accuracy"})
    assert "| sst2 (accuracy) | flora-na | 2 | 12 ± 18 % | 2 / 3 | 0.90 |" in table
    assert "| flora | 2 | exact (divergence ≈ 0) | – | – |" in table


def test_a_run_saved_before_an_option_existed_is_the_same_experiment_at_that_options_default():
    """config.json files written before e.g. --client-ranks existed still match (and --reuse) today's configs."""
    from fedlora.bench.grid import _config_key
    from fedlora.config.run import RunConfig

    config = RunConfig(task="rte", method="fedit", rounds=2)
    saved = json.loads(config.to_json())
    del saved["client_ranks"], saved["rank_map"]  # as written by an older fedlora
    assert _config_key(json.dumps(saved)) == _config_key(config.to_json())
    saved["rank_map"] = "svd"  # an option that was set differently is still a different experiment
    assert _config_key(json.dumps(saved)) != _config_key(config.to_json())


def test_client_batching_benchmark_prints_every_k_and_the_limit(capsys) -> None:
    """benchmarks/client_batching.py at toy size: one row per K plus the single-adapter limit, all measured."""
    import importlib.util

    path = Path(__file__).parents[2] / "benchmarks" / "client_batching.py"
    spec = importlib.util.spec_from_file_location("client_batching_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--model", "tiny-bert", "--clients", "2", "--steps", "1", "--batch", "2", "--seq", "8",
                        "--threads", "1"])
    assert [r["k"] for r in rows] == [1, 2, "one adapter ×2"]
    assert all(r["seconds"] > 0 and r["client_steps_s"] > 0 for r in rows)
    assert "| one adapter ×2 |" in capsys.readouterr().out
