"""FedSVD, RoLoRA, FedRot-LoRA, SVD with error feedback and the stabilised FLoRA-NA: their defining properties.

Small non-square float64 problems (d=7, k=5, r=3, U=4 unless stated), deterministic seeds, CPU only.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.aggregation import AggregationError, ClientUpdate, LoraPair, aggregate, client_weights, get_method
from fedlora.aggregation.methods.fedrot_lora import align_to_global
from fedlora.aggregation.methods.fedsvd import svd_refactor
from fedlora.aggregation.methods.flora_na_stable import MAX_DEVIATION, REBALANCE, RIDGE
from fedlora.testing.synthetic import least_squares_clients

D, K, R, U = 7, 5, 3, 4
SHAPES = {"attn.q": (D, K), "mlp.up": (6, 9)}  # (d, k), non-square, two shapes
NEW = ["fedsvd", "rolora", "fedrot-lora", "svd-ef", "flora-na-stable"]
F64 = torch.float64


def randn(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64)


def random_global(seed: int, shapes: dict[str, tuple[int, int]] = SHAPES, rank: int = R) -> dict[str, LoraPair]:
    gen = torch.Generator().manual_seed(seed)
    return {m: LoraPair(A=randn(rank, k, gen=gen), B=randn(d, rank, gen=gen)) for m, (d, k) in shapes.items()}


def clients_like(g: dict[str, LoraPair], seed: int, train: str = "AB", scale: float = 0.5) -> list[ClientUpdate]:
    """U clients = global + noise on the trained factors; unequal example counts."""
    gen = torch.Generator().manual_seed(seed)
    ups = []
    for u in range(U):
        adapter = {}
        for m, p in g.items():
            A = p.A + scale * randn(*p.A.shape, gen=gen) if "A" in train else p.A.clone()
            B = p.B + scale * randn(*p.B.shape, gen=gen) if "B" in train else p.B.clone()
            adapter[m] = LoraPair(A=A, B=B)
        ups.append(ClientUpdate(adapter, 10 * (u + 1), f"c{u}"))
    return ups


def target(updates: list[ClientUpdate], module: str) -> torch.Tensor:
    w = client_weights(updates, "examples")
    return sum(float(wu) * u.adapter[module].B @ u.adapter[module].A for wu, u in zip(w, updates))


def product(result, module: str) -> torch.Tensor:
    pair = result.adapter[module]
    return pair.B @ pair.A


def random_orthogonal(r: int, gen: torch.Generator) -> torch.Tensor:
    Q, _ = torch.linalg.qr(randn(r, r, gen=gen))
    return Q


def fedit_objective(g, ups) -> float:
    fedit = aggregate("fedit", g, ups)
    return sum(float(((product(fedit, m) - target(ups, m)) ** 2).sum()) for m in g)


# FedSVD


def test_fedsvd_is_exact_with_orthonormal_A_and_uploads_B_only():
    g = random_global(0)
    ups = clients_like(g, 1, train="B")  # A frozen at A_g on every client
    result = aggregate("fedsvd", g, ups)
    assert result.metrics["divergence"] < 1e-6
    w = client_weights(ups, "examples")
    for m in SHAPES:
        B_bar = sum(float(wu) * u.adapter[m].B for wu, u in zip(w, ups))
        torch.testing.assert_close(product(result, m), B_bar @ g[m].A, rtol=1e-12, atol=1e-12)  # Σ w B_u A_g
        A, B = result.adapter[m].A, result.adapter[m].B
        torch.testing.assert_close(A @ A.T, torch.eye(R, dtype=F64), rtol=0, atol=1e-12)  # orthonormal rows
        # B = U_r Σ_r: orthogonal columns whose norms are the singular values of B̄ A_g, descending.
        sigma = torch.linalg.svdvals(B_bar @ g[m].A)[:R]
        torch.testing.assert_close(B.T @ B, torch.diag(sigma**2), rtol=1e-10, atol=1e-10)
    fedit = aggregate("fedit", g, ups).metrics
    d_r = sum(d * R for d, _ in SHAPES.values())
    assert result.metrics["bytes_up"] == 4 * U * d_r  # B only
    assert result.metrics["bytes_down"] == fedit["bytes_down"]  # both factors back


def test_fedsvd_uploads_half_of_fedit_on_square_modules():
    g = random_global(2, {"q": (6, 6)})
    ups = clients_like(g, 3, train="B")
    fedsvd, fedit = aggregate("fedsvd", g, ups).metrics, aggregate("fedit", g, ups).metrics
    assert fedsvd["bytes_up"] * 2 == fedit["bytes_up"] and fedsvd["bytes_down"] == fedit["bytes_down"]


def test_fedsvd_zero_B_keeps_the_product_zero_and_A_full_rank_then_still_learns():
    g = {m: LoraPair(A=p.A, B=torch.zeros_like(p.B)) for m, p in random_global(4).items()}
    same = [ClientUpdate(g, 5 + u, f"c{u}") for u in range(U)]  # round 1 with nothing learnt: B̄ = 0
    first = aggregate("fedsvd", g, same)
    for m in SHAPES:
        A = first.adapter[m].A
        assert torch.count_nonzero(first.adapter[m].B) == 0
        torch.testing.assert_close(A @ A.T, torch.eye(R, dtype=F64), rtol=0, atol=1e-12)
        # A is an orthonormal basis of A_g's row space: projecting A_g onto it loses nothing.
        torch.testing.assert_close(g[m].A @ A.T @ A, g[m].A, rtol=1e-10, atol=1e-10)
    second_ups = clients_like(first.adapter, 5, train="B")
    second = aggregate("fedsvd", first.adapter, second_ups)
    assert second.metrics["divergence"] < 1e-6
    assert all(torch.linalg.matrix_rank(second.adapter[m].A) == R for m in SHAPES)


@pytest.mark.parametrize("d,k,r", [(2, 5, 3), (7, 2, 3), (7, 5, 3)])
def test_fedsvd_refactor_is_exact_for_any_shape(d, k, r):
    gen = torch.Generator().manual_seed(d * 10 + k)
    B, A = randn(d, r, gen=gen), randn(r, k, gen=gen)
    B_new, A_new, S = svd_refactor(B, A)
    assert B_new.shape == (d, r) and A_new.shape == (r, k)
    torch.testing.assert_close(B_new @ A_new, B @ A, rtol=1e-12, atol=1e-12)
    rows = min(r, k)  # A cannot have more than k independent rows
    torch.testing.assert_close(A_new[:rows] @ A_new[:rows].T, torch.eye(rows, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(S, torch.linalg.svdvals(B @ A)[: S.shape[0]], rtol=1e-10, atol=1e-12)


# RoLoRA


def test_rolora_is_exact_when_the_frozen_factor_is_shared_and_uploads_alternate():
    g = random_global(6)
    fedit = aggregate("fedit", g, clients_like(g, 7)).metrics
    d_r = sum(d * R for d, _ in SHAPES.values())
    r_k = sum(R * k for _, k in SHAPES.values())
    for round_index, train, up in ((1, "B", d_r), (2, "A", r_k), (3, "B", d_r)):
        ups = clients_like(g, 7 + round_index, train=train)
        result = aggregate("rolora", g, ups, round_index=round_index)
        assert result.metrics["divergence"] < 1e-6, round_index
        frozen = "A" if train == "B" else "B"
        for m in SHAPES:
            torch.testing.assert_close(product(result, m), target(ups, m), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(getattr(result.adapter[m], frozen), getattr(g[m], frozen), rtol=0, atol=1e-14)
        assert result.metrics["bytes_up"] == 4 * U * up  # B only in odd rounds, A only in even ones
        assert result.metrics["bytes_down"] == fedit["bytes_down"]  # both factors every round
    policy = get_method("rolora").policy
    assert (policy.for_round(1).train_A, policy.for_round(1).train_B) == (False, True)
    assert (policy.for_round(2).train_A, policy.for_round(2).train_B) == (True, False)


@pytest.mark.parametrize("round_index,frozen", [(1, "A"), (2, "B"), (3, "A")])
def test_a_client_that_changes_rolora_frozen_factor_has_no_effect_on_it(round_index, frozen):
    """Issue 21, item 8: the frozen factor is the global's (as ffa-lora's A), not an average one client can move."""
    g = random_global(6)
    honest = clients_like(g, 7 + round_index, train="B" if frozen == "A" else "A")
    evil = clients_like(g, 40 + round_index, train="AB")[0]  # moves the frozen factor too, within the clip
    evil = ClientUpdate(evil.adapter, evil.num_examples, "evil")
    attacked = aggregate("rolora", g, honest + [evil], round_index=round_index)
    assert attacked.metrics["rejected"] == []
    for m in SHAPES:
        moved = float((getattr(attacked.adapter[m], frozen) - getattr(g[m], frozen)).abs().max())
        assert moved == 0.0, (m, frozen, moved)


# FedRot-LoRA


def test_alignment_preserves_every_clients_product_with_orthogonal_rotations():
    g = random_global(8)
    ups = clients_like(g, 9, scale=1.0)
    aligned = align_to_global(g, ups)
    for before, after in zip(ups, aligned):
        assert (after.client_id, after.num_examples) == (before.client_id, before.num_examples)
        for m in SHAPES:
            b, a = before.adapter[m], after.adapter[m]
            torch.testing.assert_close(a.B @ a.A, b.B @ b.A, rtol=1e-12, atol=1e-12)
            R_u = torch.linalg.lstsq(b.B, a.B).solution  # a.B = b.B R_u
            torch.testing.assert_close(R_u.T @ R_u, torch.eye(R, dtype=F64), rtol=0, atol=1e-10)
    # The rotation is the best one: no other orthogonal R brings the pair closer to the global factors.
    gen = torch.Generator().manual_seed(0)
    for m in SHAPES:
        b, a = ups[0].adapter[m], aligned[0].adapter[m]
        best = float(((a.B - g[m].B) ** 2).sum() + ((a.A - g[m].A) ** 2).sum())
        for _ in range(20):
            Q = random_orthogonal(R, gen)
            other = float(((b.B @ Q - g[m].B) ** 2).sum() + ((Q.T @ b.A - g[m].A) ** 2).sum())
            assert best <= other + 1e-12


def test_fedrot_is_exact_on_rotated_copies_where_fedit_is_not():
    g = random_global(10)
    base = clients_like(g, 11, scale=0.3)[0].adapter  # one adapter near the global one
    gen = torch.Generator().manual_seed(12)
    copies = []
    for u in range(U):
        adapter = {}
        for m, p in base.items():
            Q = random_orthogonal(R, gen)
            adapter[m] = LoraPair(A=Q.T @ p.A, B=p.B @ Q)  # same product, rotated latent basis
        copies.append(ClientUpdate(adapter, 10 + u, f"c{u}"))
    fedrot = aggregate("fedrot-lora", g, copies).metrics
    fedit = aggregate("fedit", g, copies).metrics
    assert fedrot["divergence"] < 1e-6 and fedit["divergence"] > 1e-2  # divergence resolves ~1e-8 (a difference of squares)
    assert (fedrot["bytes_up"], fedrot["bytes_down"]) == (fedit["bytes_up"], fedit["bytes_down"])
    aligned_na = aggregate("flora-na", g, copies, align="rotation").metrics
    assert aligned_na["divergence"] < 1e-6 and aligned_na["align"] == "rotation"


# Properties every new method shares


def inputs_for(method: str, g, seed: int) -> list[ClientUpdate]:
    """Clients as the method's training policy makes them (a frozen factor stays the global one)."""
    policy = get_method(method).policy.for_round(1)
    train = ("A" if policy.train_A else "") + ("B" if policy.train_B else "")
    return clients_like(g, seed, train=train)


@pytest.mark.parametrize("method", NEW)
def test_permuting_clients_changes_nothing(method):
    g = random_global(14)
    ups = inputs_for(method, g, 15)
    a, b = aggregate(method, g, ups), aggregate(method, g, ups[::-1])
    for m in SHAPES:
        torch.testing.assert_close(product(a, m), product(b, m), rtol=1e-10, atol=1e-12)
    assert a.metrics["divergence"] == pytest.approx(b.metrics["divergence"], rel=1e-8, abs=1e-7)  # divergence resolves ~1e-8
    for key in a.state:
        torch.testing.assert_close(a.state[key], b.state[key], rtol=1e-5, atol=1e-6)  # float32 on the way out


@pytest.mark.parametrize("method", NEW)
def test_identical_clients_give_zero_divergence(method):
    g = random_global(16)
    one = inputs_for(method, g, 17)[0]
    same = [ClientUpdate(one.adapter, 10 * (u + 1), f"c{u}") for u in range(U)]
    result = aggregate(method, g, same)
    assert result.metrics["divergence"] < 1e-6
    for m in SHAPES:
        torch.testing.assert_close(product(result, m), target(same, m), rtol=1e-10, atol=1e-12)


# SVD with error feedback


def test_svd_ef_without_state_is_svd_and_returns_the_residual():
    g = random_global(18)
    ups = clients_like(g, 19)
    ef, svd = aggregate("svd-ef", g, ups), aggregate("svd", g, ups)
    for m in SHAPES:
        assert torch.equal(ef.adapter[m].A, svd.adapter[m].A) and torch.equal(ef.adapter[m].B, svd.adapter[m].B)
        residual = ef.state[f"residual/{m}"]
        assert residual.shape == SHAPES[m] and residual.dtype == torch.float32
        torch.testing.assert_close(residual.double(), target(ups, m) - product(svd, m), rtol=1e-6, atol=1e-6)
    assert ef.metrics["divergence"] == svd.metrics["divergence"]
    assert set(ef.state) == {f"residual/{m}" for m in SHAPES}
    # decay = 0 ignores a residual: plain svd again (to rounding: the dense path).
    again = aggregate("svd-ef", g, ups, state=ef.state, decay=0.0)
    for m in SHAPES:
        torch.testing.assert_close(product(again, m), product(svd, m), rtol=1e-10, atol=1e-12)
    with pytest.raises(AggregationError, match=r"decay=1.5 is invalid: must be <= 1"):
        aggregate("svd-ef", g, ups, decay=1.5)
    with pytest.raises(AggregationError, match="residual belongs to another model"):
        aggregate("svd-ef", g, ups, state={"residual/attn.q": torch.zeros(K, D)})


def test_svd_ef_residual_makes_the_sum_of_applied_products_track_the_sum_of_targets():
    """Three rounds of targets T_t (one global adapter, new clients each round, a shared trend).

    Asserted: (1) error feedback's telescoping identity Σ_t P_t = Σ_t T_t − e_3, with P_t the
    broadcast product and e_3 the residual it carries out of round 3 (to float32 state precision);
    (2) its cumulative error ‖Σ P_t − Σ T_t‖ = ‖e_3‖ is below 0.8 × plain svd's ‖Σ_t (P_t^svd − T_t)‖,
    whose truncation errors add up round after round.
    """
    shapes = {"m": (D, K), "n": (9, 6)}
    g, _ = least_squares_clients(shapes, 2, U, seed=100, dtype=F64)
    rounds = [least_squares_clients(shapes, 2, U, seed=t, heterogeneity=2.0, dtype=F64)[1] for t in range(3)]
    state: dict[str, torch.Tensor] = {}
    sum_ef = {m: torch.zeros(shapes[m], dtype=F64) for m in shapes}
    sum_svd = {m: torch.zeros(shapes[m], dtype=F64) for m in shapes}
    sum_target = {m: torch.zeros(shapes[m], dtype=F64) for m in shapes}
    for ups in rounds:
        ef = aggregate("svd-ef", g, ups, state=state)
        state = ef.state
        plain = aggregate("svd", g, ups)
        for m in shapes:
            sum_ef[m] += product(ef, m)
            sum_svd[m] += product(plain, m)
            sum_target[m] += target(ups, m)
    for m in shapes:
        torch.testing.assert_close(sum_ef[m], sum_target[m] - state[f"residual/{m}"].double(), rtol=1e-6, atol=1e-6)

    def error(sums):
        return math.sqrt(sum(float(((sums[m] - sum_target[m]) ** 2).sum()) for m in shapes))

    assert error(sum_ef) < 0.8 * error(sum_svd)


# FLoRA-NA: ridge, bounded step, stabilised variant


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scope", ["per-module", "global"])
def test_flora_na_with_ridge_and_bound_is_never_worse_than_fedit_and_bounded(seed, scope):
    g, ups = least_squares_clients(SHAPES, R, U + seed, heterogeneity=2.0, seed=seed, dtype=F64)
    result = aggregate("flora-na-stable", g, ups, scope=scope, ridge=1.0, max_deviation=0.5)
    fedit = fedit_objective(g, ups)
    metrics = result.metrics
    assert metrics["objective"] <= fedit * (1 + 1e-12)
    assert metrics["objective"] == pytest.approx(sum(float(((product(result, m) - target(ups, m)) ** 2).sum()) for m in g), rel=1e-8)
    assert metrics["objective_fedit"] == pytest.approx(fedit, rel=1e-10)
    assert max(metrics["p_dev_max"], metrics["q_dev_max"]) <= 0.5 + 1e-12
    penalised = result.extras["penalised_trace"]
    assert all(b <= a for a, b in zip(penalised, penalised[1:])), "each half-step minimises L + penalty exactly"


def test_flora_na_metrics_are_floats_that_describe_p_q_and_the_factor_norms():
    g, ups = least_squares_clients(SHAPES, R, U, heterogeneity=2.0, seed=3, dtype=F64)
    for method in ("flora-na", "flora-na-stable"):
        result = aggregate(method, g, ups)
        metrics = result.metrics
        p = torch.stack([result.extras["p"][m] for m in SHAPES])
        q = torch.stack([result.extras["q"][m] for m in SHAPES])
        expected = {"p_min": p.min(), "p_max": p.max(), "q_min": q.min(), "q_max": q.max(),
                    "p_dev_max": (p - 1).abs().max(), "q_dev_max": (q - 1).abs().max(),
                    "norm_A": torch.cat([result.adapter[m].A.flatten() for m in SHAPES]).norm(),
                    "norm_B": torch.cat([result.adapter[m].B.flatten() for m in SHAPES]).norm()}
        fedit = aggregate("fedit", g, ups)
        expected["norm_A_fedit"] = torch.cat([fedit.adapter[m].A.flatten() for m in SHAPES]).norm()
        expected["norm_B_fedit"] = torch.cat([fedit.adapter[m].B.flatten() for m in SHAPES]).norm()
        for key, value in expected.items():
            assert type(metrics[key]) is float, key
            assert metrics[key] == pytest.approx(float(value), rel=1e-10), (method, key)


def test_ridge_zero_is_flora_na_bit_for_bit_and_ridge_infinity_is_fedit():
    g, ups = least_squares_clients(SHAPES, R, U, heterogeneity=2.0, seed=5, dtype=F64)
    default = aggregate("flora-na", g, ups)
    for options in ({"ridge": 0.0}, {"ridge": 0.0, "max_deviation": 1e300}):
        explicit = aggregate("flora-na", g, ups, **options)
        for m in SHAPES:
            assert torch.equal(explicit.adapter[m].A, default.adapter[m].A)
            assert torch.equal(explicit.adapter[m].B, default.adapter[m].B)
        assert explicit.extras["objective_trace"] == default.extras["objective_trace"]
        assert explicit.metrics["objective"] == default.metrics["objective"] == min(default.extras["objective_trace"])
    fedit = aggregate("fedit", g, ups)
    for scope in ("per-module", "global"):
        huge = aggregate("flora-na", g, ups, ridge=1e12, scope=scope)
        assert huge.metrics["p_dev_max"] < 1e-8 and huge.metrics["q_dev_max"] < 1e-8
        for m in SHAPES:
            torch.testing.assert_close(huge.adapter[m].A, fedit.adapter[m].A, rtol=1e-7, atol=1e-9)
            torch.testing.assert_close(huge.adapter[m].B, fedit.adapter[m].B, rtol=1e-7, atol=1e-9)


def test_ridge_shrinks_the_coefficients_and_keeps_the_objective_between_the_solution_and_fedit():
    g, ups = least_squares_clients(SHAPES, R, U, heterogeneity=2.0, seed=7, dtype=F64)
    fedit = fedit_objective(g, ups)
    runs = [aggregate("flora-na", g, ups, ridge=ridge).metrics for ridge in (0.0, 0.1, 1.0, 10.0)]
    objectives = [m["objective"] for m in runs]
    deviations = [max(m["p_dev_max"], m["q_dev_max"]) for m in runs]
    assert all(o <= fedit * (1 + 1e-12) for o in objectives)
    assert objectives[0] <= min(objectives) * (1 + 1e-9)  # ridge 0 is the unconstrained optimum found
    assert deviations == sorted(deviations, reverse=True) and deviations[-1] < deviations[0]


def test_max_deviation_bounds_the_step_and_stays_never_worse_than_fedit():
    g, ups = least_squares_clients(SHAPES, R, U, heterogeneity=2.0, seed=9, dtype=F64)
    fedit = fedit_objective(g, ups)
    free = aggregate("flora-na", g, ups).metrics
    assert max(free["p_dev_max"], free["q_dev_max"]) > 0.2  # the bound below binds
    for scope in ("per-module", "global"):
        bounded = aggregate("flora-na", g, ups, max_deviation=0.2, scope=scope)
        metrics = bounded.metrics
        assert max(metrics["p_dev_max"], metrics["q_dev_max"]) <= 0.2 + 1e-12
        assert free["objective"] <= metrics["objective"] <= fedit * (1 + 1e-12)
        assert metrics["objective"] < fedit  # some step toward the solution helps
        assert 0 < metrics["step_back_t"] < 1
        dense = sum(float(((product(bounded, m) - target(ups, m)) ** 2).sum()) for m in g)
        assert metrics["objective"] == pytest.approx(dense, rel=1e-8)
    zero = aggregate("flora-na", g, ups, max_deviation=0.0)  # no step at all: FedIT
    fedit_result = aggregate("fedit", g, ups)
    for m in SHAPES:
        torch.testing.assert_close(zero.adapter[m].A, fedit_result.adapter[m].A, rtol=1e-12, atol=1e-12)
    assert zero.metrics["step_back_t"] == 0.0


def test_stable_defaults_are_the_module_constants_and_ridge_is_als_only():
    specs = get_method("flora-na-stable").option_specs
    assert (specs["ridge"].default, specs["max_deviation"].default, specs["rebalance"].default) == \
        (RIDGE, MAX_DEVIATION, REBALANCE) == (0.0, math.inf, True)
    assert math.isinf(get_method("flora-na").option_specs["max_deviation"].default)
    assert get_method("flora-na").option_specs["ridge"].default == 0.0
    g, ups = least_squares_clients(SHAPES, R, U, seed=1, dtype=F64)
    with pytest.raises(AggregationError, match="solver='als' only"):
        aggregate("flora-na", g, ups, solver="adamw", ridge=1.0)
    with pytest.raises(AggregationError, match="ridge=-1 is invalid"):
        aggregate("flora-na", g, ups, ridge=-1)


@pytest.mark.parametrize("method", NEW)
def test_bench_closed_forms_match_the_bytes_aggregate_reports(method):
    from fedlora.bench import comm

    g = random_global(20)
    ups = inputs_for(method, g, 21)
    modules = [(m, R, d, k) for m, (d, k) in SHAPES.items()]
    for round_index in (1, 2):
        metrics = aggregate(method, g, ups, round_index=round_index).metrics
        assert (metrics["bytes_up"], metrics["bytes_down"]) == comm.closed_form_bytes(method, modules, U, round_index)


@pytest.mark.parametrize("method", ["fedit", "flora-na", "flora-na-stable"])
def test_rebalance_keeps_product_divergence_and_bytes_and_balances_the_factors(method):
    """rebalance=True re-splits each broadcast product as U√Σ · √ΣVᵀ: same B̂Â, ‖Â‖ = ‖B̂‖ per module."""
    g = random_global(41)
    ups = clients_like(g, 42)
    plain, balanced = aggregate(method, g, ups, rebalance=False), aggregate(method, g, ups, rebalance=True)
    for module in g:
        torch.testing.assert_close(product(balanced, module), product(plain, module), rtol=1e-7, atol=1e-9)
        pair = balanced.adapter[module]
        assert float(pair.A.norm()) == pytest.approx(float(pair.B.norm()), rel=1e-9)
        gram = pair.A @ pair.A.T  # rows of A orthogonal: A Aᵀ = Σ (diagonal)
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-8, rtol=0)
    assert balanced.metrics["divergence"] == pytest.approx(plain.metrics["divergence"], rel=1e-6)
    assert balanced.metrics["bytes_up"] == plain.metrics["bytes_up"]
    assert any(not torch.allclose(balanced.adapter[m].A, plain.adapter[m].A) for m in g)  # it did re-split


@pytest.mark.parametrize("seed", range(3))
def test_flora_na_stable_broadcasts_flora_nas_product_as_balanced_factors(seed):
    """The default stabilised FLoRA-NA: FLoRA-NA's p, q, product, objective and bytes; balanced factors."""
    g, ups = least_squares_clients(SHAPES, R, U, heterogeneity=2.0, seed=seed, dtype=F64)
    stable, plain = aggregate("flora-na-stable", g, ups), aggregate("flora-na", g, ups)
    assert stable.metrics["objective"] == plain.metrics["objective"] <= fedit_objective(g, ups) * (1 + 1e-12)
    assert stable.metrics["bytes_up"] == plain.metrics["bytes_up"] and stable.metrics["bytes_down"] == plain.metrics["bytes_down"]
    for m in g:
        torch.testing.assert_close(stable.extras["p"][m], plain.extras["p"][m], rtol=0, atol=0)
        torch.testing.assert_close(product(stable, m), product(plain, m), rtol=1e-7, atol=1e-10)
        assert float(stable.adapter[m].A.norm()) == pytest.approx(float(stable.adapter[m].B.norm()), rel=1e-9)
