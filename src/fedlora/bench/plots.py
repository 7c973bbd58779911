"""The benchmark's figures, one panel per task, curves averaged over seeds (shaded: ± one std).

global_metric.png   global metric vs round per method
divergence.png      aggregation divergence vs round per method, dashed: that method's Eckart–Young
                    bound (the best any rank-r aggregate could do with the same client updates;
                    the paper's Figure 2 plus the oracle reviewers asked for)
local_vs_global.png final global metric vs mean local metric per method (bars, error bars = std)
frontier.png        accuracy per byte: final global metric (mean ± std over seeds) against the LoRA MB per
                    round, up + down, all clients; one fixed colour and marker per method
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: servers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedlora.reporting.labels import known_labels as _known_labels  # noqa: E402,F401
from fedlora.reporting.labels import method_style  # noqa: E402
from fedlora.reporting.style import integer_rounds, linear_axis, setting_title  # noqa: E402
from fedlora.reporting.style import value_axis  # noqa: E402


def _by_task_label(runs: list[dict[str, Any]]) -> dict[str, dict[str, list[list[dict[str, Any]]]]]:
    grouped: dict[str, dict[str, list[list[dict[str, Any]]]]] = {}
    for run in runs:
        grouped.setdefault(run["task"], {}).setdefault(run["label"], []).append(run["records"])
    return grouped


def _curve(seed_records: list[list[dict[str, Any]]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Seeds can differ in length only while a grid is still running: average the common prefix.
    length = min(len(r) for r in seed_records)
    values = np.array([[np.nan if rec[key] is None else rec[key] for rec in records[:length]] for records in seed_records],
                      dtype=float)
    rounds = np.array([rec["round"] for rec in seed_records[0][:length]])
    if key in ("divergence", "eckart_young_bound"):  # --divergence every N: unmeasured rounds are left out, not gaps
        measured = ~np.isnan(values).all(axis=0)
        values, rounds = values[:, measured], rounds[measured]
        length = len(rounds)
    std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(length)
    return rounds, values.mean(axis=0), std


def _panels(n: int) -> tuple[plt.Figure, list[plt.Axes]]:
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n + 1.5, 4.2), squeeze=False)
    return fig, list(axes[0])


def _configs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs' config.json dicts (for titles); a run directory without one contributes nothing."""
    configs = []
    for run in runs:
        path = Path(run.get("path", "")) / "config.json"
        if path.is_file():
            configs.append(json.loads(path.read_text()))
    return configs


def task_title(runs: list[dict[str, Any]], task: str) -> str:
    """"sst2: 10 clients, α=0.5, 8 rounds, seeds 0–2" for one task's runs."""
    of_task = [r for r in runs if r["task"] == task]
    configs = _configs(of_task) or [{"rounds": max(len(r["records"]) for r in of_task)}]
    return setting_title(task, configs, seeds=[r["seed"] for r in of_task if "seed" in r] or None)


def plot_all(runs: list[dict[str, Any]], out: Path, metric_names: dict[str, str]) -> list[Path]:
    grouped = _by_task_label(runs)
    if not grouped:
        return []
    written = []
    for name, key in (("global_metric", "global_metric"), ("divergence", "divergence")):
        fig, axes = _panels(len(grouped))
        for ax, (task, labels) in zip(axes, grouped.items()):
            values: list[float] = []
            for label, seeds in labels.items():
                rounds, mean, std = _curve(seeds, key)
                (line,) = ax.plot(rounds, mean, ms=4, label=label, **method_style(label))
                band = 0.15 if len(labels) <= 4 else 0.05  # many methods: faint bands keep the lines readable
                ax.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=band)
                values += mean.tolist()
                if key == "divergence":
                    _, bound, _ = _curve(seeds, "eckart_young_bound")
                    ax.plot(rounds, bound, ls="--", lw=1, color=line.get_color(), alpha=0.7)
                    values += bound.tolist()
            ax.set_title(task_title(runs, task), fontsize=9)
            integer_rounds(ax)
            if key == "divergence":
                ax.set_ylabel(value_axis(ax, values, "divergence (dashed: SVD bound)"))
            else:
                linear_axis(ax)
                ax.set_ylabel(f"global {metric_names.get(task, 'metric')} (mean ± std over seeds)")
            ax.grid(alpha=0.3)
        axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        written.append(_save(fig, out / f"{name}.png"))

    fig, axes = _panels(len(grouped))
    for ax, (task, labels) in zip(axes, grouped.items()):
        names = list(labels)
        x = np.arange(len(names))
        for offset, (key, title) in ((-0.2, ("global_metric", "global (final)")), (0.2, ("local_metric_mean", "local (last eval)"))):
            means: list[float] = []
            stds: list[float] = []
            for label in names:
                values_ = [_last(records, key) for records in labels[label]]
                present = [v for v in values_ if v is not None]
                means.append(float(np.mean(present)) if present else float("nan"))
                stds.append(float(np.std(present, ddof=1)) if len(present) > 1 else 0.0)
            ax.bar(x + offset, means, width=0.4, yerr=stds, capsize=2, label=title)
        ax.set_xticks(x, names, rotation=35, ha="right", fontsize=7)
        ax.set_title(task_title(runs, task), fontsize=9)
        ax.set_ylabel(f"{metric_names.get(task, 'metric')} (mean ± std over seeds)")
        linear_axis(ax)
        ax.grid(alpha=0.3, axis="y")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, out / "local_vs_global.png"))
    written.append(plot_frontier(runs, out, metric_names))
    return written


def plot_frontier(runs: list[dict[str, Any]], out: Path, metric_names: dict[str, str], title: str = "") -> Path:
    """Accuracy per byte: each method's mean global metric over the last quarter of the rounds (± std over seeds)
    against its LoRA MB per round, up + down. Finished runs only; methods at equal bytes are spread sideways."""
    grouped = _by_task_label([r for r in runs if r.get("finished", True)])
    fig, axes = plt.subplots(1, max(1, len(grouped)), figsize=(9 * max(1, len(grouped)), 4.8), squeeze=False)
    for ax, (task, labels) in zip(axes[0], grouped.items()):
        points = []
        for label, seeds in labels.items():
            tails = [float(np.mean([r["global_metric"] for r in records[-max(1, len(records) // 4):]])) for records in seeds]
            mb = float(np.mean([np.mean([r["lora_bytes_up"] + r["lora_bytes_down"] for r in records]) / 1e6 for records in seeds]))
            points.append((label, mb, tails))
        by_x: dict[float, list[int]] = {}
        for i, (_, mb, _) in enumerate(points):
            by_x.setdefault(round(mb, 3), []).append(i)
        for same in by_x.values():  # a multiplicative dodge keeps equal-byte methods apart on the log axis
            for j, i in enumerate(same):
                label, mb, tails = points[i]
                x = mb * 1.035 ** (j - (len(same) - 1) / 2)
                std = float(np.std(tails, ddof=1)) if len(tails) > 1 else 0.0
                ax.errorbar(x, float(np.mean(tails)), yerr=std, ls="none", capsize=3, ms=7,
                            label=f"{label} (n={len(tails)})", **method_style(label))
        ax.set_xscale("log")
        ticks = sorted(by_x)
        ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("LoRA MB per round, up + down, all clients (log scale; equal bytes spread sideways)")
        ax.set_ylabel(f"global {metric_names.get(task, 'metric')}, mean of the last quarter of rounds\n(± std over seeds)")
        ax.set_title(f"{task_title(runs, task)}{': ' + title if title else ''}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return _save(fig, out / "frontier.png")


def _last(records: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return values[-1] if values else None


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
