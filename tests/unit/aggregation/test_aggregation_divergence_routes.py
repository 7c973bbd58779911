"""The divergence report's routes (issue 23 §2): the dense d×k route gives the Gram route's numbers.

The "gram" route is the implementation before the routes existed, unchanged; "dense" forms T and is
the one "auto" picks at many clients. Both must agree to float64 round-off for every shape class.
"""

from __future__ import annotations

import pytest
import torch

from fedlora.aggregation import ClientUpdate, aggregate
from fedlora.aggregation.divergence import CLIENT_BLOCK, choose_route, divergence_report
from fedlora.testing.synthetic import least_squares_clients, random_clients


def _setup(U: int, r: int, d: int, k: int, seed: int = 0):
    shapes = {"m0": (d, k), "m1": (d, k), "m2": (k, d)}  # two same-shape modules (batched) and a transposed one
    if U > 10:  # least_squares_clients trains each client: seconds at many clients
        return random_clients(shapes, r, U, seed=seed)
    return least_squares_clients(shapes, r, U, seed=seed, dtype=torch.float64)


def _close(a: float, b: float) -> bool:
    # On squares: divergence² = ‖error‖²/‖T‖², and the Gram route forms ‖error‖² as ‖B̂Â‖² − 2⟨B̂Â, T⟩ + ‖T‖²,
    # exact to ~1e-16·‖T‖² absolute (so a divergence of 1e-8 there is round-off of an exact 0).
    return abs(a * a - b * b) <= 1e-10 * max(a * a, b * b, 1.0)


def _assert_same(r1, r2) -> None:
    assert _close(r1.divergence, r2.divergence), (r1.divergence, r2.divergence)
    assert _close(r1.eckart_young_bound, r2.eckart_young_bound), (r1.eckart_young_bound, r2.eckart_young_bound)
    assert abs(r1.target_norm - r2.target_norm) <= 1e-10 * r1.target_norm
    for m in r1.per_module:
        assert _close(r1.per_module[m], r2.per_module[m]) and _close(r1.per_module_bound[m], r2.per_module_bound[m])


@pytest.mark.parametrize("U,r,d,k", [(1, 2, 12, 7), (3, 4, 20, 9), (9, 2, 16, 24), (CLIENT_BLOCK + 5, 1, 10, 6)])
@pytest.mark.parametrize("method", ["fedit", "svd", "fedex-lora", "flora-na"])
def test_dense_route_equals_gram_route(U, r, d, k, method):
    g, ups = _setup(U, r, d, k)
    result = aggregate(method, g, ups)
    weights = torch.tensor([u.num_examples for u in ups], dtype=torch.float64)
    weights = weights / weights.sum()
    reports = [divergence_report(result.adapter, ups, weights, result.base_delta, route=route)
               for route in ("gram", "dense", "auto")]
    _assert_same(reports[0], reports[1])
    _assert_same(reports[0], reports[2])


def test_exact_method_reads_zero_on_both_routes():
    g, ups = _setup(40, 4, 12, 10)
    result = aggregate("fedex-lora", g, ups, weighting="uniform")
    weights = torch.full((len(ups),), 1 / len(ups), dtype=torch.float64)
    for route in ("gram", "dense"):
        assert divergence_report(result.adapter, ups, weights, result.base_delta, route=route).divergence < 1e-7


def test_permuting_clients_changes_nothing_on_the_dense_route():
    g, ups = _setup(CLIENT_BLOCK + 3, 2, 9, 11)
    result = aggregate("fedit", g, ups)
    weights = torch.linspace(1, 2, len(ups), dtype=torch.float64)
    weights = weights / weights.sum()
    perm = torch.randperm(len(ups), generator=torch.Generator().manual_seed(0))
    a = divergence_report(result.adapter, ups, weights, route="dense")
    b = divergence_report(result.adapter, [ups[i] for i in perm], weights[perm], route="dense")
    _assert_same(a, b)


def test_route_is_chosen_by_cost():
    assert choose_route(2, 8, 384, 384) == "gram"  # n = 16 ≪ d: the Grams are tiny
    assert choose_route(1000, 8, 384, 384) == "dense"  # n = 8000 ≫ d: Grams would be 8000²
    assert choose_route(1000, 8, 4096, 4096) == "gram" or choose_route(1000, 8, 4096, 4096) == "dense"
    assert choose_route(10, 8, 4096, 4096) == "gram"


def test_unknown_route_is_refused():
    g, ups = _setup(2, 2, 4, 4)
    with pytest.raises(ValueError, match="route"):
        divergence_report(g, ups, torch.tensor([0.5, 0.5], dtype=torch.float64), route="qr")  # type: ignore[arg-type]


def test_zero_updates_are_measurable_on_the_dense_route():
    g, ups = _setup(2, 2, 5, 4)
    zero = {m: type(p)(A=torch.zeros_like(p.A), B=torch.zeros_like(p.B)) for m, p in g.items()}
    ups0 = [ClientUpdate(zero, 1, f"c{i}") for i in range(3)]
    rep = divergence_report(zero, ups0, torch.full((3,), 1 / 3, dtype=torch.float64), route="dense")
    assert rep.divergence == 0 and rep.target_norm == 0
