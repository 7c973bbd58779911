"""Expand a preset into runs and execute them, skipping finished ones and resuming interrupted ones.

Layout: ``<results>/runs/<task>/<label slug>/seed<k>``, each an ordinary ``fedlora run`` directory.
A run is finished when its metrics.jsonl holds rounds 1..R of the configured R; a run with a
checkpoint but fewer rounds continues with ``run(config, resume=True)`` (the engine guarantees the
same final metrics as an uninterrupted run). So killing the grid and starting it again only
repeats the round that was in flight.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fedlora.bench.presets import Preset, Variant, estimate_seconds
from fedlora.checkpoint import CHECKPOINT_FILE
from fedlora.config import RunConfig

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
    old = json.loads(saved.read_text())
    new = json.loads(job.config.to_json())
    diff = sorted(k for k in set(old) | set(new) if k not in IGNORED_IN_MATCH and old.get(k) != new.get(k))
    if diff:
        raise ValueError(f"{job.path} was run with different {diff}; use another --out or delete that run directory")


def status(job: Job) -> str:
    """'done', 'resume' (checkpoint present, rounds missing) or 'new'."""
    _check_same_config(job)
    done = completed_rounds(job.path)
    if done >= job.config.rounds:
        return "done"
    return "resume" if done > 0 and (job.path / CHECKPOINT_FILE).is_file() else "new"


def run_jobs(jobs: list[Job], step_seconds: float, progress: bool = False,
             runner: Callable[..., Any] | None = None, log: Callable[[str], None] = print) -> dict[str, int]:
    """Run every job that is not finished; returns counts of done/resumed/new/skipped runs."""
    if runner is None:
        from fedlora.simulation import run as runner
    counts = {"skipped": 0, "resumed": 0, "new": 0}
    states = [status(job) for job in jobs]  # validate every directory before spending any CPU
    for index, (job, state) in enumerate(zip(jobs, states), 1):
        where = f"[{index}/{len(jobs)}] {job.task} {job.label} seed{job.seed}"
        if state == "done":
            counts["skipped"] += 1
            continue
        start = time.perf_counter()
        runner(job.config, resume=state == "resume", progress=progress)
        counts["resumed" if state == "resume" else "new"] += 1
        log(f"{where}: {state}, {time.perf_counter() - start:.0f} s (estimate {estimate_seconds(job.config, step_seconds):.0f} s)")
    return counts
