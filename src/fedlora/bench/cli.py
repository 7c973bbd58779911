"""`fedlora bench`: run a preset grid (or a slice of it) and write one results directory.

    fedlora bench --preset quick --out results/quick
    fedlora bench --preset headline --workers 2                       # ≤ 90 min on 2 cores
    fedlora bench --preset headline --tasks sst2 --methods fedit svd flora-na --seeds 0 --set rounds=4
    fedlora bench --preset comm                                       # bytes: formulas + tiny real runs

Reruns skip finished runs and resume interrupted ones, so the same command continues a grid.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from fedlora.bench.presets import PRESETS, STEP_SECONDS, estimate_seconds, get_preset

DEFAULT_DATA_DIR = Path("../shared/data")  # the data root: GLUE in glue/, GSM8K in gsm8k/, ...


def _override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set wants FIELD=VALUE, e.g. rounds=4; got {text!r}")
    key, value = text.split("=", 1)
    if value.lower() in ("iid", "none"):
        return key, None
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


BENCH_EXAMPLES = """\
examples:
  fedlora bench --preset quick --out results/quick      the default preset: the CI smoke grid
  fedlora bench --preset headline --dry-run             the plan and the estimated time, nothing run
  fedlora bench --preset headline --workers 2           two runs at once (2 cores)
  fedlora bench --preset headline --tasks sst2 --methods fedit svd flora-na --seeds 0 --set rounds=4
  fedlora bench --preset comm                           bytes per round: formulas + tiny real runs

Reruns skip finished runs and resume interrupted ones, so the same command continues a grid.
"""


def add_bench_options(p: argparse.ArgumentParser) -> None:
    """The ``fedlora bench`` options (and the preset list and examples in its --help)."""
    p.epilog = "presets:\n" + "".join(f"  {name:<18}{preset.description}\n" for name, preset in PRESETS.items()) \
        + "\n" + BENCH_EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--preset", default="quick", choices=list(PRESETS), metavar="NAME",
                   help="which grid, one of the presets listed below (default: quick; see docs/results.md)")
    p.add_argument("--data-dir", default=None, help=f"data root (GLUE in glue/, gsm8k/, mbpp/) or a GLUE directory; default {DEFAULT_DATA_DIR} if it exists, else $FEDLORA_DATA_DIR")
    p.add_argument("--out", default=None, help="results directory (default results/<preset>)")
    p.add_argument("--tasks", nargs="+", default=None, help="restrict to these tasks")
    p.add_argument("--methods", nargs="+", default=None, help="restrict to these method labels (or their directory slugs)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="restrict to / replace the seeds")
    p.add_argument("--set", dest="overrides", action="append", type=_override, default=[], metavar="FIELD=VALUE",
                   help="override a RunConfig field for every run, e.g. rounds=4 (changes the stated budget)")
    p.add_argument("--step-seconds", type=float, default=STEP_SECONDS, help="seconds per training step at batch 32x64, for the estimate")
    p.add_argument("--calibrate", action="store_true", help="measure the step time on this machine first (~10 s) and estimate with it")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the estimate, run nothing")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the runs on disk (partial grids too), run nothing")
    p.add_argument("--progress", action="store_true", help="per-round progress bars (sequential runs only)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="run N runs at once, each in its own process with cpu_count // N torch threads "
                        "(2 on a 2-core CPU: about 1.35x the throughput of 1). The thread count changes the "
                        "order of float sums, so numbers agree with --workers 1 to rounding, not bit for bit")
    p.add_argument("--reuse", nargs="+", type=Path, default=[], metavar="RESULTS_DIR",
                   help="copy finished runs with an identical config from these results directories instead of "
                        "rerunning them (e.g. an ablation's centre point from results/headline)")


def _data_dir(arg: str | None) -> str | None:
    if arg:
        return str(Path(arg).resolve())
    if DEFAULT_DATA_DIR.is_dir():
        return str(DEFAULT_DATA_DIR.resolve())
    return os.environ.get("FEDLORA_DATA_DIR")


def run_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from fedlora.bench.grid import expand, finished_runs, run_jobs, select, status
    from fedlora.bench.report import commit, write_report

    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    preset = select(get_preset(args.preset), args.tasks, args.methods, args.seeds)
    overrides = dict(args.overrides)
    if overrides and preset.budget_minutes is not None:
        from dataclasses import replace

        preset = replace(preset, budget_minutes=None)  # the stated budget holds for the preset as shipped only
    if args.calibrate:
        from fedlora.bench.presets import measure_step_seconds

        args.step_seconds = measure_step_seconds()
        print(f"measured {args.step_seconds:.3f} s per training step at batch 32 x 64 (nominal {STEP_SECONDS} s on an idle 2-core CPU)")
    results = Path(args.out or f"results/{preset.name}")
    jobs = expand(preset, results, _data_dir(args.data_dir), overrides)
    states = [status(job) for job in jobs]
    todo = [job for job, s in zip(jobs, states) if s != "done"]
    estimate = sum(estimate_seconds(job.config, args.step_seconds) for job in jobs)
    remaining = sum(estimate_seconds(job.config, args.step_seconds) for job in todo)
    print(f"preset {preset.name}: {len(jobs)} runs ({len(preset.tasks)} tasks x {len(preset.settings)} settings x "
          f"{len(preset.methods)} methods x {len(preset.seeds)} seeds), {len(jobs) - len(todo)} already finished")
    print(f"estimated {estimate / 60:.1f} min for the whole grid, {remaining / 60:.1f} min left "
          f"(at {args.step_seconds:.3f} s/step, one run at a time)" + (f"; budget {preset.budget_minutes:g} min" if preset.budget_minutes else ""))
    if args.dry_run:
        return 0
    words = list(argv if argv is not None else sys.argv[1:])
    words = words[words.index("bench") + 1:] if "bench" in words else words  # `fedlora [-v] bench ...`
    command = " ".join(["fedlora bench", *map(shlex.quote, words)])
    ran_at = None if args.report_only else commit()
    start = time.perf_counter()
    reuse = finished_runs(args.reuse) if args.reuse else None
    threads = getattr(args, "threads", "auto")
    if not args.report_only and args.workers == 1:
        from fedlora.util.threads import apply_threads

        print(apply_threads(threads), flush=True)
    # --workers N: each worker gets --threads N, or with auto the usable CPUs split evenly (the workers are the load)
    counts = ({"new": 0, "resumed": 0, "skipped": len(jobs), "reused": 0} if args.report_only
              else run_jobs(jobs, args.step_seconds, progress=args.progress, reuse=reuse, workers=args.workers,
                            threads=None if threads == "auto" else int(threads)))
    elapsed = time.perf_counter() - start
    path = write_report(results, preset, jobs, command, estimate, args.step_seconds, elapsed, ran_at,
                        None if args.report_only else args.workers)
    print(f"{counts['new']} new, {counts['resumed']} resumed, {counts['reused']} reused, {counts['skipped']} skipped in {elapsed / 60:.1f} min -> {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for benchmarks/paper.py (same options as `fedlora bench`)."""
    from fedlora.cli.parser import Parser  # no prefixes, a did-you-mean: as `fedlora bench`

    from fedlora.util.threads import add_threads_option, prefer_passive_wait

    prefer_passive_wait()  # benchmarks/paper.py enters here, before torch is imported
    parser = Parser(prog="fedlora bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_options(parser)
    add_threads_option(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    from fedlora.cli.commands import quiet_libraries

    quiet_libraries()
    return run_from_args(args, argv)
