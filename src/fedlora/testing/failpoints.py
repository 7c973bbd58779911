"""Fault injection for crash-safety tests: die with SIGKILL at a named point of a run.

``FEDLORA_FAILPOINT=<name>@<round>`` makes :func:`failpoint` kill the process the first time
the run reaches that point in that round — the harshest crash there is (no ``finally``, no
flush). Unset (always, outside tests) it costs one dict lookup. Points used by the engine:
``train`` (after the first client of the round trained), ``aggregate`` (after the server
aggregated, before anything is merged or saved) and ``checkpoint`` (the new checkpoint is fully
written to its temporary file but not yet renamed into place).
"""

from __future__ import annotations

import os
import signal

ENV = "FEDLORA_FAILPOINT"


def failpoint(name: str, round_: int) -> None:
    if os.environ.get(ENV) == f"{name}@{round_}":
        os.kill(os.getpid(), signal.SIGKILL)
