"""How many CPU threads torch uses, and how its idle OpenMP threads wait: set once, when a command starts.

Why: torch's default (one thread per core, OpenMP threads that spin while they wait for work) collapses
on a shared machine. With 2 threads on 2 cores and one other busy process, every parallel region waits
for a thread that the kernel has descheduled while its partner burns the other core spinning:
docs/llm_performance.md measured one SmolLM2 forward pass at 10.9 s with 2 threads against 0.68 s with 1,
and ``benchmarks/busy_cpu.py`` measures what stops it (docs/llm_performance.md, "A busy CPU").

``fedlora run``, ``fedlora demo`` and ``fedlora bench`` take ``--threads N|auto`` (declared here once,
:func:`add_threads_option`); the command applies it with :func:`apply_threads` before any model work.
It is not a :class:`~fedlora.config.run.RunConfig` field: it is the process's, not the experiment's (it changes
float summation order only, like ``--workers``), and a resumed run may use a different count.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger(__name__)

WAIT_POLICY = "OMP_WAIT_POLICY"
AUTO = "auto"
_policy_at_start: str | None = None  # OMP_WAIT_POLICY as torch will read it, when known (prefer_passive_wait ran first)


def prefer_passive_wait() -> bool:
    """Ask OpenMP's idle threads to sleep rather than spin (``OMP_WAIT_POLICY=PASSIVE``); True if it was set here.

    libgomp reads the variable once, when it is loaded, which is when ``import torch`` loads
    libtorch_cpu: after that setting it changes nothing, so it is only set while torch is not yet
    imported, and never over a value the user chose.
    """
    global _policy_at_start
    if "torch" in sys.modules:
        return False
    if WAIT_POLICY not in os.environ:
        os.environ[WAIT_POLICY] = "PASSIVE"
        _policy_at_start = "PASSIVE"
        return True
    _policy_at_start = os.environ[WAIT_POLICY].strip().upper()
    return False


def passive_wait() -> bool:
    """Whether torch's OpenMP threads sleep when idle: PASSIVE was in place before torch loaded (else unknown: no)."""
    return _policy_at_start == "PASSIVE"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's or taskset's), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def auto_threads(cpus: int | None = None, load: float | None = None, passive: bool = False) -> int:
    """The thread count ``auto`` picks: every usable CPU when idle threads sleep (``passive``), else the usable
    CPUs that other work leaves idle, at least 1.

    Measured (benchmarks/busy_cpu.py, docs/llm_performance.md): with spinning waits, 2 threads on a loaded
    2-core CPU were 5-24x slower than 1, because every parallel region waits on a descheduled thread while
    its partner spins; with OMP_WAIT_POLICY=PASSIVE, 2 threads were never slower than 1 by more than noise,
    loaded or not. So with passive waits use the CPUs; otherwise ``load`` (the 1-minute load average,
    roughly other processes' runnable threads) decides, rounded down: one thread too few costs at most
    the split of the work, one too many the collapse.
    """
    cpus = usable_cpus() if cpus is None else cpus
    if passive:
        return cpus
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # not available on this platform: assume idle
            load = 0.0
    return max(1, min(cpus, int(cpus - load + 0.25)))  # a load of 1.0 is a busy core; 0.75 of one rounds to idle


def parse_threads(text: str) -> str:
    """``auto`` or a positive integer, as text (argparse's ``type``)."""
    value = text.strip().lower()
    if value == AUTO or (value.isdigit() and int(value) >= 1):
        return value
    raise argparse.ArgumentTypeError(f"wants a positive integer or 'auto', got {text!r}")


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N|auto`` on a command that runs torch (run, demo, bench)."""
    parser.add_argument("--threads", type=parse_threads, default=AUTO, metavar="N|auto",
                        help="torch CPU threads (default: auto = the usable CPUs; if you set OMP_WAIT_POLICY to "
                             "other than PASSIVE, the usable CPUs minus the load average, at least 1). fedlora "
                             "sets OMP_WAIT_POLICY=PASSIVE unless you set it: with spinning waits, 2 threads on a "
                             "busy 2-core CPU were up to 24x slower (docs/llm_performance.md)")


def apply_threads(value: str, interop: bool = True) -> str:
    """Set torch's intra-op (and, where still allowed, inter-op) thread count; returns a line saying what was set."""
    import torch

    cpus = usable_cpus()
    if value == AUTO:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
        threads = auto_threads(cpus, load, passive_wait())
        why = f"auto: {cpus} usable CPUs" + ("" if passive_wait() else f", load {load:.1f}, waits may spin")
    else:
        threads = int(value)
        why = f"--threads {value}" + (f", more than the {cpus} usable CPUs" if threads > cpus else "")
    torch.set_num_threads(threads)
    if interop:
        try:  # allowed only before the first inter-op parallel work of the process; a later call raises
            torch.set_num_interop_threads(threads)
        except RuntimeError:
            pass
    wait = _policy_at_start or "unknown (torch was loaded before fedlora could set it)"
    return f"torch threads: {threads} ({why}); {WAIT_POLICY}={wait}"
