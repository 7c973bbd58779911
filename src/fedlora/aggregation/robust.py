"""Robust defaults against hostile clients: a norm reference that never switches off, clipping, a weight cap.

Threat model (README, "Failure modes"): a client controls everything it sends (factors, head, its
claimed example count, its id) but is one of several, and a *minority* of the round. Against it:

* **Reference scale.** Every client's update is measured as ‖update − start‖_F, its start being
  what it was sent: the global, or with mixed client ranks the global mapped to its rank
  (:func:`fedlora.aggregation.ranks.sent_start`), so the norm measures training, not the rank map. The round's
  reference is the median (``median_low``) of those norms: robust while fewer than half of the
  clients are hostile. When it cannot be used -- one valid client only, or a median of 0 (half the
  clients sent the global back) -- the reference falls back to the global's own norm (at least
  :data:`NORM_FLOOR`), so the bound never switches itself off.
* **Reject** an update whose norm exceeds ``norm_bound`` × reference (100×: scaled or poisoned).
* **Clip** any other update to ``clip`` × reference (3×): u' = s + min(1, bound / ‖u − s‖) (u − s), s its start.
  An honest client is rarely clipped (local steps of one round differ far less than 3× in norm);
  an attacker's step counts at most 3 median steps. In fallback mode nothing is clipped (there is
  no round statistic to clip to), only rejected.
* **Cap the weights** at ``weight_cap`` / U (2/U): a claimed count of 10⁹ weighs at most twice an
  equal share. Engines whose server knows each client's size (the partition table of the local
  simulation and of the Flower ServerApp) substitute the true counts and switch the cap off.

What remains possible: a hostile client moves the global by up to ~clip × weight share × the median
step each round (measured by ``benchmarks/hostile_client.py``), and colluding clients that are the
majority of a round set the median themselves.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch
from torch import Tensor

NORM_FLOOR = 1.0  # fallback reference when the global itself is (near) zero: an absolute scale
DEFAULT_CLIP = 3.0  # clip updates to 3x the round's median update norm
DEFAULT_WEIGHT_CAP = 2.0  # no client weighs more than 2 / U (twice an equal share) when counts are claimed

Pairs = Sequence[tuple[Tensor, Tensor]]  # (client tensor, global tensor) of equal shapes


def _norm(tensors: Sequence[Tensor]) -> float:
    """‖tensors‖_F in float64, scaled so that entries of 1e300 do not overflow their squares."""
    scale = max((float(t.abs().max()) for t in tensors if t.numel()), default=0.0)
    if scale == 0 or not math.isfinite(scale):
        return scale
    return scale * math.sqrt(sum(float(((t / scale) ** 2).sum()) for t in tensors))


def delta_norm(pairs: Pairs) -> float:
    """‖client − global‖_F over all the tensor pairs, in float64."""
    return _norm([mine.double() - ref.double() for mine, ref in pairs])


def own_norm(tensors: Sequence[Tensor]) -> float:
    """‖global‖_F over ``tensors`` (float64)."""
    return _norm([t.double() for t in tensors])


def reference_norm(norms: Sequence[float], global_norm: float) -> tuple[float, bool]:
    """(reference, from_round): the round's median norm, or the fallback when it cannot be used.

    The fallback, ``max(global_norm, NORM_FLOOR)``, applies with fewer than two norms or a median
    of zero (or a non-finite one); ``from_round`` is False then, and nothing is clipped.
    """
    median = statistics.median_low(norms) if norms else 0.0  # the lower middle value, as torch.median
    if len(norms) >= 2 and 0 < median < float("inf"):
        return median, True
    fallback = global_norm if 0 < global_norm < float("inf") else 0.0
    return max(fallback, NORM_FLOOR), False


def clip_scale(norm: float, bound: float) -> float:
    """The factor that brings a delta of ``norm`` within ``bound`` (1.0 when it already is)."""
    return 1.0 if norm <= bound or norm == 0 else bound / norm


def clipped(mine: Tensor, ref: Tensor, scale: float) -> Tensor:
    """``ref + scale (mine − ref)``; ``mine`` itself when ``scale`` is 1 (no copy, no rounding)."""
    return mine if scale == 1.0 else ref + scale * (mine - ref)


def capped_weights(weights: Tensor, cap: float | None) -> Tensor:
    """``weights`` (U,), summing to one, with no entry above ``cap`` / U.

    The excess is handed to the others in proportion to their weights (water-filling), so the
    order of the honest clients' weights is kept. ``None`` (or a cap >= U) leaves them unchanged.
    """
    U = weights.numel()
    if cap is None or U == 0 or cap >= U or weights.is_meta:  # meta: no values to compare
        return weights
    limit = cap / U
    w = weights.clone()
    fixed = torch.zeros(U, dtype=torch.bool, device=w.device)
    for _ in range(U):  # each pass fixes at least one more client at the limit
        over = (w > limit * (1 + 1e-12)) & ~fixed
        if not bool(over.any()):
            break
        fixed |= over
        free = ~fixed
        rest = 1.0 - limit * float(fixed.sum())
        w = torch.where(fixed, torch.full_like(w, limit), w)
        if bool(free.any()):
            share = w[free].sum()
            w[free] = w[free] * (rest / share) if float(share) > 0 else rest / float(free.sum())
    return w
