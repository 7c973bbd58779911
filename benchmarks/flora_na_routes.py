"""FLoRA-NA's ALS on its Grams vs matrix-free, on heterogeneous least-squares clients at MiniLM shapes.

    python benchmarks/flora_na_routes.py 300 gram       # the Gram route at any U
    python benchmarks/flora_na_routes.py 1000 factors   # the matrix-free route at any U

One aggregate() call (divergence report off) after building the clients; prints the objective (both routes must
agree), FedIT's objective, the ALS sweeps, seconds and the process's peak RSS. Run one process per point.
"""

from __future__ import annotations

import resource
import sys
import time

from fedlora.aggregation import aggregate
from fedlora.aggregation.methods import flora_na
from fedlora.testing.synthetic import least_squares_clients


def main() -> None:
    clients, route = int(sys.argv[1]), sys.argv[2]
    flora_na.GRAM_BUDGET_BYTES = 1 << 62 if route == "gram" else 0
    shapes = {f"layer{i}.{n}": (384, 384) for i in range(6) for n in ("query", "value")}  # MiniLM: 12 modules, r = 8
    g, ups = least_squares_clients(shapes, 8, clients, seed=4)
    start = time.perf_counter()
    result = aggregate("flora-na", g, ups, measure_divergence=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{route} U={clients}: objective {result.metrics['objective']:.12g} (fedit {result.metrics['objective_fedit']:.6g}), "
          f"{result.metrics['iterations']} sweeps, {seconds:.1f} s, peak {peak:.2f} GiB")


if __name__ == "__main__":
    main()
