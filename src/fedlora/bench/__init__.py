"""The paper-reproduction benchmark: preset grids of federated runs, tables, plots, communication checks.

    fedlora bench --preset quick          # or: python benchmarks/paper.py --preset quick

Modules: presets (grids and their cost model), grid (expand, skip finished, resume), stats (mean ± std
over seeds, markdown/CSV), plots, comm (bytes per round: closed forms vs round_bytes vs real runs),
report (the results directory), cli (options shared by `fedlora bench` and benchmarks/paper.py).
"""

from fedlora.bench.cli import add_bench_options, main, run_from_args
from fedlora.bench.presets import PRESETS, Preset, Setting, Variant, estimate_seconds, get_preset

__all__ = ["PRESETS", "Preset", "Setting", "Variant", "add_bench_options", "estimate_seconds", "get_preset", "main", "run_from_args"]
