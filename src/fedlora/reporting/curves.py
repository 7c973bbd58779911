"""Plots and tables from runs' ``metrics.jsonl``: one run's curves, or several runs side by side.

Plots are named and labelled by the metric they show (``global_exact_match.png``, y axis "global
exact_match"), the main metric as the run's task was configured (``--task instruct --exact-match``:
exact_match, not the registered token_accuracy). A decoder-LLM run's main metric often stays at 0 for
a small model while its test loss and token accuracy move, so those are plotted too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedlora.util.jsonsafe import measured_mean, read_metrics  # noqa: E402


def read_run(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(config, per-round records) of a run directory."""
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} not found: is {path} the --out directory of a fedlora run?")
    config: Any = {}
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except ValueError as exc:
            raise ValueError(f"{path / 'config.json'}: not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path / 'config.json'}: a run's config must be a JSON object, got "
                             f"{type(config).__name__}")
    return config, read_metrics(metrics)  # null (a non-finite value) read back as NaN


def _label(config: dict[str, Any], path: Path) -> str:
    options = config.get("method_options") if isinstance(config.get("method_options"), dict) else {}
    extra = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
    return f"{config.get('method', path.name)}{f' ({extra})' if extra else ''}"


def plot_run(path: str | Path) -> list[Path]:
    """``global_<metric>.png`` per plotted metric (:func:`plotted_metrics`) and divergence.png (with the
    Eckart–Young bound)."""
    return plot_runs([path], Path(path))


EXTRA_METRICS = ("loss", "token_accuracy")  # a causal-LM evaluation's teacher-forced metrics: they move first


def plot_file_name(metric: str) -> str:
    """``global_<metric>.png`` with a file-safe metric name (pass@1: ``global_pass_at_1.png``)."""
    return "global_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", metric.replace("@", "_at_")) + ".png"


def plotted_metrics(config: dict[str, Any], records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(metric name, record key) per global-metric plot: the main metric (key ``global_metric``), then each of
    :data:`EXTRA_METRICS` the records' ``global`` dicts hold (key ``global/<name>``)."""
    seen = {k for r in records if isinstance(r.get("global"), dict) for k in r["global"]}
    main = _metric_name(config)
    if seen and main not in seen and "token_accuracy" in seen:
        main = "token_accuracy"  # a causal-LM run that did not generate: main falls back to it (CausalLMTask.evaluate)
    return [(main, "global_metric"), *((m, f"global/{m}") for m in EXTRA_METRICS if m in seen and m != main)]


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def _values(records: list[dict[str, Any]], key: str) -> list[float]:
    if key.startswith("global/"):
        name = key.removeprefix("global/")
        return [float("nan") if (g := r.get("global")) is None or g.get(name) is None else g[name] for r in records]
    return [r[key] for r in records]


def _styles(runs: list[tuple[Path, dict[str, Any], list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Each run's method colour and marker; a method's second, third... run gets another line style."""
    from fedlora.reporting.style import method_style

    seen: dict[str, int] = {}
    styles = []
    for path, config, _ in runs:
        method = str(config.get("method", path.name))
        repeat = seen[method] = seen.get(method, -1) + 1
        styles.append({**method_style(method), "ls": ("-", ":", "-.", (0, (5, 1)))[repeat % 4]})
    return styles


def plot_runs(paths: Sequence[str | Path], out: Path, prefix: str = "") -> list[Path]:
    """Overlaid curves of runs: global metric and divergence per round, the SVD bound dashed in each
    run's colour; log divergence axis with labelled ticks, integer rounds, task and setting in the title."""
    from fedlora.reporting.style import SIGNED_METRICS, integer_rounds, linear_axis, nonnegative_axis, setting_title, value_axis

    out.mkdir(parents=True, exist_ok=True)
    runs = [(Path(p), *read_run(p)) for p in paths]
    metrics = plotted_metrics(runs[0][1], runs[0][2]) if runs else [("metric", "global_metric")]
    styles = _styles(runs)
    tasks = "/".join(dict.fromkeys(str(c.get("task", "?")) for _, c, _ in runs))
    title = setting_title(tasks, [c for _, c, _ in runs])
    plots = [(plot_file_name(name).removesuffix(".png"), key, f"global {name}", name) for name, key in metrics]
    written = []
    for name, key, ylabel, metric in [*plots, ("divergence", "divergence", "aggregation divergence", "divergence")]:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        values: list[float] = []
        for (path, config, records), style in zip(runs, styles):
            if key == "divergence":  # only the rounds that measured it: --divergence N would otherwise draw no line
                records = [r for r in records if _finite(r.get("divergence"))]
            rounds = [r["round"] for r in records]
            ys = _values(records, key)
            values += ys
            ax.plot(rounds, ys, ms=5, lw=1.5, label=_label(config, path), **style)
            if key == "divergence":
                bound = [r["eckart_young_bound"] for r in records]
                values += bound
                ax.plot(rounds, bound, ls="--", lw=1, color=style["color"], alpha=0.7)
        if key == "divergence":
            ylabel = value_axis(ax, values, ylabel)
            ax.plot([], [], ls="--", color="grey", label="SVD (Eckart–Young) bound, in the method's colour")
        else:
            linear_axis(ax)
            if metric not in SIGNED_METRICS:
                nonnegative_axis(ax, values)
        integer_rounds(ax)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="major")
        ax.legend(fontsize=7)
        fig.tight_layout()
        target = out / f"{prefix}{name}.png"
        fig.savefig(target, dpi=120)
        plt.close(fig)
        written.append(target)
    return written


def _metric_name(config: dict[str, Any]) -> str:
    """The main metric of the run's task as the run configured it (Task.configure), else as registered."""
    from fedlora.config.run import RunConfig
    from fedlora.tasks import get_task, task_for

    known = {f.name for f in dataclasses.fields(RunConfig)} - {"data_dir", "model"}  # paths of another machine
    try:
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in known}
        return task_for(RunConfig(**fields)).metric
    except (TypeError, ValueError):  # an older or edited config.json (ConfigError is a ValueError)
        try:
            return get_task(str(config.get("task", "sst2"))).metric
        except ValueError:  # a task registered by code not imported here
            return "metric"


def summarize(path: str | Path) -> dict[str, Any]:
    config, records = read_run(path)
    if not records:
        raise ValueError(f"{path} has no completed rounds yet")
    try:
        return _summary(path, config, records)
    except KeyError as exc:  # an edited or foreign file: name it, not only the missing key
        raise ValueError(f"{Path(path) / 'metrics.jsonl'}: a round record has no {exc} field") from None
    except TypeError as exc:
        raise ValueError(f"{Path(path) / 'metrics.jsonl'}: a round record has a field of the wrong type "
                         f"({exc})") from None


def _summary(path: str | Path, config: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    locals_ = [r["local_metric_mean"] for r in records if r.get("local_metric_mean") is not None]
    return {
        "run": str(path),
        "method": _label(config, Path(path)),
        "rounds": len(records),
        "final": records[-1]["global_metric"],
        "best": max(r["global_metric"] for r in records),
        "local": locals_[-1] if locals_ else float("nan"),
        # over the rounds that measured it (--divergence every N / off leave the others NaN)
        "divergence": measured_mean(r["divergence"] for r in records),
        "bound": measured_mean(r["eckart_young_bound"] for r in records),
        "mb_up": records[-1]["bytes_up"] / 1e6,
        "mb_down": records[-1]["bytes_down"] / 1e6,
        "server_s": float(np.mean([r["server_seconds"] for r in records])),
        "wall_s": float(sum(r["wall_seconds"] for r in records)),
    }


def _fmt(value: float) -> str:
    return "–" if value != value else f"{value:.4f}"  # NaN: not measured (no local evaluation in that run)


def compare_table(paths: Sequence[str | Path]) -> str:
    """A markdown table, one row per run; "local (last)" only when some run evaluated its clients locally
    (``--eval-local-every``): the demo never does, and its column was always empty."""
    rows = [summarize(p) for p in paths]
    columns: list[tuple[str, Any]] = [
        ("run", lambda r: Path(r["run"]).name), ("method", lambda r: r["method"]), ("rounds", lambda r: r["rounds"]),
        ("final", lambda r: f"{r['final']:.4f}"), ("best", lambda r: f"{r['best']:.4f}"),
        ("local (last)", lambda r: _fmt(r["local"])), ("mean divergence", lambda r: f"{r['divergence']:.4g}"),
        ("mean SVD bound", lambda r: f"{r['bound']:.4g}"), ("MB up/round", lambda r: f"{r['mb_up']:.3f}"),
        ("MB down/round", lambda r: f"{r['mb_down']:.3f}"), ("server s/round", lambda r: f"{r['server_s']:.3f}"),
        ("wall s", lambda r: f"{r['wall_s']:.0f}"),
    ]
    if all(r["local"] != r["local"] for r in rows):  # NaN everywhere: no run measured it
        columns = [c for c in columns if c[0] != "local (last)"]
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell(r)) for _, cell in columns) + " |" for r in rows]
    return "\n".join(lines)
