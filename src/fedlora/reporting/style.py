"""Axes that can be read: shared by every plot fedlora writes (run, compare, demo, bench).

Why: a symlog divergence axis showed one tick label or none, short runs got round ticks at 1.25,
identical curves hid each other, and no plot said what it was of. Here: a divergence axis that is
logarithmic with labelled ticks (linear when the values span less than ~1.3 decades), integer
round ticks, a fixed colour and marker per method (:func:`method_style`), and
a title naming the task and setting.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from fedlora.reporting.labels import method_style  # noqa: F401  (re-exported: every plot styles methods alike)

LINEAR_RANGE = 20.0  # max / min below this: a linear axis reads better than a log one
ZERO_BELOW = 1e-4  # relative to the largest value: below this a divergence is "exact", drawn at the bottom


def _label(value: float, _pos: Any = None) -> str:
    return f"{value:.3g}"


def integer_rounds(ax: Axes) -> None:
    """Round numbers only on the x axis (no 1.25, 1.5 on a 3-round run)."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("round")


def linear_axis(ax: Axes) -> None:
    """A linear y axis with short labels (0.512, not 0.51200000)."""
    ax.set_yscale("linear")
    ax.yaxis.set_major_formatter(FuncFormatter(_label))


SIGNED_METRICS = frozenset({"matthews_correlation", "pearson", "spearman"})  # correlations: [-1, 1]; the rest are >= 0


def nonnegative_axis(ax: Axes, values: Iterable[float]) -> None:
    """Call after plotting: a y axis that does not run below 0 when no value does (a flat line at 0 was drawn
    on -0.05..0.05, suggesting negative exact matches). Metrics that can be negative: :data:`SIGNED_METRICS`."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    low, high = ax.get_ylim()
    if finite and min(finite) >= 0 and low < 0:
        ax.set_ylim(0, high if high > 0 else 1)


def value_axis(ax: Axes, values: Iterable[float], what: str = "divergence") -> str:
    """Call after plotting: log scale with labelled ticks for ``values`` spanning more than
    :data:`LINEAR_RANGE`, else linear. Returns the y label to use.

    An exact method's divergence is 0 up to float rounding (1e-17 .. 1e-8), which would stretch a
    log axis over many empty decades: values below :data:`ZERO_BELOW` times the largest are drawn
    on a dotted line at the bottom, and a note on the plot says so.
    """
    finite = [v for v in values if v is not None and math.isfinite(v)]
    high = max(finite, default=0.0)
    floor = high * ZERO_BELOW
    visible = [v for v in finite if v > floor]
    if high <= 0 or max(visible) / min(visible) < LINEAR_RANGE:
        linear_axis(ax)
        nonnegative_axis(ax, finite)  # a divergence is a norm ratio
        return what
    low = min(visible)
    bottom = min(low, floor * 10) / 1.5 if len(visible) < len(finite) else low / 1.5
    for line in ax.get_lines():  # the ≈0 curves sit on the bottom line instead of leaving the plot
        ys = [max(float(y), bottom) for y in np.asarray(line.get_ydata(), dtype=float)]
        line.set_ydata(ys)
    ax.set_yscale("log")
    decades = math.log10(high / bottom)
    subs = (1.0, 2.0, 5.0) if decades <= 3 else (1.0,)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs, numticks=12))
    ax.yaxis.set_major_formatter(FuncFormatter(_label))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(bottom / 1.6, high * 1.5)  # room below: markers at ``bottom`` are drawn whole
    if len(visible) < len(finite):
        ax.axhline(bottom, color="dimgrey", lw=0.6, ls=":")
        ax.text(0.01, bottom * 1.15, f"dotted line: ≈0 (< {floor:.1g}, exact up to rounding)",
                transform=ax.get_yaxis_transform(), fontsize=7, va="bottom", color="dimgrey")
    return f"{what}, log scale"


def _join(values: Iterable[Any]) -> str:
    unique = list(dict.fromkeys(values))
    return "/".join(str(v) for v in unique) if unique else "?"


def setting_title(task: str, configs: Sequence[dict[str, Any]], seeds: Iterable[Any] | None = None) -> str:
    """"sst2: 10 clients, α=0.5, 8 rounds, seed 0" from runs' config.json dicts (values that differ joined by /)."""
    alphas = ["iid" if c.get("alpha", 0.5) is None else c.get("alpha", 0.5) for c in configs]
    seed_list = sorted(set(seeds if seeds is not None else (c.get("seed", 0) for c in configs)))
    seed_text = f"seed {seed_list[0]}" if len(seed_list) == 1 else f"seeds {_seeds(seed_list)}"
    return (f"{task}: {_join(c.get('clients', '?') for c in configs)} clients, α={_join(alphas)}, "
            f"{_join(c.get('rounds', '?') for c in configs)} rounds, {seed_text}")


def _seeds(seeds: list[Any]) -> str:
    if all(isinstance(s, int) for s in seeds) and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}–{seeds[-1]}"
    return ",".join(map(str, seeds))
