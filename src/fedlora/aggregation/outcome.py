"""The two ways a round ends without a new global: too few valid clients, or a result that is not finite.

Finite inputs can still give non-finite outputs: a float16 global cannot hold what float32 clients
averaged to (7e4 > 65504), FLoRA's stacked product of entries of 1e20 is 1e40 in float32. Such a
result is never applied: the round is skipped (``metrics["skipped"]``, with a ``reason``), the
global stays as it was, and the divergence reads NaN, never 0.0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from fedlora.aggregation.types import Adapter, AggregationResult, LoraPair


def skipped_result(
    method: str, global_adapter: Adapter, state: dict[str, Tensor] | None, reason: str, *, num_clients: int,
    rejected: list[dict[str, Any]], **metrics: Any,
) -> AggregationResult:
    """The global adapter unchanged (a copy), no ``base_delta``, ``skipped`` and its ``reason``."""
    adapter = {m: LoraPair(A=p.A.detach().clone(), B=p.B.detach().clone()) for m, p in global_adapter.items()}
    return AggregationResult(
        adapter=adapter,
        metrics={"method": method, "num_clients": num_clients, "skipped": True, "reason": reason, "rejected": rejected,
                 "divergence": float("nan"), "eckart_young_bound": float("nan"), "solve_seconds": 0.0,
                 "bytes_up": 0, "bytes_down": 0, **metrics},
        state=dict(state or {}),
    )


def walk_tensors(value: Any, path: str = "") -> Iterator[tuple[str, Tensor]]:
    """Every tensor inside ``value`` (tensors, LoraPairs, dicts, lists, tuples), with where it sits."""
    if isinstance(value, Tensor):
        yield path, value
    elif isinstance(value, LoraPair):
        yield f"{path}.A", value.A
        yield f"{path}.B", value.B
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from walk_tensors(item, f"{path}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from walk_tensors(item, f"{path}[{index}]")


def non_finite(result: AggregationResult) -> str | None:
    """Where ``result`` holds NaN or Inf (adapter, base_delta, extras, state), or None when it is finite."""
    parts = {"adapter": result.adapter, "base_delta": result.base_delta, "extras": result.extras, "state": result.state}
    for name, value in parts.items():
        for path, tensor in walk_tensors(value, name):
            if tensor.is_meta or not tensor.is_floating_point():
                continue
            if not bool(torch.isfinite(tensor).all()):
                return f"the aggregated {path} ({tensor.dtype}) is not finite"
    if next(iter(result.adapter.values())).A.is_meta:  # no values: the metrics are NaN by design
        return None
    if result.metrics.get("divergence_measured") is False:  # --divergence off / every N: NaN means "not measured"
        return None
    for key in ("divergence", "eckart_young_bound"):
        value = result.metrics.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            return f"the aggregation's {key} is {value} (an overflow in the server maths)"
    return None
