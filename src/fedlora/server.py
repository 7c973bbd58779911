"""The server's step of a round, shared by the local engine and the Flower strategy.

Aggregates the LoRA factors with :func:`fedlora.aggregation.aggregate` (which validates every
update and rejects bad clients) and FedAvg-s the classifier heads of the clients it kept. A head
with NaN/Inf rejects its client too, so a single broken client never reaches the global model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fedlora.aggregation import Adapter, AggregationResult, aggregate, client_weights
from fedlora.client import ClientResult, average_heads


def server_step(
    method: str, global_adapter: Adapter, results: Sequence[ClientResult], *, min_clients: int = 1, **options: Any
) -> tuple[AggregationResult, dict[str, Tensor] | None]:
    """(aggregation result, new global head); the head is None when the round was skipped."""
    if not results:  # no client reported (Flower: every node failed): a skipped round, nothing changes
        skipped = AggregationResult(adapter=global_adapter, metrics={
            "method": method, "num_clients": 0, "skipped": True, "rejected": [], "divergence": float("nan"),
            "eckart_young_bound": float("nan"), "solve_seconds": 0.0, "bytes_up": 0, "bytes_down": 0})
        return skipped, None
    bad_heads = [
        {"client": r.update.client_id, "reason": f"classifier head {k!r} contains NaN or Inf"}
        for r in results
        for k, t in r.head.items()
        if not bool(torch.isfinite(t).all())
    ]
    blamed = {e["client"] for e in bad_heads}
    kept = [r for r in results if r.update.client_id not in blamed]
    if not kept:  # nothing left to aggregate: a skipped round, reported like aggregate() does
        result = aggregate(method, global_adapter, [r.update for r in results], min_clients=len(results) + 1, **options)
        result.metrics["rejected"] = bad_heads + [e for e in result.metrics["rejected"] if e["client"] not in blamed]
        return result, None
    result = aggregate(method, global_adapter, [r.update for r in kept], min_clients=min_clients, **options)
    result.metrics["rejected"] = bad_heads + result.metrics["rejected"]
    if result.metrics["skipped"]:
        return result, None
    rejected = {e["client"] for e in result.metrics["rejected"]}
    accepted = [r for r in kept if r.update.client_id not in rejected]
    head = average_heads([r.head for r in accepted], client_weights([r.update for r in accepted]))
    return result, head
