"""The candidate's process: loads the generated code and answers the judge's requests. Standard library only.

It runs inside the kernel boundary (:mod:`fedlora.sandbox.boundary`) as
``python -I -S -B -u -c "<put this folder on sys.path>; import worker; worker.main()" MEM CPU FSIZE NPROC``,
with the judge's requests on fd 0, its replies on fd 1 and fd 2 going to the caller's output log.

Nothing here is trusted: the candidate runs in this very interpreter and can rewrite any of it. That is fine
by design: all the worker can ever give the judge is plain data (see :mod:`fedlora.sandbox.plain`), and the
verdict is the judge's. The candidate is loaded as a module named ``candidate`` (never ``__main__``), so an
``if __name__ == "__main__": unittest.main()`` block does not run.
"""

from __future__ import annotations

import os
import resource
import sys
import types
from typing import Any

try:  # inside the sandbox this folder is on sys.path and fedlora is not importable
    from fedlora.sandbox import plain
except ImportError:  # pragma: no cover - the sandboxed path
    import plain  # type: ignore[no-redef,import-not-found]

_ORDINARY = Exception  # anything else (SystemExit, KeyboardInterrupt, GeneratorExit) ends the candidate's run


def _set_limits(memory: int, cpu: int, fsize: int, nproc: int) -> None:
    """Per-process rlimits (the cgroup bounds the whole program; these make a single runaway fail early)."""
    for limit, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_AS, memory)):
        resource.setrlimit(limit, (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    if nproc > 0:  # only where no cgroup bounds the program (unsandboxed mode); root is exempt anyway
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


def _describe(exc: BaseException) -> list[Any]:
    """``[type name, message, ordinary]`` without trusting the exception's own ``__str__`` to behave."""
    try:
        message = str(exc)[:500]
    except BaseException:  # noqa: BLE001 - a hostile __str__
        message = "<unprintable>"
    return [type(exc).__name__, message, isinstance(exc, _ORDINARY)]


class Server:
    """The candidate's namespace plus a table of objects the judge holds references to."""

    def __init__(self, namespace: dict[str, Any]) -> None:
        self.namespace = namespace
        self.objects: list[Any] = []

    def ref(self, value: Any) -> int:
        self.objects.append(value)
        return len(self.objects) - 1

    def value(self, data: Any) -> Any:
        return plain.decode(data, self.objects.__getitem__, __import__)

    def reply(self, value: Any) -> dict[str, Any]:
        return {"value": plain.encode(value, self.ref)}

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "ping":
            return {"pong": True}
        if op == "get":
            name = request["name"]
            return self.reply(self.namespace[name]) if name in self.namespace else {"missing": True}
        target = self.objects[request["ref"]]
        if op == "call":
            args = [self.value(a) for a in request["args"]]
            kwargs = {k: self.value(v) for k, v in request["kwargs"].items()}
            return self.reply(target(*args, **kwargs))
        if op == "getattr":
            return self.reply(getattr(target, request["name"]))
        if op == "iter":
            return {"value": ["r", self.ref(iter(target))]}
        if op == "next":
            try:
                return self.reply(next(target))
            except StopIteration:
                return {"stop": True}
        raise ValueError(f"unknown request {op!r}")


def run_as_main() -> None:
    """``run_program``'s mode: the whole of stdin is a program, run as ``__main__`` (its exit status is all)."""
    with os.fdopen(os.dup(0), "rb") as stdin:
        source = stdin.read()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    module = types.ModuleType("__main__")
    sys.modules["__main__"], sys.argv = module, ["program.py"]
    exec(compile(source, "program.py", "exec"), module.__dict__)


def main() -> None:
    memory, cpu, fsize, nproc = map(int, sys.argv[1:5])
    _set_limits(memory, cpu, fsize, nproc)
    if sys.argv[5:] == ["program"]:
        return run_as_main()
    requests, replies = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)  # the candidate's prints go to the log, never onto the reply channel's fd
    load = plain.receive(requests)
    module = types.ModuleType("candidate")
    module.__file__ = "candidate.py"
    sys.modules["candidate"], sys.argv = module, ["candidate.py"]
    try:
        exec(compile(load["source"], "candidate.py", "exec"), module.__dict__)
        if load.get("setup"):
            exec(compile(load["setup"], "setup.py", "exec"), module.__dict__)
        plain.send(replies, {"loaded": True, "id": load.get("id")})
    except BaseException as exc:  # noqa: BLE001 - whatever the candidate raises is a failure to load
        plain.send(replies, {"raise": _describe(exc), "id": load.get("id")})
        return
    server = Server(module.__dict__)
    while True:
        try:
            request = plain.receive(requests)
        except plain.WireError:
            return  # the judge is done
        try:
            answer = server.handle(request)
        except BaseException as exc:  # noqa: BLE001 - the candidate's exceptions are reported, not fatal here
            answer = {"raise": _describe(exc)}
        answer["id"] = request.get("id")  # the judge accepts only the reply to the request it just sent
        try:
            plain.send(replies, answer)
        except (ValueError, RecursionError, OverflowError) as exc:  # a value that cannot be sent (too big, too deep)
            plain.send(replies, {"raise": ["UnsendableValue", str(exc)[:200], True], "id": request.get("id")})
