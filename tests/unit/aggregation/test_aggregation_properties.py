"""Mathematical properties every aggregation method must have (non-square shapes throughout)."""

from __future__ import annotations

import itertools

import pytest
import torch

from fedlora.aggregation import ClientUpdate, LoraPair, aggregate, available_methods, client_weights, get_method
from fedlora.aggregation.methods.flora_na_als import GramProblem
from fedlora.testing.synthetic import least_squares_clients, random_clients

SHAPES = {"attn.q": (24, 10), "attn.v": (24, 10), "mlp.up": (7, 19)}  # (d, k), non-square on purpose
RANK = 3
ALL = available_methods()


def dense_target(updates, module, weighting="examples"):
    w = client_weights(updates, weighting)
    return sum(float(wu) * u.adapter[module].B.double() @ u.adapter[module].A.double() for wu, u in zip(w, updates))


def effective_product(result, module):
    pair = result.adapter[module]
    out = pair.B.double() @ pair.A.double()
    if module in result.base_delta:
        out = out + result.base_delta[module].double()
    return out


def dense_objective(adapter, updates, weighting="examples"):
    return sum(
        float(((adapter[m].B.double() @ adapter[m].A.double() - dense_target(updates, m, weighting)) ** 2).sum())
        for m in adapter
    )


def test_registry_lists_every_method_of_the_paper():
    assert set(ALL) == {"fedit", "ffa-lora", "fedex-lora", "flora", "fedsa-lora", "svd", "flora-na",
                        "fedsvd", "rolora", "fedrot-lora", "svd-ef", "flora-na-stable", "fedask"}


def frozen_A(method):
    """Methods whose clients cannot move A in round 1 (FFA-LoRA, FedSVD, RoLoRA's first half) get A_g back."""
    return not get_method(method).policy.for_round(1).train_A


@pytest.mark.parametrize("solver,options", [("als", {"max_sweeps": 0}), ("adamw", {"steps": 0})])
def test_flora_na_at_p_q_one_is_fedit(solver, options):
    g, ups = least_squares_clients(SHAPES, RANK, 5, seed=3)
    fedit = aggregate("fedit", g, ups)
    na = aggregate("flora-na", g, ups, solver=solver, **options)
    for m in SHAPES:
        torch.testing.assert_close(na.adapter[m].A, fedit.adapter[m].A, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(na.adapter[m].B, fedit.adapter[m].B, rtol=1e-6, atol=1e-7)
        assert torch.all(na.extras["p"][m] == 1) and torch.all(na.extras["q"][m] == 1)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scope", ["per-module", "global"])
def test_als_never_worse_than_fedit_and_matches_or_beats_adamw(seed, scope):
    make = least_squares_clients if seed % 2 == 0 else random_clients
    g, ups = make(SHAPES, RANK, 4 + seed, seed=seed)
    als = aggregate("flora-na", g, ups, scope=scope)
    adamw = aggregate("flora-na", g, ups, scope=scope, solver="adamw")
    fedit = dense_objective(aggregate("fedit", g, ups).adapter, ups)
    assert als.metrics["objective"] <= fedit * (1 + 1e-9)
    assert als.metrics["objective"] <= adamw.metrics["objective"] * (1 + 1e-6)
    trace = als.extras["objective_trace"]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(trace, trace[1:])), "ALS must never increase L"
    # The reported objective is the real dense one for the broadcast adapter.
    assert als.metrics["objective"] == pytest.approx(dense_objective(als.adapter, ups), rel=1e-4)


def test_per_module_scope_is_at_least_as_good_as_global():
    g, ups = least_squares_clients(SHAPES, RANK, 6, seed=11)
    per_module = aggregate("flora-na", g, ups, scope="per-module").metrics["objective"]
    shared = aggregate("flora-na", g, ups, scope="global").metrics["objective"]
    assert per_module <= shared * (1 + 1e-9)


def test_gram_objective_equals_dense_objective():
    g, ups = random_clients({"m": (13, 9)}, RANK, 5, seed=2)
    w = client_weights(ups, "examples")
    A = torch.stack([g["m"].A] + [u.adapter["m"].A for u in ups])[None]
    B = torch.stack([g["m"].B] + [u.adapter["m"].B for u in ups])[None]
    problem = GramProblem.build(A, B, w)
    gen = torch.Generator().manual_seed(0)
    p, q = torch.randn(1, 5, generator=gen, dtype=torch.float64), torch.randn(1, 5, generator=gen, dtype=torch.float64)
    A_hat = g["m"].A + sum(w[u] * p[0, u] * (ups[u].adapter["m"].A - g["m"].A) for u in range(5))
    B_hat = g["m"].B + sum(w[u] * q[0, u] * (ups[u].adapter["m"].B - g["m"].B) for u in range(5))
    dense = ((B_hat @ A_hat - dense_target(ups, "m")) ** 2).sum()
    assert float(problem.objective(p, q)[0]) == pytest.approx(float(dense), rel=1e-10)
    assert float(problem.target_sq()[0]) == pytest.approx(float((dense_target(ups, "m") ** 2).sum()), rel=1e-10)


@pytest.mark.parametrize("method", ALL)
def test_identical_clients_give_zero_divergence(method):
    g, ups = least_squares_clients(SHAPES, RANK, 1, seed=5)
    same = [ClientUpdate(ups[0].adapter, 10 * (i + 1), f"c{i}") for i in range(4)]
    if frozen_A(method):  # these clients cannot move A
        same = [ClientUpdate({m: LoraPair(g[m].A, p.B) for m, p in u.adapter.items()}, u.num_examples, u.client_id) for u in same]
    result = aggregate(method, g, same)
    assert result.metrics["divergence"] < 1e-6
    for m in SHAPES:
        torch.testing.assert_close(effective_product(result, m), dense_target(same, m), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["fedex-lora", "flora"])
def test_exact_methods_reproduce_the_ideal_average(method):
    g, ups = least_squares_clients(SHAPES, RANK, 6, seed=7)
    result = aggregate(method, g, ups)
    assert result.metrics["divergence"] < 1e-6
    for m in SHAPES:
        torch.testing.assert_close(effective_product(result, m), dense_target(ups, m), rtol=1e-5, atol=1e-6)
        assert result.base_delta[m].shape == (SHAPES[m][0], SHAPES[m][1])  # (d, k), never transposed


def test_flora_restarts_lora_with_a_seeded_fresh_init():
    g, ups = least_squares_clients(SHAPES, RANK, 3, seed=1)
    a, b, c = (aggregate("flora", g, ups, seed=s) for s in (4, 4, 5))
    for m in SHAPES:
        assert torch.count_nonzero(a.adapter[m].B) == 0
        assert torch.equal(a.adapter[m].A, b.adapter[m].A) and not torch.equal(a.adapter[m].A, c.adapter[m].A)


def test_flora_stacked_factors_multiply_to_its_base_delta_on_non_square_modules():
    """What FLoRA's clients download (B_stack (d, U r), A_stack (U r, k)) is exactly the merge the server makes."""
    g, ups = least_squares_clients(SHAPES, RANK, 4, seed=3)
    result = aggregate("flora", g, ups, seed=2)
    for m, (d, k) in ((m, SHAPES[m][:2]) for m in SHAPES):
        stacked = result.extras["stacked"][m]
        assert stacked.B.shape == (d, 4 * RANK) and stacked.A.shape == (4 * RANK, k)
        assert torch.equal((stacked.B @ stacked.A).to(result.base_delta[m].dtype), result.base_delta[m])


def test_svd_is_the_dense_eckart_young_optimum():
    g, ups = least_squares_clients(SHAPES, RANK, 6, seed=9)
    result = aggregate("svd", g, ups)
    for m in SHAPES:
        U, S, Vh = torch.linalg.svd(dense_target(ups, m))
        best = (U[:, :RANK] * S[:RANK]) @ Vh[:RANK]
        torch.testing.assert_close(effective_product(result, m), best, rtol=1e-5, atol=1e-6)
    assert result.metrics["divergence"] == pytest.approx(result.metrics["eckart_young_bound"], rel=1e-6)
    for method in ALL:  # nothing that broadcasts rank r beats the bound
        metrics = aggregate(method, g, ups).metrics
        if method not in ("fedex-lora", "flora"):
            assert metrics["divergence"] >= metrics["eckart_young_bound"] * (1 - 1e-6)


@pytest.mark.parametrize("method", ALL)
def test_permuting_clients_changes_nothing(method):
    g, ups = least_squares_clients(SHAPES, RANK, 5, seed=13)
    a = aggregate(method, g, ups)
    b = aggregate(method, g, ups[::-1])
    for m in SHAPES:
        torch.testing.assert_close(effective_product(a, m), effective_product(b, m), rtol=1e-5, atol=1e-6)
    assert a.metrics["divergence"] == pytest.approx(b.metrics["divergence"], rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("method", ALL)
def test_single_client(method):
    g, ups = least_squares_clients(SHAPES, RANK, 1, seed=17)
    if frozen_A(method):
        ups = [ClientUpdate({m: LoraPair(g[m].A, p.B) for m, p in ups[0].adapter.items()}, 5, "solo")]
    result = aggregate(method, g, ups)
    assert result.metrics["divergence"] < 1e-6  # one client's product already has rank r
    assert result.metrics["num_clients"] == 1


@pytest.mark.parametrize("method", ALL)
def test_float32_and_float64_inputs_agree(method):
    g64, ups64 = least_squares_clients(SHAPES, RANK, 4, seed=19, dtype=torch.float64)
    g32 = {m: p.to(torch.float32) for m, p in g64.items()}
    ups32 = [ClientUpdate({m: p.to(torch.float32) for m, p in u.adapter.items()}, u.num_examples, u.client_id) for u in ups64]
    a, b = aggregate(method, g64, ups64), aggregate(method, g32, ups32)
    for m in SHAPES:
        assert b.adapter[m].A.dtype == torch.float32  # float32 in, float32 out (the wire format)
        torch.testing.assert_close(effective_product(a, m), effective_product(b, m), rtol=1e-4, atol=1e-5)


def test_weighting_by_examples_differs_from_uniform_and_authors_mixes_them():
    g, ups = least_squares_clients(SHAPES, RANK, 4, seed=23)
    examples = aggregate("flora-na", g, ups)
    uniform = aggregate("flora-na", g, ups, weighting="uniform")
    authors = aggregate("flora-na", g, ups, weighting="authors")
    assert not torch.allclose(examples.adapter["attn.q"].A, uniform.adapter["attn.q"].A)
    # Equal data sizes: the authors' mix is consistent and equals the uniform answer.
    equal = [ClientUpdate(u.adapter, 50, u.client_id) for u in ups]
    for m in SHAPES:
        torch.testing.assert_close(
            aggregate("flora-na", g, equal, weighting="authors").adapter[m].B,
            aggregate("flora-na", g, equal, weighting="uniform").adapter[m].B,
        )
    # Unequal sizes: its broadcast is not optimal for the example-weighted target it is judged on.
    assert examples.metrics["divergence"] <= authors.metrics["divergence"] + 1e-9


def test_communication_matches_the_formulas():
    g, ups = random_clients({"m": (6, 5)}, 2, 3, seed=0, dtype=torch.float32)
    r, k, d, U, f32 = 2, 5, 6, 3, 4
    expected = {
        "fedit": ((r * k + d * r) * U, (r * k + d * r) * U),
        "flora-na": ((r * k + d * r) * U, (r * k + d * r) * U),
        "svd": ((r * k + d * r) * U, (r * k + d * r) * U),
        "ffa-lora": (d * r * U, d * r * U),
        "fedsa-lora": (r * k * U, r * k * U),
        "fedex-lora": ((r * k + d * r) * U, (r * k + d * r + d * k) * U),
        "flora": ((r * k + d * r) * U, U * (r * k + d * r) * U),
    }
    for method, (up, down) in expected.items():
        metrics = aggregate(method, g, ups).metrics
        assert (metrics["bytes_up"], metrics["bytes_down"]) == (up * f32, down * f32), method


def test_ffa_lora_keeps_the_shared_a_and_averages_b():
    g, ups = least_squares_clients(SHAPES, RANK, 3, seed=29)
    result = aggregate("ffa-lora", g, ups)
    w = client_weights(ups)
    for m in SHAPES:
        assert torch.equal(result.adapter[m].A, g[m].A)
        torch.testing.assert_close(result.adapter[m].B, sum(float(wu) * u.adapter[m].B for wu, u in zip(w, ups)))


@pytest.mark.parametrize("method,scope", list(itertools.product(["flora-na"], ["per-module", "global"])))
def test_flora_na_beats_fedit_on_heterogeneous_clients(method, scope):
    g, ups = least_squares_clients(SHAPES, RANK, 8, heterogeneity=2.0, seed=31)
    na = aggregate(method, g, ups, scope=scope).metrics["divergence"]
    fedit = aggregate("fedit", g, ups).metrics["divergence"]
    bound = aggregate("fedit", g, ups).metrics["eckart_young_bound"]
    assert bound <= na < fedit
