"""Federated fine-tuning of LoRA adapters: FLoRA-NA and its baselines, simulated on one machine or on Flower.

Each client fine-tunes a LoRA adapter on its own (non-IID) share of a task; every round the server
aggregates the adapters with the chosen method and scores the global model. A run directory gets
config.json, metrics.jsonl, plots and the trained PEFT adapter.

examples:
  fedlora demo --data-dir ../shared/data/glue   SST-2, 10 clients, alpha 0.5: FLoRA-NA (stabilised) vs FedIT,
                                                read from local GLUE files; without --data-dir the data comes
                                                from $FEDLORA_DATA_DIR, else the Hugging Face hub (network)
  fedlora run --task toy --rounds 2             a small run that checks the setup (built-in data, no files)
  fedlora run --task rte --data-dir ../shared/data/glue --method fedit --rounds 20 --clients 10 --out runs/rte
  fedlora run --config run.toml --seed 1        options from a TOML file; flags override it
  fedlora compare runs/demo/fedit runs/demo/flora-na-stable --out runs/cmp
  fedlora bench --preset quick --dry-run        what a benchmark grid runs, and its estimated time
  fedlora methods                               every aggregation method: options, secure aggregation, source
  fedlora tasks                                 every task: model family, metric, where its data comes from

`fedlora COMMAND --help` lists a command's options and their defaults; -v (before or after COMMAND)
logs each round.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import warnings
from pathlib import Path

from fedlora.cli.parser import Parser
from fedlora.config.run import ConfigError, RunConfig
from fedlora.config.schema import add_arguments, from_namespace
from fedlora.cli.demo import DEMO_EXAMPLES
from fedlora.util.threads import add_threads_option, apply_threads, prefer_passive_wait
from fedlora.runs.model_card import privacy_text

FORMATS = ("text", "markdown")  # fedlora.cli.catalog.FORMATS; repeated so that building the parser imports nothing

RUN_EXAMPLES = """\
examples:
  fedlora run --task sst2 --data-dir ../shared/data/glue --method flora-na --rounds 20 --clients 10 --out runs/sst2
  fedlora run --task rte --data-dir ../shared/data/glue --lr-schedule cosine --warmup-steps 20 --max-grad-norm 1
  fedlora run --config run.toml --rounds 40     the options from run.toml, --rounds overridden
  fedlora run --config runs/sst2/config.json --seed 1 --out runs/sst2-seed1    repeat a run, one change
  fedlora run --resume runs/sst2                continue an interrupted run from its checkpoint

Without --data-dir the data comes from $FEDLORA_DATA_DIR, else the Hugging Face hub, which needs the
network; `fedlora tasks` says where each task's data comes from. The toy task needs no data.

--config FILE: a TOML file with any of the options above, dashed or underscored, at the top level or
in a table named after the option's section; unknown keys are refused. A run's config.json (JSON)
works too. Flags typed on the command line override the file.
    task = "rte"
    method = "flora-na"
    rounds = 20
    [training]
    lr = 5e-3
    lr-schedule = "cosine"
    warmup-steps = 20
"""


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Every RunConfig field as a flag, generated from its one declaration (fedlora.config.run), and --config.

    Only the options typed on the command line land in the namespace (:func:`config_from_args` layers
    them over the config file and the declared defaults), so a flag can override a file.
    """
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="read options from a TOML file (or a run's config.json); flags override it")
    add_arguments(parser, RunConfig, shown={"out": "runs/<method>-<task>"}, given_only=True)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The validated config: declared defaults, then ``--config FILE``, then the flags typed."""
    from fedlora.config.file import read_config_file

    values = read_config_file(args.config, RunConfig) if getattr(args, "config", None) else {}
    typed = from_namespace(RunConfig, args)  # only the options on the command line (given_only)
    if "method_options" in typed:  # --method-option KEY=VALUE adds to (or replaces one of) the file's
        typed["method_options"] = {**values.get("method_options", {}), **typed["method_options"]}
    values.update(typed)
    if values.get("out", "") == "":  # unset; a null or a boolean is left for validation to refuse
        defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
        values["out"] = f"runs/{values.get('method', defaults['method'])}-{values.get('task', defaults['task'])}"
    return RunConfig(**values)


def _subcommand(sub: argparse._SubParsersAction, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    """A sub-command whose --help shows its description, its examples and ``-v`` (also accepted here)."""
    verbose = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,  # keeps a -v given
                         help="log each round (also accepted before the command)")  # before the command
    return sub.add_parser(name, help=help, description=help, epilog=examples, parents=[verbose], allow_abbrev=False,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fedlora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log each round")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = _subcommand(sub, "run", "federated fine-tuning with the local engine (every option has a default)",
                      RUN_EXAMPLES)
    run.usage = "%(prog)s [-h] [-v] [--config FILE] [--resume RUN_DIR] [--OPTION VALUE ...]"
    add_run_options(run)
    add_threads_option(run)
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run already in --out (its config, checkpoint, metrics, adapter); without it an "
                          "existing run is refused: continue it with --resume")
    compare = _subcommand(sub, "compare", "markdown table + overlaid plots of several runs",
                          "example:\n  fedlora compare runs/demo/fedit runs/demo/flora-na-stable --out runs/cmp\n")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (each holds metrics.jsonl)")
    compare.add_argument("--out", default=None, help="also write compare.md and the plots here (default: print "
                         "the table only)")
    demo = _subcommand(sub, "demo", "SST-2, 10 clients, alpha=0.5: the stabilised FLoRA-NA (the default method) "
                       "vs FedIT", DEMO_EXAMPLES)
    demo.add_argument("--data-dir", default=None, help="GLUE folder with SST-2/ (default: $FEDLORA_DATA_DIR, "
                      "else the Hugging Face hub, which needs the network)")
    demo.add_argument("--out", default="runs/demo", help="one run directory per method under this (default: "
                      "%(default)s)")
    demo.add_argument("--methods", nargs="+", default=["flora-na-stable", "fedit"],
                      help="methods to compare (default: flora-na-stable fedit; add flora-na for the paper's method)")
    demo.add_argument("--rounds", type=int, default=8, help="federated rounds per method (default: %(default)s)")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace the runs already in --out/METHOD; without it an existing run is refused")
    add_threads_option(demo)
    from fedlora.bench.cli import BENCH_EXAMPLES, add_bench_options  # light: argparse and the preset tables only

    bench = _subcommand(sub, "bench", "paper benchmark grid: tables, CSV, plots (see docs/results.md)", BENCH_EXAMPLES)
    add_bench_options(bench)
    add_threads_option(bench)
    for name, what in (("methods", "aggregation method: what clients train and upload, options and defaults, "
                                    "secure aggregation, mixed ranks, source"),
                       ("tasks", "task: model family, metric, what is learned, where the data comes from")):
        listing = _subcommand(sub, name, f"every registered {what} (docs/{name}.md is its Markdown)",
                              f"examples:\n  fedlora {name}\n  fedlora {name} --format markdown > docs/{name}.md    "
                              "regenerate the docs' table\n")
        listing.add_argument("--format", choices=FORMATS, default="text",
                             help="text: one block per entry; markdown: the docs' tables (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    prefer_passive_wait()  # before anything imports torch: OpenMP reads it once, when torch loads it
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.command == "run":
            from fedlora.runs.run_dir import explicit_options

            # explicit_options suppresses the parser's defaults: a second parser, not the one above
            return _run(args, explicit_options(build_parser(), argv))
        if args.command == "compare":
            quiet_libraries()
            return compare_runs(args.runs, args.out)
        if args.command == "demo":
            from fedlora.cli.demo import run_demo

            return run_demo(args)
        if args.command in ("methods", "tasks"):
            from fedlora.cli.catalog import render

            print(render(args.command, args.format), end="" if args.format == "markdown" else "\n")
            return 0
        if args.command == "bench":
            quiet_libraries()
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


def quiet_libraries() -> None:
    # Our own progress bar says what is happening; the libraries' load reports and per-map bars are noise.
    import datasets
    import transformers

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # PEFT ⇄ transformers 5
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _run(args: argparse.Namespace, given: set[str] | None = None) -> int:
    """Lock the run directory, check it (fresh, --overwrite or --resume), then run; all before heavy imports."""
    from fedlora.runs import lock as runlock
    from fedlora.protocol.checkpoint import CONFIG_FILE
    from fedlora.util.atomic import atomic_write_text
    from fedlora.runs.run_dir import check_fresh, claim, resume_config

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
            if getattr(args, "config", None):  # a --config file's options count as given, like flags
                from fedlora.config.file import read_config_file

                typed = {**read_config_file(args.config, RunConfig), **typed}
            config = resume_config(out, typed)
            atomic_write_text(out / CONFIG_FILE, config.to_json())  # the extended run's config (e.g. more rounds)
        else:
            check_fresh(out, getattr(args, "overwrite", False))
            claim(out)  # a fedlora run directory from now on (what a later --overwrite may replace)
        quiet_libraries()
        print(apply_threads(args.threads), flush=True)
        from fedlora.engines.local import run

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
    if privacy_text(last):
        print(f"privacy: {privacy_text(last)}")
    return 0


def compare_runs(runs: list[str], out: str | None) -> int:
    from fedlora.reporting.curves import compare_table, plot_runs

    table = compare_table(runs)
    print(table)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "compare.md").write_text(table + "\n")
        for path in plot_runs(runs, Path(out), prefix="compare_"):
            print(f"wrote {path}")
    return 0
