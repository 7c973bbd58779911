"""The frontier's tables for docs/results.md: accuracy per byte with paired differences against FedIT.

Reads the run directories `fedlora bench --preset frontier` / `frontier-long` wrote and prints one markdown table
per results directory. Beyond `fedlora bench`'s own report (final and best metric) it adds the mean over the last
quarter of the rounds, because single-round SST-2 accuracy on 200 dev rows swings by ±0.1 between rounds here,
and each paired difference's t statistic (mean / (std / √n)) and wins/losses over seeds.

    python benchmarks/frontier_table.py results/frontier results/frontier-long
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from fedlora.aggregation import get_method


def load(results: Path) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """{label directory: {seed: records}} for the finished runs only."""
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for config_path in sorted(results.glob("runs/*/*/seed*/config.json")):
        config = json.loads(config_path.read_text())
        lines = (config_path.parent / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        if len(records) >= config["rounds"]:
            seed = int(config_path.parent.name.removeprefix("seed"))
            runs.setdefault(config_path.parent.parent.name, {})[seed] = records
    return runs


def config_of(results: Path, label_dir: str) -> dict[str, Any]:
    return dict(json.loads(next((results / "runs").glob(f"*/{label_dir}/seed*/config.json")).read_text()))


def label_of(config: dict[str, Any]) -> str:
    """`fedit (rebalance=true)`: the method and the options the runs were made with, as `--method-option` spells them."""
    options = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(config["method_options"].items()))
    return f"`{config['method']}`" + (f" ({options})" if options else "")


def value(record: dict[str, Any]) -> float:
    """The global metric, or for the LLM tasks (whose exact match is 0 at CPU scale) the teacher-forced loss."""
    return float(record["global"].get("loss", record["global_metric"]))


def summary(records: list[dict[str, Any]]) -> dict[str, float]:
    tail = records[-max(1, len(records) // 4):]
    return {
        "final": value(records[-1]),
        "tail": statistics.fmean(value(r) for r in tail),
        "divergence": statistics.fmean(r["divergence"] for r in records),
        "mb_up": statistics.fmean(r["lora_bytes_up"] for r in records) / 1e6,
        "mb_down": statistics.fmean(r["lora_bytes_down"] for r in records) / 1e6,
    }


def spread(values: list[float], digits: int = 3) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f} (n=1)"


def paired(values: list[float], lower_is_better: bool = False, digits: int = 3) -> str:
    """Mean ± std of paired differences, t = mean / (std/√n), and wins/losses against FedIT (ties within 1e-9)."""
    if not values:
        return "–"
    mean = statistics.fmean(values)
    sign = -1 if lower_is_better else 1
    wins, losses = sum(sign * v > 1e-9 for v in values), sum(sign * v < -1e-9 for v in values)
    if len(values) < 2:
        return f"{mean:+.{digits}f} (n=1) {wins}/{losses}"
    std = statistics.stdev(values)
    t = mean / (std / math.sqrt(len(values))) if std > 0 else math.copysign(math.inf, mean) if mean else 0.0
    return f"{mean:+.{digits}f} ± {std:.{digits}f} (t = {t:+.1f}) {wins}/{losses}"


def table(results: Path) -> str:
    runs = load(results)
    base = {seed: summary(r) for seed, r in runs.get("fedit", {}).items()}
    rounds = len(next(iter(next(iter(runs.values())).values())))
    quarter = max(1, rounds // 4)
    first = next(iter(next(iter(runs.values())).values()))[-1]
    loss = "loss" in first["global"]
    what = "teacher-forced test loss (lower is better)" if loss else "global accuracy"
    digits = 4 if loss else 3
    lines = [f"`{results}`: {rounds} rounds; final and tail = {what}, tail = its mean over rounds {rounds - quarter + 1}–{rounds}; "
             "Δ = paired difference against FedIT on the same seed (mean ± std over seeds, t, wins/losses for the method)", "",
             "| method | seeds | final | Δ final vs FedIT | tail | Δ tail vs FedIT | mean divergence | MB up / down per round | secure aggregation |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for label, by_seed in runs.items():
        s = {seed: summary(r) for seed, r in by_seed.items()}
        common = sorted(set(s) & set(base))
        d_final = [s[k]["final"] - base[k]["final"] for k in common] if label != "fedit" else []
        d_tail = [s[k]["tail"] - base[k]["tail"] for k in common] if label != "fedit" else []
        config = config_of(results, label)
        secure = "no" if get_method(config["method"]).policy.needs_individual_updates else "yes"
        one = next(iter(s.values()))
        rows.append(((1 if loss else -1) * statistics.fmean(v["tail"] for v in s.values()),
                     f"| {label_of(config)} | {len(s)} | {spread([v['final'] for v in s.values()], digits)} | "
                     f"{paired(d_final, loss, digits)} | {spread([v['tail'] for v in s.values()], digits)} | "
                     f"{paired(d_tail, loss, digits)} | "
                     f"{statistics.fmean(v['divergence'] for v in s.values()):.3f} | "
                     f"{one['mb_up']:.2f} / {one['mb_down']:.2f} | {secure} |"))
    lines += [row for _, row in sorted(rows, key=lambda item: item[0])]  # best first
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        print(table(Path(argument)))
