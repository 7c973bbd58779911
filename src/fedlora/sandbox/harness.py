"""Starting, bounding and ending sandboxed programs; scoring a candidate against its tests.

:func:`run_test` is what pass@1 uses: the candidate's code runs in a worker process inside the kernel boundary
(:mod:`.boundary`), the trusted tests run in a judge process outside it (:mod:`.judge`), and only the judge's
verdict, read from a pipe the candidate never sees, says "passed". :func:`run_program` runs a plain program in
the same boundary and reports how it ended: an exit status, never a verdict.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import IO

from fedlora.sandbox.boundary import HERE, INSIDE, bwrap_command, interpreter, problem
from fedlora.sandbox.cgroups import Cgroup

log = logging.getLogger(__name__)

ALLOW_FLAG = "--allow-unsandboxed-code"
_EXTRA_TASKS = 3  # bwrap's own processes (the outer monitor, the namespace's init) count towards pids.max
_JUDGE_MEMORY = 2 << 30  # bytes: the judge decodes at most 64 MiB frames


class SandboxUnavailable(OSError):
    """The kernel boundary cannot be set up here and the caller did not accept running code without it."""


@dataclass(frozen=True)
class Limits:
    """What one program may use. The cgroup bounds processes and memory of the whole program; rlimits bound each
    process (CPU seconds, file size, address space) so that a single runaway fails early; timeout_s is the wall
    clock, enforced from outside."""

    timeout_s: float = 10.0  # wall clock for the whole run (load + every test)
    cpu_s: int = 10  # RLIMIT_CPU of each process
    memory_mb: int = 1024  # cgroup memory of the whole program; also RLIMIT_AS of each process
    max_processes: int = 16  # cgroup pids.max: processes + threads of the whole program
    max_file_mb: int = 16  # size of the private /tmp, and RLIMIT_FSIZE (the captured output included)
    max_output_chars: int = 2000  # what is kept (the tail) of the output


@dataclass(frozen=True)
class TestProblem:
    """A candidate and its tests. Only ``candidate`` is untrusted; the rest comes from the benchmark."""

    __test__ = False  # not a pytest test class, despite the name

    candidate: str  # the generated code (HumanEval: prompt + completion), loaded as module "candidate"
    test: str  # trusted test code run by the judge: MBPP's asserts, or HumanEval's test (defines check)
    setup: str = ""  # trusted code run in the candidate's namespace after it (MBPP's test_setup_code)
    prompt: str = ""  # trusted code run in the tests' namespace first (HumanEval's prompt: helpers, imports)
    entry_point: str = ""  # HumanEval: the judge calls check(<the candidate's entry_point>)
    candidate_builtins: tuple[str, ...] = ()  # built-in names the tests take from the candidate (MBPP 126: sum)


@dataclass(frozen=True)
class ExecResult:
    """The outcome of scoring one candidate. ``passed`` comes from the judge alone."""

    passed: bool
    status: str  # "passed" | "failed" | "crashed" (the candidate's process ended) | "timeout" | "error"
    seconds: float
    reason: str  # the judge's one line (or the harness's, for timeout/error)
    output: str  # tail of what the candidate and the tests printed, at most Limits.max_output_chars


@dataclass(frozen=True)
class ProgramResult:
    """How a plain program ended: ``status`` is "exited" (see returncode), "timeout", "killed" or "error"."""

    status: str
    returncode: int | None
    seconds: float
    output: str


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def boundary_or_refuse(allow_unsandboxed: bool) -> bool:
    """True when the kernel boundary is available; False when it is not and the caller accepted that; else
    :class:`SandboxUnavailable` with one line saying why and which flag accepts the risk."""
    why = problem()
    if why is None:
        return True
    if allow_unsandboxed:
        _warn_once(f"running generated code WITHOUT the kernel sandbox ({ALLOW_FLAG}): {why}")
        return False
    raise SandboxUnavailable(f"generated code is not run: {why}. To run it without the kernel sandbox, at your "
                             f"own risk (it can read and change your files), pass {ALLOW_FLAG}.")


class _Program:
    """A started program, confined (bwrap inside its own cgroup) or not. :meth:`stop` ends all it started."""

    def __init__(self, inner: list[str], stdin: int, stdout: int | IO[bytes], stderr: IO[bytes], limits: Limits,
                 confined: bool) -> None:
        self.cgroup: Cgroup | None = None
        self.scratch: tempfile.TemporaryDirectory[str] | None = None
        if not confined:  # an empty working directory, never the caller's cwd
            self.scratch = tempfile.TemporaryDirectory(prefix="fedlora-unsandboxed-")
            self.proc = subprocess.Popen(inner, stdin=stdin, stdout=stdout, stderr=stderr, env=_ENV,
                                         cwd=self.scratch.name, start_new_session=True, close_fds=True)
            return
        self.cgroup = Cgroup.create(limits.max_processes + _EXTRA_TASKS, limits.memory_mb << 20)
        # The shell waits for one line on stdin before it becomes bwrap, so the program is inside the cgroup
        # before its first instruction (Python 3.11 has no CLONE_INTO_CGROUP, and preexec_fn is unsafe in threads).
        command = ["/bin/sh", "-c", 'read -r _ && exec "$@"', "sh", *bwrap_command(inner, limits.max_file_mb << 20)]
        try:
            self.proc = subprocess.Popen(command, stdin=stdin, stdout=stdout, stderr=stderr, env={}, cwd="/",
                                         start_new_session=True, close_fds=True)
            self.cgroup.add(self.proc.pid)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> int | None:
        """Kill everything the program started; its return code (None if it never started)."""
        proc = getattr(self, "proc", None)
        if self.cgroup is not None:
            self.cgroup.kill()
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        if self.cgroup is not None:
            self.cgroup.remove()
        if self.scratch is not None:
            self.scratch.cleanup()
        return proc.returncode if proc is not None else None


_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def _boot(module: str, confined: bool, *args: object) -> list[str]:
    """``python -I -S -B -u -c`` that imports ``module`` from this folder (as seen by the process) and runs main.

    ``-u``: what the candidate prints reaches the log as it is printed. Buffered, it would be flushed only at
    interpreter exit, which races with the kill that ends every program (CI once lost a passing candidate's print).
    """
    where = INSIDE if confined else str(HERE)
    code = f"import sys; sys.path.insert(0, {where!r}); import {module}; {module}.main()"
    return [interpreter(), "-I", "-S", "-B", "-u", "-c", code, *map(str, args)]


def _worker_args(limits: Limits, confined: bool) -> list[object]:
    nproc = 0 if confined else limits.max_processes  # the cgroup bounds a confined program
    return [limits.memory_mb << 20, limits.cpu_s, limits.max_file_mb << 20, nproc]


def _tail(out: IO[bytes], max_chars: int) -> str:
    """The last ``max_chars`` characters of a log file (read from its end: it may be max_file_mb long)."""
    size = out.seek(0, os.SEEK_END)
    out.seek(max(0, size - 4 * max_chars - 4))
    text = out.read().decode("utf-8", errors="replace")
    return text[-max_chars:] if max_chars > 0 else ""


def run_test(task: TestProblem, limits: Limits = Limits(), allow_unsandboxed: bool = False) -> ExecResult:
    """Score one candidate: "passed" only if the judge ran every test to its end against the live candidate.

    Raises :class:`SandboxUnavailable` (before running anything) when the boundary cannot be set up and
    ``allow_unsandboxed`` is False; never raises for anything the candidate does."""
    confined = boundary_or_refuse(allow_unsandboxed)
    start = time.monotonic()
    spec = json.dumps({**asdict(task), "memory_bytes": _JUDGE_MEMORY}).encode()
    to_worker_r, to_worker_w = os.pipe()
    from_worker_r, from_worker_w = os.pipe()
    open_fds = {to_worker_r, to_worker_w, from_worker_r, from_worker_w}

    def close(*fds: int) -> None:
        for fd in fds:
            if fd in open_fds:
                os.close(fd)
                open_fds.discard(fd)

    worker: _Program | None = None
    judge: subprocess.Popen[bytes] | None = None
    status, reason = "error", ""
    with tempfile.TemporaryFile() as output:
        try:
            worker = _Program(_boot("worker", confined, *_worker_args(limits, confined)), to_worker_r, from_worker_w, output, limits, confined)
            if confined:
                os.write(to_worker_w, b"\n")  # the go-line: the worker is in its cgroup now
            close(to_worker_r, from_worker_w)
            judge = subprocess.Popen(_boot("judge", False, to_worker_w, from_worker_r), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=output, pass_fds=(to_worker_w, from_worker_r),
                                     env=_ENV, cwd="/", start_new_session=True)
            close(to_worker_w, from_worker_r)
            remaining = max(0.1, limits.timeout_s - (time.monotonic() - start))
            raw, _ = judge.communicate(spec, timeout=remaining)
            verdict = json.loads(raw) if raw else {}
            if isinstance(verdict, dict) and verdict.get("status") in ("passed", "failed", "crashed"):
                status, reason = verdict["status"], str(verdict.get("reason", ""))
            else:
                reason = f"the judge gave no verdict (exit {judge.returncode})"
        except subprocess.TimeoutExpired:
            status, reason = "timeout", f"not finished within {limits.timeout_s} s"
        except (OSError, ValueError) as exc:
            reason = f"sandbox: {exc}"
        finally:  # also on KeyboardInterrupt: nothing the candidate started outlives this call
            close(*list(open_fds))
            if worker is not None:
                worker.stop()
            if judge is not None and judge.poll() is None:
                os.killpg(judge.pid, signal.SIGKILL)
                judge.wait()
        text = _tail(output, limits.max_output_chars)
    return ExecResult(status == "passed", status, time.monotonic() - start, reason, text)


def run_tests(tasks: Sequence[TestProblem], limits: Limits = Limits(), workers: int | None = None,
              allow_unsandboxed: bool = False) -> list[ExecResult]:
    """:func:`run_test` for many candidates, up to ``workers`` at once (default: the CPU count); input order."""
    if not tasks:
        return []
    boundary_or_refuse(allow_unsandboxed)  # refuse once, before starting anything
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda t: run_test(t, limits, allow_unsandboxed), tasks))


def run_program(source: str, limits: Limits = Limits(), allow_unsandboxed: bool = False) -> ProgramResult:
    """Run ``source`` as ``__main__`` inside the boundary and report how it ended. An exit status is not a verdict:
    the program controls it. Scoring uses :func:`run_test`."""
    confined = boundary_or_refuse(allow_unsandboxed)
    start = time.monotonic()
    source_r, source_w = os.pipe()
    program: _Program | None = None
    exited = False
    with tempfile.TemporaryFile() as output:
        try:
            program = _Program(_boot("worker", confined, *_worker_args(limits, confined), "program"), source_r,
                               output, output, limits, confined)
            os.close(source_r)
            source_r = -1
            with os.fdopen(source_w, "wb") as pipe:
                source_w = -1
                pipe.write(b"\n" + source.encode())
            try:
                program.proc.wait(timeout=limits.timeout_s)
                exited = True
            except subprocess.TimeoutExpired:
                pass
        except OSError as exc:
            return ProgramResult("error", None, time.monotonic() - start, f"sandbox: {exc!r}")
        finally:
            for fd in (source_r, source_w):
                if fd >= 0:
                    os.close(fd)
            code = program.stop() if program is not None else None
        text = _tail(output, limits.max_output_chars)
    if not exited:
        status = "timeout"
    elif code is not None and (code < 0 or code > 128):  # a signal (bwrap reports 128 + n)
        status = "timeout" if code in (-signal.SIGXCPU, 128 + signal.SIGXCPU) else "killed"
    else:
        status = "exited"
    return ProgramResult(status, code, time.monotonic() - start, text)
