"""Write one results directory: results.md (tables + plots + provenance), results.csv, runs.csv, PNGs."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from fedlora.bench import comm, plots, stats
from fedlora.bench.grid import Job, completed_rounds, threads_per_worker
from fedlora.bench.presets import Preset, STEP_SECONDS
from fedlora.util.jsonsafe import read_metrics


def commit() -> str:
    """The checked-out commit, with "-dirty" when tracked files differ from it (then it alone does not reproduce)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def metric_names(tasks: list[str]) -> dict[str, str]:
    from fedlora.tasks.glue import get_task

    return {t: get_task(t).metric for t in tasks}


def load_runs(jobs: list[Job]) -> list[dict[str, Any]]:
    """Records of every job with at least one round (a partial grid still gets a partial report)."""
    runs = []
    for job in jobs:
        if completed_rounds(job.path) == 0:
            continue
        records = read_metrics(job.path / "metrics.jsonl")  # null (a non-finite value) read back as NaN
        runs.append({"task": job.task, "label": job.label, "seed": job.seed, "path": job.path,
                     "finished": len(records) >= job.config.rounds, "records": records,
                     **stats.summarize_records(records)})
    return runs


def write_report(results: Path, preset: Preset, jobs: list[Job], command: str, estimate_s: float,
                 step_seconds: float = STEP_SECONDS, elapsed_s: float | None = None, ran_at: str | None = None,
                 workers: int | None = None) -> Path:
    """``ran_at``: the commit when the runs started (the code that produced them), if known;
    ``workers``: how many runs went at once in this invocation (``--workers``), if it ran any."""
    runs = load_runs(jobs)
    names = metric_names(list(preset.tasks))
    rows = stats.aggregate_rows(runs)
    stats.write_csv(results / "results.csv", rows)
    stats.write_csv(results / "runs.csv", [{k: (str(v) if k == "path" else v) for k, v in r.items() if k != "records"} for r in runs])
    figures = plots.plot_all(runs, results, names)

    # Every finished run's recorded bytes are checked against the formulas (raises on any mismatch).
    measured = [row for r in runs if (r["path"] / "checkpoint.safetensors").is_file() for row in comm.check_measured(r["path"])]
    seen: set[str] = set()
    first_per_method = [r for r in measured if not (r["method"] in seen or seen.add(r["method"]))]
    # The formula table is cheap, so it always covers every method, not just this grid's.
    methods = list(comm.CLOSED_FORM)

    base = jobs[0].config if jobs else None
    now = commit()
    budget = f"≤ {preset.budget_minutes:g} min on a 2-core CPU" if preset.budget_minutes else "no stated budget"
    finished = sum(r["finished"] for r in runs)
    lines = [
        f"# fedlora bench: preset `{preset.name}`",
        "",
        f"{preset.description}.",
        "",
        f"- command: `{command}`",
        f"- commit: `{ran_at or now}`" + (f" (runs); report written at `{now}`" if ran_at and ran_at != now else ""),
        f"- budget: {budget}; estimated {estimate_s / 60:.1f} min for {len(jobs)} runs at {step_seconds} s per "
        f"training step (batch 32 × 64 tokens, idle machine)" + (f"; this invocation took {elapsed_s / 60:.1f} min" if elapsed_s is not None else "")
        + (f" with {workers} run{'s' if workers > 1 else ''} at a time, {threads_per_worker(workers)} torch "
           f"thread{'s' if threads_per_worker(workers) > 1 else ''} each" if workers and elapsed_s is not None else ""),
        f"- runs: {finished}/{len(jobs)} finished ({len(runs) - finished} partial); seeds {list(preset.seeds)}; mean ± sample std over seeds",
    ]
    if base is not None:
        shared = {k: getattr(base, k) for k in ("clients", "alpha", "fraction", "rounds", "local_steps", "batch_size",
                                                "max_length", "lr", "rank", "lora_alpha", "max_eval_examples",
                                                "max_local_eval_examples", "eval_local_every")}
        lines.append(f"- per run: {', '.join(f'{k}={v}' for k, v in shared.items())} (ablation settings override these)")
    lines += ["", "## Results", "",
              "local = mean over the rounds with local evaluation of the clients' mean metric on their own held-out split; "
              "local − global compares it with the global metric of the same rounds. Divergence = ‖B̂Â + Δ − T‖/‖T‖ "
              "averaged over rounds; SVD bound = the same for the best rank-r aggregate (Eckart–Young). MB = LoRA factors only.",
              "", stats.markdown_table(rows, names) if rows else "_no finished runs yet_", ""]
    paired = stats.paired_rows(runs)
    if paired:
        lines += ["## Paired against FedIT (same task, setting and seed)", "",
                  "Each seed fixes the partition, the initial adapter and every client's batches, so a method's difference "
                  "from FedIT on the same seed removes most of the seed-to-seed spread. Mean ± sample std over seeds.", "",
                  stats.paired_table(paired, names), ""]
    gaps = stats.gap_rows(runs)
    if gaps:
        lines += ["## Divergence against the SVD optimum (same task, setting and seed)", "",
                  "0 % is FedIT's divergence, 100 % the Eckart–Young optimum at the same rank and bytes (svd); "
                  "exact methods pay for divergence 0 in bytes or in a frozen factor, see the table above. The objective "
                  "columns compare FLoRA-NA's solver objective with FedIT's on the same round's client updates.", "",
                  stats.gap_table(gaps, names), ""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in figures] + [""]
    lines += ["## Communication at the paper's shapes (float32, formulas)", "", comm.formula_table(comm.formula_rows(methods)), ""]
    if first_per_method:
        lines += ["## Communication measured in these runs vs the formula", "",
                  f"All {len(measured)} recorded rounds matched the closed form exactly (asserted); first round per method:", "",
                  comm.measured_table(first_per_method), ""]
    (results / "results.md").write_text("\n".join(lines))
    return results / "results.md"
