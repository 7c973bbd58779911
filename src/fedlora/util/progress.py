"""Progress phases within one run; multi-run progress (demo, bench) is :mod:`fedlora.cli.progress`.

:func:`phase` says which phase is running (training, local evaluation, generation
k/n, scoring code, global evaluation ...): a client's local evaluation of an LLM can take minutes on a
busy CPU, and a bar that only says "round 2 client-1" looks hung. Phases nest ("local evaluation:
generation 3/8"); whoever shows progress listens with :func:`on_phase`, and with ``-v`` every phase
that took a few seconds is logged with its duration.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
log = logging.getLogger(__name__)

_phases: list[str] = []  # the running phases, outermost first
_listeners: list[Callable[[str], None]] = []
LOG_AFTER_S = 3.0  # phases shorter than this are not worth a log line


def current_phase() -> str:
    """The running phases, outermost first, joined by ": " ("" when none)."""
    return ": ".join(_phases)


def _notify() -> None:
    text = current_phase()
    for listener in list(_listeners):
        listener(text)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Announce that ``name`` runs for the duration of the ``with`` block (nested under any running phase)."""
    _phases.append(name)
    _notify()
    started = time.perf_counter()
    try:
        yield
    finally:
        took = time.perf_counter() - started
        if took >= LOG_AFTER_S:
            log.info("%s: %s", current_phase(), duration(took))
        _phases.pop()
        _notify()


def update_phase(name: str) -> None:
    """Rename the innermost running phase (e.g. "generation 3/8" after each batch); no-op outside one."""
    if _phases:
        _phases[-1] = name
        _notify()


@contextlib.contextmanager
def on_phase(listener: Callable[[str], None]) -> Iterator[None]:
    """Call ``listener(current_phase())`` whenever a phase starts, ends or is renamed, within the block."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def duration(seconds: float) -> str:
    """"45 s", "12 min", "1 h 05 min"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"
