"""Bad input to `aggregate` fails loudly and helpfully; inputs are never modified in place."""

from __future__ import annotations

import copy

import pytest
import torch

from fedlora.aggregation import AggregationError, ClientUpdate, LoraPair, aggregate, available_methods
from fedlora.testing.synthetic import least_squares_clients

SHAPES = {"attn.q": (12, 8), "mlp.up": (6, 10)}  # (d, k)
RANK = 2
ALL = available_methods()


@pytest.fixture(scope="module")
def clients():
    # Built once: every test derives new updates from these and never mutates them (checked below).
    return least_squares_clients(SHAPES, RANK, 4, seed=0)


def replace_module(update: ClientUpdate, module: str, pair) -> ClientUpdate:
    adapter = dict(update.adapter)
    adapter[module] = pair
    return ClientUpdate(adapter, update.num_examples, update.client_id)


def with_tensor(update: ClientUpdate, module: str, factor: str, tensor) -> ClientUpdate:
    pair = update.adapter[module]
    A, B = (tensor, pair.B) if factor == "A" else (pair.A, tensor)
    return replace_module(update, module, LoraPair(A=A, B=B))


def poisoned(value: float):
    def make(update: ClientUpdate) -> ClientUpdate:
        A = update.adapter["mlp.up"].A.clone()
        A[0, 1] = value
        return with_tensor(update, "mlp.up", "A", A)

    return make


def drop_module(update: ClientUpdate) -> ClientUpdate:
    return ClientUpdate({m: p for m, p in update.adapter.items() if m != "mlp.up"}, update.num_examples, update.client_id)


def add_module(update: ClientUpdate) -> ClientUpdate:
    return replace_module(update, "attn.k", update.adapter["attn.q"])


BAD_CLIENTS = {
    # name: (how to break one client, what the message must mention besides the client id)
    "shape": (lambda u: with_tensor(u, "attn.q", "B", torch.zeros(13, RANK)), ["'attn.q'", "(13, 2)"]),
    "rank": (
        lambda u: replace_module(u, "mlp.up", LoraPair(A=torch.zeros(RANK + 1, 10), B=torch.zeros(6, RANK + 1))),
        ["'mlp.up'", "rank"],
    ),
    "rank_inconsistent_pair": (
        lambda u: replace_module(u, "mlp.up", LoraPair(A=torch.zeros(RANK + 1, 10), B=torch.zeros(6, RANK))),
        ["'mlp.up'", "rank"],
    ),
    "missing_module": (drop_module, ["missing modules", "mlp.up"]),
    "extra_module": (add_module, ["unknown modules", "attn.k"]),
    "nan": (poisoned(float("nan")), ["'mlp.up'", "NaN"]),
    "inf": (poisoned(float("inf")), ["'mlp.up'", "Inf"]),
    "int_dtype": (
        lambda u: with_tensor(u, "attn.q", "A", torch.ones(RANK, 8, dtype=torch.int64)),
        ["'attn.q'", "int64", "floating point"],
    ),
    "not_a_tensor": (lambda u: with_tensor(u, "attn.q", "A", [[0.0] * 8] * RANK), ["'attn.q'", "torch.Tensor"]),
    "not_a_pair": (lambda u: replace_module(u, "attn.q", (u.adapter["attn.q"].A, u.adapter["attn.q"].B)), ["'attn.q'", "LoraPair"]),
    "zero_examples": (lambda u: ClientUpdate(u.adapter, 0, u.client_id), ["num_examples=0", "positive int"]),
    "negative_examples": (lambda u: ClientUpdate(u.adapter, -3, u.client_id), ["num_examples=-3", "positive int"]),
    "float_examples": (lambda u: ClientUpdate(u.adapter, 2.5, u.client_id), ["num_examples=2.5", "positive int"]),
    "bool_examples": (lambda u: ClientUpdate(u.adapter, True, u.client_id), ["num_examples=True", "positive int"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CLIENTS))
def test_bad_client_raises_naming_client_and_module(clients, case):
    g, ups = clients
    breaker, needles = BAD_CLIENTS[case]
    bad = list(ups)
    bad[2] = breaker(ups[2])
    with pytest.raises(AggregationError) as info:
        aggregate("fedit", g, bad, on_invalid="raise")
    message = str(info.value)
    assert "client 'client-2'" in message
    for needle in needles:
        assert needle in message, (case, message)
    for good in ("client-0", "client-1", "client-3"):  # only the culprit is blamed
        assert good not in message


def test_every_bad_client_is_reported_at_once(clients):
    g, ups = clients
    bad = [poisoned(float("nan"))(ups[0]), ups[1], drop_module(ups[2]), ups[3]]
    message = str(pytest.raises(AggregationError, aggregate, "flora-na", g, bad, on_invalid="raise").value)
    assert "client-0" in message and "client-2" in message and "client-1" not in message


def test_duplicate_client_ids(clients):
    g, ups = clients
    dup = list(ups) + [ClientUpdate(ups[1].adapter, 7, "client-1")]
    message = str(pytest.raises(AggregationError, aggregate, "fedit", g, dup, on_invalid="raise").value)
    assert "'client-1'" in message and "duplicate" in message


def test_empty_update_list(clients):
    g, _ = clients
    with pytest.raises(AggregationError, match="no client updates"):
        aggregate("fedit", g, [])


def test_unknown_method_lists_the_available_ones(clients):
    g, ups = clients
    message = str(pytest.raises(AggregationError, aggregate, "fedavg-magic", g, ups).value)
    assert "'fedavg-magic'" in message
    for method in ALL:
        assert method in message


def test_unknown_option_is_named(clients):
    g, ups = clients
    message = str(pytest.raises(AggregationError, aggregate, "flora-na", g, ups, max_sweep=3).value)
    assert "max_sweep" in message and "max_sweeps" in message  # names the typo and the real options
    message = str(pytest.raises(AggregationError, aggregate, "fedit", g, ups, seed=1).value)
    assert "seed" in message and "rebalance" in message  # fedit's only option
    message = str(pytest.raises(AggregationError, aggregate, "svd", g, ups, seed=1).value)
    assert "seed" in message and "none" in message  # a method without options says so


@pytest.mark.parametrize("method,weighting", [("fedit", "median"), ("fedit", "authors"), ("flora-na", "size")])
def test_unknown_weighting(clients, method, weighting):
    g, ups = clients
    message = str(pytest.raises(AggregationError, aggregate, method, g, ups, weighting=weighting).value)
    assert repr(weighting) in message and "examples" in message


def test_unknown_on_invalid_and_flora_na_options(clients):
    g, ups = clients
    with pytest.raises(AggregationError, match="on_invalid"):
        aggregate("fedit", g, ups, on_invalid="ignore")
    with pytest.raises(AggregationError, match="solver"):
        aggregate("flora-na", g, ups, solver="lbfgs")
    with pytest.raises(AggregationError, match="scope"):
        aggregate("flora-na", g, ups, scope="layer")


@pytest.mark.parametrize(
    "global_adapter,needle",
    [
        ({}, "non-empty dict"),
        ([("attn.q", None)], "non-empty dict"),
        ({"attn.q": "not a pair"}, "'attn.q'"),
        ({"attn.q": LoraPair(A=torch.zeros(2, 8), B=torch.zeros(12, 3))}, "rank"),
        ({"attn.q": LoraPair(A=torch.zeros(2, 8, dtype=torch.int32), B=torch.zeros(12, 2))}, "floating point"),
        ({"attn.q": LoraPair(A=torch.full((2, 8), float("nan")), B=torch.zeros(12, 2))}, "NaN"),
        ({"attn.q": LoraPair(A=torch.zeros(2, 8, 1), B=torch.zeros(12, 2))}, "2-D"),
    ],
)
def test_malformed_global_adapter(clients, global_adapter, needle):
    _, ups = clients
    message = str(pytest.raises(AggregationError, aggregate, "fedit", global_adapter, ups).value)
    assert "global adapter" in message and needle in message


@pytest.mark.parametrize("method", ALL)
def test_reject_drops_bad_clients_and_equals_aggregating_the_good_ones(clients, method):
    g, ups = clients
    mixed = [ups[0], poisoned(float("inf"))(ups[1]), ups[2], drop_module(ups[3])]
    rejected = aggregate(method, g, mixed, on_invalid="reject")
    good = aggregate(method, g, [ups[0], ups[2]])
    assert {entry["client"] for entry in rejected.metrics["rejected"]} == {"client-1", "client-3"}
    assert all(entry["reason"] for entry in rejected.metrics["rejected"])
    assert rejected.metrics["num_clients"] == 2 and good.metrics["rejected"] == []
    for m in SHAPES:
        torch.testing.assert_close(rejected.adapter[m].A, good.adapter[m].A, rtol=0, atol=0)
        torch.testing.assert_close(rejected.adapter[m].B, good.adapter[m].B, rtol=0, atol=0)
        assert (m in rejected.base_delta) == (m in good.base_delta)
        if m in good.base_delta:
            assert torch.equal(rejected.base_delta[m], good.base_delta[m])
    assert rejected.metrics["divergence"] == good.metrics["divergence"]


def test_default_is_reject_and_a_round_without_enough_valid_clients_is_skipped(clients):
    g, ups = clients
    result = aggregate("fedit", g, [drop_module(u) for u in ups])  # default on_invalid="reject"
    assert result.metrics["skipped"] is True and len(result.metrics["rejected"]) == len(ups)
    for m in SHAPES:  # the global adapter is left exactly as it was
        assert torch.equal(result.adapter[m].A, g[m].A) and torch.equal(result.adapter[m].B, g[m].B)
    assert result.base_delta == {}
    partial = aggregate("fedit", g, [ups[0], drop_module(ups[1])], min_clients=2)
    assert partial.metrics["skipped"] is True and partial.metrics["num_clients"] == 1
    assert aggregate("fedit", g, [ups[0], drop_module(ups[1])]).metrics["skipped"] is False


def test_huge_update_norms_and_implausible_example_counts_are_rejected(clients):
    g, ups = clients
    scaled = ClientUpdate({m: LoraPair(A=g[m].A + 1e4 * (p.A - g[m].A), B=g[m].B + 1e4 * (p.B - g[m].B))
                           for m, p in ups[1].adapter.items()}, ups[1].num_examples, "client-1")
    greedy = ClientUpdate(ups[2].adapter, 10**12, "client-2")
    result = aggregate("flora-na", g, [ups[0], scaled, greedy, ups[3]])
    reasons = {e["client"]: e["reason"] for e in result.metrics["rejected"]}
    assert set(reasons) == {"client-1", "client-2"}
    assert "median" in reasons["client-1"] and "implausible" in reasons["client-2"]
    clean = aggregate("flora-na", g, [ups[0], ups[3]])
    for m in SHAPES:
        torch.testing.assert_close(result.adapter[m].A, clean.adapter[m].A, rtol=0, atol=0)
    # The bound is configurable and can be switched off.
    assert aggregate("fedit", g, [ups[0], scaled, ups[3]], norm_bound=None).metrics["rejected"] == []


def snapshot(global_adapter, updates):
    return copy.deepcopy(global_adapter), [copy.deepcopy(u) for u in updates]


def assert_unchanged(before, after):
    (g0, ups0), (g1, ups1) = before, after
    for m in g0:
        assert torch.equal(g0[m].A, g1[m].A) and torch.equal(g0[m].B, g1[m].B)
    for u0, u1 in zip(ups0, ups1):
        assert u0.num_examples == u1.num_examples and u0.client_id == u1.client_id
        for m in u0.adapter:
            assert torch.equal(u0.adapter[m].A, u1.adapter[m].A) and torch.equal(u0.adapter[m].B, u1.adapter[m].B)


OPTIONS = {"flora-na": [{}, {"scope": "global"}, {"solver": "adamw", "steps": 3}, {"weighting": "authors"}]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ALL)
def test_inputs_are_never_modified(clients, method, dtype):
    g, ups = clients
    g = {m: p.to(dtype) for m, p in g.items()}
    ups = [ClientUpdate({m: p.to(dtype) for m, p in u.adapter.items()}, u.num_examples, u.client_id) for u in ups]
    before = snapshot(g, ups)
    for options in OPTIONS.get(method, [{}]):
        result = aggregate(method, g, ups, **options)
        assert_unchanged(before, (g, ups))
        # The result owns its tensors: editing it in place must not reach back into the inputs.
        for pair in result.adapter.values():
            pair.A.add_(1.0)
            pair.B.add_(1.0)
        for delta in result.base_delta.values():
            delta.add_(1.0)
        assert_unchanged(before, (g, ups))
    # Rejecting a client must not touch it (or anyone else) either (Inf: torch.equal is False on NaN).
    mixed = [ups[0], poisoned(float("inf"))(ups[1]), ups[2]]
    before_mixed = snapshot(g, mixed)
    aggregate(method, g, mixed, on_invalid="reject")
    assert_unchanged(before_mixed, (g, mixed))
