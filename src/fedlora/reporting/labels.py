"""A fixed colour and marker per method label, so a method looks the same in every plot fedlora draws.

Light on purpose (no matplotlib): the bench presets register their variant labels at import.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


# A fixed style per method, so a method keeps its colour and marker in every plot.
# tab10 plus four dark extras: no pale shades (tab20's light halves were unreadable as thin lines).
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#8f8f00",
            "#17becf", "#000000", "#b8860b", "#006400", "#4b0082")
_MARKERS = "osD^v<>pXh*P8d"


_labels: list[str] = []  # labels beyond the method names, in registration order (the bench presets')


def register_labels(labels: Iterable[str]) -> None:
    """Give further labels (a preset's variants, "flora-na (adamw)") a fixed style of their own."""
    _labels.extend(label for label in labels if label not in _labels)


def known_labels() -> list[str]:
    """Every method, then every registered label: a fixed index per label, whatever the plot holds."""
    from fedlora.aggregation import available_methods

    known = list(available_methods())
    return known + [label for label in _labels if label not in known]


def method_style(label: str) -> dict[str, Any]:
    """Colour and marker of a method label ("flora-na", "flora-na [alpha=0.1]" share them; a variant
    such as "flora-na (adamw)" has its own). No two labels of the presets share both."""
    name = label.partition(" [")[0]
    known = known_labels()
    index = known.index(name) if name in known else sum(map(ord, name))
    return {"color": _COLOURS[index % len(_COLOURS)],
            "marker": _MARKERS[(index + index // len(_COLOURS)) % len(_MARKERS)]}
