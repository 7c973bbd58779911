"""``fedlora demo``: SST-2, 10 clients, α = 0.5, the default method (stabilised FLoRA-NA) against FedIT.

Every method's config is built (and validated) and its run directory locked and checked before the first
run starts; the runs are then made one after the other, with a plan, an ETA corrected by each finished
run, and at the end the comparison table and where everything was written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedlora.config.run import RunConfig

DEMO_EXAMPLES = """\
examples:
  fedlora demo --data-dir ../shared/data/glue    SST-2 from local GLUE files (offline)
  fedlora demo                                   SST-2 from $FEDLORA_DATA_DIR, else the Hugging Face hub (network)
  fedlora demo --data-dir ../shared/data/glue --rounds 4 --out runs/demo-short
  fedlora demo --data-dir ../shared/data/glue --methods flora-na-stable flora-na fedit    the paper's FLoRA-NA too

At its end the demo prints a comparison table and where it wrote it (--out/compare.md, with plots), the
run folder of each method (--out/METHOD: metrics.jsonl, plots) and each trained adapter (--out/METHOD/adapter).
"""


def run_demo(args: argparse.Namespace) -> int:
    """``fedlora demo``'s parsed arguments (``--data-dir --out --methods --rounds --overwrite --threads``) -> exit status."""
    configs = [  # all built (and validated) before the first one runs
        RunConfig(
            task="sst2", data_dir=args.data_dir, method=method, rounds=args.rounds, clients=10, alpha=0.5,
            local_steps=5, batch_size=16, lr=5e-3, max_length=48, eval_local_every=0, max_eval_examples=None,
            out=str(Path(args.out) / method),
        )
        for method in args.methods
    ]
    from fedlora.runs import lock as runlock
    from fedlora.runs.run_dir import claim, refuse_existing, remove_outputs

    outs = [Path(c.out) for c in configs]
    held: list[Path] = []
    try:  # every method's directory locked for the whole demo, and all checked before any is changed
        for out in outs:
            runlock.acquire(out)
            held.append(out)
        for out in outs:
            refuse_existing(out, args.overwrite, resume_hint=False)
        for out in outs:
            if args.overwrite:
                remove_outputs(out)
            claim(out)
        return _run_all(configs, args.out, getattr(args, "threads", "auto"))
    finally:
        for out in held:
            runlock.release(out)


def _run_all(configs: list[RunConfig], out: str, threads: str = "auto") -> int:
    from fedlora.bench.presets import STEP_SECONDS, estimate_seconds
    from fedlora.cli.progress import RunProgress, plan_text
    from fedlora.engines.local import run

    # The cost model is fitted at batch 32 x 64; at the demo's 16 x 48 it predicts 87 s for fedit, which took
    # 221 s on a 2-core AMD EPYC at load 1-2 (fedlora demo, 2026-11-30): scale by that measurement.
    measured_scale = 2.5
    estimates = [estimate_seconds(c) * measured_scale for c in configs]
    print(plan_text(configs, sum(estimates), f"cost model at {STEP_SECONDS} s per step x {measured_scale}, as "
                    "measured for fedit on a 2-core CPU; the ETA below is corrected by each finished run"), flush=True)
    from fedlora.cli.commands import compare_runs, quiet_libraries  # looked up now: tests replace them
    from fedlora.util.threads import apply_threads

    quiet_libraries()
    print(apply_threads(threads), flush=True)
    progress = RunProgress(estimates)
    for index, config in enumerate(configs):
        what = f"{config.method}: {config.rounds} rounds, {config.clients} clients, alpha={config.alpha}"
        progress.start(index, what)
        run(config)
        progress.finish(index, what)
    status = compare_runs([c.out for c in configs], out)
    print(outputs_text(configs, out))
    return status


def outputs_text(configs: list[RunConfig], out: str) -> str:
    """Where the demo's results are: the comparison, each method's run folder, each trained adapter."""
    width = max(len(str(Path(c.out))) for c in configs) + len("/adapter/") + 2
    lines = [f"\ndemo outputs (under {out}/):", f"  {str(Path(out) / 'compare.md'):<{width}}the table above; "
             f"compare_*.png beside it: the methods' curves overlaid"]
    for c in configs:
        lines.append(f"  {str(Path(c.out)) + '/':<{width}}{c.method}'s run: config.json, metrics.jsonl (every round), "
                     "global_<metric>.png, divergence.png")
        lines.append(f"  {str(Path(c.out) / 'adapter') + '/':<{width}}{c.method}'s trained PEFT adapter and its model "
                     "card (README.md: how to load it)")
    return "\n".join(lines)
