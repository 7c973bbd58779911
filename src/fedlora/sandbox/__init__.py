"""Running model-written code: a kernel boundary around it, and a verdict it cannot forge.

Scoring MBPP / HumanEval means executing code a model wrote. It never runs in the training process, and never
outside the boundary unless the user passes ``--allow-unsandboxed-code``:

* :mod:`.boundary` — bubblewrap namespaces (user, mount, PID, network, IPC, UTS, cgroup), uid 65534 without
  capabilities, a read-only view of ``/usr`` and the Python installation, a private tmpfs as the only writable
  place, no host sockets;
* :mod:`.cgroups` — whole-program bounds on processes+threads and memory, and a kill that reaches everything
  the program started (``setsid`` included);
* :mod:`.judge` / :mod:`.worker` / :mod:`.plain` — the tests run in a separate, trusted judge process; the
  candidate's process only answers calls with plain data, so neither exiting early (``os._exit(0)``) nor an
  object that equals everything can make a test pass;
* :mod:`.harness` — starts, bounds and ends the processes: :func:`run_test` / :func:`run_tests` score,
  :func:`run_program` runs a plain program and reports its exit status (not a verdict).
"""

from fedlora.sandbox.boundary import problem as boundary_problem
from fedlora.sandbox.harness import (
    ALLOW_FLAG,
    ExecResult,
    Limits,
    ProgramResult,
    SandboxUnavailable,
    TestProblem,
    boundary_or_refuse,
    run_program,
    run_test,
    run_tests,
)

__all__ = ["ALLOW_FLAG", "ExecResult", "Limits", "ProgramResult", "SandboxUnavailable", "TestProblem",
           "boundary_or_refuse", "boundary_problem", "run_program", "run_test", "run_tests"]
