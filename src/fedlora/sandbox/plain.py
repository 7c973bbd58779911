"""Plain data across the sandbox wall: a tagged JSON codec and length-prefixed frames. Standard library only.

This module is imported by three processes: the caller (fedlora), the judge (trusted test runner) and the worker
(the candidate's process, inside the sandbox; the worker imports it from a read-only bind of this folder, so it
must not import fedlora).

Why a codec of our own rather than pickle or marshal: what the worker sends is written by the code under test.
Decoding must only ever produce exact built-in values (``int``, ``str``, ``list``, ...), whose ``__eq__`` the
candidate does not control, so an object that "equals everything" cannot cross the wall. Anything that is not
plain data crosses as an opaque reference (``["r", id]``) the judge can call or iterate but never compare.

Tags: ``N`` None, ``b`` bool, ``i`` int, ``f`` float (repr, so nan/inf/-0.0 round-trip), ``c`` complex, ``s`` str,
``y`` bytes (hex), ``l`` list, ``t`` tuple, ``S`` set, ``F`` frozenset, ``d`` dict (pairs), ``r`` remote
reference, ``m`` module (by name: the judge imports its own copy), ``T`` a built-in class (``int``, ``str``, ...).
"""

from __future__ import annotations

import builtins
import json
import os
import struct
import types
from collections.abc import Callable
from typing import Any

MAX_FRAME = 64 << 20  # bytes: a larger message is refused (a candidate returning 10 GB must not exhaust the judge)
MAX_DEPTH = 200  # nesting depth of a plain value: deeper structures are refused rather than overflowing the stack
_HEADER = struct.Struct(">Q")


class WireError(Exception):
    """The other side sent something that is not a well-formed message (or closed the channel)."""


def encode(value: Any, remote: Callable[[Any], int], depth: int = 0) -> Any:
    """``value`` as tagged JSON-ready data; objects that are not plain data become ``["r", remote(value)]``.

    Subclasses of plain types (``OrderedDict``, ``Counter``, a ``str`` subclass) are sent as their base type: the
    receiver gets plain values either way, so being lenient here weakens nothing."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply to send")
    nxt = depth + 1
    if value is None:
        return ["N"]
    if isinstance(value, bool):
        return ["b", bool(value)]
    if isinstance(value, int):
        return ["i", int(value)]
    if isinstance(value, float):
        return ["f", repr(float(value))]
    if isinstance(value, complex):
        return ["c", repr(value.real), repr(value.imag)]
    if isinstance(value, str):
        return ["s", str.__str__(value)]
    if isinstance(value, bytes | bytearray):
        return ["y", bytes(value).hex()]
    if isinstance(value, types.ModuleType):
        return ["m", value.__name__]
    if isinstance(value, type) and getattr(builtins, name := value.__name__, None) is value:
        return ["T", name]
    if isinstance(value, list | tuple | set | frozenset):
        tag = "l" if isinstance(value, list) else "t" if isinstance(value, tuple) else \
            "S" if isinstance(value, set) else "F"
        return [tag, [encode(v, remote, nxt) for v in value]]
    if isinstance(value, dict):
        return ["d", [[encode(k, remote, nxt), encode(v, remote, nxt)] for k, v in dict.items(value)]]
    return ["r", remote(value)]


def decode(data: Any, remote: Callable[[int], Any], module: Callable[[str], Any], depth: int = 0) -> Any:
    """The value that :func:`encode` encoded, built only from exact built-in types (and the given factories for
    remote references and modules). Raises :class:`WireError` for anything malformed."""
    if depth > MAX_DEPTH:
        raise WireError("value nested too deeply")
    if not isinstance(data, list) or not data or not isinstance(data[0], str):
        raise WireError(f"not a tagged value: {str(data)[:80]}")
    tag, args, nxt = data[0], data[1:], depth + 1

    def one(kind: type) -> Any:
        if len(args) != 1 or type(args[0]) is not kind:
            raise WireError(f"malformed {tag!r} value")
        return args[0]

    if tag == "N" and not args:
        return None
    if tag == "b":
        return one(bool)
    if tag == "i":
        return one(int)
    if tag == "f":
        return float(one(str))
    if tag == "c" and len(args) == 2 and all(type(a) is str for a in args):
        return complex(float(args[0]), float(args[1]))
    if tag == "s":
        return one(str)
    if tag == "y":
        return bytes.fromhex(one(str))
    if tag in "ltSF" and len(tag) == 1:
        items = [decode(v, remote, module, nxt) for v in one(list)]
        return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
    if tag == "d":
        pairs = one(list)
        if not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise WireError("malformed dict value")
        return {decode(k, remote, module, nxt): decode(v, remote, module, nxt) for k, v in pairs}
    if tag == "r":
        return remote(one(int))
    if tag == "m":
        return module(one(str))
    if tag == "T":
        cls = getattr(builtins, one(str), None)
        if not isinstance(cls, type):
            raise WireError("not a built-in class")
        return cls
    raise WireError(f"unknown tag {tag!r}")


def send(fd: int, message: dict[str, Any]) -> None:
    """Write one frame: 8-byte big-endian length, then the JSON text."""
    body = json.dumps(message, allow_nan=False).encode()
    if len(body) > MAX_FRAME:
        raise ValueError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    data = memoryview(_HEADER.pack(len(body)) + body)
    while data:
        data = data[os.write(fd, data):]


def _read_exactly(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise WireError("channel closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def receive(fd: int) -> dict[str, Any]:
    """Read one frame; :class:`WireError` on a closed channel, an oversized frame or anything but a JSON object."""
    (size,) = _HEADER.unpack(_read_exactly(fd, _HEADER.size))
    if size > MAX_FRAME:
        raise WireError(f"frame of {size} bytes exceeds the {MAX_FRAME}-byte limit")
    try:
        message = json.loads(_read_exactly(fd, size))
    except (ValueError, RecursionError) as exc:
        raise WireError(f"malformed frame: {exc}") from None
    if not isinstance(message, dict):
        raise WireError("a frame must hold a JSON object")
    return message
