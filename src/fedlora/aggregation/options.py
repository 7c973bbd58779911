"""Method options, checked from the method's own signature before anything runs.

A method declares its options as keyword-only parameters with annotations; those annotations
are the single source of what a value may be:

* ``Literal["als", "adamw"]``: one of these strings;
* ``int`` / ``float``: a finite number (strings from a command line are converted; booleans are
  refused for numbers), optionally bounded with ``Annotated[int, AtLeast(1)]``,
  ``Annotated[float, GreaterThan(0)]`` or ``Annotated[float, AtLeast(0), AtMost(1)]``;
* ``bool``: ``True``/``False`` (or the strings "true"/"false").

:func:`check_options` is called both when a run's configuration is built (so
``--method-option solver=bogus`` fails in under a second, before any model or data loads) and
by :func:`fedlora.aggregation.aggregate` (so library callers get the same message).
"""

from __future__ import annotations

import inspect
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, get_args, get_origin

from fedlora.aggregation.types import AggregationError


@dataclass(frozen=True)
class AtLeast:
    """Annotated bound: value >= ``low``."""

    low: float

    def check(self, value: float) -> str | None:
        return None if value >= self.low else f"must be >= {self.low:g}"


@dataclass(frozen=True)
class GreaterThan:
    """Annotated bound: value > ``low``."""

    low: float

    def check(self, value: float) -> str | None:
        return None if value > self.low else f"must be > {self.low:g}"


@dataclass(frozen=True)
class AtMost:
    """Annotated bound: value <= ``high``."""

    high: float

    def check(self, value: float) -> str | None:
        return None if value <= self.high else f"must be <= {self.high:g}"


@dataclass(frozen=True)
class OptionSpec:
    """One option of one method: its name, accepted type, bounds and default."""

    name: str
    kind: Any  # int, float, bool, str or a tuple of allowed strings (from Literal)
    bounds: tuple[Any, ...]
    default: Any


def option_specs(fn: Callable[..., Any], skip: int = 3) -> dict[str, OptionSpec]:
    """The keyword-only parameters of ``fn`` after the first ``skip`` positional ones."""
    params = inspect.signature(fn).parameters
    specs: dict[str, OptionSpec] = {}
    for name in list(params)[skip:]:
        param = params[name]
        if param.kind != inspect.Parameter.KEYWORD_ONLY:
            continue
        kind, bounds = _unpack(_resolve(param.annotation, fn))
        specs[name] = OptionSpec(name, kind, bounds, param.default)
    return specs


def _resolve(annotation: Any, fn: Callable[..., Any]) -> Any:
    """The option's annotation as an object (``from __future__ import annotations`` makes it a string).

    Only the options' own annotations are evaluated: a method may annotate its tensors with names
    imported for type checking only.
    """
    if annotation is inspect.Parameter.empty:
        return Any
    if isinstance(annotation, str):
        try:
            return eval(annotation, getattr(fn, "__globals__", {}))  # noqa: S307 -- the method's own source text
        except NameError:
            return Any
    return annotation


def _unpack(annotation: Any) -> tuple[Any, tuple[Any, ...]]:
    bounds: tuple[Any, ...] = ()
    if get_origin(annotation) is typing.Annotated:
        annotation, *meta = get_args(annotation)
        bounds = tuple(m for m in meta if hasattr(m, "check"))
    if get_origin(annotation) is Literal:
        return tuple(get_args(annotation)), bounds
    return annotation, bounds


def check_options(method: str, specs: dict[str, OptionSpec], options: dict[str, Any]) -> dict[str, Any]:
    """Return ``options`` converted to their declared types; raise naming the first bad one.

    Unknown names, values outside a ``Literal``, non-numbers, non-finite numbers and values
    outside declared bounds are refused with the option, the value and what is accepted.
    """
    unknown = sorted(set(options) - set(specs))
    if unknown:
        raise AggregationError(
            f"method {method!r} has no option {', '.join(unknown)}; its options: {', '.join(sorted(specs)) or 'none'}"
        )
    return {name: _convert(method, specs[name], value) for name, value in options.items()}


def _convert(method: str, spec: OptionSpec, value: Any) -> Any:
    def refuse(why: str) -> AggregationError:
        return AggregationError(f"method {method!r}: option {spec.name}={value!r} is invalid: {why}")

    kind = spec.kind
    if isinstance(kind, tuple):
        if value not in kind:
            raise refuse(f"use one of {', '.join(map(str, kind))}")
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise refuse("use true or false")
    if kind in (int, float):
        if isinstance(value, bool):
            raise refuse(f"expected a number ({kind.__name__})")
        if isinstance(value, float) and not math.isfinite(value):
            raise refuse("must be finite")
        try:
            number = kind(value) if not isinstance(value, str) or kind is float else int(value, 10)
        except (TypeError, ValueError, OverflowError):
            raise refuse(f"expected a number ({kind.__name__})") from None
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise refuse("expected a whole number")
        if not math.isfinite(number):
            raise refuse("must be finite")
        if kind is int and not -(2**63) <= number < 2**63:  # what torch and numpy seeds and counters hold
            raise refuse("must fit in a signed 64-bit integer")
        for bound in spec.bounds:
            if (why := bound.check(number)) is not None:
                raise refuse(why)
        return number
    if kind is str and not isinstance(value, str):
        raise refuse("expected a string")
    return value
