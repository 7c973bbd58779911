"""Plots and tables from runs' ``metrics.jsonl``: one run's curves, or several runs side by side."""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedlora.jsonsafe import read_metrics  # noqa: E402


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
    """accuracy.png (global metric vs round) and divergence.png (with the Eckart–Young bound)."""
    return plot_runs([path], Path(path))


def _styles(runs: list[tuple[Path, dict[str, Any], list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Each run's method colour and marker; a method's second, third... run gets another line style."""
    from fedlora.bench.plots import method_style

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
    from fedlora.plot_style import integer_rounds, linear_axis, setting_title, value_axis

    out.mkdir(parents=True, exist_ok=True)
    runs = [(Path(p), *read_run(p)) for p in paths]
    metric = _metric_name(runs[0][1]) if runs else "metric"
    styles = _styles(runs)
    tasks = "/".join(dict.fromkeys(str(c.get("task", "?")) for _, c, _ in runs))
    title = setting_title(tasks, [c for _, c, _ in runs])
    written = []
    for name, key, ylabel in (("accuracy", "global_metric", f"global {metric}"), ("divergence", "divergence", "aggregation divergence")):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        values: list[float] = []
        for (path, config, records), style in zip(runs, styles):
            rounds = [r["round"] for r in records]
            ys = [r[key] for r in records]
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
    from fedlora.tasks import get_task

    return get_task(config.get("task", "sst2")).metric


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
        "divergence": float(np.mean([r["divergence"] for r in records])),
        "bound": float(np.mean([r["eckart_young_bound"] for r in records])),
        "mb_up": records[-1]["bytes_up"] / 1e6,
        "mb_down": records[-1]["bytes_down"] / 1e6,
        "server_s": float(np.mean([r["server_seconds"] for r in records])),
        "wall_s": float(sum(r["wall_seconds"] for r in records)),
    }


def _fmt(value: float) -> str:
    return "–" if value != value else f"{value:.4f}"  # NaN: not measured (no local evaluation in that run)


def compare_table(paths: Sequence[str | Path]) -> str:
    """A markdown table, one row per run."""
    rows = [summarize(p) for p in paths]
    header = "| run | method | rounds | final | best | local (last) | mean divergence | mean SVD bound | MB up/round | MB down/round | server s/round | wall s |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {Path(r['run']).name} | {r['method']} | {r['rounds']} | {r['final']:.4f} | {r['best']:.4f} | {_fmt(r['local'])} | "
            f"{r['divergence']:.4g} | {r['bound']:.4g} | {r['mb_up']:.3f} | {r['mb_down']:.3f} | {r['server_s']:.3f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)
