"""One hostile client against every aggregation method: how far can it move the global product?

    python benchmarks/hostile_client.py                 # 3 honest clients + 1 attacker, a few seconds
    python benchmarks/hostile_client.py --honest 9      # 9 honest + 1
    python benchmarks/hostile_client.py --out table.md
    python benchmarks/hostile_client.py --client-ranks 1 1 2 --step-size 0.005   # low-rank honest clients

The attack of issue 14, item 4: honest clients come from :func:`fedlora.testing.synthetic.least_squares_clients`
(gradient descent from a shared start on heterogeneous tasks); the attacker sends the global plus an
honest client's direction scaled to 99× the round's median update norm (just under the 100× rejection
bound) and claims ``num_examples`` = 10⁹ (the absolute cap), or the honest clients' median count.

Reported per method: ‖ΔP‖ / s, where ΔP is the change of the global product over all modules,
B'A' + base_delta − B A (the frozen-weight merge counts), and s is the median over honest clients of
their own product step ‖B_u A_u − B A‖. "honest" is the round without the attacker; "old" the
defaults before issue 14 (reject at 100× the median only: ``clip=None, weight_cap=None``); "new" the
defaults now (clip to 3× the median, weight share capped at 2/U: :mod:`fedlora.aggregation.robust`).

``--client-ranks`` (issue 21, item 7): the honest clients train at these ranks (one each, ≤ 4, the
server's rank; truncated starts, as ``--rank-map truncate``), the attacker at the full rank. Its
direction is honest client 0's step from its start. Reported: its *push* ‖P − P₀‖ / s, where P₀ is
the same round with the attacker sending its start back (an idle full-rank client keeps the global's
components the low-rank clients were never sent; that is not the attacker's doing), and s the median
honest product step from each client's own start. "before": every update measured from the
full-rank global (as before issue 21), the attacker at 99× that median; "now": from the start each
client was sent, at its rank, the attacker at 99× that median; "equal": the same clients at the full rank.
``--step-size`` sets the clients' gradient-descent step (0.5: large; ~0.005: a fine-tuning round's
step, far smaller than the adapter, the regime where the rank mapping dominated the old measure).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import torch

from fedlora.aggregation import Adapter, AggregationResult, ClientUpdate, LoraPair, aggregate, available_methods, get_method
from fedlora.aggregation.ranks import sent_start
from fedlora.aggregation.validation import update_norm
from fedlora.testing.synthetic import least_squares_clients

SHAPES = {f"layer{i}.{m}": (48, 32) for i in range(2) for m in ("q", "v")}  # (d, k)
RANK = 4
OLD: dict[str, Any] = {"clip": None, "weight_cap": None}  # the defaults before issue 14 (norm_bound=100 unchanged)


def product_change(result: AggregationResult, global_adapter: Adapter) -> float:
    """‖B'A' + base_delta − B A‖_F over every module (float64)."""
    total = 0.0
    for m, g in global_adapter.items():
        new = result.adapter[m].B.double() @ result.adapter[m].A.double()  # (d, k)
        if m in result.base_delta:
            new = new + result.base_delta[m].double()
        total += float(((new - g.B.double() @ g.A.double()) ** 2).sum())
    return total**0.5


def honest_step(global_adapter: Adapter, update: ClientUpdate) -> float:
    """‖B_u A_u − B A‖_F over every module: how far one honest client moves the product."""
    return sum(float(((u.B.double() @ u.A.double() - g.B.double() @ g.A.double()) ** 2).sum())
               for u, g in ((update.adapter[m], g) for m, g in global_adapter.items())) ** 0.5


def product_gap(a: AggregationResult, b: AggregationResult) -> float:
    """‖(B'A' + base_delta)_a − (B'A' + base_delta)_b‖_F over every module (float64)."""
    total = 0.0
    for m in a.adapter:
        gap = a.adapter[m].B.double() @ a.adapter[m].A.double() - b.adapter[m].B.double() @ b.adapter[m].A.double()
        for result, sign in ((a, 1.0), (b, -1.0)):
            if m in result.base_delta:
                gap = gap + sign * result.base_delta[m].double()
        total += float((gap**2).sum())
    return total**0.5


def attacker(global_adapter: Adapter, honest: Sequence[ClientUpdate], factor: float, count: int) -> ClientUpdate:
    """The global plus honest client 0's direction scaled to ``factor`` × the median update norm."""
    median = statistics.median_low(update_norm(global_adapter, u) for u in honest)
    scale = factor * median / update_norm(global_adapter, honest[0])
    adapter = {m: LoraPair(A=g.A + scale * (honest[0].adapter[m].A - g.A), B=g.B + scale * (honest[0].adapter[m].B - g.B))
               for m, g in global_adapter.items()}
    return ClientUpdate(adapter, count, "attacker")


def trained_clients(honest_clients: int, seed: int, step_size: float = 0.5,
                    ranks: Sequence[int] = ()) -> tuple[Adapter, list[ClientUpdate]]:
    """The global adapter and the honest clients' updates, in float32 as on the wire."""
    g64, ups64 = least_squares_clients(SHAPES, RANK, honest_clients, seed=seed, step_size=step_size,
                                       client_ranks=ranks)
    g = {m: p.to(torch.float32) for m, p in g64.items()}
    honest = [ClientUpdate({m: p.to(torch.float32) for m, p in u.adapter.items()}, u.num_examples, u.client_id)
              for u in ups64]
    return g, honest


def run(method: str, honest_clients: int, seed: int, step_size: float = 0.5) -> dict[str, float]:
    g, honest = trained_clients(honest_clients, seed, step_size)
    step = statistics.median(honest_step(g, u) for u in honest)
    options: dict[str, Any] = {"seed": seed} if method == "flora" else {}
    counts = sorted(u.num_examples for u in honest)
    row = {"honest": product_change(aggregate(method, g, honest, **options), g) / step}
    for label, count in (("1e9", 10**9), ("equal", counts[len(counts) // 2])):
        attack = honest + [attacker(g, honest, 99.0, count)]
        for name, defaults in (("old", OLD), ("new", {})):
            result = aggregate(method, g, attack, **defaults, **options)
            moved = float("nan") if result.metrics["skipped"] else product_change(result, g) / step
            row[f"{name} {label}"] = moved
    return row


def push(method: str, ranks: Sequence[int], seed: int, step_size: float, count: int | None,
         measured_from: str) -> float:
    """The full-rank attacker's push on the global product, in honest steps (NaN: it was rejected).

    ``measured_from``: "start" (now: each update from what its client was sent) or "global" (before
    issue 21: every update from the full-rank global, i.e. ``aggregate`` without ``client_ranks``).
    ``count``: the attacker's claimed examples (None: the honest clients' median count).
    """
    g, honest = trained_clients(len(ranks), seed, step_size, ranks)
    starts = [sent_start(g, r, "truncate") for r in ranks]
    step = statistics.median(honest_step(s, u) for u, s in zip(honest, starts))
    median = statistics.median_low(update_norm(s if measured_from == "start" else g, u) for u, s in zip(honest, starts))
    scale = 99.0 * median / update_norm(starts[0], honest[0])
    claimed = sorted(u.num_examples for u in honest)[len(honest) // 2] if count is None else count
    evil = ClientUpdate({m: LoraPair(A=g[m].A + scale * (honest[0].adapter[m].A - starts[0][m].A),
                                     B=g[m].B + scale * (honest[0].adapter[m].B - starts[0][m].B)) for m in g},
                        claimed, "attacker")
    idle = ClientUpdate({m: LoraPair(A=p.A.clone(), B=p.B.clone()) for m, p in g.items()}, claimed, "attacker")
    ranked: dict[str, Any] = {}
    if measured_from == "start":
        ranked["client_ranks"] = {u.client_id: r for u, r in zip(honest, ranks)} | {"attacker": RANK}
    attacked = aggregate(method, g, honest + [evil], **ranked)
    if attacked.metrics["rejected"] or attacked.metrics["skipped"]:
        return float("nan")
    return product_gap(attacked, aggregate(method, g, honest + [idle], **ranked)) / step


def run_mixed(method: str, ranks: Sequence[int], seed: int, step_size: float) -> dict[str, float]:
    row = {}
    for label, count in (("1e9", 10**9), ("equal", None)):
        row[f"equal ranks {label}"] = push(method, [RANK] * len(ranks), seed, step_size, count, "start")
        row[f"before {label}"] = push(method, ranks, seed, step_size, count, "global")
        row[f"now {label}"] = push(method, ranks, seed, step_size, count, "start")
    return row


def mixed_table(ranks: Sequence[int], seed: int, step_size: float) -> list[str]:
    columns = ["equal ranks 1e9", "before 1e9", "now 1e9", "equal ranks equal", "before equal", "now equal"]
    lines = [
        f"The full-rank attacker's push / an honest client's step (honest clients at ranks {' '.join(map(str, ranks))} of "
        f"{RANK} + 1 attacker at 99x the median update norm; step size {step_size:g}; seed {seed})",
        "",
        "| method | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for method in available_methods():
        if not get_method(method).policy.mixed_ranks:  # flora: no mixed ranks
            continue
        row = run_mixed(method, ranks, seed, step_size)
        lines.append(f"| {method} | " + " | ".join("rejected" if row[c] != row[c] else f"{row[c]:.2f}" for c in columns)
                     + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--honest", type=int, default=3, help="honest clients (the attacker is one more)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the table to this Markdown file")
    parser.add_argument("--client-ranks", type=int, nargs="+", default=[], metavar="R",
                        help=f"one rank (1-{RANK}) per honest client: the mixed-ranks table (the attacker at {RANK})")
    parser.add_argument("--step-size", type=float, default=0.5, help="the honest clients' gradient-descent step (> 0)")
    args = parser.parse_args(argv)
    if not all(1 <= r <= RANK for r in args.client_ranks):
        parser.error(f"--client-ranks: each rank must be from 1 to {RANK}")
    if not args.step_size > 0:
        parser.error("--step-size must be > 0")
    logging.disable(logging.WARNING)  # the attacker's clipping is logged at INFO; rejections would flood
    if args.client_ranks:
        return write(mixed_table(args.client_ranks, args.seed, args.step_size), args.out)
    columns = ["honest", "old 1e9", "new 1e9", "old equal", "new equal"]
    lines = [
        f"Global product move / an honest client's step ({args.honest} honest clients + 1 attacker at 99x the "
        f"median update norm; {'' if args.step_size == 0.5 else f'step size {args.step_size:g}; '}seed {args.seed})",
        "",
        "| method | " + " | ".join(f"{c}" for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for method in available_methods():
        row = run(method, args.honest, args.seed, args.step_size)
        lines.append(f"| {method} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
    return write(lines, args.out)


def write(lines: list[str], out: str | None) -> int:
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if out:
        with open(out, "w") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
