"""One point of ``benchmarks/aggregation.py --clients``, run in its own process so its peak memory is its own.

    python benchmarks/client_sweep_point.py METHOD U IMPL   # IMPL: new, or old (the U·r Gram divergence route)

Prints one JSON line: seconds of the whole ``aggregate`` call (the method + the divergence report),
the solve and the divergence share, the process's peak RSS (ru_maxrss) and its RSS before the call.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from functools import partial

import torch

from fedlora.aggregation import aggregate, api
from fedlora.aggregation.divergence import divergence_report
from fedlora.aggregation.methods import flora_na
from fedlora.testing.synthetic import random_clients

MODULES, DIM, RANK = 12, 384, 8  # MiniLM: 12 modules 384×384, r = 8


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    method, clients, impl = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if impl == "old":  # the implementations before issue 23: every group through the (U r)² Grams
        api.divergence_report = partial(divergence_report, route="gram")  # type: ignore[assignment]
        flora_na.GRAM_BUDGET_BYTES = 1 << 62  # FLoRA-NA's ALS on its Grams at any U
    shapes = {f"layer{i // 2}.{'qv'[i % 2]}": (DIM, DIM) for i in range(MODULES)}
    g, ups = random_clients(shapes, RANK, 2, dtype=torch.float32)
    aggregate(method, g, ups)  # warm-up: first LAPACK/BLAS calls are slow
    g, ups = random_clients(shapes, RANK, clients, dtype=torch.float32)  # float32 uploads, as clients send them
    before = _rss_mib()
    start = time.perf_counter()
    result = aggregate(method, g, ups)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"method": method, "U": clients, "impl": impl, "seconds": seconds,
                      "solve_seconds": result.metrics["solve_seconds"], "peak_mib": peak, "inputs_mib": before,
                      "divergence": result.metrics["divergence"]}))


if __name__ == "__main__":
    main()
