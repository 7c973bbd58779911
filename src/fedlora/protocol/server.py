"""The server's step of a round, shared by the local engine and the Flower strategy.

Aggregates the LoRA factors with :func:`fedlora.aggregation.aggregate` (which validates every
update, rejects bad clients and clips the rest) and FedAvg-s the classifier heads of the clients it
kept. Heads are screened like factors first (:mod:`fedlora.aggregation.heads`): wrong keys or
shapes, a non-float or non-finite tensor, or a norm far above the round's reject the client, so a
single broken client never reaches the global model. A new head that is not finite in the global
head's dtype (a float64 head of 1e300 in a float32 model) skips the round, like a non-finite adapter.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fedlora.aggregation import Adapter, AggregationResult, aggregate
from fedlora.aggregation.api import DEFAULT_NORM_BOUND, materialise
from fedlora.aggregation.heads import clip_head, head_problem, screen_heads
from fedlora.aggregation.outcome import skipped_result
from fedlora.aggregation.robust import DEFAULT_CLIP
from fedlora.aggregation.validation import client_key
from fedlora.protocol.client import ClientResult, average_heads

log = logging.getLogger(__name__)


class ServerStep(NamedTuple):
    """One round's server outcome: the aggregation (with its metrics) and the new global head.

    ``head`` is None exactly when the round was skipped (``result.metrics["skipped"]``, with its
    ``reason``): the global adapter and head stay as they were. One signal, checked in one place.
    """

    result: AggregationResult
    head: dict[str, Tensor] | None

    @property
    def skipped(self) -> bool:
        return self.head is None


def server_step(
    method: str, global_adapter: Adapter, results: Iterable[ClientResult], *, global_head: dict[str, Tensor],
    min_clients: int = 1, norm_bound: float | None = DEFAULT_NORM_BOUND, clip: float | None = DEFAULT_CLIP,
    **options: Any,
) -> ServerStep:
    """The round's :class:`ServerStep`: the aggregation and the new global head (None: skipped).

    ``global_head``: the head the clients started from, the reference every client head must match.
    ``norm_bound`` and ``clip`` apply to heads and factors alike; other options go to :func:`aggregate`.
    """
    results = materialise(results)
    if not results:  # no client reported (Flower: every node failed): a skipped round, nothing changes
        return ServerStep(skipped_result(method, global_adapter, options.get("state"), "no client reported this round",
                                         num_clients=0, rejected=[]), None)
    names, bad_heads = malformed(results, global_head)
    blamed = {e["client"] for e in bad_heads}
    well_formed = [(n, r) for n, r in zip(names, results) if n not in blamed]
    problems, norms, reference, from_round = screen_heads(
        [n for n, _ in well_formed], [r.head for _, r in well_formed], global_head, norm_bound)
    bad_heads += [{"client": c, "reason": reason} for c, reason in problems]
    for entry in bad_heads:
        log.warning("round update from client %s rejected: %s", entry["client"], entry["reason"])
    blamed = {e["client"] for e in bad_heads}
    kept = [(n, r, norm) for (n, r), norm in zip(well_formed, norms or [0.0] * len(well_formed)) if n not in blamed]
    if not kept:  # nothing to hand to aggregate: a skipped round
        reason = ("every client's classifier head was rejected" if any(isinstance(r, ClientResult) for r in results)
                  else "no valid client result")
        return ServerStep(skipped_result(method, global_adapter, options.get("state"), reason,
                                         num_clients=0, rejected=bad_heads), None)
    updates = [r.update for _, r, _ in kept]
    result = aggregate(method, global_adapter, updates, min_clients=min_clients, norm_bound=norm_bound, clip=clip,
                       **options)
    result.metrics["rejected"] = bad_heads + result.metrics["rejected"]
    if result.metrics["skipped"]:
        return ServerStep(result, None)
    weights = result.metrics["weights"]  # the (capped) example weights aggregate used, by client
    accepted = [(n, r, norm) for n, r, norm in kept if n in weights]
    heads = [r.head if clip is None or not from_round else clip_head(r.head, global_head, norm, clip * reference)
             for _, r, norm in accepted]
    w = torch.tensor([weights[n] for n, _, _ in accepted], dtype=torch.float64)
    head = average_heads(heads, w, like=global_head)
    if not all(bool(torch.isfinite(t).all()) for t in head.values() if not t.is_meta):
        reason = "the averaged classifier head is not finite in the global head's dtype; the global is left unchanged"
        log.warning("round skipped: %s", reason)
        return ServerStep(skipped_result(method, global_adapter, options.get("state"), reason,
                                         num_clients=len(accepted), rejected=result.metrics["rejected"]), None)
    return ServerStep(result, head)


def malformed(results: list[Any], global_head: dict[str, Tensor]) -> tuple[list[str], list[dict[str, str]]]:
    """Each result's client name, and ``{client, reason}`` for those that are no ClientResult or whose head does
    not match the global head (keys, shapes, dtype, finite values): what every server step refuses first."""
    names = [client_key(getattr(r, "update", None), i) for i, r in enumerate(results)]
    bad = [{"client": n, "reason": p} for n, r in zip(names, results)
           if (p := "a client result must be a ClientResult" if not isinstance(r, ClientResult)
               else head_problem(r.head, global_head))]
    return names, bad
