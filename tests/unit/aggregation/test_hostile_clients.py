"""Issue 14, items 4-8 (and issue 21, item 7): no single client dominates, crashes or poisons an aggregation.

Each test states the promise a hostile (or careless) client must not break; each failed before the
robust defaults of :mod:`fedlora.aggregation.robust` (a 99x client moved the global product
thousands of honest steps, a 1e6x client was accepted when the median norm was 0, heads were never
checked, non-finite results were applied, odd inputs raised raw TypeErrors).
"""

from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

import pytest
import torch

from fedlora.aggregation import AggregationError, ClientUpdate, LoraPair, aggregate, available_methods, get_method
from fedlora.aggregation.ranks import sent_start
from fedlora.aggregation.validation import update_norm
from fedlora.protocol.client import ClientResult
from fedlora.config.run import ConfigError, RunConfig
from fedlora.protocol.rounds import Server
from fedlora.protocol.server import server_step
from fedlora.testing.synthetic import least_squares_clients

SHAPES = {"q": (12, 8), "v": (10, 6)}  # (d, k)
RANK = 2
ALL = available_methods()


def options(method: str) -> dict:
    return {"seed": 0} if method == "flora" else {}


@pytest.fixture(scope="module")
def clients():
    """A float32 global adapter and 3 honest, trained client updates (never mutated by the tests)."""
    return least_squares_clients(SHAPES, RANK, 3, seed=0)


def moved(global_adapter, update_or_adapter, base_delta=None) -> float:
    """‖B'A' (+ base_delta) − B A‖_F over the modules: how far the global product moved."""
    adapter = getattr(update_or_adapter, "adapter", update_or_adapter)
    total = 0.0
    for m, g in global_adapter.items():
        new = adapter[m].B.double() @ adapter[m].A.double()
        if base_delta and m in base_delta:
            new = new + base_delta[m].double()
        total += float(((new - g.B.double() @ g.A.double()) ** 2).sum())
    return math.sqrt(total)


def scaled(global_adapter, update: ClientUpdate, factor: float, count: int | None = None, client_id: str = "evil"):
    """``update``'s step from the global, times ``factor``, under a new id (and a claimed count)."""
    adapter = {m: LoraPair(A=g.A + factor * (update.adapter[m].A - g.A), B=g.B + factor * (update.adapter[m].B - g.B))
               for m, g in global_adapter.items()}
    return ClientUpdate(adapter, update.num_examples if count is None else count, client_id)


def unchanged(global_adapter, update: ClientUpdate, client_id: str) -> ClientUpdate:
    """A client that sends the global adapter back (update norm 0)."""
    return ClientUpdate({m: LoraPair(p.A.clone(), p.B.clone()) for m, p in global_adapter.items()}, 10, client_id)


# -- item 4: a client's weight and step are bounded -------------------------------------------------------------------
def test_one_client_at_99x_the_median_claiming_1e9_examples_moves_the_global_a_few_honest_steps(clients):
    g, honest = clients
    step = sorted(moved(g, u) for u in honest)[1]  # the median honest client's own product step
    for method in ALL:
        for count in (10**9, honest[1].num_examples):
            result = aggregate(method, g, honest + [scaled(g, honest[0], 99.0, count)], **options(method))
            assert result.metrics["rejected"] == []  # under the 100x bound: it is clipped, not rejected
            assert [c["client"] for c in result.metrics["clipped"]] == ["evil"]
            assert moved(g, result.adapter, result.base_delta) < 5 * step, (method, count)


def test_claimed_counts_are_capped_at_twice_an_equal_share(clients):
    g, honest = clients
    result = aggregate("fedit", g, honest + [ClientUpdate(honest[0].adapter, 10**9, "greedy")])
    assert result.metrics["weights"]["greedy"] == pytest.approx(2 / 4)
    assert sum(result.metrics["weights"].values()) == pytest.approx(1.0)
    uncapped = aggregate("fedit", g, honest + [ClientUpdate(honest[0].adapter, 10**9, "greedy")], weight_cap=None)
    assert uncapped.metrics["weights"]["greedy"] > 0.999  # the switch: for counts from a trusted source


def test_the_server_weighs_clients_by_its_own_partition_table_not_their_claims(clients):
    g, honest = clients
    table = SimpleNamespace(clients=[SimpleNamespace(client_id=u.client_id, num_examples=7 + i) for i, u in enumerate(honest)])
    server = SimpleNamespace(federation=table, mixed_ranks=False)
    claims = [ClientResult(ClientUpdate(u.adapter, 10**9, u.client_id), {}, 0.1, None) for u in honest]
    bounded = Server.bounded(server, claims)  # type: ignore[arg-type]
    assert [r.update.num_examples for r in bounded] == [7, 8, 9]


def test_clip_factor_is_a_run_option_checked_before_anything_loads():
    assert RunConfig().clip_factor == 3.0 and RunConfig(clip_factor=0).clip_factor == 0
    for bad in (-1, float("inf"), "x"):
        with pytest.raises(ConfigError, match="clip-factor"):
            RunConfig(clip_factor=bad)


# -- item 5: the norm bound never switches itself off -------------------------------------------------------------------
@pytest.mark.parametrize("method", ALL)
def test_a_1e6x_update_is_rejected_when_the_median_is_zero_or_it_is_alone(clients, method):
    g, honest = clients
    huge = scaled(g, honest[0], 1e6)
    idle = [unchanged(g, u, f"idle-{i}") for i, u in enumerate(honest[:2])]
    for updates in ([huge], idle + [huge], [idle[0], huge]):
        result = aggregate(method, g, updates, **options(method))
        reasons = {e["client"]: e["reason"] for e in result.metrics["rejected"]}
        assert "evil" in reasons and "fallback reference" in reasons["evil"], (method, len(updates))
    alone = aggregate(method, g, [honest[0]], **options(method))  # an honest client alone is still accepted
    assert alone.metrics["rejected"] == [] and not alone.metrics["skipped"]


# -- item 6: classifier heads are validated like factors -------------------------------------------------------------
def head_round(g, honest, heads, global_head):
    results = [ClientResult(u, h, 0.1, None) for u, h in zip(honest, heads)]
    return server_step("fedit", g, results, global_head=global_head)


def test_a_head_1e6_times_away_is_rejected_and_the_global_head_stays_small(clients):
    g, honest = clients
    gh = {"w": torch.full((2, 4), 0.08), "b": torch.zeros(2)}
    heads = [{k: t + 0.01 * (i + 1) for k, t in gh.items()} for i in range(3)]
    heads[2] = {k: t * 1e6 for k, t in heads[2].items()}
    result, head = head_round(g, honest, heads, gh)
    assert [e["client"] for e in result.metrics["rejected"]] == [honest[2].client_id]
    assert "classifier head" in result.metrics["rejected"][0]["reason"]
    assert float(head["w"].abs().max()) < 0.2


@pytest.mark.parametrize(
    "bad,needle",
    [
        ({"w": torch.zeros(1, 4), "b": torch.zeros(2)}, "shape (1, 4)"),  # would broadcast into the average
        ({"w": torch.zeros(2, 4)}, "keys differ"),
        ({"w": torch.zeros(2, 4, dtype=torch.int64), "b": torch.zeros(2)}, "floating point"),
        ({"w": torch.zeros(2, 4).to_sparse(), "b": torch.zeros(2)}, "sparse"),
        ({"w": torch.full((2, 4), 1e300, dtype=torch.float64), "b": torch.zeros(2)}, "norm"),
        ([torch.zeros(2, 4), torch.zeros(2)], "not a dict"),
    ],
)
def test_a_malformed_head_rejects_its_client_with_a_reason(clients, bad, needle):
    g, honest = clients
    gh = {"w": torch.zeros(2, 4), "b": torch.zeros(2)}
    heads = [{k: t + 0.01 * (i + 1) for k, t in gh.items()} for i in range(2)] + [bad]
    result, head = head_round(g, honest, heads, gh)
    reasons = {e["client"]: e["reason"] for e in result.metrics["rejected"]}
    assert set(reasons) == {honest[2].client_id} and needle in reasons[honest[2].client_id]
    assert head is not None and all(torch.isfinite(t).all() and t.shape == gh[k].shape for k, t in head.items())


def test_float64_heads_of_1e300_never_become_inf_in_a_float32_model(clients):
    g, honest = clients
    gh = {"w": torch.zeros(2, 4)}
    big = {"w": torch.full((2, 4), 1e300, dtype=torch.float64)}
    alone, none = head_round(g, honest[:1], [big], gh)  # one client: the fallback reference rejects it
    assert none is None and alone.metrics["skipped"]
    result, head = head_round(g, honest, [big, big, {"w": torch.zeros(2, 4)}], gh)  # a majority: the mean overflows
    assert head is None and result.metrics["skipped"] and "not finite" in result.metrics["reason"]


# -- item 7: every output is checked; a non-finite result is skipped, never applied ----------------------------------
def test_flora_with_entries_of_1e20_skips_the_round_instead_of_an_infinite_base_delta(clients):
    g, honest = clients
    big = [ClientUpdate({m: LoraPair(torch.full_like(p.A, 1e20), torch.full_like(p.B, 1e20)) for m, p in g.items()},
                        10, f"big-{i}") for i in range(3)]
    result = aggregate("flora", g, big, seed=0)
    assert result.metrics["skipped"] is True and "base_delta" in result.metrics["reason"]
    assert result.base_delta == {} and math.isnan(result.metrics["divergence"])
    assert all(torch.equal(result.adapter[m].A, g[m].A) for m in g)


@pytest.mark.parametrize("method", ALL)
def test_a_float16_global_never_receives_inf_from_clients_at_7e4(clients, method):
    g, _ = clients
    g16 = {m: LoraPair(p.A.half(), p.B.half()) for m, p in g.items()}
    updates = [ClientUpdate({m: LoraPair(torch.full_like(p.A, 7e4 + i), torch.full_like(p.B, 1.0 + i)) for m, p in g.items()},
                            10, f"c{i}") for i in range(3)]  # float32 uploads beyond float16's 65504
    result = aggregate(method, g16, updates, **options(method))
    finite = all(torch.isfinite(p.A).all() and torch.isfinite(p.B).all() for p in result.adapter.values())
    assert finite and all(torch.isfinite(d).all() for d in result.base_delta.values())
    if result.metrics["skipped"]:
        assert "not finite" in result.metrics["reason"] and math.isnan(result.metrics["divergence"])


# -- item 8: odd inputs get the documented behaviour, never a raw error -----------------------------------------------
def test_a_non_string_client_id_is_rejected_and_not_aggregated(clients):
    g, honest = clients
    result = aggregate("fedit", g, honest[:2] + [ClientUpdate(honest[2].adapter, 10, 7)])
    assert result.metrics["rejected"] == [{"client": "7", "reason": "client_id=7; it must be a non-empty string"}]
    clean = aggregate("fedit", g, honest[:2])
    assert all(torch.equal(result.adapter[m].A, clean.adapter[m].A) for m in g)


def test_updates_from_a_generator_are_aggregated_and_a_non_iterable_is_refused(clients):
    g, honest = clients
    from_list = aggregate("fedit", g, honest)
    from_generator = aggregate("fedit", g, (u for u in honest))
    assert not from_generator.metrics["skipped"] and from_generator.metrics["num_clients"] == 3
    assert all(torch.equal(from_list.adapter[m].A, from_generator.adapter[m].A) for m in g)
    with pytest.raises(AggregationError, match="iterable"):
        aggregate("fedit", g, 3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda p: LoraPair(p.A.to_sparse(), p.B), "sparse"),
        (lambda p: LoraPair(p.A.to(torch.float8_e4m3fn), p.B), "float8"),
        (lambda p: LoraPair(p.A.to("meta"), p.B.to("meta")), "meta"),
    ],
)
def test_sparse_float8_and_meta_factors_are_rejected_with_a_reason(clients, make, needle):
    g, honest = clients
    odd = ClientUpdate({m: make(p) for m, p in honest[2].adapter.items()}, 10, "odd")
    result = aggregate("fedit", g, honest[:2] + [odd])
    reasons = [e["reason"] for e in result.metrics["rejected"]]
    assert reasons and all(e["client"] == "odd" for e in result.metrics["rejected"]) and needle in reasons[0]


def test_module_names_of_mixed_types_are_a_rejection_not_a_type_error(clients):
    g, honest = clients
    odd = ClientUpdate({**honest[2].adapter, 3: honest[2].adapter["q"], "zz": honest[2].adapter["q"]}, 10, "odd")
    result = aggregate("fedit", g, honest[:2] + [odd])
    assert [e["client"] for e in result.metrics["rejected"]] == ["odd"]
    assert "unknown modules" in result.metrics["rejected"][0]["reason"]
    with pytest.raises(AggregationError, match="module name 3"):
        aggregate("fedit", {**g, 3: g["q"]}, honest)


def test_a_rank_0_global_adapter_is_a_caller_error():
    empty = {"q": LoraPair(torch.zeros(0, 8), torch.zeros(12, 0))}
    update = ClientUpdate({"q": LoraPair(torch.zeros(0, 8), torch.zeros(12, 0))}, 10, "c")
    for method in ALL:
        with pytest.raises(AggregationError, match="rank and both dimensions must be >= 1"):
            aggregate(method, empty, [update], **options(method))


@pytest.mark.parametrize(
    "method,option",
    [("flora-na", {"max_sweeps": "abc"}), ("flora-na", {"steps": -1}), ("flora-na", {"max_sweeps": math.inf}),
     ("flora-na-stable", {"max_sweeps": math.inf}), ("flora", {"seed": 1e30}), ("flora", {"seed": 2**70})],
)
def test_bad_option_values_are_one_aggregation_error(clients, method, option):
    g, honest = clients
    name = next(iter(option))
    with pytest.raises(AggregationError, match=f"option {name}="):
        aggregate(method, g, honest, **option)


def test_method_option_from_the_command_line_is_one_config_error():
    with pytest.raises(ConfigError, match="max_sweeps='abc' is invalid"):
        RunConfig(method="flora-na", method_options={"max_sweeps": "abc"})
    with pytest.raises(ConfigError, match="steps=.-1. is invalid"):
        RunConfig(method="flora-na", method_options={"steps": "-1"})


# -- issue 21, item 7: with mixed client ranks, each update is judged against the start it was sent --------------------
MIXED = [m for m in ALL if get_method(m).policy.mixed_ranks]
FULL = 4  # the server's rank in these tests


def mixed_clients(ranks: tuple[int, ...], rank_map: str = "truncate"):
    """Honest clients trained at ``ranks`` from what they were sent, with fine-tuning-sized steps (far below ‖A‖)."""
    g, honest = least_squares_clients(SHAPES, FULL, len(ranks), seed=0, client_ranks=ranks, rank_map=rank_map,
                                      step_size=0.005)
    return g, honest, {u.client_id: r for u, r in zip(honest, ranks)}


@pytest.mark.parametrize("ranks,rank_map", [((4, 4, 4, 4, 1), "truncate"), ((4, 4, 2, 1), "truncate"),
                                            ((4, 4, 2, 1), "svd")])
def test_honest_mixed_rank_clients_are_neither_rejected_nor_clipped(ranks, rank_map):
    g, honest, client_ranks = mixed_clients(ranks, rank_map)
    for method in MIXED if rank_map == "truncate" else ["fedit", "svd"]:
        mapped = {} if rank_map == "truncate" else {"rank_map": rank_map}  # truncate: the default
        result = aggregate(method, g, honest, client_ranks=client_ranks, **mapped)
        assert (result.metrics["rejected"], result.metrics["clipped"]) == ([], []), (method, ranks)


def test_equal_client_ranks_give_exactly_the_aggregate_without_ranks(clients):
    g, honest = clients
    attack = honest + [scaled(g, honest[0], 99.0)]  # something to clip
    for method in ALL:
        plain = aggregate(method, g, attack, **options(method))
        ranked = aggregate(method, g, attack, client_ranks={u.client_id: RANK for u in attack}, rank_map="svd",
                           **options(method))
        assert ranked.metrics["clipped"] == plain.metrics["clipped"] != [], method
        assert ranked.metrics["norm_reference"] == plain.metrics["norm_reference"], method
        for m in g:
            assert torch.equal(ranked.adapter[m].A, plain.adapter[m].A) and torch.equal(ranked.adapter[m].B, plain.adapter[m].B)
            assert m not in plain.base_delta or torch.equal(ranked.base_delta[m], plain.base_delta[m])


def product_gap(a, b) -> float:
    """‖(B'A' + base_delta)_a − (B'A' + base_delta)_b‖_F over the modules: how far apart two results' products are."""
    zero = torch.zeros((), dtype=torch.float64)
    return math.sqrt(sum(float(((a.adapter[m].B.double() @ a.adapter[m].A.double() + a.base_delta.get(m, zero).double()
                                 - b.adapter[m].B.double() @ b.adapter[m].A.double() - b.base_delta.get(m, zero).double())
                                ** 2).sum()) for m in a.adapter))


def full_rank_push(method: str, ranks: tuple[int, ...], against: str) -> float | None:
    """How far one full-rank attacker pushes the global product, in honest steps (None: it was rejected).

    The attacker sends honest client 0's step, scaled to 99x the round's median norm measured from each
    client's start (``against="start"``) or from the full-rank global (the measure before issue 21). Its
    push is measured against the same round with the attacker sending its start back, so that a full-rank
    client's mere presence (it keeps the components the low-rank clients were never sent) is not counted.
    """
    g, honest, client_ranks = mixed_clients(ranks)
    starts = [sent_start(g, r, "truncate") for r in ranks]
    median = statistics.median_low(update_norm(s if against == "start" else g, u) for u, s in zip(honest, starts))
    step0 = {m: (honest[0].adapter[m].A - starts[0][m].A, honest[0].adapter[m].B - starts[0][m].B) for m in g}
    scale = 99.0 * median / update_norm(starts[0], honest[0])
    evil = ClientUpdate({m: LoraPair(A=g[m].A + scale * dA, B=g[m].B + scale * dB) for m, (dA, dB) in step0.items()},
                        honest[1].num_examples, "evil")
    idle = unchanged(g, honest[1], "evil")
    ranked = client_ranks | {"evil": FULL}
    attacked = aggregate(method, g, honest + [evil], client_ranks=ranked)
    if attacked.metrics["rejected"]:
        return None
    baseline = aggregate(method, g, honest + [idle], client_ranks=ranked)
    step = statistics.median(moved(s, u) for u, s in zip(honest, starts))  # each honest product step from its start
    return product_gap(attacked, baseline) / step


@pytest.mark.parametrize("method", MIXED)
def test_one_full_rank_attacker_among_low_rank_clients_moves_the_global_no_more_than_with_equal_ranks(method):
    equal = full_rank_push(method, (FULL, FULL, FULL), "start")
    assert equal is not None and equal < 1.5  # about clip x weight share (3 x 1/4) honest steps (README)
    for against in ("start", "global"):
        push = full_rank_push(method, (1, 1, 2), against)
        assert push is None or push <= 1.5 * equal, (method, against, push, equal)


def test_client_ranks_and_rank_map_that_cannot_describe_the_round_are_one_aggregation_error(clients):
    g, honest = clients
    for bad, needle in (({"client-0": 0}, "from 1 to the global adapter's rank 2"), ({"client-0": RANK + 1}, "from 1"),
                        ({"client-0": True}, "from 1"), ([2, 2, 2], "pass a dict")):
        with pytest.raises(AggregationError, match=needle):
            aggregate("fedit", g, honest, client_ranks=bad)  # type: ignore[arg-type]
    with pytest.raises(AggregationError, match="rank_map='bogus' is invalid"):
        aggregate("fedit", g, honest, rank_map="bogus")
