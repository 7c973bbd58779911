"""The method registry: every aggregation method registers one pure function here.

A method function has the signature ``fn(global_adapter, updates, weights, *, option=default, ...)``
and returns an :class:`AggregationResult` holding at least ``adapter`` (and ``base_delta`` where
it touches the frozen weights). It receives validated float64 tensors and ``weights`` (U,)
that sum to one; :func:`fedlora.aggregation.aggregate` does validation, dtype handling,
timing, divergence and communication metrics around it, so a new method is ~20 lines.

What a method needs from the engines (which factors train and travel, private factors, a server
seed, what clients download) is declared once, in its :class:`TrainingPolicy`; its options are
declared by its keyword-only parameters' annotations (:mod:`fedlora.aggregation.options`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from fedlora.aggregation.options import OptionSpec, check_options, option_specs
from fedlora.aggregation.phased import PhasedAggregation
from fedlora.aggregation.types import Adapter, AggregationError, AggregationResult, TrainingPolicy

MethodFn = Callable[..., AggregationResult]

_REGISTRY: dict[str, "MethodSpec"] = {}


@dataclass(frozen=True)
class MethodSpec:
    """One registered aggregation method: its pure function, what clients must do, and its options.

    ``fn`` maps client updates to an :class:`AggregationResult` (the formula and paper in its docstring);
    ``policy`` tells both engines what clients train, upload and keep private, and what the server
    downloads (:class:`TrainingPolicy`); the options a user may set are read from ``fn``'s keyword-only
    parameters and checked before a run starts.
    """

    name: str
    fn: MethodFn
    policy: TrainingPolicy
    summary: str
    # Weightings the method understands; "authors" exists only for flora-na.
    weightings: tuple[str, ...] = ("examples", "uniform")
    option_specs: dict[str, OptionSpec] = field(default_factory=dict)
    # Where the method comes from (a citation, or "this project"): shown by `fedlora methods` and docs/methods.md.
    source: str = ""
    # Several client round trips of weighted sums per round (FedASK); None: one upload of factors.
    phased: PhasedAggregation | None = None
    # How a client rebuilds the global adapter it is not sent, from (the initial adapter's shapes and dtype, the
    # server's seed) (FLoRA's re-init); None: the method sends it, or it is the initial adapter.
    rebuild: Callable[[Adapter, int], Adapter] | None = None

    @property
    def options(self) -> tuple[str, ...]:
        """Names of the method's own options (``weighting`` is handled by ``aggregate``)."""
        return tuple(n for n in self.option_specs if n != "weighting")

    def check_options(self, options: dict[str, Any], *, from_user: bool = True) -> dict[str, Any]:
        """``options`` (with an optional ``weighting``) converted and checked; raises AggregationError.

        ``from_user``: options from a run's configuration, where engine-drawn ones (``seed`` of a
        ``server_seed`` method) are not the user's to set; library callers pass False.
        """
        options = dict(options)
        weighting = options.pop("weighting", None)
        if weighting is not None and weighting not in self.weightings:
            raise AggregationError(
                f"method {self.name!r}: option weighting={weighting!r} is invalid: use one of {', '.join(self.weightings)}"
            )
        own = {n: s for n, s in self.option_specs.items() if n != "weighting"}
        if from_user and self.policy.server_seed:  # the engine draws the seed each round; a user may not set it
            own.pop("seed", None)
        checked = check_options(self.name, own, options)
        return checked | ({"weighting": weighting} if weighting is not None else {})


def register_method(
    name: str,
    *,
    policy: TrainingPolicy = TrainingPolicy(),
    summary: str,
    weightings: tuple[str, ...] = ("examples", "uniform"),
    source: str = "",
    phased: PhasedAggregation | None = None,
    rebuild: Callable[[Adapter, int], Adapter] | None = None,
) -> Callable[[MethodFn], MethodFn]:
    """Decorator: ``@register_method("fedit", summary=..., source="Zhang et al., ICASSP 2024")`` over a method function."""

    def wrap(fn: MethodFn) -> MethodFn:
        if name in _REGISTRY:
            raise ValueError(f"aggregation method {name!r} is registered twice")
        _REGISTRY[name] = MethodSpec(name, fn, policy, summary, weightings, option_specs(fn), source, phased, rebuild)
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
