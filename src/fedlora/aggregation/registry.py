"""The method registry: every aggregation method registers one pure function here.

A method function has the signature ``fn(global_adapter, updates, weights, **options)`` and
returns an :class:`AggregationResult` holding at least ``adapter`` (and ``base_delta`` where
it touches the frozen weights). It receives validated float64 tensors and ``weights`` (U,)
that sum to one; :func:`fedlora.aggregation.aggregate` does validation, dtype handling,
timing, divergence and communication metrics around it, so a new method is ~20 lines.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

from fedlora.aggregation.types import AggregationError, AggregationResult, TrainingPolicy

MethodFn = Callable[..., AggregationResult]

_REGISTRY: dict[str, "MethodSpec"] = {}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: MethodFn
    policy: TrainingPolicy
    summary: str
    # Weightings the method understands; "authors" exists only for flora-na.
    weightings: tuple[str, ...] = ("examples", "uniform")
    options: tuple[str, ...] = field(default=())


def register_method(
    name: str,
    *,
    policy: TrainingPolicy = TrainingPolicy(),
    summary: str,
    weightings: tuple[str, ...] = ("examples", "uniform"),
) -> Callable[[MethodFn], MethodFn]:
    """Decorator: ``@register_method("fedit", summary=...)`` over a method function."""

    def wrap(fn: MethodFn) -> MethodFn:
        if name in _REGISTRY:
            raise ValueError(f"aggregation method {name!r} is registered twice")
        params = inspect.signature(fn).parameters
        options = tuple(p for p in list(params)[3:] if params[p].kind == inspect.Parameter.KEYWORD_ONLY)
        _REGISTRY[name] = MethodSpec(name, fn, policy, summary, weightings, options)
        return fn

    return wrap


def get_method(name: str) -> MethodSpec:
    _load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise AggregationError(
            f"unknown aggregation method {name!r}; available: {', '.join(available_methods())}"
        ) from None


def available_methods() -> list[str]:
    """Names of every registered method, in a stable order."""
    _load_builtin_methods()
    return sorted(_REGISTRY)


def _load_builtin_methods() -> None:
    # Importing the package registers the built-in methods (each module's decorator runs once).
    import fedlora.aggregation.methods  # noqa: F401
