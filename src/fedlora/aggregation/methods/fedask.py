"""FedASK: the rank-r SVD of the ideal aggregate from two rounds of *sums*, never a client's factors.

Zhang et al., "Differentially Private Federated Low Rank Adaptation Beyond Fixed-Matrix", NeurIPS 2025,
arXiv 2507.09990 (code: FLEECERmw/PrivacyFedLLM, ``policy_fedask.py``). With the ideal aggregate
M = Σ_u w_u B_u A_u (d, k) and a sketch of s columns (the randomized range finder of Halko, Martinsson
& Tropp 2011, without power iterations):

    phase 1  client u:  Y_u = B_u (A_u Ω)          (d, s),  Ω (k, s) Gaussian, drawn from the round's seed
             server:    Q = orth(Σ_u w_u Y_u)      (d, s) = orth(M Ω), broadcast
    phase 2  client u:  Z_u = A_uᵀ (B_uᵀ Q)        (k, s)
             server:    Zᵀ = Σ_u w_u Z_uᵀ = Qᵀ M  (s, k);  Zᵀ = U Σ Vᵀ (thin SVD)
                        B = Q U_r Σ_r^½  (d, r),   A = Σ_r^½ V_rᵀ  (r, k)      (the authors' balanced split)

so B A = Q [Qᵀ M]_r, the best rank-r approximation of M within the sketch's range. It is *exact*
(equal to the ``svd`` yardstick, the Eckart–Young optimum) whenever rank M <= s, i.e. s >= U r; with
fewer columns it is the randomized SVD's approximation, whose error decays with the oversampling
p = s - r. Both phases need only sums, so secure aggregation and DP noise on the sums fit it.

Ω is drawn fresh each round from the seed the engine passes (``server_seed``), per module in sorted
order, on the CPU in float64 then cast, so every client and the server draw the same Ω. The server
maths is float64; a client computes its uploads in its adapter's dtype (float32 on the wire).
Communication per client: up d·s + k·s (Y_u, Z_u), down d·s (Q) + r·(d + k) (the new adapter).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fedlora.aggregation.phased import PhasedAggregation, Upload, run_phases
from fedlora.aggregation.registry import register_method
from fedlora.aggregation.types import Adapter, AggregationResult, ClientUpdate, LoraPair, TrainingPolicy

SKETCH_PER_RANK = 4  # s = 4 r by default: the authors' configuration sketches 64 columns for rank 16


def sketch_columns(pair: LoraPair, sketch: int) -> int:
    """s for one module: ``sketch`` (0: 4 r), at most min(d, k) (a range finder cannot use more)."""
    d, k = pair.shape
    return min(sketch or SKETCH_PER_RANK * pair.rank, d, k)


def omegas(adapter: Adapter, seed: int, sketch: int) -> dict[str, Tensor]:
    """Ω (k, s) for every module, drawn from ``seed`` in sorted module order (the same on every side)."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    out = {}
    for module in sorted(adapter):
        pair = adapter[module]
        omega = torch.randn(pair.shape[1], sketch_columns(pair, sketch), generator=generator, dtype=torch.float64,
                            device="cpu")  # drawn on the CPU: every device and client draws the same numbers
        out[module] = omega.to(device=pair.A.device, dtype=pair.A.dtype)
    return out


def client_upload(phase: int, adapter: Adapter, broadcast: Upload, options: dict[str, Any]) -> Upload:
    """Phase 1: Y_u = B_u (A_u Ω) (d, s); phase 2: Z_u = A_uᵀ (B_uᵀ Q) (k, s). Never a d×k matrix."""
    if phase == 1:
        sketch = omegas(adapter, options.get("seed", 0), options.get("sketch", 0))
        return {m: p.B @ (p.A @ sketch[m]) for m, p in adapter.items()}  # (d, s)
    return {m: p.A.T @ (p.B.T @ broadcast[m].to(p.B.dtype)) for m, p in adapter.items()}  # (k, s)


def server_orthonormalise(phase: int, global_adapter: Adapter, total: Upload, sent: Upload,
                          options: dict[str, Any]) -> Upload:
    """After phase 1: Q = orth(Σ_u w_u Y_u) (d, s), the sketched range of M."""
    return {m: torch.linalg.qr(Y)[0] for m, Y in total.items()}  # (d, s)


def server_refactor(global_adapter: Adapter, total: Upload, sent: Upload, options: dict[str, Any]) -> AggregationResult:
    """After phase 2: B = Q U_r Σ_r^½, A = Σ_r^½ V_rᵀ from the SVD of Zᵀ = Qᵀ M (s, k)."""
    adapter: Adapter = {}
    singular_values: dict[str, Tensor] = {}
    for module, pair in global_adapter.items():
        Q = sent[module].to(torch.float64)  # (d, s)
        U, S, Vh = torch.linalg.svd(total[module].T, full_matrices=False)  # (s, s'), (s',), (s', k)
        r = pair.rank
        root = S[:r].sqrt()
        B = torch.zeros(pair.shape[0], r, dtype=torch.float64, device=Q.device)
        A = torch.zeros(r, pair.shape[1], dtype=torch.float64, device=Q.device)
        B[:, : root.numel()] = Q @ (U[:, :r] * root)  # (d, r)
        A[: root.numel()] = root[:, None] * Vh[:r]  # (r, k)
        adapter[module] = LoraPair(A=A, B=B)
        singular_values[module] = S
    return AggregationResult(adapter=adapter, extras={"singular_values": singular_values})


def upload_shapes(phase: int, global_adapter: Adapter, options: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """{module: (d, s)} in phase 1, {module: (k, s)} in phase 2."""
    sketch = options.get("sketch", 0)
    return {m: (p.shape[0] if phase == 1 else p.shape[1], sketch_columns(p, sketch)) for m, p in global_adapter.items()}


def broadcast_shapes(phase: int, global_adapter: Adapter, options: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Before phase 2: Q, {module: (d, s)}."""
    return upload_shapes(1, global_adapter, options)


PHASES = PhasedAggregation(phases=2, upload=client_upload, server=server_orthonormalise, finish=server_refactor,
                           shapes=upload_shapes, broadcasts=broadcast_shapes)


@register_method(
    "fedask",
    policy=TrainingPolicy(upload_A=False, upload_B=False, download_full_adapter=True, server_seed=True,
                          needs_individual_updates=False, mixed_ranks=False),
    summary="two sketched sums per round (Y = Σ w B A Ω, then Z = Σ w Aᵀ Bᵀ Q): the rank-r SVD of Σ w B A",
    source="Zhang et al., NeurIPS 2025 (FedASK)",
    phased=PHASES,
)
def fedask(global_adapter: Adapter, updates: Sequence[ClientUpdate], weights: Tensor, *, seed: int = 0,
           sketch: int = 0) -> AggregationResult:
    # sketch: the sketch's columns s (0: 4 r); exact, the svd yardstick, when s >= clients x r.
    return run_phases(PHASES, global_adapter, updates, weights, {"seed": seed, "sketch": sketch})
