"""The checks of the privacy options (``--dp-*``), before anything loads: DP-FedAvg's preconditions.

Separate from :mod:`fedlora.config.run` only for size; :func:`validate_privacy` is called from its
validation with the same ``require`` helper, so every message names the option and what is accepted.
"""

from __future__ import annotations

import math
from typing import Any, Callable

Require = Callable[[bool, str, Any, str], None]


def dp_enabled(config: Any) -> bool:
    """Whether the run is differentially private (``--dp-clip`` > 0)."""
    return bool(config.dp_clip)


def validate_privacy(c: Any, require: Require) -> None:
    """``--dp-clip/--dp-epsilon/--dp-noise/--dp-delta`` consistent with each other and with the method."""
    from fedlora.aggregation import available_methods, get_method

    _non_negative(c, require, ("dp_clip", "dp_epsilon", "dp_noise"))
    _validate_dp_sgd(c, require)
    if not dp_enabled(c):
        require(not c.dp_epsilon and not c.dp_noise, "dp_clip", c.dp_clip,
                "differential privacy needs the clip bound C: set --dp-clip (a typical client update norm; a "
                "non-DP run's metrics.jsonl reports the round's median as norm_reference)")
        return
    require(bool(c.dp_epsilon or c.dp_noise), "dp_clip", c.dp_clip,
            "with --dp-clip set, give --dp-epsilon (the noise is calibrated to it) or --dp-noise (or both)")
    require(isinstance(c.dp_delta, float) and 0 < c.dp_delta < 1 / c.clients, "dp_delta", c.dp_delta,
            f"must be in (0, 1/--clients = {1 / c.clients:.3g}): a larger δ lets the mechanism reveal a whole client")
    policy = get_method(c.method).policy
    def fits(name: str) -> bool:  # one upload of factors whose sum is all the method needs
        spec = get_method(name)
        return not spec.policy.needs_individual_updates and not spec.policy.private_factors and spec.phased is None

    sums_only = [m for m in available_methods() if fits(m)]
    require(fits(c.method), "method", c.method,
            "differential privacy (DP-FedAvg) adds noise to the sum of client updates, so it works with methods "
            f"that need only sums and share every factor they train: {', '.join(sums_only)}"
            + ("; fedsa-lora's global model needs each client's private B, which DP never releases"
               if policy.private_factors else "")
            + ("; a multi-phase method would need noise on every phase's sum, which is not implemented: use "
               "record-level DP (--dp-sgd-*) with it" if get_method(c.method).phased is not None else ""))
    require(not any(r != c.rank for r in c.client_ranks), "client_ranks", c.client_ranks,
            "mixed client ranks are not supported with differential privacy; drop --client-ranks")
    weighting = c.method_options.get("weighting", "uniform")
    require(weighting == "uniform", "method_options", f"weighting={weighting}",
            "DP-FedAvg weighs every client equally (an example-weighted mean would let a client's data size change "
            "the sensitivity); drop the weighting option")


def dp_sgd_enabled(config: Any) -> bool:
    """Whether clients train with record-level DP-SGD (``--dp-sgd-clip`` > 0)."""
    return bool(config.dp_sgd_clip)


def _validate_dp_sgd(c: Any, require: Require) -> None:
    """Record-level DP-SGD (:mod:`fedlora.models.dp_sgd`): its options, and the knobs it replaces or cannot take."""
    _non_negative(c, require, ("dp_sgd_clip", "dp_sgd_epsilon", "dp_sgd_noise"))
    if not dp_sgd_enabled(c):
        require(not c.dp_sgd_epsilon and not c.dp_sgd_noise, "dp_sgd_clip", c.dp_sgd_clip,
                "record-level DP-SGD needs the per-example clip bound: set --dp-sgd-clip (e.g. 1.0)")
        return
    require(bool(c.dp_sgd_epsilon or c.dp_sgd_noise), "dp_sgd_clip", c.dp_sgd_clip,
            "with --dp-sgd-clip set, give --dp-sgd-epsilon (the noise is calibrated to it) or --dp-sgd-noise")
    require(isinstance(c.dp_sgd_delta, float) and 0 < c.dp_sgd_delta < 1, "dp_sgd_delta", c.dp_sgd_delta,
            "must be in (0, 1), and below 1 / the smallest client's examples (checked once the data is split)")
    require(c.client_batch == 1, "client_batch", c.client_batch,
            "record-level DP-SGD trains one client at a time (Opacus' per-example gradients); use --client-batch 1")
    require(c.grad_accum == 1, "grad_accum", c.grad_accum,
            "record-level DP-SGD takes whole batches (per-example gradients already bound memory by the batch); "
            "use --grad-accum 1 and a smaller --batch-size")
    require(c.precision == "fp32", "precision", c.precision, "record-level DP-SGD runs in fp32 only")
    require(not c.max_grad_norm, "max_grad_norm", c.max_grad_norm,
            "record-level DP-SGD clips every example's gradient to --dp-sgd-clip instead; drop --max-grad-norm")


def _non_negative(c: Any, require: Require, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(c, name)
        require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and value >= 0, name, value, "must be a finite number >= 0 (0: off)")
