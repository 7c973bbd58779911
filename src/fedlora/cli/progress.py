"""Honest progress for commands that run several federated runs (``fedlora demo``, ``fedlora bench``).

Why: the per-round bar of one run says nothing about the runs after it, and the cost model's
estimate holds for an idle 2-core machine only (a loaded one was 3x slower and the first ETA
was wrong by that much). So: say at start what will run and the estimate with its assumption
(and that the machine is busy, when it is); before each run print "run k of n" with the
overall ETA; after each run rescale the remaining estimates by how fast the finished runs
really were, so the ETA becomes honest after the first run. Phases within one run are
:mod:`fedlora.util.progress`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from fedlora.util.progress import duration

if TYPE_CHECKING:
    from fedlora.config.run import RunConfig


def _values(configs: Sequence[RunConfig], name: str) -> str:
    unique = list(dict.fromkeys(str(getattr(c, name)) for c in configs))
    return "/".join(unique)


def machine_load() -> str:
    """"" on an idle machine; else a warning that estimates assume an idle one."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return ""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if load < 0.5 * cpus:
        return ""
    return f"; this machine is busy (load {load:.1f} on {cpus} CPUs): expect up to {max(1.0, load / cpus + 1):.0f}x longer"


def plan_text(configs: Sequence[RunConfig], estimate_s: float, assumption: str) -> str:
    """What will run and how long it should take, in two lines."""
    methods = ", ".join(dict.fromkeys(c.method for c in configs))
    alpha = _values(configs, "alpha").replace("None", "iid")
    return (f"will run {len(configs)} run{'s' if len(configs) != 1 else ''} on {_values(configs, 'task')}: {methods}; "
            f"{_values(configs, 'rounds')} rounds, {_values(configs, 'clients')} clients, α={alpha}, "
            f"seed {_values(configs, 'seed')}\n"
            f"estimated {duration(estimate_s)} in all ({assumption}){machine_load()}")


class RunProgress:
    """"run k of n" lines with an overall ETA, the estimates rescaled by the measured speed."""

    def __init__(self, estimates: Sequence[float], log: Callable[[str], None] = print, workers: int = 1,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.estimates = list(estimates)
        self.log, self.workers, self.clock = log, max(1, workers), clock
        self.done: dict[int, float] = {}  # run index -> measured seconds
        self.started: dict[int, float] = {}

    @property
    def speed(self) -> float:
        """Measured / estimated seconds over the finished runs (1 before the first finishes)."""
        estimated = sum(self.estimates[k] for k in self.done)
        return sum(self.done.values()) / estimated if estimated > 0 else 1.0

    def remaining_seconds(self) -> float:
        left = [e for k, e in enumerate(self.estimates) if k not in self.done]
        return sum(left) * self.speed / self.workers

    def _eta(self) -> str:
        left = self.remaining_seconds()
        at = datetime.now(UTC) + timedelta(seconds=left)
        basis = "from the cost model" if not self.done else f"runs so far took {self.speed:.2g}x the estimate"
        return f"overall {duration(left)} left, ETA {at:%H:%M} UTC ({basis})"

    def start(self, index: int, what: str) -> None:
        """Before run ``index`` (0-based) starts."""
        self.started[index] = self.clock()
        self.log(f"[run {index + 1} of {len(self.estimates)}] {what}: estimated "
                 f"{duration(self.estimates[index] * self.speed)}; {self._eta()}")

    def finish(self, index: int, what: str, seconds: float | None = None) -> None:
        """After run ``index`` finished (``seconds``: its wall time, else since :meth:`start`)."""
        took = seconds if seconds is not None else self.clock() - self.started.get(index, self.clock())
        self.done[index] = took
        self.log(f"[run {index + 1} of {len(self.estimates)}] {what}: done in {duration(took)} "
                 f"(estimate {duration(self.estimates[index])}); {len(self.done)}/{len(self.estimates)} done, "
                 + (self._eta() if len(self.done) < len(self.estimates) else "all done"))
