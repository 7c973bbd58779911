"""The data that flows through aggregation: LoRA pairs, client updates, results.

A LoRA-adapted weight is ``W = W0 + s · B @ A`` with ``A`` of shape (r, k), ``B`` of
shape (d, r) and ``s = lora_alpha / r`` (PEFT's convention: ``lora_A.weight`` is (r, k),
``lora_B.weight`` is (d, r)). Everything in :mod:`fedlora.aggregation` works in the
*product space* of ``B @ A``; the scaling ``s`` is applied only when a product-space change
is merged into a frozen weight (see :func:`fedlora.models.lora_state.merge_base_delta`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

Adapter = dict[str, "LoraPair"]


@dataclass(frozen=True)
class LoraPair:
    """One adapted module's factors: ``A`` (r, k) and ``B`` (d, r)."""

    A: Tensor  # (r, k)
    B: Tensor  # (d, r)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape (d, k) of the weight this pair adapts."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    def product(self) -> Tensor:
        return self.B @ self.A  # (d, k)

    def to(self, dtype: torch.dtype) -> "LoraPair":
        return LoraPair(self.A.to(dtype), self.B.to(dtype))

    def numel(self) -> int:
        return self.A.numel() + self.B.numel()


@dataclass(frozen=True)
class ClientUpdate:
    """What one client uploads after local training: its adapter and how many examples it saw."""

    adapter: Adapter
    num_examples: int
    client_id: str


@dataclass
class AggregationResult:
    """The server's answer for one round.

    ``adapter``: the next global adapter (what clients download and start from).
    ``base_delta``: per module, a product-space (d, k) change that must be merged into the
    frozen weight as ``W0 += s · base_delta``; empty for methods that never touch ``W0``.
    ``metrics``: at least ``divergence``, ``eckart_young_bound``, ``solve_seconds``,
    ``bytes_up`` and ``bytes_down`` (per round, all clients, float32 on the wire).
    ``extras``: method-specific details (FLoRA-NA's p, q, objective trace, ...).
    ``state``: what a stateful method (``TrainingPolicy.stateful``) keeps on the server for the next
    round, e.g. the error-feedback residual; the engines checkpoint it and pass it back as ``state``.
    """

    adapter: Adapter
    base_delta: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingPolicy:
    """What a method needs from the engines: the one place they learn how a method behaves.

    Engines (local simulation, Flower) branch on these declarations only, never on a method's name.

    ``train_A`` / ``train_B``: whether the factor gets gradients on the client.
    ``upload_A`` / ``upload_B``: whether the factor travels to the server.
    ``local_B``: the client keeps its own B across rounds (FedSA-LoRA, a private factor); the
    server's B is used only to evaluate a global model.
    ``download_residual``: clients also download the dense (d, k) ``base_delta`` (FedEx-LoRA).
    ``download_stacked``: clients download every client's factors (FLoRA stacking) and rebuild the
    re-initialised global adapter from the server's seed instead of downloading it.
    ``server_seed``: the server passes the method a fresh per-round ``seed`` option (FLoRA's re-init).
    ``needs_individual_updates``: the server must see each client's factors (products B_u A_u,
    SVDs, coefficients per client); False when sums of uploads suffice, which is what secure
    aggregation (Flower's SecAgg+) can deliver.
    ``download_full_adapter``: clients download both factors every round, whatever they upload: the
    server changes a factor the clients do not upload (FedSVD's A), or the uploads alternate (RoLoRA).
    ``alternate``: the trained (and uploaded) factor alternates by round: B in odd rounds (A frozen;
    B starts at zero, so A's gradient would be zero), A in even rounds (B frozen). See :meth:`for_round`.
    ``stateful``: the method keeps tensors on the server between rounds (``state`` in and out).
    ``mixed_ranks``: clients may train lower ranks than the server's (zero-padded at the boundary,
    :mod:`fedlora.aggregation.ranks`); False where a client-held or frozen factor would not survive
    the mapping.
    """

    train_A: bool = True
    train_B: bool = True
    upload_A: bool = True
    upload_B: bool = True
    local_B: bool = False
    download_residual: bool = False
    download_stacked: bool = False
    server_seed: bool = False
    needs_individual_updates: bool = True
    download_full_adapter: bool = False
    alternate: bool = False
    stateful: bool = False
    mixed_ranks: bool = True

    def for_round(self, round_: int) -> "TrainingPolicy":
        """The policy of round ``round_`` (1-based): itself, or for an alternating method the half that trains."""
        if not self.alternate:
            return self
        if round_ % 2 == 1:
            return replace(self, train_A=False, upload_A=False, alternate=False)
        return replace(self, train_B=False, upload_B=False, alternate=False)

    @property
    def download(self) -> str:
        """What a client downloads besides the shared factors: "factors", "residual" or "stacked"."""
        return "stacked" if self.download_stacked else "residual" if self.download_residual else "factors"

    @property
    def private_factors(self) -> tuple[str, ...]:
        """Factors that stay on the client between rounds."""
        return ("B",) if self.local_B else ()

    @property
    def rank_maps(self) -> tuple[str, ...]:
        """The ``--rank-map`` modes mixed client ranks may use: "svd" re-factorises both factors, which would
        replace a frozen, client-held or alternating factor, so such methods take "truncate" only."""
        if not self.mixed_ranks:
            return ()
        return ("truncate", "svd") if self.train_A and not self.private_factors and not self.alternate else ("truncate",)

    @property
    def merges_into_base(self) -> bool:
        """The method changes the frozen weights (its result carries a ``base_delta``)."""
        return self.download_residual or self.download_stacked


class AggregationError(ValueError):
    """Bad input to :func:`fedlora.aggregation.aggregate`; the message names what and how to fix it."""
