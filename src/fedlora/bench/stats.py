"""Per-run summaries of metrics.jsonl, and their mean ± std over seeds: the markdown table and CSVs.

Everything is computed from the records the engine wrote; nothing here knows a method's expected
numbers. The std is the sample standard deviation (ddof=1) over seeds; with one seed it is shown
as "n=1" rather than a misleading ± 0.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any, Iterable

from fedlora.util.jsonsafe import measured_mean

# (key, column header, format) of the seed-aggregated columns, in table order.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("final", "final", ".4f"),
    ("best", "best", ".4f"),
    ("local", "local (mean)", ".4f"),
    ("gap", "local − global", "+.4f"),
    ("final_loss", "final loss", ".4f"),
    ("local_loss", "local loss", ".4f"),
    ("divergence", "mean divergence", ".4g"),
    ("bound", "mean SVD bound", ".4g"),
    ("mb_up", "MB up/round", ".3f"),
    ("mb_down", "MB down/round", ".3f"),
    ("server_s", "server s/round", ".3f"),
)
OPTIONAL = {"final_loss", "local_loss"}  # only tasks that report a loss (the LLM tasks) fill these


def summarize_records(records: list[dict[str, Any]]) -> dict[str, float]:
    """One run's numbers. Local metric: mean over the rounds that evaluated locally; the gap compares
    it with the global metric of those same rounds, so personalisation is not confused with progress."""
    if not records:
        raise ValueError("a run with no completed rounds cannot be summarised")
    local_rounds = [r for r in records if r.get("local_metric_mean") is not None]
    local = statistics.fmean(r["local_metric_mean"] for r in local_rounds) if local_rounds else math.nan
    gap = statistics.fmean(r["local_metric_mean"] - r["global_metric"] for r in local_rounds) if local_rounds else math.nan
    local_losses = [r["local_loss_mean"] for r in records if r.get("local_loss_mean") is not None]
    return {
        "rounds": len(records),
        "final": records[-1]["global_metric"],
        # LLM tasks: teacher-forced loss (lower is better); nan for tasks that report none (GLUE)
        "final_loss": float(records[-1].get("global", {}).get("loss", math.nan)),
        "local_loss": statistics.fmean(local_losses) if local_losses else math.nan,
        "best": max(r["global_metric"] for r in records),
        "local": local,
        "gap": gap,
        # over the rounds that measured it (--divergence every N / off leave the others NaN)
        "divergence": measured_mean(r["divergence"] for r in records),
        "bound": measured_mean(r["eckart_young_bound"] for r in records),
        # LoRA traffic only: the classifier head is FedAvg-ed identically by every method.
        "mb_up": statistics.fmean(r["lora_bytes_up"] for r in records) / 1e6,
        "mb_down": statistics.fmean(r["lora_bytes_down"] for r in records) / 1e6,
        "server_s": statistics.fmean(r["server_seconds"] for r in records),
        "wall_s": sum(r["wall_seconds"] for r in records),
    }


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """(mean, sample std); std is nan for a single value. NaNs (e.g. no local evaluation) propagate."""
    values = list(values)
    if not values:
        return math.nan, math.nan
    if len(values) == 1:
        return float(values[0]), math.nan
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan  # statistics.stdev cannot take a nan
    return statistics.fmean(values), statistics.stdev(values)


def aggregate_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group per-run summaries (each with task, label, seed) by (task, label); mean and std per column.
    Row order follows first appearance, i.e. the preset's order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["task"], run["label"]), []).append(run)
    rows = []
    for (task, label), members in groups.items():
        row: dict[str, Any] = {"task": task, "label": label, "n": len(members), "seeds": sorted(m["seed"] for m in members)}
        for key, _, _ in COLUMNS + (("wall_s", "", ""),):
            row[key], row[f"{key}_std"] = mean_std(m[key] for m in members)
        rows.append(row)
    return rows


def _cell(mean: float, std: float, fmt: str, n: int) -> str:
    if math.isnan(mean):
        return "–"
    text = format(mean, fmt)
    return f"{text} ± {format(std, fmt.lstrip('+'))}" if n > 1 and not math.isnan(std) else text


def markdown_table(rows: list[dict[str, Any]], metric_names: dict[str, str]) -> str:
    """Columns no run has a value for (the losses on GLUE) are left out."""
    columns = [c for c in COLUMNS if c[0] not in OPTIONAL or any(not math.isnan(r[c[0]]) for r in rows)]
    header = ["task (metric)", "method", "seeds"] + [title for _, title, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row['task']} ({metric_names.get(row['task'], '?')})", row["label"], str(row["n"])]
        cells += [_cell(row[k], row[f"{k}_std"], fmt, row["n"]) for k, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    if not rows:
        path.write_text("")
        return path
    fields = [k for k in rows[0] if k != "seeds"] + ["seeds"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "seeds": " ".join(map(str, row.get("seeds", [])))} if "seeds" in row else row)
    return path


def _split_label(label: str) -> tuple[str, str]:
    """"flora-na [alpha=0.1]" -> ("flora-na", " [alpha=0.1]"): method part and ablation-setting suffix."""
    method, sep, setting = label.partition(" [")
    return method, (sep + setting if sep else "")


def paired_rows(runs: list[dict[str, Any]], baseline: str = "fedit") -> list[dict[str, Any]]:
    """Every method against ``baseline`` run for run: same task, same ablation setting, same seed.

    A seed fixes the partition, the initial adapter and head, and every client's batches, so the
    paired difference removes most of the seed-to-seed spread that dominates small budgets.
    ``wins``/``ties``/``losses`` count seeds by the sign of the final-metric difference.
    """
    by_key = {(r["task"], r["label"], r["seed"]): r for r in runs}
    groups: dict[tuple[str, str], list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for run in runs:
        method, setting = _split_label(run["label"])
        base = by_key.get((run["task"], baseline + setting, run["seed"]))
        if method != baseline and base is not None:
            groups.setdefault((run["task"], run["label"]), []).append((run, base))
    rows = []
    for (task, label), pairs in groups.items():
        diff = {key: [r.get(key, math.nan) - b.get(key, math.nan) for r, b in pairs]
                for key in ("final", "best", "divergence", "final_loss")}
        row: dict[str, Any] = {"task": task, "label": label, "n": len(pairs),
                               "wins": sum(d > 0 for d in diff["final"]), "ties": sum(d == 0 for d in diff["final"]),
                               "losses": sum(d < 0 for d in diff["final"]), "loss_wins": sum(d < 0 for d in diff["final_loss"])}
        for key, values in diff.items():
            row[f"d_{key}"], row[f"d_{key}_std"] = mean_std(values)
        rows.append(row)
    return rows


def paired_table(rows: list[dict[str, Any]], metric_names: dict[str, str], baseline: str = "fedit") -> str:
    with_loss = any(not math.isnan(r["d_final_loss"]) for r in rows)  # LLM tasks: lower loss is better
    header = ["task (metric)", "method", "paired seeds", f"Δ final vs {baseline}", f"Δ best vs {baseline}",
              "wins / ties / losses (final)", f"Δ mean divergence vs {baseline}"]
    header += [f"Δ final loss vs {baseline}", "lower loss (seeds)"] if with_loss else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row['task']} ({metric_names.get(row['task'], '?')})", row["label"], str(row["n"]),
                 _cell(row["d_final"], row["d_final_std"], "+.4f", row["n"]),
                 _cell(row["d_best"], row["d_best_std"], "+.4f", row["n"]),
                 f"{row['wins']} / {row['ties']} / {row['losses']}",
                 _cell(row["d_divergence"], row["d_divergence_std"], "+.4g", row["n"])]
        if with_loss:
            cells += [_cell(row["d_final_loss"], row["d_final_loss_std"], "+.4f", row["n"]),
                      f"{row['loss_wins']} / {row['n']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


EXACT = 1e-6  # divergence below this is float rounding of an exact aggregate (e.g. 1e-17, 5e-9)


def gap_rows(runs: list[dict[str, Any]], low: str = "fedit", high: str = "svd") -> list[dict[str, Any]]:
    """How much of the divergence gap between ``low`` (FedIT) and ``high`` (the SVD optimum) each method closes.

    Per seed: closed = (D_fedit − D_method) / (D_fedit − D_svd) on the runs' mean divergence, so 0 is
    FedIT and 1 the Eckart–Young optimum; ``exact`` marks methods whose divergence is 0 to float
    rounding (FedEx-LoRA, FLoRA, FFA-LoRA), which pay for it in bytes or in frozen factors. Runs that report FLoRA-NA's solver objective (metrics.jsonl
    ``objective`` and ``objective_fedit``, the same round's client updates under both aggregates) also
    get ``rounds_not_worse`` (objective ≤ FedIT's) and the median objective ratio over their rounds.
    """
    by_key = {(r["task"], r["label"], r["seed"]): r for r in runs}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        method, setting = _split_label(run["label"])
        base, best = by_key.get((run["task"], low + setting, run["seed"])), by_key.get((run["task"], high + setting, run["seed"]))
        if method in (low, high) or base is None or best is None or base["divergence"] <= best["divergence"]:
            continue
        groups.setdefault((run["task"], run["label"]), []).append(
            {**run, "closed": (base["divergence"] - run["divergence"]) / (base["divergence"] - best["divergence"])})
    rows = []
    for (task, label), members in groups.items():
        row: dict[str, Any] = {"task": task, "label": label, "n": len(members)}
        row["closed"], row["closed_std"] = mean_std(m["closed"] for m in members)
        row["exact"] = all(m["divergence"] < EXACT for m in members)
        pairs = [(r["objective"], r["objective_fedit"]) for m in members for r in m.get("records", [])
                 if r.get("objective") is not None and r.get("objective_fedit")]
        row["rounds"] = len(pairs)
        row["rounds_not_worse"] = sum(o <= f for o, f in pairs)
        row["median_ratio"] = statistics.median(o / f for o, f in pairs) if pairs else math.nan
        rows.append(row)
    return rows


def gap_table(rows: list[dict[str, Any]], metric_names: dict[str, str]) -> str:
    header = ["task (metric)", "method", "seeds", "share of the FedIT → SVD divergence gap closed",
              "rounds with objective ≤ FedIT's", "median objective / FedIT's"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row['task']} ({metric_names.get(row['task'], '?')})", row["label"], str(row["n"]),
                 "exact (divergence ≈ 0)" if row["exact"] else _cell(100 * row["closed"], 100 * row["closed_std"], ".0f", row["n"]) + " %",
                 f"{row['rounds_not_worse']} / {row['rounds']}" if row["rounds"] else "–",
                 "–" if math.isnan(row["median_ratio"]) else f"{row['median_ratio']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
