"""The privacy tables and plot for docs/results.md: accuracy (or loss) against the record-level budget ε.

Reads the run directories `fedlora bench --preset privacy` (SST-2) or `privacy-llm` (GSM8K) wrote. Per method and ε
(no DP shown as ε = ∞): the tail metric (mean over the last quarter of the rounds, because single-round SST-2
accuracy on 200 dev rows swings by ±0.1 here), mean ± sample std over seeds, and the paired difference against
FedIT at the same ε and seed with its wins over seeds. Writes the plot next to the other results figures.

    python benchmarks/privacy_table.py results/privacy docs/results/privacy_accuracy_vs_epsilon.png
    python benchmarks/privacy_table.py results/privacy-llm
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

Runs = dict[tuple[str, float], dict[int, list[dict[str, Any]]]]  # (method, ε or inf) -> seed -> records


def load(results: Path) -> Runs:
    """Finished runs only, keyed by (method, ε); ε = inf without DP."""
    runs: Runs = {}
    for config_path in sorted(results.glob("runs/*/*/seed*/config.json")):
        config = json.loads(config_path.read_text())
        lines = (config_path.parent / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        if len(records) < config["rounds"]:
            continue
        epsilon = config.get("dp_sgd_epsilon") or math.inf
        runs.setdefault((config["method"], float(epsilon)), {})[config["seed"]] = records
    return runs


def tail(records: list[dict[str, Any]], loss: bool) -> float:
    """Mean of the main metric (or the global loss) over the last quarter of the rounds (at least one)."""
    last = records[-max(1, len(records) // 4):]
    return statistics.fmean(r["global"]["loss"] if loss else r["global_metric"] for r in last)


def fmt(values: list[float], signed: bool = False) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return f"{mean:+.3f} ± {std:.3f}" if signed else f"{mean:.3f} ± {std:.3f}"


def table(runs: Runs, loss: bool) -> str:
    metric = "tail test loss (lower is better)" if loss else "tail accuracy"
    lines = [f"| method | ε (record level, δ = 1e-5) | noise multiplier z (by seed) | ε spent (bound) | {metric} | Δ vs fedit, paired | "
             f"{'lower' if loss else 'higher'} than fedit (seeds) |", "|---|---|---|---|---|---|---|"]
    for (method, epsilon), by_seed in sorted(runs.items(), key=lambda kv: (-kv[0][1], kv[0][0] != "fedit", kv[0][0])):
        values = {s: tail(r, loss) for s, r in by_seed.items()}
        base = runs.get(("fedit", epsilon), {})
        diffs = [values[s] - tail(base[s], loss) for s in sorted(values) if s in base] if method != "fedit" else []
        better = sum((d < 0) if loss else (d > 0) for d in diffs)
        first = next(iter(by_seed.values()))[-1]
        zs = sorted(r[-1]["dp_sgd_noise_multiplier"] for r in by_seed.values()) if first.get("dp_sgd_noise_multiplier") else []
        z = (f"{zs[0]:.3g}" if zs[0] == zs[-1] else f"{zs[0]:.3g}–{zs[-1]:.3g}") if zs else "–"  # by seed: n_min differs
        spent = f"{max(r[-1]['dp_sgd_epsilon'] for r in by_seed.values()):.3g}" if first.get("dp_sgd_epsilon") else "–"
        shown = "no DP" if math.isinf(epsilon) else f"{epsilon:g}"
        lines.append(f"| {method} | {shown} | {z} | {spent} | {fmt(list(values.values()))} | "
                     f"{fmt(diffs, signed=True) if diffs else '–'} | {f'{better} of {len(diffs)}' if diffs else '–'} |")
    return "\n".join(lines)


def plot(runs: Runs, loss: bool, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epsilons = sorted({e for _, e in runs if not math.isinf(e)})
    positions = {e: i for i, e in enumerate(epsilons)} | {math.inf: len(epsilons)}
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({m for m, _ in runs}):
        points = sorted((positions[e], [tail(r, loss) for r in by_seed.values()])
                        for (m, e), by_seed in runs.items() if m == method)
        xs = [x for x, _ in points]
        means = [statistics.fmean(v) for _, v in points]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=method)
    ax.set_xticks(list(positions.values()), [f"{e:g}" for e in epsilons] + ["no DP"])
    ax.set_xlabel("record-level ε (DP-SGD in every client, δ = 1e-5)")
    ax.set_ylabel("global test loss (tail)" if loss else "global accuracy (tail)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> None:
    results = Path(argv[0])
    runs = load(results)
    loss = any("loss" in r[-1]["global"] and "accuracy" not in r[-1]["global"]
               for by_seed in runs.values() for r in by_seed.values())
    print(table(runs, loss))
    if len(argv) > 1:
        plot(runs, loss, Path(argv[1]))
        print(f"\nplot: {argv[1]}")


if __name__ == "__main__":
    main(sys.argv[1:])
