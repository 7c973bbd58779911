"""Run untrusted, model-generated Python programs in a separate, limited process.

Scoring MBPP / HumanEval means executing code a model wrote. It never runs in the training process: every program
gets its own interpreter (``python -I -S``), started by :func:`run_program`. The layers, from strongest to weakest:

Kernel-enforced (hold even against ctypes):
  * a separate process in a new session (``start_new_session``); the whole process group is SIGKILLed when the
    program ends or its wall-clock ``timeout_s`` passes, so background children die with it (unless they escape
    the group with ``setsid``, which the Python layer refuses);
  * rlimits set by the child before the program starts: RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE (size of any
    file written, output included), RLIMIT_CORE=0 and RLIMIT_NPROC. RLIMIT_NPROC is NOT enforced for uid 0 (the
    kernel exempts root, whatever its namespace): running as root, the fork-bomb guard is the Python layer plus
    the group kill (and the PID namespace below);
  * namespaces, when the kernel allows ``unshare`` (see :func:`network_isolation`): a new network namespace holds
    only a loopback that is down, so nothing (not even 127.0.0.1) can be reached; a new user namespace drops the
    capabilities the program would have on the host, so root cannot raise its hard rlimits back; a new PID
    namespace means the program cannot signal processes outside it, and all its processes die with it;
  * a fresh working directory (``HOME`` and ``TMPDIR`` too), deleted afterwards; a minimal environment, so no
    caller variable (tokens, paths) is visible; ``-I`` ignores ``PYTHON*`` variables, the user site and the cwd
    on ``sys.path``; ``-S`` skips site-packages: programs get the standard library only.

Python-level (installed by the bootstrap before the program is compiled; a program using ctypes, or reaching the
originals through closures, gets past them):
  * ``os.fork``/``forkpty``/``system``/``popen``/``spawn*``/``exec*``/``posix_spawn*``, ``_posixsubprocess``
    (hence ``subprocess`` and ``multiprocessing``), ``setsid``/``setpgid`` and signalling other processes raise;
  * opening a path for writing, and removing, renaming, linking or chmod-ing one, outside the working
    directory raises PermissionError (reads are allowed: the program needs the standard library);
  * creating sockets raises (also when the namespace already isolates the network).

This is NOT a security boundary against a determined attacker: as root, without namespaces, a ctypes call gets
past every Python-level guard. For untrusted code at scale, run the evaluation inside a container or jail
(nsjail, firejail, gVisor, a VM) as an unprivileged user with a read-only filesystem.
"""

from __future__ import annotations

import functools
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO

_SETUP_FAILED = 117  # the bootstrap's exit code when it could not install its guards (the program did not run)

# Runs in the child as `python -I -S -c _BOOTSTRAP <workdir> <program> <AS bytes> <cpu s> <nproc> <fsize bytes>`.
# Given in argv, not as a file in the working directory, so the program can never modify it. Rlimits are set here
# rather than in Popen's preexec_fn, which is unsafe with threads (run_programs runs Popens from a thread pool).
_BOOTSTRAP = r'''
import builtins, errno, io, os, posix, resource as R, sys


def setup():
    root, prog = sys.argv[1], sys.argv[2]
    mem, cpu, nproc, fsize = map(int, sys.argv[3:7])
    for lim, val in ((R.RLIMIT_CORE, 0), (R.RLIMIT_FSIZE, fsize), (R.RLIMIT_AS, mem)):
        R.setrlimit(lim, (val, val))
    R.setrlimit(R.RLIMIT_CPU, (cpu, cpu + 1))
    net, pidns = "python-level", False
    try:
        import ctypes
        unshare = ctypes.CDLL(None, use_errno=True).unshare
        USER, NET, PID = 0x10000000, 0x40000000, 0x20000000
        for flags in (USER | NET | PID, NET | PID, USER | NET, NET):
            if unshare(flags) == 0:
                net, pidns = "namespace", bool(flags & PID)
                break
    except Exception:
        pass
    if pidns:  # the namespace's first process is our child; this one only waits and passes its status on
        child = os.fork()
        if child:
            status, usage = os.wait4(child, 0)[1:]
            if os.WIFSIGNALED(status):
                import signal
                sig = os.WTERMSIG(status)  # pid 1 ignores SIGXCPU, so the CPU limit ends it with SIGKILL
                if sig == signal.SIGKILL and usage.ru_utime + usage.ru_stime >= cpu:
                    sig = signal.SIGXCPU
                signal.signal(sig, signal.SIG_DFL)
                os.kill(os.getpid(), sig)
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    R.setrlimit(R.RLIMIT_NPROC, (nproc, nproc))
    realpath, readlink, fspath, sep = os.path.realpath, os.readlink, os.fspath, os.sep
    top = realpath(root)

    def check(path, dir_fd=None):
        if isinstance(path, int):
            return
        path = os.fsdecode(fspath(path))
        if dir_fd is not None and not path.startswith(sep):
            path = readlink(f"/proc/self/fd/{dir_fd}") + sep + path
        path = realpath(path)
        if path != top and not path.startswith(top + sep) and path != "/dev/null":
            raise PermissionError(errno.EACCES, "sandbox: writing outside the working directory is refused", path)

    def deny(name):
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EPERM, f"sandbox: {name} is refused")
        return refuse

    def paths(func, n):  # check the first n path arguments, relative to their dir_fd if given
        def guarded(*args, **kw):
            for i, p in enumerate(args[:n]):
                dir_fd = kw.get("dir_fd") if n == 1 else kw.get(("src_dir_fd", "dst_dir_fd")[i])
                check(p, dir_fd)
            return func(*args, **kw)
        return guarded

    def setattrs(name, value, *modules):
        for m in modules:
            if hasattr(m, name):
                setattr(m, name, value)

    orig_open, orig_os_open, orig_kill, FileIO, me = io.open, os.open, os.kill, io.FileIO, os.getpid()
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def open_(file, mode="r", *args, **kw):
        if any(c in mode for c in "wax+"):
            check(file)
        return orig_open(file, mode, *args, **kw)

    def os_open(path, flags, *args, dir_fd=None, **kw):
        if flags & WRITE:
            check(path, dir_fd)
        return orig_os_open(path, flags, *args, dir_fd=dir_fd, **kw)

    class GuardedFileIO(FileIO):
        def __init__(self, file, mode="r", *args, **kw):
            if any(c in mode for c in "wax+"):
                check(file)
            super().__init__(file, mode, *args, **kw)

    def symlink(src, dst, *args, **kw):
        check(dst, kw.get("dir_fd"))
        return posix_symlink(src, dst, *args, **kw)

    def kill(pid, sig):
        if pid not in (0, me):
            raise PermissionError(errno.EPERM, "sandbox: signalling another process is refused")
        return orig_kill(pid, sig)

    import _io, _posixsubprocess, _socket
    posix_symlink = os.symlink
    setattrs("open", open_, builtins, io, _io)
    setattrs("FileIO", GuardedFileIO, io, _io)
    setattrs("open", os_open, os, posix)
    setattrs("symlink", symlink, os, posix)
    setattrs("kill", kill, os, posix)
    for name in ("remove", "unlink", "rmdir", "removedirs", "mkdir", "truncate", "chmod", "chown", "lchown",
                 "utime", "mkfifo", "mknod", "chroot"):
        setattrs(name, paths(getattr(os, name), 1), os, posix)
    for name in ("rename", "renames", "replace", "link"):
        setattrs(name, paths(getattr(os, name), 2), os, posix)
    for name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execl", "execle", "execlp", "execlpe",
                 "execvp", "execvpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp",
                 "spawnlpe", "posix_spawn", "posix_spawnp", "setsid", "setpgid", "setpgrp", "killpg"):
        setattrs(name, deny(name), os, posix)
    _posixsubprocess.fork_exec = deny("subprocess")  # subprocess, multiprocessing's spawn and forkserver

    class NoSocket(_socket.socket):
        __slots__ = ()  # socket.socket subclasses this and adds __weakref__ itself

        def __init__(self, *args, **kwargs):
            raise PermissionError(errno.EPERM, "sandbox: network access is refused")
    _socket.socket = _socket.SocketType = NoSocket
    _socket.socketpair = deny("socketpair")
    sys.fedlora_sandbox_network = net
    with orig_open(prog, "rb") as f:
        return f.read()


try:
    source = setup()
except BaseException as exc:
    print(f"sandbox: setup failed: {exc!r}", file=sys.stderr)
    os._exit(117)
del setup
main = type(sys)("__main__")
main.__builtins__ = builtins
sys.modules["__main__"], sys.argv = main, ["program.py"]
exec(compile(source, "program.py", "exec"), main.__dict__)
'''


@dataclass(frozen=True)
class Limits:
    """What one program may use. Memory and CPU are rlimits; timeout_s is enforced by the parent (group kill)."""

    timeout_s: float = 10.0  # wall clock per program
    cpu_s: int = 10  # RLIMIT_CPU (SIGXCPU: reported as "timeout")
    memory_mb: int = 1024  # RLIMIT_AS: allocation beyond it raises MemoryError (-> "failed") or kills
    max_processes: int = 16  # RLIMIT_NPROC: counts all processes of the real uid (threads too); root is exempt
    max_file_mb: int = 16  # RLIMIT_FSIZE: caps every file written, the captured output included
    max_output_chars: int = 2000  # what is kept (the tail) of stdout+stderr


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one program. ``passed`` only for exit code 0 within the limits."""

    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "killed" | "error"
    returncode: int | None
    seconds: float
    output: str  # tail of stdout+stderr, at most Limits.max_output_chars


def _wait_exited(pid: int, timeout_s: float) -> bool:
    """Wait until ``pid`` has exited, without reaping it: a zombie keeps its process group id reserved, so the
    group kill that follows can never hit an unrelated group that got the recycled id."""
    deadline = time.monotonic() + timeout_s
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = -1
    if fd >= 0:
        try:
            return bool(select.select([fd], [], [], max(0.0, timeout_s))[0])
        finally:
            os.close(fd)
    delay = 0.001
    while time.monotonic() < deadline:  # no pidfd (Linux < 5.3): poll waitid without reaping
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return False


def _tail(out: IO[bytes], max_chars: int) -> str:
    """The last ``max_chars`` characters of the output file (read from its end: it may be max_file_mb long)."""
    size = out.seek(0, os.SEEK_END)
    out.seek(max(0, size - 4 * max_chars - 4))
    text = out.read().decode("utf-8", errors="replace")
    return text[-max_chars:] if max_chars > 0 else ""


def run_program(source: str, limits: Limits = Limits()) -> ExecResult:
    """Run ``source`` as ``__main__`` in a fresh sandboxed interpreter; never raises for anything the program does."""
    start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="fedlora-sandbox-") as work, tempfile.TemporaryFile() as out:
            program = os.path.join(work, "program.py")
            with open(program, "w", encoding="utf-8") as f:
                f.write(source)
            env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
            argv = [sys.executable, "-I", "-S", "-c", _BOOTSTRAP, work, program, str(limits.memory_mb << 20),
                    str(limits.cpu_s), str(limits.max_processes), str(limits.max_file_mb << 20)]
            proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
            try:
                exited = _wait_exited(proc.pid, limits.timeout_s)
            finally:  # also on KeyboardInterrupt: never leave the group running
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the group: children left behind die too
                except (ProcessLookupError, PermissionError):
                    pass
                returncode = proc.wait()
            output = _tail(out, limits.max_output_chars)
    except OSError as exc:  # could not start (no interpreter, no temp space, ...)
        return ExecResult(False, "error", None, time.monotonic() - start, f"sandbox: {exc!r}")
    if not exited or returncode == -signal.SIGXCPU:
        status = "timeout"
    elif returncode == 0:
        status = "passed"
    elif returncode == _SETUP_FAILED and output.lstrip().startswith("sandbox: setup failed"):
        status = "error"
    elif returncode < 0:
        status = "killed"
    else:
        status = "failed"
    return ExecResult(status == "passed", status, returncode, time.monotonic() - start, output)


def run_programs(sources: Sequence[str], limits: Limits = Limits(), workers: int | None = None) -> list[ExecResult]:
    """Run many programs, up to ``workers`` at once (default: the CPU count); results in input order.

    Threads suffice: each only waits on its subprocess."""
    workers = max(1, workers or os.cpu_count() or 1)
    if not sources:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(sources))) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))


@functools.lru_cache(maxsize=1)
def network_isolation() -> str:
    """How the network is cut off on this machine: ``"namespace"`` (kernel: an empty network namespace, plus the
    Python guard) or ``"python-level"`` (socket creation refused in Python only). Probed once with a real run."""
    result = run_program("import sys\nprint(sys.fedlora_sandbox_network)", Limits(timeout_s=30.0))
    value = result.output.strip().splitlines()[-1] if result.passed and result.output.strip() else ""
    if value not in ("namespace", "python-level"):
        raise RuntimeError(f"sandbox probe failed: {result}")
    return value
