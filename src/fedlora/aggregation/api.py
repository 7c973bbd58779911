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
import math
import time
from collections.abc import Iterable
from typing import Any, TypeVar

import torch
from torch import Tensor

from fedlora.aggregation.communication import round_bytes
from fedlora.aggregation.divergence import divergence_report, unmeasured_report
from fedlora.aggregation.outcome import non_finite, skipped_result
from fedlora.aggregation.ranks import RANK_MAPS, sent_start
from fedlora.aggregation.registry import get_method
from fedlora.aggregation.robust import DEFAULT_CLIP, DEFAULT_WEIGHT_CAP, capped_weights, clip_scale
from fedlora.aggregation.robust import clipped as clipped_tensor
from fedlora.aggregation.types import Adapter, AggregationError, AggregationResult, ClientUpdate, LoraPair
from fedlora.aggregation.validation import (
    MAX_NUM_EXAMPLES,
    adapter_device,
    client_key,
    collect_problems,
    format_problems,
    norm_outliers,
    round_norms,
    validate_global,
)
from fedlora.aggregation.weights import client_weights

log = logging.getLogger(__name__)
SERVER_DTYPE = torch.float64
DEFAULT_NORM_BOUND = 100.0  # reject updates > 100x the round's median norm (scaled or poisoned)
T = TypeVar("T")
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
    updates: Iterable[ClientUpdate],
    *,
    weighting: str = "examples",
    on_invalid: str = "reject",
    min_clients: int = 1,
    norm_bound: float | None = DEFAULT_NORM_BOUND,
    clip: float | None = DEFAULT_CLIP,
    weight_cap: float | None = DEFAULT_WEIGHT_CAP,
    max_num_examples: int = MAX_NUM_EXAMPLES,
    round_index: int = 1,
    state: dict[str, Tensor] | None = None,
    client_ranks: dict[str, int] | None = None,
    rank_map: str = "truncate",
    measure_divergence: bool = True,
    **options: Any,
) -> AggregationResult:
    """Aggregate one round of client updates into the next global adapter.

    ``method``: a name from :func:`available_methods`. ``weighting``: "examples" (w_u ∝ n_u),
    "uniform", or for flora-na "authors". Other ``options`` go to the method (e.g.
    ``solver="adamw"`` for flora-na, ``seed`` for flora).

    Every client update is validated first: a non-empty string client id, module names, shapes and
    rank equal to the global adapter's, dense float16/bfloat16/float32/float64 tensors, finite
    values, ``0 < num_examples <= max_num_examples``, a unique client id, and an update norm
    ‖update − start‖_F at most ``norm_bound`` × the round's reference norm (its median; with a
    single client or a zero median, the global adapter's own norm, at least 1; ``None`` disables
    it). Accepted updates are then clipped to ``clip`` × the round's median norm, and no client
    weighs more than ``weight_cap`` / U (pass ``None`` when the counts come from a trusted source,
    as both engines do); see :mod:`fedlora.aggregation.robust` for the threat model. ``start`` is
    what the client was sent: the global adapter, or for a client of rank r_u below the global's R
    in ``client_ranks`` ({client id: rank}; others are at R) the global mapped to r_u by ``rank_map``
    and zero-padded (:func:`fedlora.aggregation.ranks.sent_start`, as the engines send it), so a
    low-rank client's norm measures its training, not the components it was never given.
    ``on_invalid="reject"`` (default) drops failing clients for this round, logs them and lists them
    in ``metrics["rejected"]`` as ``{client, reason}``; if fewer than ``min_clients`` remain the
    round is skipped: the returned adapter equals the global one, ``base_delta`` is empty,
    ``metrics["skipped"]`` is True and ``metrics["reason"]`` says why. A result that is not finite
    (an overflow in the global's dtype) is skipped the same way, never returned.
    ``on_invalid="raise"`` raises one :class:`AggregationError` naming every bad client and module
    instead. Caller errors (unknown method or option, no updates, malformed global adapter, a global
    adapter spread over several devices) always raise.

    ``updates`` may be any iterable (it is materialised once). Inputs may sit on any one device (the
    global adapter's); a client whose tensors sit on another device is invalid like any other bad
    client. The result's tensors come back on that device.
    """
    spec = get_method(method)
    if weighting not in spec.weightings:
        raise AggregationError(f"method {method!r} supports weighting {', '.join(spec.weightings)}; got {weighting!r}")
    options = spec.check_options(options, from_user=False)
    if on_invalid not in ("raise", "reject"):
        raise AggregationError(f"on_invalid must be 'raise' or 'reject', got {on_invalid!r}")
    if isinstance(min_clients, bool) or not isinstance(min_clients, int) or min_clients < 1:
        raise AggregationError(f"min_clients must be an integer >= 1, got {min_clients!r}")
    for name, value, accepted in (("norm_bound", norm_bound, "> 0"), ("clip", clip, "> 0"), ("weight_cap", weight_cap, ">= 1")):
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if value is not None and not (number and (value >= 1 if accepted == ">= 1" else value > 0)):
            raise AggregationError(f"{name}={value!r} is invalid: use a finite number {accepted}, or None to switch it off")
    validate_global(global_adapter)
    _check_ranks(client_ranks, rank_map, _rank(global_adapter))
    device = adapter_device(global_adapter)
    updates = materialise(updates)
    if not updates:
        raise AggregationError("no client updates to aggregate: at least one client must report this round")

    problems = collect_problems(global_adapter, updates, max_num_examples)
    blamed = {c for c, _ in problems}
    valid = [u for i, u in enumerate(updates) if client_key(u, i) not in blamed]
    norms: list[float] = []
    reference, from_round = float("nan"), False
    starts = [global_adapter] * len(valid)
    if device.type != "meta":  # meta tensors have no values to measure
        starts = _starts(global_adapter, valid, client_ranks or {}, rank_map)
        norms, reference, from_round = round_norms(global_adapter, valid, starts)
        if norm_bound is not None:
            problems += norm_outliers([u.client_id for u in valid], norms, reference, from_round, norm_bound)
    if problems and on_invalid == "raise":
        raise AggregationError(f"invalid client updates for {method!r}: {format_problems(problems)}")
    rejected = [{"client": c, "reason": r} for c, r in problems]
    for entry in rejected:
        log.warning("round update from client %s rejected: %s", entry["client"], entry["reason"])
    blamed = {c for c, _ in problems}
    keep = [i for i, u in enumerate(valid) if u.client_id not in blamed]
    updates = [valid[i] for i in keep]
    if len(updates) < min_clients:
        reason = f"{len(updates)} valid client updates, fewer than min_clients={min_clients}"
        log.warning("round skipped: %s; global adapter unchanged", reason)
        return skipped_result(method, global_adapter, state, reason, num_clients=len(updates), rejected=rejected)

    out_dtype = next(iter(global_adapter.values())).A.dtype
    server = _server_device(device)
    g64 = _cast(global_adapter, SERVER_DTYPE, server)
    u64 = [ClientUpdate(_cast(u.adapter, SERVER_DTYPE, server), u.num_examples, u.client_id) for u in updates]
    clipped: list[dict[str, Any]] = []
    if clip is not None and from_round:
        s64 = {id(s): g64 if s is global_adapter else _cast(s, SERVER_DTYPE, server) for s in starts}
        u64, clipped = _clip([s64[id(starts[i])] for i in keep], u64, [norms[i] for i in keep], clip * reference)
    weights = capped_weights(client_weights(u64, weighting, device=server), weight_cap)
    example_weights = capped_weights(client_weights(u64, "examples", device=server), weight_cap)
    if "authors" in spec.weightings:
        options["weighting"] = weighting
    if spec.policy.alternate:  # which factor trained (and which stays the global's) depends on the round
        options["round_index"] = round_index
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
    # measure_divergence=False (--divergence off or between every-N rounds): not measured, NaN (null in records).
    report = (divergence_report(result.adapter, u64, example_weights, result.base_delta) if measure_divergence
              else unmeasured_report(result.adapter))
    ranks = None if client_ranks is None else [client_ranks.get(u.client_id, _rank(global_adapter)) for u in u64]
    bytes_up, bytes_down = round_bytes(spec.policy.for_round(round_index), global_adapter, len(u64), ranks)
    robust = {"norm_reference": reference, "norm_reference_is_median": from_round, "clipped": clipped,
              "weights": {u.client_id: float("nan") if w.is_meta else float(w) for u, w in zip(u64, example_weights)}}
    metrics = {
        "method": method,
        "num_clients": len(u64),
        "divergence": report.divergence,
        "eckart_young_bound": report.eckart_young_bound,
        "divergence_per_module": report.per_module,
        "divergence_measured": measure_divergence,
        "solve_seconds": solve_seconds,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "rejected": rejected,
        "skipped": False,
        **robust,
        **result.metrics,
    }
    final = AggregationResult(
        adapter=_cast(result.adapter, out_dtype, device),
        base_delta={m: d.to(device=device, dtype=out_dtype) for m, d in result.base_delta.items()},
        metrics=metrics,
        extras=_to_device(result.extras, device),
        state={k: v.to(device=device, dtype=torch.float32) for k, v in result.state.items()},
    )
    problem = non_finite(final)
    if problem is not None:  # finite inputs, non-finite output (an overflow in out_dtype): never applied
        reason = f"{problem}; the global adapter is left unchanged"
        log.warning("round skipped: %s", reason)
        return skipped_result(method, global_adapter, state, reason, num_clients=len(u64), rejected=rejected, **robust)
    return final


def materialise(updates: Iterable[T]) -> list[T]:
    """``updates`` as a list: any iterable (a generator too) is read once; anything else is refused."""
    if isinstance(updates, (str, bytes, dict)) or not isinstance(updates, Iterable):
        raise AggregationError(
            f"updates must be a list (or any iterable) of client updates, got a {type(updates).__name__}"
        )
    return list(updates)


def _check_ranks(client_ranks: dict[str, int] | None, rank_map: str, server_rank: int) -> None:
    """Raise on a ``client_ranks`` or ``rank_map`` argument that cannot describe this round (caller errors)."""
    if rank_map not in RANK_MAPS:
        raise AggregationError(f"rank_map={rank_map!r} is invalid: use one of {', '.join(RANK_MAPS)}")
    if client_ranks is None:
        return
    if not isinstance(client_ranks, dict):
        raise AggregationError(f"client_ranks is a {type(client_ranks).__name__}; pass a dict {{client id: rank}}")
    for client, rank in client_ranks.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= server_rank:
            raise AggregationError(f"client_ranks[{client!r}]={rank!r} is invalid: use an int from 1 to the "
                                   f"global adapter's rank {server_rank}")


def _starts(global_adapter: Adapter, updates: list[ClientUpdate], client_ranks: dict[str, int],
            rank_map: str) -> list[Adapter]:
    """What each client was sent (one object per rank; the global adapter itself at full rank)."""
    device = adapter_device(global_adapter)
    server = _server_device(device)
    by_rank: dict[int, Adapter] = {_rank(global_adapter): global_adapter}
    out = []
    for update in updates:
        rank = client_ranks.get(update.client_id, _rank(global_adapter))
        if rank not in by_rank:
            # In the global's dtype, as the engines map it; on the CPU where the device lacks float64 (the svd map's maths).
            dtype = next(iter(global_adapter.values())).A.dtype
            source = global_adapter if server == device else _cast(global_adapter, dtype, server)
            by_rank[rank] = _to_device(sent_start(source, rank, rank_map), device)
        out.append(by_rank[rank])
    return out


def _clip(
    starts: list[Adapter], u64: list[ClientUpdate], norms: list[float], bound: float
) -> tuple[list[ClientUpdate], list[dict[str, Any]]]:
    """Each update with ‖u − s‖ above ``bound`` pulled back onto it: s + (bound / ‖u − s‖)(u − s), s its start."""
    out, clipped = [], []
    for update, norm, start in zip(u64, norms, starts):
        scale = clip_scale(norm, bound)
        if scale < 1.0:
            clipped.append({"client": update.client_id, "norm": norm, "bound": bound})
            log.info("round update from client %s clipped: norm %.4g to %.4g", update.client_id, norm, bound)
            update = ClientUpdate(
                {m: LoraPair(A=clipped_tensor(p.A, start[m].A, scale), B=clipped_tensor(p.B, start[m].B, scale))
                 for m, p in update.adapter.items()},
                update.num_examples, update.client_id)
        out.append(update)
    return out, clipped


def _rank(adapter: Adapter) -> int:
    return next(iter(adapter.values())).rank
