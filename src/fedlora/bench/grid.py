"""Expand a preset into runs and execute them, skipping finished ones and resuming interrupted ones.

Layout: ``<results>/runs/<task>/<label slug>/seed<k>``, each an ordinary ``fedlora run`` directory.
A run is finished when its metrics.jsonl holds rounds 1..R of the configured R; a run with a
checkpoint but fewer rounds continues with ``run(config, resume=True)`` (the engine guarantees the
same final metrics as an uninterrupted run). So killing the grid and starting it again only
repeats the round that was in flight.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fedlora.bench.presets import Preset, Variant, estimate_seconds
from fedlora.protocol.checkpoint import CHECKPOINT_FILE
from fedlora.config.run import RunConfig

IGNORED_IN_MATCH = {"out", "data_dir"}  # moving the results or the data does not change a run


@dataclass(frozen=True)
class Job:
    task: str
    label: str  # method label plus the ablation setting, e.g. "fedit [alpha=0.1]"
    seed: int
    config: RunConfig

    @property
    def path(self) -> Path:
        return Path(self.config.out)


def slug(label: str) -> str:
    """A directory name for a label: "flora-na (adamw 50)" -> "flora-na_adamw-50"."""
    text = re.sub(r"[()\[\],]", " ", label).strip()
    text = re.sub(r"\s+", "_", re.sub(r"\s*=\s*", "-", text))
    return re.sub(r"[^A-Za-z0-9._-]", "", text)


def select(preset: Preset, tasks: list[str] | None, methods: list[str] | None, seeds: list[int] | None) -> Preset:
    """Restrict a preset to some tasks / method labels (or slugs) / seeds, e.g. for a small slice."""
    chosen: tuple[Variant, ...] = preset.methods
    if methods:
        unknown = [m for m in methods if not any(m in (v.label, slug(v.label)) for v in preset.methods)]
        if unknown:
            raise ValueError(f"preset {preset.name} has no method {unknown}; it has {[v.label for v in preset.methods]}")
        chosen = tuple(v for v in preset.methods if v.label in methods or slug(v.label) in methods)
    from dataclasses import replace

    return replace(preset, tasks=tuple(tasks or preset.tasks), methods=chosen, seeds=tuple(seeds if seeds is not None else preset.seeds))


def expand(preset: Preset, results: Path, data_dir: str | None, overrides: dict[str, Any] | None = None) -> list[Job]:
    jobs = []
    for task in preset.tasks:
        for setting in preset.settings:
            for variant in preset.methods:
                label = f"{variant.label} [{setting.label}]" if setting.label else variant.label
                for seed in preset.seeds:
                    out = results / "runs" / task / slug(label) / f"seed{seed}"
                    fields = {**preset.base, **setting.changes, **(overrides or {})}
                    config = RunConfig(task=task, data_dir=data_dir, method=variant.method,
                                       method_options=dict(variant.options), seed=seed, out=str(out), **fields)
                    jobs.append(Job(task, label, seed, config))
    return jobs


def completed_rounds(path: Path) -> int:
    """Rounds 1..n present in order in metrics.jsonl (0 if missing or unreadable)."""
    try:
        lines = (path / "metrics.jsonl").read_text().splitlines()
        rounds = [json.loads(line)["round"] for line in lines if line.strip()]
    except (OSError, ValueError, KeyError):
        return 0
    return len(rounds) if rounds == list(range(1, len(rounds) + 1)) else 0


def _check_same_config(job: Job) -> None:
    # Skipping or resuming a run made with other options would report numbers for the wrong experiment.
    saved = job.path / "config.json"
    if not saved.is_file():
        return
    old = _with_defaults(json.loads(saved.read_text()))
    new = json.loads(job.config.to_json())
    diff = sorted(k for k in set(old) | set(new) if k not in IGNORED_IN_MATCH and old.get(k) != new.get(k))
    if diff:
        raise ValueError(f"{job.path} was run with different {diff}; use another --out or delete that run directory")


def _config_key(config_json: str) -> str:
    """What makes two runs the same experiment: the config minus where it lives on disk."""
    fields = {k: v for k, v in _with_defaults(json.loads(config_json)).items() if k not in IGNORED_IN_MATCH}
    return json.dumps(fields, sort_keys=True)


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config.json with the options added since it was written filled in at their defaults,
    which is what that run did (e.g. ``client_ranks`` unset: every client at ``--rank``)."""
    return json.loads(RunConfig().to_json()) | saved


def finished_runs(results_dirs: list[Path]) -> dict[str, Path]:
    """Index the finished runs under other results directories by their config, for reuse.

    An ablation's centre point (alpha=0.5, U=10, r=8, the ALS solver) is the headline's SST-2 run
    with the same seed; the engine is deterministic given the config, so rerunning it would only
    reproduce the same metrics.jsonl at the cost of minutes.
    """
    index: dict[str, Path] = {}
    for root in results_dirs:
        if not Path(root).is_dir():
            raise ValueError(f"--reuse {root}: no such results directory")
        for saved in sorted(Path(root).glob("runs/*/*/seed*/config.json")):
            config_json = saved.read_text()
            if completed_rounds(saved.parent) >= json.loads(config_json).get("rounds", 0) > 0:
                index.setdefault(_config_key(config_json), saved.parent)
    return index


def _copy_run(source: Path, job: Job) -> None:
    # Copy beside the target, then rename: an interrupted copy never looks like a finished run.
    partial = job.path.with_name(job.path.name + ".copying")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    (partial / "config.json").write_text(job.config.to_json())  # its own out path, not the source's
    shutil.rmtree(job.path, ignore_errors=True)
    partial.rename(job.path)


def status(job: Job) -> str:
    """'done', 'resume' (checkpoint present, rounds missing) or 'new'."""
    _check_same_config(job)
    done = completed_rounds(job.path)
    if done >= job.config.rounds:
        return "done"
    return "resume" if done > 0 and (job.path / CHECKPOINT_FILE).is_file() else "new"


def run_jobs(jobs: list[Job], step_seconds: float, progress: bool = False,
             runner: Callable[..., Any] | None = None, log: Callable[[str], None] = print,
             reuse: dict[str, Path] | None = None, workers: int = 1, threads: int | None = None) -> dict[str, int]:
    """Run every job that is not finished; returns counts of skipped/resumed/new/reused runs.

    ``reuse`` (from :func:`finished_runs`) maps configs to finished runs elsewhere; a new job whose
    config is there is copied instead of run. ``workers`` > 1 runs that many jobs at once in
    separate processes (see :func:`_run_parallel`) with ``threads`` torch threads each (None: the usable
    CPUs split evenly); ``runner`` must then be picklable.
    """
    counts = {"skipped": 0, "resumed": 0, "new": 0, "reused": 0}
    states = [status(job) for job in jobs]  # validate every directory before spending any CPU
    todo: list[tuple[str, Job, str]] = []
    for index, (job, state) in enumerate(zip(jobs, states), 1):
        where = f"[{index}/{len(jobs)}] {job.task} {job.label} seed{job.seed}"
        if state == "done":
            counts["skipped"] += 1
            continue
        source = (reuse or {}).get(_config_key(job.config.to_json())) if state == "new" else None
        if source is not None and source.resolve() != job.path.resolve():
            _copy_run(source, job)
            counts["reused"] += 1
            log(f"{where}: reused {source}")
            continue
        todo.append((where, job, state))

    # "run k of n" over the runs this invocation executes, with an overall ETA (fedlora.util.progress)
    from fedlora.cli.progress import RunProgress, plan_text

    estimates = [estimate_seconds(job.config, step_seconds) for _, job, _ in todo]
    order = {id(job): k for k, (_, job, _) in enumerate(todo)}
    tracker = RunProgress(estimates, log=log, workers=workers if workers > 1 and len(todo) > 1 else 1)
    if todo:
        at_once = f"{tracker.workers} at a time" if tracker.workers > 1 else "one at a time"
        log(plan_text([job.config for _, job, _ in todo], tracker.remaining_seconds(),
                      f"{at_once}, cost model at {step_seconds:.3g} s per training step"))

    def finished(where: str, job: Job, state: str, seconds: float) -> None:
        counts["resumed" if state == "resume" else "new"] += 1
        tracker.finish(order[id(job)], f"{where} ({state})", seconds)

    if workers > 1 and len(todo) > 1:
        _run_parallel(todo, workers, runner, finished, threads)
        return counts
    if runner is None:
        from fedlora.engines.local import run as runner
    for where, job, state in todo:
        tracker.start(order[id(job)], f"{where} ({state})")
        start = time.perf_counter()
        runner(job.config, resume=state == "resume", progress=progress)
        finished(where, job, state, time.perf_counter() - start)
    return counts


def cpu_count() -> int:
    """CPUs this process may use (the affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    """Torch threads each of ``workers`` parallel runs gets: the usable CPUs split evenly, at least 1."""
    return max(1, cpu_count() // workers)


def _start_worker(threads: int) -> None:
    import torch

    from fedlora.cli.commands import quiet_libraries  # a spawned process starts with the libraries' defaults

    torch.set_num_threads(threads)
    quiet_libraries()


def _timed_run(runner: Callable[..., Any] | None, config: RunConfig, resume: bool) -> float:
    if runner is None:
        from fedlora.engines.local import run as runner
    start = time.perf_counter()
    runner(config, resume=resume, progress=False)
    return time.perf_counter() - start


def _run_parallel(todo: list[tuple[str, Job, str]], workers: int, runner: Callable[..., Any] | None,
                  finished: Callable[[str, Job, str, float], None], threads: int | None = None) -> None:
    """Run ``todo`` on ``workers`` processes with cpu_count() // workers torch threads each.

    Why: on a 2-core CPU one run with 2 threads keeps the cores only ~80% busy (MiniLM's matrices
    at batch 8 x 48 are too small to split well), while 2 single-threaded runs keep both busy:
    about 1.35x the throughput. Each run is still deterministic given its config and the thread
    count (its batches, dropout and partition are seeded per run, never by the worker); a different
    thread count splits float sums differently, so it agrees with a sequential run to rounding
    (relative 1e-8 after one round here), not bit for bit. Spawned, not forked: forking
    after torch has started its OpenMP pool can deadlock the child. On the first failure the
    queued runs are cancelled, the running ones finish (so nothing is half-written beyond what
    a resume repairs), and the error is raised naming the run.
    """
    context = multiprocessing.get_context("spawn")
    threads = threads or threads_per_worker(workers)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(_timed_run, runner, job.config, state == "resume"): (where, job, state)
                   for where, job, state in todo}
        try:
            for future in as_completed(futures):
                where, job, state = futures[future]
                try:
                    seconds = future.result()
                except Exception as error:
                    raise RuntimeError(f"{where} failed ({job.path}): {type(error).__name__}: {error}") from error
                finished(where, job, state, seconds)
        finally:
            for future in futures:
                future.cancel()
