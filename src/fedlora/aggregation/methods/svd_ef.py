"""Truncated SVD with error feedback: what rank r cannot carry this round is carried into the next.

Error feedback (Seide et al., "1-Bit Stochastic Gradient Descent and its Application to
Data-Parallel Distributed Training of Speech DNNs", Interspeech 2014; Karimireddy et al., "Error
Feedback Fixes SignSGD and other Gradient Compression Schemes", ICML 2019) applied to the server's
rank-r truncation: per module, with T = Σ_u w_u B_u A_u (d, k) and the residual e_prev left over
from the previous round (zero in the first),
    X = T + γ · e_prev,      B A = the best rank-r approximation of X (balanced split, as ``svd``:
                                   B = U_r √Σ_r (d, r), A = √Σ_r V_rᵀ (r, k)),
    e_new = X − B A          (kept on the server for the next round).
γ is the option ``decay`` in [0, 1] (1: classical error feedback; 0: plain ``svd``, the residual is
stored but never used). With γ = 1 the residual telescopes: over rounds 1..n the broadcast products
P_t = B_t A_t satisfy Σ_t P_t = Σ_t X_t − Σ_t e_t = Σ_t T_t − e_n, so the sum of what was applied
is off from the sum of the targets by one residual, not by the sum of n truncation errors. In the
engines, where round t's clients start from P_{t−1}, the same identity reads P_n + e_n = P_0 +
Σ_t (T_t − P_{t−1}): the model stays one residual away from the untruncated trajectory.

Costs: no extra bytes (clients see an ordinary rank-r adapter; communication equals FedIT's), but
the server keeps a dense d×k float32 residual per module (``state["residual/<module>"]``), i.e. a
full copy of every adapted weight matrix, and the truncation of X is a dense SVD, O(d k min(d, k))
per module. In a round without a residual for a module (the first, or state lost) X = T is
truncated exactly as the ``svd`` method does, from the factors (never forming T for the SVD), so
that round equals ``svd`` bit for bit; T is then formed once to store e_new.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from torch import Tensor

from fedlora.aggregation import lowrank
from fedlora.aggregation.methods.common import factors
from fedlora.aggregation.options import AtLeast, AtMost
from fedlora.aggregation.registry import register_method
from fedlora.aggregation.types import Adapter, AggregationError, AggregationResult, ClientUpdate, LoraPair, TrainingPolicy

STATE_PREFIX = "residual/"


def dense_truncated_svd(X: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Best rank-``rank`` approximation of a dense X (d, k) split as B (d, r) @ A (r, k), balanced; and σ."""
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)  # (d, m), (m,), (m, k)
    keep = min(rank, S.shape[0])
    root = S[:keep].sqrt()
    B = torch.zeros(X.shape[0], rank, dtype=X.dtype, device=X.device)
    A = torch.zeros(rank, X.shape[1], dtype=X.dtype, device=X.device)
    B[:, :keep] = U[:, :keep] * root  # (d, keep)
    A[:keep] = root[:, None] * Vh[:keep]  # (keep, k)
    return B, A, S


@register_method(
    "svd-ef",
    policy=TrainingPolicy(stateful=True),
    summary="truncated SVD of T + residual; the truncation error is fed back next round (error feedback)",
    source="error feedback (Seide et al. 2014; Karimireddy et al. 2019)",
)
def svd_ef(
    global_adapter: Adapter,
    updates: Sequence[ClientUpdate],
    weights: Tensor,
    state: dict[str, Tensor],
    *,
    decay: Annotated[float, AtLeast(0), AtMost(1)] = 1.0,
) -> AggregationResult:
    adapter: Adapter = {}
    new_state: dict[str, Tensor] = {}
    residual_norm_sq = 0.0
    for module, pair in global_adapter.items():
        Bs, As = factors(updates, module)
        F, E = lowrank.stack_factors(Bs, As, weights)  # (d, U r), (U r, k): F @ E = T
        previous = state.get(STATE_PREFIX + module)
        if previous is None:  # exactly the svd method's computation
            B, A, _ = lowrank.truncated_svd_factors(F, E, pair.rank)
            X = F @ E  # (d, k)
        else:
            if tuple(previous.shape) != pair.shape:
                raise AggregationError(
                    f"svd-ef: state {STATE_PREFIX + module!r} has shape {tuple(previous.shape)}, "
                    f"expected (d, k) = {pair.shape}: the residual belongs to another model"
                )
            X = F @ E + decay * previous  # (d, k)
            B, A, _ = dense_truncated_svd(X, pair.rank)
        residual = X - B @ A  # (d, k)
        new_state[STATE_PREFIX + module] = residual
        residual_norm_sq += float((residual**2).sum())
        adapter[module] = LoraPair(A=A, B=B)
    return AggregationResult(adapter=adapter, state=new_state, metrics={"residual_norm": residual_norm_sq**0.5})
