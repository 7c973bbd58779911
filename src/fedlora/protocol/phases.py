"""Multi-phase rounds (:mod:`fedlora.aggregation.phased`, FedASK), written once for both engines.

Phase 1's uploads arrive with the clients' training results (``ClientResult.first_upload``); phases
2..P go through a :class:`PhaseChannel`, which sends the server's broadcast to this round's clients and
returns their uploads: in the local engine the clients are the in-process results
(:class:`InProcessChannel`), on Flower one more message per client and phase
(:class:`fedlora.engines.flower.phases.FlowerChannel`). The server only ever forms Σ_u w_u upload_u.

Each upload is validated (names, shapes, finite; a bad or silent client drops out of the round's later
phases) and clipped like a factor update, to ``clip`` times the phase's median upload norm; the weights
are the surviving clients' example weights, renormalised in every phase. A client that answers phase 1
and then fails is left out of phase 2's sum: the result is then the sketch of the others' aggregate
in a range that also saw its contribution, still a valid low-rank approximation.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from typing import Any, Protocol

import torch
from torch import Tensor

from fedlora.aggregation import Adapter, AggregationResult, LoraPair, get_method
from fedlora.aggregation.api import SERVER_DTYPE
from fedlora.aggregation.communication import round_bytes
from fedlora.aggregation.divergence import unmeasured_report
from fedlora.aggregation.heads import clip_head, head_problem, screen_heads
from fedlora.aggregation.outcome import non_finite, skipped_result
from fedlora.aggregation.phased import PhasedAggregation, Upload, upload_problem, weighted_sum
from fedlora.aggregation.robust import clip_scale
from fedlora.protocol.client import ClientResult, average_heads
from fedlora.protocol.server import ServerStep

log = logging.getLogger(__name__)


class PhaseChannel(Protocol):
    """How the server reaches this round's clients for phases 2..P."""

    def exchange(self, phase: int, clients: list[str], broadcast: Upload) -> dict[str, Any]:
        """Send ``broadcast`` to ``clients``; their uploads by client id (a client that failed is absent)."""
        ...


class InProcessChannel:
    """The local engine's clients: each upload computed from the client's trained adapter in this process."""

    def __init__(self, phased: PhasedAggregation, results: list[ClientResult], options: dict[str, Any]) -> None:
        self.phased, self.options = phased, options
        self.adapters = {r.update.client_id: r.update.adapter for r in results if isinstance(r, ClientResult)}

    def exchange(self, phase: int, clients: list[str], broadcast: Upload) -> dict[str, Any]:
        sent = {m: t.float() for m, t in broadcast.items()}  # float32 on the wire, as Flower sends it
        return {c: self.phased.upload(phase, self.adapters[c], sent, self.options) for c in clients}


def first_upload(phased: PhasedAggregation, adapter: Adapter, options: dict[str, Any]) -> Upload:
    """A client's phase-1 upload, right after training (the same call on both engines' clients)."""
    return phased.upload(1, adapter, {}, options)


def phased_server_step(method: str, global_adapter: Adapter, results: list[ClientResult], *,
                       global_head: dict[str, Tensor], channel: PhaseChannel, options: dict[str, Any],
                       round_index: int, min_clients: int = 1, clip: float | None = None) -> ServerStep:
    """The round's :class:`ServerStep` for a phased method: every phase's weighted sum, then the new global."""
    spec = get_method(method)
    phased = spec.phased
    assert phased is not None, f"{method} is not a phased method"
    g64 = {m: p.to(SERVER_DTYPE) for m, p in global_adapter.items()}
    rejected: list[dict[str, Any]] = []
    uploads: dict[str, Any] = {}
    weights_of: dict[str, float] = {}
    heads: dict[str, dict[str, Tensor]] = {}
    for i, r in enumerate(results):
        name = r.update.client_id if isinstance(r, ClientResult) else f"#{i}"
        problem = ("a client result must be a ClientResult" if not isinstance(r, ClientResult)
                   else head_problem(r.head, global_head))
        if problem is None:
            uploads[name], weights_of[name], heads[name] = r.first_upload, float(r.update.num_examples), r.head
        else:
            rejected.append({"client": name, "reason": problem})
    broadcast: Upload = {}
    bytes_up = bytes_down = 0
    started = time.perf_counter()
    clipped: list[dict[str, Any]] = []
    for phase in range(1, phased.phases + 1):
        if phase > 1:
            asked = sorted(uploads, key=list(weights_of).index)
            bytes_down += sum(t.numel() for t in broadcast.values()) * 4 * len(asked)  # float32 on the wire
            uploads = channel.exchange(phase, asked, broadcast)
        shapes = phased.shapes(phase, g64, options)
        uploads, bad = _valid(uploads, shapes, phase)
        rejected += bad
        if len(uploads) < min_clients:
            reason = f"{len(uploads)} valid client uploads in phase {phase}, fewer than min_clients={min_clients}"
            log.warning("round skipped: %s; global adapter unchanged", reason)
            return ServerStep(skipped_result(method, global_adapter, None, reason, num_clients=len(uploads),
                                             rejected=rejected), None)
        bytes_up += sum(t.numel() for t in next(iter(uploads.values())).values()) * 4 * len(uploads)
        names = list(uploads)
        if clip is not None:
            clipped += _clip(uploads, clip, phase)
        w = torch.tensor([weights_of[n] for n in names], dtype=torch.float64)
        total = weighted_sum([uploads[n] for n in names], w / w.sum())
        if phase < phased.phases:
            broadcast = phased.server(phase, g64, total, broadcast, options)
    result: AggregationResult = phased.finish(g64, total, broadcast, options)
    solve_seconds = time.perf_counter() - started
    kept_heads = [heads[n] for n in names]
    if clip is not None:  # heads are clipped like a plain round's: to clip x the round's median head update
        _, norms, reference, from_round = screen_heads(names, kept_heads, global_head, None)
        if from_round:
            kept_heads = [clip_head(h, global_head, n, clip * reference) for h, n in zip(kept_heads, norms)]
    head = average_heads(kept_heads, w / w.sum(), like=global_head)  # w: the last phase's clients' weights
    return phased_step(method, global_adapter, result, head, clients=len(names), round_index=round_index,
                       bytes_up=bytes_up, phase_bytes_down=bytes_down, solve_seconds=solve_seconds, rejected=rejected,
                       clipped=clipped, weights={n: float(x) for n, x in zip(names, w / w.sum())})


def phased_step(method: str, global_adapter: Adapter, result: AggregationResult, head: dict[str, Tensor], *,
                clients: int, round_index: int, bytes_up: int, phase_bytes_down: int, solve_seconds: float = 0.0,
                rejected: list[dict[str, Any]] | None = None, clipped: list[dict[str, Any]] | None = None,
                weights: dict[str, float] | None = None) -> ServerStep:
    """The :class:`ServerStep` of a phased method's finished round (its phases summed in this process, or each by
    secure aggregation): the result in the global's dtype, its metrics, and a skip if it or the head is not finite."""
    dtype = next(iter(global_adapter.values())).A.dtype
    result.adapter = {m: LoraPair(A=p.A.to(dtype).contiguous(), B=p.B.to(dtype).contiguous())
                      for m, p in result.adapter.items()}
    _, factors_down = round_bytes(get_method(method).policy.for_round(round_index), global_adapter, clients)
    report = unmeasured_report(result.adapter)  # the server never holds a client's product to measure it against
    result.metrics = {"method": method, "num_clients": clients, "divergence": report.divergence,
                      "eckart_young_bound": report.eckart_young_bound, "divergence_per_module": report.per_module,
                      "divergence_measured": False, "solve_seconds": solve_seconds, "bytes_up": bytes_up,
                      "bytes_down": phase_bytes_down + factors_down, "rejected": rejected or [], "skipped": False,
                      "clipped": clipped or [], **({"weights": weights} if weights is not None else {}),
                      "phases": get_method(method).phased.phases if get_method(method).phased else 1}
    problem = non_finite(result) or next((f"the averaged classifier head {k!r} is not finite" for k, t in head.items()
                                          if not t.is_meta and not bool(torch.isfinite(t).all())), None)
    if problem:
        log.warning("round skipped: %s", problem)
        return ServerStep(skipped_result(method, global_adapter, None, f"{problem}; the global is left unchanged",
                                         num_clients=clients, rejected=rejected or []), None)
    return ServerStep(result, head)


def _valid(uploads: dict[str, Any], shapes: dict[str, tuple[int, ...]],
           phase: int) -> tuple[dict[str, Upload], list[dict[str, Any]]]:
    """The well-formed uploads, and ``{client, reason}`` for the others."""
    good, bad = {}, []
    for name, upload in uploads.items():
        problem = upload_problem(upload, shapes)
        if problem is None:
            good[name] = upload
        else:
            log.warning("phase %d upload from client %s rejected: %s", phase, name, problem)
            bad.append({"client": name, "reason": f"phase {phase}: {problem}"})
    return good, bad


def _clip(uploads: dict[str, Upload], clip: float, phase: int) -> list[dict[str, Any]]:
    """Scale every upload above ``clip`` x the phase's median norm back to it (in place); who was clipped."""
    norms = {n: math.sqrt(sum(float(t.double().pow(2).sum()) for t in u.values())) for n, u in uploads.items()}
    median = statistics.median(norms.values())
    if len(uploads) < 2 or median == 0:
        return []
    out = []
    for name, norm in norms.items():
        scale = clip_scale(norm, clip * median)
        if scale < 1.0:
            uploads[name] = {k: t * scale for k, t in uploads[name].items()}
            out.append({"client": name, "norm": norm, "bound": clip * median, "phase": phase})
    return out
