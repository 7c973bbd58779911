"""Aggregation benchmark: solve time and divergence of fedit, svd, flora-na/als and flora-na/adamw.

    python benchmarks/aggregation.py            # full: RoBERTa-large and LLaMA-2-7B q/v shapes (minutes)
    python benchmarks/aggregation.py --small    # a few seconds, same table at toy shapes
    python benchmarks/aggregation.py --out results.md
    python benchmarks/aggregation.py --clients  # issue 23 §4: U = 10 … 1,000 at MiniLM shapes, a process per point

Cases (client adapters from :func:`fedlora.testing.synthetic.least_squares_clients`, i.e. clients that
ran gradient descent from a shared start on heterogeneous least-squares tasks):
  (a) RoBERTa-large: 48 modules, d = k = 1024, r = 16, U = 10; AdamW at its full 200 steps.
  (b) LLaMA-2-7B q/v: 64 modules, d = k = 4096, r = 16, U = 10; AdamW cut to a few steps (it
      forms 64 dense 4096×4096 products per step), reported as s/step and extrapolated to 200.
  (c) client-count sweep U ∈ {2, 10, 50, 100} for ALS, at (a)'s module shape with fewer modules
      (the Grams grow as (U r)²: at U = 100 a 48-module problem needs 2 GB of Grams alone).

  (d) --clients: fedit and flora-na at U ∈ {10, 30, 100, 300, 1000}, MiniLM shapes (12 modules
      384×384, r = 8): seconds per round (aggregate(): the method + the divergence report) and peak
      RSS, each point in its own process (benchmarks/client_sweep_point.py). Baseline in the same run:
      the old implementations (fedit's divergence through the (U r)² Grams; flora-na's ALS on its
      ((U+1) r)² Grams at every U), run until a point takes longer than --cap-seconds (stopped there)
      or its Grams would need > 4 GiB. The new flora-na switches to the matrix-free ALS
      (fedlora.aggregation.methods.flora_na_factors) where its Grams would exceed 512 MiB.

Every method is warmed up once (first MKL/LAPACK calls are slow); times are the best of
``--repeats`` runs (AdamW: one run). ``solve s`` is the method alone (``metrics["solve_seconds"]``),
``wall s`` the whole ``aggregate`` call (validation, float64 casts, divergence report). Ratios are
against baselines measured in this same run. Also importable: ``main(argv)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fedlora.aggregation import aggregate
from fedlora.testing.synthetic import least_squares_clients


@dataclass(frozen=True)
class Case:
    name: str
    modules: int
    dim: int
    rank: int
    clients: int
    adamw_steps: int | None  # None: skip AdamW


FULL = {
    "a": Case("(a) RoBERTa-large 48×1024²", 48, 1024, 16, 10, 200),
    "b": Case("(b) LLaMA-2-7B q/v 64×4096²", 64, 4096, 16, 10, 2),
    "sweep": Case("(c) ALS sweep, 12×1024²", 12, 1024, 16, 0, None),
}
SMALL = {
    "a": Case("(a) small 2×64²", 2, 64, 4, 10, 200),
    "b": Case("(b) small 8×256²", 8, 256, 8, 10, 2),
    "sweep": Case("(c) ALS sweep, 2×64²", 2, 64, 4, 0, None),
}
SWEEP_CLIENTS = (2, 10, 50, 100)
METHODS = (("fedit", {}), ("svd", {}), ("flora-na/als", {"solver": "als"}), ("flora-na/adamw", {"solver": "adamw"}))


def _clients(case: Case, clients: int, seed: int = 0):
    shapes = {f"layer{i // 2}.{'qv'[i % 2]}": (case.dim, case.dim) for i in range(case.modules)}
    start = time.perf_counter()
    g, ups = least_squares_clients(shapes, case.rank, clients, seed=seed)
    return g, ups, time.perf_counter() - start


def _run(method: str, options: dict, g, ups, repeats: int) -> tuple[dict, float]:
    name = method.split("/")[0]
    best_metrics, best_wall = None, float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        metrics = aggregate(name, g, ups, **options).metrics
        wall = time.perf_counter() - start
        if best_metrics is None or metrics["solve_seconds"] < best_metrics["solve_seconds"]:
            best_metrics = metrics
        best_wall = min(best_wall, wall)
    return best_metrics, best_wall


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "–"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def bench_case(case: Case, repeats: int, log) -> tuple[list[dict], dict]:
    g, ups, build_s = _clients(case, case.clients)
    log(f"{case.name}: built {case.clients} clients in {build_s:.2f} s")
    rows, by_method = [], {}
    for method, options in METHODS:
        opts = dict(options)
        if method.endswith("adamw"):
            if case.adamw_steps is None:
                continue
            opts["steps"] = case.adamw_steps
            aggregate("flora-na", g, ups, solver="adamw", steps=1)  # warm-up
            metrics, wall = _run(method, opts, g, ups, 1)
        else:
            aggregate(method.split("/")[0], g, ups, **options)  # warm-up
            metrics, wall = _run(method, opts, g, ups, repeats)
        row = {**metrics, "case": case.name, "method": method, "solve": metrics["solve_seconds"], "wall": wall}
        if method.endswith("adamw"):
            evaluations = case.adamw_steps + 1  # steps + the initial (FedIT) evaluation; includes building T
            row["per_step"] = metrics["solve_seconds"] / evaluations
            row["extrapolated_200"] = row["per_step"] * 201
        rows.append(row)
        by_method[method] = row
        log(f"  {method}: solve {metrics['solve_seconds']:.3f} s, wall {wall:.2f} s, divergence {metrics['divergence']:.6f}")
    return rows, by_method


def bench_sweep(case: Case, repeats: int, log) -> list[dict]:
    rows = []
    for clients in SWEEP_CLIENTS:
        g, ups, build_s = _clients(case, clients)
        aggregate("flora-na", g, ups)  # warm-up
        metrics, wall = _run("flora-na/als", {}, g, ups, repeats)
        fedit = aggregate("fedit", g, ups).metrics
        rows.append({**metrics, "case": case.name, "method": "flora-na/als", "U": clients, "solve": metrics["solve_seconds"],
                     "wall": wall, "fedit_divergence": fedit["divergence"]})
        log(f"  sweep U={clients}: solve {metrics['solve_seconds']:.3f} s, wall {wall:.2f} s (clients built in {build_s:.1f} s)")
    return rows


def render(results: dict, args) -> str:
    lines = []
    threads = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines.append(f"# FLoRA-NA aggregation benchmark ({'--small' if args.small else 'full'})\n")
    lines.append(
        f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"load average {load:.1f} at the end; float64 server maths; times = best of {args.repeats} (AdamW: 1 run) after a warm-up.\n"
    )
    lines.append("| case | method | solve s | wall s | divergence | ÷ FedIT | ÷ EY bound | EY bound | L(FedIT) | L(final) | iters/steps | note |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for key in ("a", "b"):
        if key not in results:
            continue
        rows, by = results[key]
        fedit_div = by["fedit"]["divergence"]
        for row in rows:
            note = ""
            iters = row.get("iterations")
            if row["method"].endswith("adamw"):
                note = f"{row['iterations']} steps: {row['per_step']:.3g} s/step → ~{row['extrapolated_200']:.4g} s for 200"
            lines.append(
                f"| {row['case']} | {row['method']} | {_fmt(row['solve'])} | {_fmt(row['wall'], 3)} | {row['divergence']:.6f} | "
                f"{row['divergence'] / fedit_div:.4f} | {row['divergence'] / row['eckart_young_bound']:.4f} | "
                f"{row['eckart_young_bound']:.6f} | {_fmt(row.get('objective_fedit'), 6)} | {_fmt(row.get('objective'), 6)} | "
                f"{iters if iters is not None else '–'} | {note} |"
            )
    if "sweep" in results:
        lines.append("\n| case | U | ALS solve s | wall s | sweeps | divergence | FedIT divergence | EY bound | L(FedIT) | L(ALS) |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row in results["sweep"]:
            lines.append(
                f"| {row['case']} | {row['U']} | {_fmt(row['solve'])} | {_fmt(row['wall'], 3)} | {row['iterations']} | "
                f"{row['divergence']:.6f} | {row['fedit_divergence']:.6f} | {row['eckart_young_bound']:.6f} | "
                f"{_fmt(row['objective_fedit'], 6)} | {_fmt(row['objective'], 6)} |"
            )
    lines.append("\n## Ratios (same run)\n")
    if "a" in results:
        by = results["a"][1]
        als, adamw = by["flora-na/als"], by.get("flora-na/adamw")
        if adamw:
            speedup = adamw["solve"] / als["solve"]
            obj = als["objective"] / adamw["objective"] if adamw["objective"] > 0 else float("nan")
            lines.append(
                f"- (a) ALS speed-up vs AdamW ({adamw['iterations']} steps): **{speedup:.0f}×** (target ≥ 100×: "
                f"{'met' if speedup >= 100 else 'MISSED'}); objective ALS/AdamW = {obj:.6f} "
                f"({'no worse' if obj <= 1 + 1e-9 else 'WORSE'})"
            )
    if "b" in results:
        by = results["b"][1]
        als = by["flora-na/als"]
        lines.append(
            f"- (b) ALS solve time: **{als['solve']:.3f} s** (target ≤ 1 s on 2 cores: {'met' if als['solve'] <= 1 else 'MISSED'}); "
            f"whole aggregate() call {als['wall']:.2f} s"
        )
        adamw = by.get("flora-na/adamw")
        if adamw:
            lines.append(
                f"- (b) AdamW: {adamw['per_step']:.3g} s/step, ~{adamw['extrapolated_200']:.4g} s extrapolated to 200 steps "
                f"(≈ {adamw['extrapolated_200'] / als['solve']:.0f}× ALS)"
            )
    for key in ("a", "b"):
        if key in results:
            by = results[key][1]
            als, fedit = by["flora-na/als"], by["fedit"]
            gap = fedit["divergence"] - fedit["eckart_young_bound"]
            closed = (fedit["divergence"] - als["divergence"]) / gap if gap > 0 else float("nan")
            lines.append(
                f"- {key}: ALS divergence {als['divergence']:.6f} = {als['divergence'] / fedit['divergence']:.4f} × FedIT, "
                f"{als['divergence'] / als['eckart_young_bound']:.4f} × the Eckart–Young bound "
                f"(closes {100 * closed:.1f}% of the FedIT→bound gap)"
            )
    return "\n".join(lines) + "\n"


CLIENT_SWEEP = (10, 30, 100, 300, 1000)
GOALS = {"fedit": 5.0, "flora-na": 30.0}  # s per round at U = 1,000 on the 2-core CPU (issue 23 §4); peak ≤ 2 GiB
GRAM_LIMIT_GIB = 4.0  # a point whose (U r)² Grams alone would need more is not started (it would swap or be killed)


def _gram_gib(method: str, impl: str, clients: int) -> float:
    """Memory of the (U r)² (flora-na: ((U + 1) r)², both factors) Grams of the 12 modules, float64; 0 for the new route."""
    if impl == "new":  # fedit: the cheapest exact route; flora-na: Grams only within GRAM_BUDGET_BYTES
        return 0.0
    n = (clients + (method == "flora-na")) * 8
    return 2 * 12 * n * n * 8 / 2**30


def _point(method: str, clients: int, impl: str, timeout: float) -> dict:
    script = Path(__file__).with_name("client_sweep_point.py")
    try:
        out = subprocess.run([sys.executable, str(script), method, str(clients), impl], capture_output=True, text=True,
                             timeout=timeout, check=True, env={**os.environ})
    except subprocess.TimeoutExpired:
        return {"method": method, "U": clients, "impl": impl, "skipped": f"> {timeout:.0f} s", "timeout": True}
    except subprocess.CalledProcessError as error:
        return {"method": method, "U": clients, "impl": impl, "failed": error.stderr.strip().splitlines()[-1:]}
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _exponent(rows: list[dict]) -> float:
    """Least-squares slope of log(seconds) on log(U) over the points with U ≥ 30 (small U is overhead)."""
    pts = [(math.log(r["U"]), math.log(r["seconds"])) for r in rows if "seconds" in r and r["U"] >= 30]
    if len(pts) < 2:
        return math.nan
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def bench_clients(clients: tuple[int, ...], cap: float, log) -> dict[tuple[str, str], list[dict]]:
    """Per (method, impl): one row per U. The new fedit runs every point; the old implementation and
    flora-na run until a point takes longer than ``cap`` seconds (it is stopped there) or its Grams
    would exceed GRAM_LIMIT_GIB; larger U are then "not run"."""
    runs = [("fedit", "new"), ("fedit", "old"), ("flora-na", "new"), ("flora-na", "old")]
    results: dict[tuple[str, str], list[dict]] = {key: [] for key in runs}
    for method, impl in runs:
        stopped = ""
        for U in clients:
            capped = impl == "old"
            if not stopped and _gram_gib(method, impl, U) > GRAM_LIMIT_GIB:
                stopped = f"its Grams alone need {_gram_gib(method, impl, U):.1f} GiB"
            if stopped:
                results[(method, impl)].append({"U": U, "skipped": stopped})
                log(f"  {method}/{impl} U={U}: not run ({stopped})")
                continue
            # the process also imports torch and builds the clients: the call itself is held to ``cap``
            row = _point(method, U, impl, timeout=cap + 60 if capped else 600)
            results[(method, impl)].append(row)
            if "seconds" in row:
                log(f"  {method}/{impl} U={U}: {row['seconds']:.2f} s, peak {row['peak_mib']:.0f} MiB")
                if capped and row["seconds"] > cap:
                    stopped = f"U={U} took {row['seconds']:.0f} s"
            else:
                stopped = f"U={U}: {row.get('skipped') or row.get('failed')}"
                log(f"  {method}/{impl} U={U}: {row}")
    return results


def render_clients(results: dict[tuple[str, str], list[dict]], clients: tuple[int, ...], cap: float) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# Server client sweep (MiniLM shapes: 12 modules 384×384, r = 8; float32 uploads, float64 server maths)\n",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
        f"{load:.1f} at the end. s = one whole aggregate() call (method + divergence report) after a warm-up, one "
        f"process per point; peak = that process's ru_maxrss (the clients' float32 uploads included). "
        f"The old implementation and flora-na are not run past the first U that takes over {cap:.0f} s.\n",
        "| method | implementation | " + " | ".join(f"U={U}" for U in clients) + " | growth exponent (U ≥ 30) |",
        "|---|---|" + "---:|" * len(clients) + "---:|",
    ]
    for (method, impl), rows in results.items():
        name = {("fedit", "new"): "new (route by cost)", ("fedit", "old"): "old (U·r Grams)",
                ("flora-na", "new"): "new (Grams ≤ 512 MiB, else matrix-free CG)",
                ("flora-na", "old"): "old (((U+1)·r)² Grams, U×U solves)"}[(method, impl)]
        cells = []
        for row in rows:
            if "seconds" in row:
                cells.append(f"{row['seconds']:.2f} s / {row['peak_mib'] / 1024:.2f} GiB")
            else:
                cells.append(row["skipped"] if row.get("timeout") else
                             "not run" if "skipped" in row else f"failed ({row.get('failed', '?')})")
        lines.append(f"| {method} | {name} | " + " | ".join(cells) + f" | {_exponent(rows):.2f} |")
    lines.append("\n## Ratios and goals (same run)\n")
    for method in ("fedit", "flora-na"):
        new, old = ({r["U"]: r for r in results[(method, impl)]} for impl in ("new", "old"))
        for U in clients:
            if "seconds" in new.get(U, {}) and "seconds" in old.get(U, {}):
                lines.append(f"- {method} U={U}: old / new = **{old[U]['seconds'] / new[U]['seconds']:.1f}×** "
                             f"(peak {old[U]['peak_mib']:.0f} → {new[U]['peak_mib']:.0f} MiB)")
    for method, goal in GOALS.items():
        row = {r["U"]: r for r in results[(method, "new")]}.get(max(clients), {})
        if "seconds" in row:
            ok = row["seconds"] <= goal and row["peak_mib"] <= 2048
            lines.append(f"- {method} U={max(clients)}: {row['seconds']:.2f} s, peak {row['peak_mib']:.0f} MiB "
                         f"(goal ≤ {goal:.0f} s, ≤ 2 GiB: {'met' if ok else 'MISSED'})")
        else:
            lines.append(f"- {method} U={max(clients)}: not measured ({row.get('skipped') or row.get('failed')}); "
                         f"goal ≤ {goal:.0f} s MISSED")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="toy shapes, a few seconds")
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (best kept); AdamW runs once")
    parser.add_argument("--cases", default="a,b,sweep", help="comma-separated subset of a, b, sweep")
    parser.add_argument("--adamw-steps-b", type=int, default=None, help="AdamW steps at (b) (default 2; 1 with --small)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--clients", action="store_true", help="the client sweep (d) instead of (a)-(c)")
    parser.add_argument("--client-counts", default=",".join(map(str, CLIENT_SWEEP)), help="U values of --clients")
    parser.add_argument("--cap-seconds", type=float, default=45.0,
                        help="--clients: stop the old implementation and flora-na at the first U slower than this")
    args = parser.parse_args(argv)
    cases = dict(SMALL if args.small else FULL)
    if args.adamw_steps_b is not None:
        b = cases["b"]
        cases["b"] = Case(b.name, b.modules, b.dim, b.rank, b.clients, args.adamw_steps_b)

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    if args.clients:
        counts = tuple(int(c) for c in args.client_counts.split(","))
        table = render_clients(bench_clients(counts, args.cap_seconds, log), counts, args.cap_seconds)
        print(table)
        if args.out:
            Path(args.out).write_text(table, encoding="utf-8")
        return table

    results: dict = {}
    for key in args.cases.split(","):
        key = key.strip()
        if key == "sweep":
            results["sweep"] = bench_sweep(cases["sweep"], args.repeats, log)
        elif key in ("a", "b"):
            results[key] = bench_case(cases[key], args.repeats, log)
        else:
            parser.error(f"unknown case {key!r}; use a, b, sweep")
    table = render(results, args)
    print(table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(table)
    return table


if __name__ == "__main__":
    main()
