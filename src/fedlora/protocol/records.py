"""One line of ``metrics.jsonl``: what a round did, written identically by both engines.

Fields: round, clients, global metrics (and ``global_metric``, the task's main one), local
(personalised) metrics per client and their mean (and the mean local loss, for tasks that report one), train loss, the aggregation's divergence and
its Eckart–Young bound, solve/server seconds, LoRA and total bytes up/down (the classifier head
travels both ways), rejected clients with reasons, and whether the round was skipped, and the method's own diagnostics (:data:`METHOD_DIAGNOSTICS`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedlora.protocol.client import ClientResult


def round_record(
    round_: int, results: list[ClientResult], agg_metrics: dict[str, Any], global_metrics: dict[str, float],
    server_seconds: float, head: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """One line of metrics.jsonl; the Flower ServerApp writes the same fields."""
    locals_ = {r.update.client_id: r.local_metrics["main"] for r in results if r.local_metrics is not None}
    # LLM tasks: the teacher-forced loss on each client's held-out share (their main metric is near 0 on small models)
    local_losses = [r.local_metrics["loss"] for r in results if r.local_metrics is not None and "loss" in r.local_metrics]
    head_bytes = sum(t.numel() for t in head.values()) * 4 * len(results)  # the head travels both ways (FedAvg)
    return {
        "round": round_,
        "clients": [r.update.client_id for r in results],
        "global": global_metrics,
        "global_metric": global_metrics["main"],
        "local_metric_mean": float(np.mean(list(locals_.values()))) if locals_ else None,
        "local_metric": locals_ or None,
        "local_loss_mean": float(np.mean(local_losses)) if local_losses else None,
        "train_loss": float(np.mean([r.loss for r in results])) if results else None,
        "divergence": agg_metrics["divergence"],  # null when not measured (--divergence off / every N) or skipped
        "divergence_measured": bool(agg_metrics.get("divergence_measured", True)) and not agg_metrics["skipped"],
        "eckart_young_bound": agg_metrics["eckart_young_bound"],
        "solve_seconds": agg_metrics["solve_seconds"],
        "server_seconds": server_seconds,
        "bytes_up": agg_metrics["bytes_up"] + head_bytes,
        "bytes_down": agg_metrics["bytes_down"] + head_bytes,
        "lora_bytes_up": agg_metrics["bytes_up"],
        "lora_bytes_down": agg_metrics["bytes_down"],
        "rejected": agg_metrics["rejected"],
        "skipped": agg_metrics["skipped"],
        "skip_reason": agg_metrics.get("reason"),  # why a skipped round was skipped (None when it was not)
        "clipped": agg_metrics.get("clipped", []),  # [{client, norm, bound}]: updates scaled back to the clip bound
        # A method's own diagnostics (FLoRA-NA: objective, coefficient range, factor norms; svd-ef: residual norm)
        **{k: agg_metrics[k] for k in METHOD_DIAGNOSTICS if k in agg_metrics},
    }


METHOD_DIAGNOSTICS = ("objective", "objective_fedit", "p_min", "p_max", "q_min", "q_max", "p_dev_max", "q_dev_max",
                      "norm_A", "norm_B", "norm_A_fedit", "norm_B_fedit", "step_back_t", "residual_norm")
