"""FLoRA-NA's matrix-free ALS (many clients) takes the Gram route's steps: same objective, same broadcast.

The Gram route forms 2·M·(J r)² floats per group of same-shape modules (12 GiB at 1,000 clients on MiniLM
shapes); past ``GRAM_BUDGET_BYTES`` the ALS runs from the factors with conjugate-gradient half-steps instead.
Tolerance: objective 1e-9 relative, broadcast product 1e-7 (CG stops at 1e-9 relative residual).
"""

from __future__ import annotations

import pytest
import torch

from fedlora.aggregation import ClientUpdate, aggregate
from fedlora.aggregation.methods import flora_na, flora_na_factors
from fedlora.testing.synthetic import least_squares_clients

SHAPES = {"attn.q": (12, 10), "attn.v": (12, 10), "mlp.up": (8, 14)}  # non-square, two of one shape
CASES = [{}, {"scope": "global"}, {"ridge": 1.0}, {"ridge": 1.0, "scope": "global"}, {"max_deviation": 0.05},
         {"weighting": "uniform"}]


def _both(monkeypatch: pytest.MonkeyPatch, method: str, clients: int, **options):
    g, ups = least_squares_clients(SHAPES, 3, clients, seed=4)
    monkeypatch.setattr(flora_na, "GRAM_BUDGET_BYTES", 1 << 60)
    gram = aggregate(method, g, ups, **options)
    used: list[int] = []
    real = flora_na_factors.solve_als_factors
    monkeypatch.setattr(flora_na, "solve_als_factors", lambda *a, **k: used.append(1) or real(*a, **k))
    monkeypatch.setattr(flora_na, "GRAM_BUDGET_BYTES", 0)
    factors = aggregate(method, g, ups, **options)
    assert used, "the factor route must have run"
    return gram, factors


@pytest.mark.parametrize("options", CASES, ids=[str(c) or "default" for c in CASES])
def test_matrix_free_als_equals_the_gram_route(monkeypatch, options) -> None:
    gram, factors = _both(monkeypatch, "flora-na", 6, **options)
    assert factors.metrics["objective"] == pytest.approx(gram.metrics["objective"], rel=1e-9)
    assert factors.metrics["objective_fedit"] == pytest.approx(gram.metrics["objective_fedit"], rel=1e-12)
    assert factors.metrics["objective"] <= factors.metrics["objective_fedit"]  # never worse than FedIT
    for m in SHAPES:
        torch.testing.assert_close(factors.adapter[m].B @ factors.adapter[m].A, gram.adapter[m].B @ gram.adapter[m].A,
                                   rtol=1e-7, atol=1e-7)


def test_flora_na_stable_takes_the_same_route(monkeypatch) -> None:
    gram, factors = _both(monkeypatch, "flora-na-stable", 5)
    assert factors.metrics["objective"] == pytest.approx(gram.metrics["objective"], rel=1e-9)


def test_identical_clients_give_zero_divergence_on_the_factor_route(monkeypatch) -> None:
    g, ups = least_squares_clients(SHAPES, 3, 1, seed=1)
    same = [ClientUpdate(adapter=ups[0].adapter, num_examples=10 + i, client_id=f"c{i}") for i in range(4)]
    monkeypatch.setattr(flora_na, "GRAM_BUDGET_BYTES", 0)
    result = aggregate("flora-na", g, same)
    assert result.metrics["divergence"] == pytest.approx(0.0, abs=1e-12)
    for m, pair in ups[0].adapter.items():
        torch.testing.assert_close(result.adapter[m].B @ result.adapter[m].A, pair.B @ pair.A, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("chunk", [1, 4])
def test_client_chunks_bound_memory_without_changing_the_result(monkeypatch, chunk) -> None:
    """At many clients the factor route and the FedIT mean work a chunk of clients at a time (temporaries of
    chunk / U the size); chunks that do not divide U (6 clients, 7 bases) give the Gram route's result."""
    from fedlora.aggregation.methods import common

    monkeypatch.setattr(flora_na_factors, "CHUNK", chunk)
    monkeypatch.setattr(common, "MEAN_CHUNK", chunk)
    gram, factors = _both(monkeypatch, "flora-na", 6)
    assert factors.metrics["objective"] == pytest.approx(gram.metrics["objective"], rel=1e-9)
    assert factors.metrics["norm_A_fedit"] == pytest.approx(gram.metrics["norm_A_fedit"], rel=1e-12)
    for m in SHAPES:
        torch.testing.assert_close(factors.adapter[m].B @ factors.adapter[m].A, gram.adapter[m].B @ gram.adapter[m].A,
                                   rtol=1e-7, atol=1e-7)
