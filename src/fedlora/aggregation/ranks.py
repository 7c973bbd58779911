"""Per-client LoRA ranks: the one boundary where the server's rank-R adapter meets a rank-r_u client.

The server keeps the largest rank R (``--rank``); client u trains rank r_u ≤ R. Convention: a
rank-r_u client *is* a rank-R adapter whose last R − r_u components are zero, and its product is
scaled by the server's α/R like everyone else's, so one product means one weight change on every
client and every method aggregates zero-padded factors unchanged. Zero components stay exactly
zero under training: with B[:, i] = 0 and A[i, :] = 0 both gradients vanish (∂L/∂A[i] = s·B[:, i]ᵀG,
∂L/∂B[:, i] = s·G·A[i]ᵀ), and AdamW moves a parameter with zero gradient and zero state by zero.

Server → client (``to_client``):
  "truncate" (HetLoRA, Cho et al. 2024, arXiv 2401.06432): the first r_u components, A[:r_u], B[:, :r_u].
  "svd" (FlexLoRA, Bai et al., NeurIPS 2024, arXiv 2402.11505): the best rank-r_u approximation of the
  global product, B A ≈ U_r √Σ_r · √Σ_r V_rᵀ. Components with no singular value (a zero product in
  round 1) keep the truncated global factors, so a client never gets A = B = 0 (a saddle where
  nothing trains).
Client → server (``pad``): zero-padding back to R, after ``restrict`` has zeroed whatever a client
sent beyond its rank (an untrusted client cannot use components it was not given).
``sent_start`` is the round's start of a rank-r_u client in that zero-padded form: what the engines
send, and what :func:`fedlora.aggregation.aggregate` measures, rejects and clips its update against.
Bytes count each client at its own rank (:func:`fedlora.aggregation.communication.round_bytes`).

Exactness: when Σ_u r_u ≤ R, the zero-padded clients' T = Σ_u w_u B_u A_u has rank ≤ R, so the
``svd`` method reproduces it exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedlora.aggregation.lowrank import product_norm, stack_factors, truncated_svd_factors
from fedlora.aggregation.types import Adapter, LoraPair

RANK_MAPS = ("truncate", "svd")


def assign_ranks(choices: Sequence[int], clients: int, server_rank: int, seed: int) -> list[int]:
    """Each client's rank: ``choices`` one per client, or (any other length) drawn uniformly from them.

    ``()``: every client has the server's rank. Draws use their own seeded generator, so the
    assignment depends on (choices, clients, seed) only.
    """
    if not choices:
        return [server_rank] * clients
    if len(choices) == clients:
        return [int(r) for r in choices]
    rng = np.random.default_rng([seed, 7_919])
    return [int(r) for r in rng.choice(np.asarray(choices), size=clients)]


def is_mixed(ranks: Sequence[int], server_rank: int) -> bool:
    return any(r != server_rank for r in ranks)


def restrict(adapter: Adapter, rank: int) -> Adapter:
    """``adapter`` with components ≥ ``rank`` zeroed (same shapes): what a rank-``rank`` client may change."""
    out: Adapter = {}
    for module, pair in adapter.items():
        A, B = pair.A.clone(), pair.B.clone()
        A[rank:] = 0  # (R, k)
        B[:, rank:] = 0  # (d, R)
        out[module] = LoraPair(A=A, B=B)
    return out


def truncate(adapter: Adapter, rank: int) -> Adapter:
    """The first ``rank`` components as (rank, k) and (d, rank) factors: what travels to and from the client."""
    return {m: LoraPair(A=p.A[:rank].clone(), B=p.B[:, :rank].clone()) for m, p in adapter.items()}


def pad(adapter: Adapter, server_rank: int) -> Adapter:
    """Zero-pad (r_u, k) / (d, r_u) factors to the server's rank R."""
    out: Adapter = {}
    for module, pair in adapter.items():
        r, k = pair.A.shape
        d = pair.B.shape[0]
        A = torch.zeros(server_rank, k, dtype=pair.A.dtype, device=pair.A.device)  # (R, k)
        B = torch.zeros(d, server_rank, dtype=pair.B.dtype, device=pair.B.device)  # (d, R)
        A[:r], B[:, :r] = pair.A, pair.B
        out[module] = LoraPair(A=A, B=B)
    return out


def sent_start(adapter: Adapter, rank: int, mode: str) -> Adapter:
    """What a rank-``rank`` client starts from, zero-padded to ``adapter``'s rank R (``adapter`` itself at R)."""
    server_rank = next(iter(adapter.values())).rank
    return adapter if rank >= server_rank else pad(to_client(adapter, rank, mode), server_rank)


def to_client(adapter: Adapter, rank: int, mode: str) -> Adapter:
    """The rank-``rank`` factors client u starts from, (rank, k) and (d, rank), under ``mode``."""
    if mode not in RANK_MAPS:
        raise ValueError(f"unknown rank map {mode!r}; use one of {', '.join(RANK_MAPS)}")
    if mode == "truncate" or rank >= next(iter(adapter.values())).rank:
        return truncate(adapter, rank)
    out: Adapter = {}
    truncated = truncate(adapter, rank)
    for module, pair in adapter.items():
        F, E = stack_factors([pair.B.double()], [pair.A.double()], torch.ones(1, dtype=torch.float64))
        if product_norm(F, E) == 0.0:  # nothing to decompose (round 1: B = 0)
            out[module] = truncated[module]
            continue
        B, A, sigma = truncated_svd_factors(F, E, rank)  # (d, rank), (rank, k), (s,)
        kept = torch.zeros(rank, dtype=torch.bool)
        kept[: min(rank, sigma.shape[0])] = sigma[:rank] > sigma[0] * 1e-12
        empty = (~kept).to(A.device)
        A[empty] = truncated[module].A.double()[empty]  # no singular direction there: the truncated global factors
        B[:, empty] = truncated[module].B.double()[:, empty]
        out[module] = LoraPair(A=A.to(pair.A.dtype), B=B.to(pair.B.dtype))
    return out
