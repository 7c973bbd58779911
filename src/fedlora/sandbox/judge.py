"""The judge: runs a problem's trusted tests against the candidate, and alone decides "passed". Stdlib only.

Started by :mod:`fedlora.sandbox.harness` as ``python -I -S -B -u -c "<this folder on sys.path>; import judge;
judge.main()" TO_WORKER FROM_WORKER``, outside the candidate's sandbox, with the problem (JSON) on stdin and the
verdict (one JSON object) written to the stdout it was started with.

The test code (MBPP's asserts, HumanEval's ``check``) runs here, in a process the candidate never runs code in.
A name the tests use that they do not define themselves (the function under test, ``math`` imported by the
candidate, ``root`` built by MBPP's setup code) is looked up in the candidate's process: plain data arrives as
exact built-in values, modules are imported here from the standard library, and anything else (functions,
classes, instances) becomes a :class:`Remote` handle that can be called, iterated or have attributes read, but
never compared (an object whose ``__eq__`` always answers True stays in the candidate's process) nor tested for
truth. Built-in names always mean the built-ins: the candidate cannot redefine ``len`` for the tests.

"passed" means: the test code ran to its end without an exception and the candidate's process answered every
request and never raised ``SystemExit``/``KeyboardInterrupt``. The candidate exiting (``os._exit(0)``,
``sys.exit(0)``, ``atexit`` or ``excepthook`` tricks) or dying only closes its channel, which fails the problem.
"""

from __future__ import annotations

import builtins
import importlib
import json
import os
import resource
import secrets
import sys
from typing import Any

try:  # started with this folder on sys.path: fedlora itself is not importable under -S
    from fedlora.sandbox import plain
except ImportError:  # pragma: no cover - the subprocess path
    import plain  # type: ignore[no-redef,import-not-found]

# Exceptions the candidate may raise "through" to the tests (tests such as ``try: f(x) except ValueError``).
# StopIteration and friends are not among them: raised from a call inside ``map``/``all`` they would silently end
# the test's loop early. Anything else arrives as CandidateError.
_PASS_THROUGH = {e.__name__: e for e in (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError,
                                         AttributeError, ArithmeticError, LookupError, OverflowError,
                                         AssertionError, NotImplementedError, RecursionError, RuntimeError,
                                         UnicodeError, MemoryError)}


class CandidateError(Exception):
    """The candidate raised an exception that the tests see as this (or sent something that is not plain)."""


class CandidateGone(BaseException):
    """The candidate's process ended, or raised SystemExit/KeyboardInterrupt: the problem fails whatever the test
    does. A BaseException, so a test's ``except Exception`` cannot swallow it."""


class Channel:
    """Requests to the candidate's process and its decoded answers. Once the candidate is gone, it stays gone."""

    def __init__(self, to_worker: int, from_worker: int) -> None:
        self.to_worker, self.from_worker = to_worker, from_worker
        self.gone: str | None = None

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request and read its reply. Each request carries a fresh random id that its reply must echo,
        so replies written ahead into the pipe (by a candidate that then exits) never answer a request."""
        if self.gone:
            raise CandidateGone(self.gone)
        ident = secrets.token_hex(8)
        try:
            plain.send(self.to_worker, {**request, "id": ident})
            reply = plain.receive(self.from_worker)
        except (plain.WireError, OSError) as exc:
            self.gone = f"the candidate's process ended or broke its channel ({exc})"
            raise CandidateGone(self.gone) from None
        if reply.get("id") != ident:
            self.gone = "the candidate's process sent a reply that does not answer the request"
            raise CandidateGone(self.gone)
        return reply

    def answer(self, reply: dict[str, Any]) -> Any:
        """The value of a reply, or the candidate's exception raised here."""
        if "value" in reply:
            try:
                return plain.decode(reply["value"], lambda i: Remote(self, i), _module)
            except plain.WireError as exc:
                raise CandidateError(f"the candidate sent malformed data: {exc}") from None
        raised = reply.get("raise")
        if isinstance(raised, list) and len(raised) == 3:
            name, message, ordinary = (str(raised[0]), str(raised[1]), raised[2] is True)
            if not ordinary:
                self.gone = f"the candidate raised {name}"
                raise CandidateGone(self.gone)
            raise _PASS_THROUGH.get(name, CandidateError)(message if name in _PASS_THROUGH else f"{name}: {message}")
        self.gone = "the candidate sent a reply that is not an answer"
        raise CandidateGone(self.gone)

    def request(self, **request: Any) -> Any:
        return self.answer(self.ask(request))


def _module(name: str) -> Any:
    """A module the candidate's namespace holds, imported here (the standard library only, as in the sandbox)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise CandidateError(f"module {name!r} is not available to the tests") from None


def _send_arg(value: Any) -> int:
    if isinstance(value, Remote):
        return value._id
    raise CandidateError(f"a {type(value).__name__} from the tests cannot be passed to the candidate (plain data only)")


class Remote:
    """A handle to an object living in the candidate's process. Callable, iterable, attributes readable; never
    equal to anything but itself, and without a truth value."""

    __slots__ = ("_channel", "_id")

    def __init__(self, channel: Channel, ref: int) -> None:
        self._channel, self._id = channel, ref

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._channel.request(op="call", ref=self._id, args=[plain.encode(a, _send_arg) for a in args],
                                     kwargs={k: plain.encode(v, _send_arg) for k, v in kwargs.items()})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._channel.request(op="getattr", ref=self._id, name=name)

    def __iter__(self) -> Any:
        iterator = self._channel.request(op="iter", ref=self._id)
        while True:
            reply = self._channel.ask({"op": "next", "ref": iterator._id})
            if reply.get("stop") is True:
                return
            yield self._channel.answer(reply)

    def __bool__(self) -> bool:
        raise CandidateError("the candidate returned an object that is not plain data; its truth is not trusted")

    def __repr__(self) -> str:
        return f"<candidate object #{self._id}>"


class TestNamespace(dict[str, Any]):
    """The tests' globals: their own names, then the built-ins, then the candidate's names (see module doc)."""

    def __init__(self, channel: Channel, candidate_builtins: list[str]) -> None:
        super().__init__(__name__="__test__", __builtins__=builtins)
        self.channel, self.candidate_builtins = channel, set(candidate_builtins)

    def __missing__(self, name: str) -> Any:
        if hasattr(builtins, name) and name not in self.candidate_builtins:
            raise KeyError(name)  # the interpreter then takes the real built-in
        reply = self.channel.ask({"op": "get", "name": name})
        if reply.get("missing") is True:
            raise KeyError(name)
        return self.channel.answer(reply)


def judge(problem: dict[str, Any], channel: Channel) -> tuple[bool, str]:
    """Run the problem's tests; ``(passed, reason)``."""
    loaded = channel.ask({"op": "load", "source": problem["candidate"], "setup": problem.get("setup", "")})
    if loaded.get("loaded") is not True:
        raised = loaded.get("raise")
        what = f"{raised[0]}: {raised[1]}" if isinstance(raised, list) and len(raised) == 3 else "no answer"
        return False, f"the code did not load ({what})"
    namespace = TestNamespace(channel, problem.get("candidate_builtins", []))
    entry = problem.get("entry_point")
    if entry:  # HumanEval: the prompt's helpers are the benchmark's own (trusted); its function is the candidate's
        exec(compile(problem.get("prompt", ""), "prompt.py", "exec"), namespace)
        candidate = channel.request(op="get", name=entry)
        if not isinstance(candidate, Remote):
            return False, f"the candidate's {entry!r} is not a function"
        namespace[entry] = candidate  # some checks compare the candidate with the name itself (HumanEval/33)
    exec(compile(problem["test"], "test.py", "exec"), namespace)
    if entry:
        namespace["check"](candidate)
    if channel.ask({"op": "ping"}).get("pong") is not True:  # alive and answering after the last test
        return False, "the candidate's process did not answer after the tests"
    if channel.gone:
        return False, channel.gone
    return True, "every test ran and passed"


def main() -> None:
    to_worker, from_worker = int(sys.argv[1]), int(sys.argv[2])
    verdict = os.dup(1)
    os.dup2(2, 1)  # anything the tests print goes to the log, not into the verdict
    problem = json.loads(sys.stdin.read())
    memory = int(problem["memory_bytes"])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    channel = Channel(to_worker, from_worker)
    try:
        passed, reason = judge(problem, channel)
    except CandidateGone as exc:
        passed, reason = False, str(exc)
    except BaseException as exc:  # noqa: BLE001 - an assert or any error in the tests is a failure
        passed, reason = False, f"{type(exc).__name__}: {str(exc)[:300]}"
    if channel.gone:  # a test that swallowed CandidateGone with a bare except still fails
        passed, reason = False, channel.gone
    status = "passed" if passed else "crashed" if channel.gone else "failed"
    os.write(verdict, json.dumps({"status": status, "reason": reason}).encode())
    os.close(verdict)
