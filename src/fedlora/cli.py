"""fedlora: federated fine-tuning of LoRA adapters (FLoRA-NA and its baselines), locally or on Flower.

The command line reads top to bottom: parse → build a RunConfig (validated) → run → save.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from fedlora.config import ConfigError, RunConfig
from fedlora.config_schema import add_arguments, from_namespace

def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Every RunConfig field as a flag, generated from its one declaration (fedlora.config)."""
    add_arguments(parser, RunConfig, defaults={"out": None})


def config_from_args(args: argparse.Namespace) -> RunConfig:
    values = from_namespace(RunConfig, args)
    values["out"] = values["out"] or f"runs/{values['method']}-{values['task']}"
    return RunConfig(**values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log each round")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="federated fine-tuning with the local engine")
    add_run_options(run)
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a crashed run from its last checkpoint")
    compare = sub.add_parser("compare", help="markdown table + overlaid plots of several runs")
    compare.add_argument("runs", nargs="+")
    compare.add_argument("--out", default=None, help="write compare.md and plots here")
    demo = sub.add_parser("demo", help="SST-2, 10 clients, alpha=0.5: the stabilised FLoRA-NA (the default method) vs FedIT")
    demo.add_argument("--data-dir", default=None)
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--methods", nargs="+", default=["flora-na-stable", "fedit"],
                      help="methods to compare (default: flora-na-stable fedit; add flora-na for the paper's method)")
    demo.add_argument("--rounds", type=int, default=8)
    from fedlora.bench.cli import add_bench_options  # light: argparse and the preset tables only

    add_bench_options(sub.add_parser("bench", help="paper benchmark grid: tables, CSV, plots (see docs/results.md)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    _add_run_dir_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.command == "run":
            from fedlora.run_dir import explicit_options

            fresh = build_parser()  # explicit_options suppresses its defaults: a second parser, not ours
            _add_run_dir_options(fresh)
            return _run(args, explicit_options(fresh, argv))
        if args.command == "compare":
            _quiet_libraries()
            return _compare(args.runs, args.out)
        if args.command == "demo":
            return _demo(args)
        if args.command == "bench":
            _quiet_libraries()
            from fedlora.bench import run_from_args

            return run_from_args(args, argv)
    except (ConfigError, OSError, ValueError, KeyError) as exc:  # bad input: one line, no traceback
        print(f"fedlora {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedlora {args.command}: interrupted", file=sys.stderr)
        return 130
    return 1


def _one_line(exc: BaseException) -> str:
    """The error's message on one line (KeyError quotes its message; library errors can span lines)."""
    text = exc.args[0] if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str) else str(exc)
    return " ".join(text.split())


def _add_run_dir_options(parser: argparse.ArgumentParser) -> None:
    """``fedlora run --overwrite`` (run-directory semantics: fedlora.run_dir)."""
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    subparsers.choices["run"].add_argument(
        "--overwrite", action="store_true",
        help="replace the run already in --out (its config, checkpoint, metrics, adapter); without it an existing "
             "run is refused: continue it with --resume")


def _quiet_libraries() -> None:
    # Our own progress bar says what is happening; the libraries' load reports and per-map bars are noise.
    import datasets
    import transformers

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # PEFT ⇄ transformers 5
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _run(args: argparse.Namespace, given: set[str] | None = None) -> int:
    """Lock the run directory, check it (fresh, --overwrite or --resume), then run; all before heavy imports."""
    from fedlora import runlock
    from fedlora.checkpoint import CONFIG_FILE, atomic_write_text
    from fedlora.run_dir import check_fresh, resume_config

    if args.resume:
        if getattr(args, "overwrite", False):
            raise ConfigError("--overwrite and --resume contradict each other: --resume continues the run in RUN_DIR")
        out = Path(args.resume)
        if not (out / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"no run to resume in {out} (no {CONFIG_FILE}); --resume takes the --out "
                                    "directory of an earlier run")
    else:
        config = config_from_args(args)  # every option checked here, before anything heavy is imported
        out = Path(config.out)
    runlock.acquire(out)  # a read-only or busy run directory fails here, in a second, not after loading
    try:
        if args.resume:  # compared with the checkpoint under the lock: nobody else writes it meanwhile
            typed = {k: v for k, v in from_namespace(RunConfig, args).items() if k in (given or set())}
            config = resume_config(out, typed)
            atomic_write_text(out / CONFIG_FILE, config.to_json())  # the extended run's config (e.g. more rounds)
        else:
            check_fresh(out, getattr(args, "overwrite", False))
        _quiet_libraries()
        from fedlora.simulation import run

        history = run(config, resume=bool(args.resume))
    except KeyboardInterrupt:
        print(f"fedlora run: interrupted; the rounds completed so far are checkpointed in {out}: continue "
              f"with `fedlora run --resume {out}`", file=sys.stderr)
        return 130
    finally:
        runlock.release(out)
    if not history or all(r.get("skipped") for r in history):
        print(f"fedlora run: error: every round was skipped (fewer than --min-clients={config.min_clients} valid "
              f"client updates; reasons under 'rejected' in {Path(config.out) / 'metrics.jsonl'}): nothing was "
              "trained", file=sys.stderr)
        return 1
    last = history[-1]
    print(f"{config.method} on {config.task}: final {last['global']} after {last['round']} rounds -> {config.out}")
    return 0


def _compare(runs: list[str], out: str | None) -> int:
    from fedlora.reporting import compare_table, plot_runs

    table = compare_table(runs)
    print(table)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "compare.md").write_text(table + "\n")
        for path in plot_runs(runs, Path(out), prefix="compare_"):
            print(f"wrote {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fedlora.simulation import run

    configs = [  # all built (and validated) before the first one runs
        RunConfig(
            task="sst2", data_dir=args.data_dir, method=method, rounds=args.rounds, clients=10, alpha=0.5,
            local_steps=5, batch_size=16, lr=5e-3, max_length=48, eval_local_every=0, max_eval_examples=None,
            out=str(Path(args.out) / method),
        )
        for method in args.methods
    ]
    from fedlora.bench.presets import STEP_SECONDS, estimate_seconds
    from fedlora.progress import RunProgress, plan_text

    estimates = [estimate_seconds(c) for c in configs]
    print(plan_text(configs, sum(estimates), f"cost model at {STEP_SECONDS} s per training step on an idle 2-core "
                    "CPU; the ETA below is corrected by each finished run"), flush=True)
    _quiet_libraries()
    progress = RunProgress(estimates)
    for index, config in enumerate(configs):
        what = f"{config.method}: {config.rounds} rounds, {config.clients} clients, alpha={config.alpha}"
        progress.start(index, what)
        run(config)
        progress.finish(index, what)
    return _compare([c.out for c in configs], args.out)
