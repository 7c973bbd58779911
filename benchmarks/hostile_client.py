"""One hostile client against every aggregation method: how far can it move the global product?

    python benchmarks/hostile_client.py                 # 3 honest clients + 1 attacker, a few seconds
    python benchmarks/hostile_client.py --honest 9      # 9 honest + 1
    python benchmarks/hostile_client.py --out table.md

The attack of issue 14, item 4: honest clients come from :func:`fedlora.synthetic.least_squares_clients`
(gradient descent from a shared start on heterogeneous tasks); the attacker sends the global plus an
honest client's direction scaled to 99× the round's median update norm (just under the 100× rejection
bound) and claims ``num_examples`` = 10⁹ (the absolute cap), or the honest clients' median count.

Reported per method: ‖ΔP‖ / s, where ΔP is the change of the global product over all modules,
B'A' + base_delta − B A (the frozen-weight merge counts), and s is the median over honest clients of
their own product step ‖B_u A_u − B A‖. "honest" is the round without the attacker; "old" the
defaults before issue 14 (reject at 100× the median only: ``clip=None, weight_cap=None``); "new" the
defaults now (clip to 3× the median, weight share capped at 2/U: :mod:`fedlora.aggregation.robust`).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import torch

from fedlora.aggregation import Adapter, AggregationResult, ClientUpdate, LoraPair, aggregate, available_methods
from fedlora.aggregation.validation import update_norm
from fedlora.synthetic import least_squares_clients

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


def attacker(global_adapter: Adapter, honest: Sequence[ClientUpdate], factor: float, count: int) -> ClientUpdate:
    """The global plus honest client 0's direction scaled to ``factor`` × the median update norm."""
    median = statistics.median_low(update_norm(global_adapter, u) for u in honest)
    scale = factor * median / update_norm(global_adapter, honest[0])
    adapter = {m: LoraPair(A=g.A + scale * (honest[0].adapter[m].A - g.A), B=g.B + scale * (honest[0].adapter[m].B - g.B))
               for m, g in global_adapter.items()}
    return ClientUpdate(adapter, count, "attacker")


def run(method: str, honest_clients: int, seed: int) -> dict[str, float]:
    g64, ups64 = least_squares_clients(SHAPES, RANK, honest_clients, seed=seed)
    g = {m: p.to(torch.float32) for m, p in g64.items()}  # float32, as on the wire
    honest = [ClientUpdate({m: p.to(torch.float32) for m, p in u.adapter.items()}, u.num_examples, u.client_id)
              for u in ups64]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--honest", type=int, default=3, help="honest clients (the attacker is one more)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # the attacker's clipping is logged at INFO; rejections would flood
    columns = ["honest", "old 1e9", "new 1e9", "old equal", "new equal"]
    lines = [
        f"Global product move / an honest client's step ({args.honest} honest clients + 1 attacker at 99x the "
        f"median update norm; seed {args.seed})",
        "",
        "| method | " + " | ".join(f"{c}" for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for method in available_methods():
        row = run(method, args.honest, args.seed)
        lines.append(f"| {method} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
