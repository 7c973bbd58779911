"""`aggregate`: the one entry point every engine (local simulation, Flower, scripts) calls.

Server maths runs in float64: the FLoRA-NA Gram objective subtracts nearly equal numbers when
the divergence is small, and float64 keeps it exact to ~1e-12 relative at no noticeable cost
(the work is r×r blocks). Results are returned in the dtype of the global adapter (float32
on the wire). Inputs are never modified in place.

Devices: the maths runs where the inputs are (cpu, cuda:n, mps, meta, ...), which is the device of
the global adapter; every client tensor must be on it too (clients elsewhere are invalid, see
:mod:`fedlora.aggregation.validation`). The adapter, ``base_delta`` and ``extras`` come back on
that device; scalar metrics are Python floats. Two exceptions, both forced by the hardware:
a device without float64 (Apple's mps) does the server maths on the CPU and gets its results moved
back (float64 extras as float32); the ``meta`` device carries no values, so there the value checks
are skipped, the metrics are NaN, and methods whose maths depends on values (a solver's
convergence test, an SVD's numerical rank) raise an :class:`AggregationError`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fedlora.aggregation.communication import round_bytes
from fedlora.aggregation.divergence import divergence_report
from fedlora.aggregation.registry import get_method
from fedlora.aggregation.types import Adapter, AggregationError, AggregationResult, ClientUpdate, LoraPair
from fedlora.aggregation.validation import (
    MAX_NUM_EXAMPLES,
    adapter_device,
    client_key,
    collect_problems,
    format_problems,
    norm_outliers,
    validate_global,
)
from fedlora.aggregation.weights import client_weights

log = logging.getLogger(__name__)
SERVER_DTYPE = torch.float64
DEFAULT_NORM_BOUND = 100.0  # reject updates > 100x the round's median norm (scaled or poisoned)
NO_FLOAT64_DEVICES = ("mps",)  # device types without float64: the server maths runs on the CPU for them


def _cast(adapter: Adapter, dtype: torch.dtype, device: torch.device) -> Adapter:
    """A copy of ``adapter`` in ``dtype`` on ``device`` (always a copy: inputs are never aliased)."""
    return {
        m: LoraPair(
            A=p.A.detach().to(device=device, dtype=dtype, copy=True),
            B=p.B.detach().to(device=device, dtype=dtype, copy=True),
        )
        for m, p in adapter.items()
    }


def _server_device(device: torch.device) -> torch.device:
    """Where the float64 server maths runs for inputs on ``device``."""
    return torch.device("cpu") if device.type in NO_FLOAT64_DEVICES else device


def _to_device(value: Any, device: torch.device) -> Any:
    """``value`` (tensors, LoraPairs, and dicts, lists, tuples of them) moved to ``device``; others unchanged."""
    if isinstance(value, Tensor):
        if value.device == device:
            return value
        if value.dtype == torch.float64 and device.type in NO_FLOAT64_DEVICES:
            return value.to(device=device, dtype=torch.float32)
        return value.to(device)
    if isinstance(value, LoraPair):
        return LoraPair(A=_to_device(value.A, device), B=_to_device(value.B, device))
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def aggregate(
    method: str,
    global_adapter: Adapter,
    updates: Sequence[ClientUpdate],
    *,
    weighting: str = "examples",
    on_invalid: str = "reject",
    min_clients: int = 1,
    norm_bound: float | None = DEFAULT_NORM_BOUND,
    max_num_examples: int = MAX_NUM_EXAMPLES,
    round_index: int = 1,
    state: dict[str, Tensor] | None = None,
    client_ranks: dict[str, int] | None = None,
    **options: Any,
) -> AggregationResult:
    """Aggregate one round of client updates into the next global adapter.

    ``method``: a name from :func:`available_methods`. ``weighting``: "examples" (w_u ∝ n_u),
    "uniform", or for flora-na "authors". Other ``options`` go to the method (e.g.
    ``solver="adamw"`` for flora-na, ``seed`` for flora).

    Every client update is validated first: module names, shapes and rank equal to the global
    adapter's, floating dtype, finite values, ``0 < num_examples <= max_num_examples``, a unique
    client id, and an update norm ‖update − global‖_F at most ``norm_bound`` × the round's median
    (``None`` disables it). ``on_invalid="reject"`` (default) drops failing clients for this round,
    logs them and lists them in ``metrics["rejected"]`` as ``{client, reason}``; if fewer than
    ``min_clients`` remain the round is skipped: the returned adapter equals the global one,
    ``base_delta`` is empty and ``metrics["skipped"]`` is True. ``on_invalid="raise"`` raises one
    :class:`AggregationError` naming every bad client and module instead. Caller errors (unknown
    method or option, no updates, malformed global adapter, a global adapter spread over several
    devices) always raise.

    Inputs may sit on any one device (the global adapter's); a client whose tensors sit on another
    device is invalid like any other bad client. The result's tensors come back on that device.
    """
    spec = get_method(method)
    if weighting not in spec.weightings:
        raise AggregationError(f"method {method!r} supports weighting {', '.join(spec.weightings)}; got {weighting!r}")
    options = spec.check_options(options, from_user=False)
    if on_invalid not in ("raise", "reject"):
        raise AggregationError(f"on_invalid must be 'raise' or 'reject', got {on_invalid!r}")
    if min_clients < 1:
        raise AggregationError(f"min_clients must be >= 1, got {min_clients}")
    validate_global(global_adapter)
    device = adapter_device(global_adapter)
    if not updates:
        raise AggregationError("no client updates to aggregate: at least one client must report this round")

    problems = collect_problems(global_adapter, updates, max_num_examples)
    blamed = {c for c, _ in problems}
    valid = [u for i, u in enumerate(updates) if client_key(u, i) not in blamed]
    if norm_bound is not None:
        problems += norm_outliers(global_adapter, valid, norm_bound)
    if problems and on_invalid == "raise":
        raise AggregationError(f"invalid client updates for {method!r}: {format_problems(problems)}")
    rejected = [{"client": c, "reason": r} for c, r in problems]
    for entry in rejected:
        log.warning("round update from client %s rejected: %s", entry["client"], entry["reason"])
    blamed = {c for c, _ in problems}
    updates = [u for u in valid if u.client_id not in blamed]
    if len(updates) < min_clients:
        log.warning("round skipped: %d valid updates, min_clients=%d; global adapter unchanged", len(updates), min_clients)
        return AggregationResult(
            adapter=_cast(global_adapter, next(iter(global_adapter.values())).A.dtype, device),
            metrics={"method": method, "num_clients": len(updates), "skipped": True, "rejected": rejected,
                     "divergence": float("nan"), "eckart_young_bound": float("nan"), "solve_seconds": 0.0,
                     "bytes_up": 0, "bytes_down": 0},
            state=dict(state or {}),
        )

    out_dtype = next(iter(global_adapter.values())).A.dtype
    server = _server_device(device)
    g64 = _cast(global_adapter, SERVER_DTYPE, server)
    u64 = [ClientUpdate(_cast(u.adapter, SERVER_DTYPE, server), u.num_examples, u.client_id) for u in updates]
    weights = client_weights(u64, weighting, device=server)
    if "authors" in spec.weightings:
        options["weighting"] = weighting
    if spec.policy.stateful:
        options["state"] = {k: v.to(device=server, dtype=SERVER_DTYPE) for k, v in (state or {}).items()}

    start = time.perf_counter()
    try:
        result = spec.fn(g64, u64, weights, **options)
    except (NotImplementedError, RuntimeError) as error:
        if server.type != "meta":
            raise
        raise AggregationError(
            f"method {method!r} cannot run on the meta device: its maths depends on tensor values, "
            f"which meta tensors do not have ({type(error).__name__}: {str(error).splitlines()[0]})"
        ) from error
    solve_seconds = time.perf_counter() - start

    # Divergence is always measured against the example-weighted T, whatever the method solved for.
    report = divergence_report(result.adapter, u64, client_weights(u64, "examples", device=server), result.base_delta)
    ranks = None if client_ranks is None else [client_ranks.get(u.client_id, _rank(global_adapter)) for u in u64]
    bytes_up, bytes_down = round_bytes(spec.policy.for_round(round_index), global_adapter, len(u64), ranks)
    metrics = {
        "method": method,
        "num_clients": len(u64),
        "divergence": report.divergence,
        "eckart_young_bound": report.eckart_young_bound,
        "divergence_per_module": report.per_module,
        "solve_seconds": solve_seconds,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "rejected": rejected,
        "skipped": False,
        **result.metrics,
    }
    return AggregationResult(
        adapter=_cast(result.adapter, out_dtype, device),
        base_delta={m: d.to(device=device, dtype=out_dtype) for m, d in result.base_delta.items()},
        metrics=metrics,
        extras=_to_device(result.extras, device),
        state={k: v.to(device=device, dtype=torch.float32) for k, v in result.state.items()},
    )


def _rank(adapter: Adapter) -> int:
    return next(iter(adapter.values())).rank
