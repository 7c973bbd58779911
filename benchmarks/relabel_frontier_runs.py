"""One-off: give the frontier runs made before `flora-na-stable`'s defaults were fixed the config that names what ran.

During the frontier grid (commits 4f4ae79..ee5f1d1) `flora-na-stable` first meant ridge=1, max_deviation=0.5 without
rebalancing, and the balanced broadcast was probed as `flora-na` with rebalance=true. After the grid chose the
balanced broadcast as `flora-na-stable`'s default, each finished run directory is moved to its new label and its
config.json rewritten to the method + options that reproduce it exactly under the new defaults (the computations
are identical: `flora-na-stable` calls `flora-na`'s ALS with these options). metrics.jsonl and checkpoints are
untouched. Usage: python benchmarks/relabel_frontier_runs.py results/frontier [results/frontier-long]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# old directory -> the (method, method_options) its runs were made with
OLD = {
    "flora-na-stable": ("flora-na-stable", {}),
    "flora-na-stable_rebalanced": ("flora-na-stable", {"rebalance": True}),
    "flora-na_rebalanced": ("flora-na", {"rebalance": True}),
}
# old directory -> (new directory, method, method_options) under the new defaults
MOVES = {
    "flora-na-stable": ("flora-na_ridge-1_max_deviation-0.5", "flora-na", {"ridge": 1.0, "max_deviation": 0.5}),
    "flora-na-stable_rebalanced": ("flora-na-stable_ridge-1_max_deviation-0.5", "flora-na-stable",
                                   {"ridge": 1.0, "max_deviation": 0.5}),
    "flora-na_rebalanced": ("flora-na-stable", "flora-na-stable", {}),
}


def relabel(results: Path) -> None:
    runs = results / "runs" / "sst2"
    for old, (new, method, options) in MOVES.items():  # dict order: flora-na-stable is freed before it is reused
        source = runs / old
        if not source.is_dir():
            continue
        for path in sorted(source.glob("seed*/config.json")):
            config = json.loads(path.read_text())
            if (config["method"], config["method_options"]) != OLD[old]:
                raise SystemExit(f"{path}: {config['method']} {config['method_options']} is not a run of the old "
                                 f"label {old!r} ({OLD[old]}); nothing moved")
        target = runs / new
        if target.exists():
            raise SystemExit(f"{target} exists; nothing moved")
        source.rename(target)
        for seed_dir in sorted(target.glob("seed*")):
            path = seed_dir / "config.json"
            config = json.loads(path.read_text())
            config.update(method=method, method_options=options, out=str(seed_dir))
            path.write_text(json.dumps(config, indent=2, sort_keys=True))
        print(f"{source} -> {target}: method={method} options={options}")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        relabel(Path(arg))
