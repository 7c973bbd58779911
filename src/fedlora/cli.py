"""The `fedlora` command line: parse → build a RunConfig → run → save. See `fedlora --help`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from fedlora.aggregation import available_methods
from fedlora.config import ConfigError, RunConfig

DEFAULTS = RunConfig()


def parse_alpha(text: str) -> float | None:
    return None if text.lower() == "iid" else float(text)


def parse_method_option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--method-option wants KEY=VALUE, e.g. solver=adamw; got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)  # numbers and booleans
    except json.JSONDecodeError:
        return key, value


def add_run_options(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("--task", default=d.task, help="GLUE task: sst2 mrpc rte cola qnli qqp mnli stsb")
    p.add_argument("--data-dir", default=None, help="GLUE directory (original layout); default $FEDLORA_DATA_DIR, else the hub")
    p.add_argument("--model", default=None, help="hub id or local path; default: bundled all-MiniLM-L6-v2")
    p.add_argument("--method", default=d.method, choices=available_methods())
    p.add_argument("--method-option", action="append", type=parse_method_option, default=[], metavar="KEY=VALUE",
                   help="method option, repeatable: solver=adamw, scope=global, weighting=authors, steps=200")
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--clients", type=int, default=d.clients)
    p.add_argument("--alpha", type=parse_alpha, default=d.alpha, help="Dirichlet concentration over labels, or 'iid'")
    p.add_argument("--fraction", type=float, default=d.fraction, help="share of clients sampled per round")
    p.add_argument("--min-clients", type=int, default=d.min_clients, help="skip a round with fewer valid client updates")
    p.add_argument("--local-steps", type=int, default=d.local_steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    p.add_argument("--target-modules", nargs="+", default=list(d.target_modules))
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-local-every", type=int, default=d.eval_local_every)
    p.add_argument("--max-eval-examples", type=int, default=None)
    p.add_argument("--out", default=None, help="run directory (default runs/<method>-<task>)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        task=args.task, data_dir=args.data_dir, model=args.model, method=args.method,
        method_options=dict(args.method_option), rounds=args.rounds, clients=args.clients, alpha=args.alpha,
        fraction=args.fraction, min_clients=args.min_clients, local_steps=args.local_steps, batch_size=args.batch_size, lr=args.lr,
        max_length=args.max_length, rank=args.rank, lora_alpha=args.lora_alpha,
        target_modules=tuple(args.target_modules), seed=args.seed, eval_local_every=args.eval_local_every,
        max_eval_examples=args.max_eval_examples, out=args.out or f"runs/{args.method}-{args.task}",
    )


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
    demo = sub.add_parser("demo", help="SST-2, 10 clients, alpha=0.5: FLoRA-NA vs FedIT (a few minutes on a CPU)")
    demo.add_argument("--data-dir", default=None)
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--methods", nargs="+", default=["flora-na", "fedit"], choices=available_methods())
    demo.add_argument("--rounds", type=int, default=8)
    from fedlora.bench.cli import add_bench_options  # light: argparse and the preset tables only

    add_bench_options(sub.add_parser("bench", help="paper benchmark grid: tables, CSV, plots (see docs/results.md)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    _quiet_libraries()
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "compare":
            return _compare(args.runs, args.out)
        if args.command == "demo":
            return _demo(args)
        if args.command == "bench":
            from fedlora.bench import run_from_args

            return run_from_args(args, argv)
    except (ConfigError, OSError, ValueError, KeyError) as exc:  # bad input: one line, no traceback
        print(f"fedlora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 1


def _quiet_libraries() -> None:
    # Our own progress bar says what is happening; the libraries' load reports and per-map bars are noise.
    import datasets
    import transformers

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # PEFT ⇄ transformers 5
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _run(args: argparse.Namespace) -> int:
    from fedlora.simulation import run

    if args.resume:
        config = RunConfig.from_json((Path(args.resume) / "config.json").read_text()).replace(out=args.resume)
        history = run(config, resume=True)
    else:
        config = config_from_args(args)
        history = run(config)
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

    runs = []
    for method in args.methods:
        config = RunConfig(
            task="sst2", data_dir=args.data_dir, method=method, rounds=args.rounds, clients=10, alpha=0.5,
            local_steps=5, batch_size=16, lr=5e-3, max_length=48, eval_local_every=0, max_eval_examples=None,
            out=str(Path(args.out) / method),
        )
        print(f"== {method}: {config.rounds} rounds, {config.clients} clients, alpha={config.alpha}")
        run(config)
        runs.append(config.out)
    return _compare(runs, args.out)
