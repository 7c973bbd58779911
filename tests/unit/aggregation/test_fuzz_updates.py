"""Property-based fuzzing of the server's step with malformed and hostile client updates and heads.

Whatever the clients send (factors and classifier heads), `server_step` never crashes, never
returns NaN or Inf, rejects every broken client and never an honest one, rejects outliers that are
a minority of the round, and the new global model is what the accepted clients alone would give:
rejected clients leave no trace. A round whose result would not be finite is skipped, never applied.
"""

from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.aggregation import ClientUpdate, LoraPair, available_methods
from fedlora.protocol.client import ClientResult
from fedlora.protocol.server import server_step

SHAPES = {"q": (5, 3), "v": (4, 6)}  # (d, k), non-square
RANK = 2
CORRUPTIONS = [
    "none", "none", "none", "wrong_shape", "wrong_rank", "nan", "inf", "empty", "extra_key", "missing_key",
    "huge_norm", "zero_examples", "negative_examples", "half_precision", "int_dtype", "not_a_pair",
]
BROKEN = set(CORRUPTIONS) - {"none", "half_precision"}


def make_global(seed: int) -> dict[str, LoraPair]:
    g = torch.Generator().manual_seed(seed)
    return {m: LoraPair(A=torch.randn(RANK, k, generator=g), B=torch.randn(d, RANK, generator=g)) for m, (d, k) in SHAPES.items()}


def make_update(global_adapter, index: int, corruption: str, seed: int) -> ClientUpdate:
    g = torch.Generator().manual_seed(seed)
    adapter = {m: LoraPair(A=p.A + 0.1 * torch.randn(p.A.shape, generator=g), B=p.B + 0.1 * torch.randn(p.B.shape, generator=g))
               for m, p in global_adapter.items()}
    n = 10 + index
    pair = adapter["v"]
    if corruption == "wrong_shape":
        adapter["v"] = LoraPair(A=pair.A.T.contiguous(), B=pair.B)
    elif corruption == "wrong_rank":
        adapter["v"] = LoraPair(A=torch.cat([pair.A, pair.A[:1]]), B=torch.cat([pair.B, pair.B[:, :1]], dim=1))
    elif corruption in ("nan", "inf"):
        A = pair.A.clone()
        A[0, 0] = float(corruption)
        adapter["v"] = LoraPair(A=A, B=pair.B)
    elif corruption == "empty":
        adapter = {}
    elif corruption == "extra_key":
        adapter["k"] = pair
    elif corruption == "missing_key":
        del adapter["q"]
    elif corruption == "huge_norm":
        adapter = {m: LoraPair(A=global_adapter[m].A + 1e6 * (p.A - global_adapter[m].A), B=p.B) for m, p in adapter.items()}
    elif corruption == "zero_examples":
        n = 0
    elif corruption == "negative_examples":
        n = -5
    elif corruption == "half_precision":  # valid: a client on bf16 hardware
        adapter = {m: LoraPair(A=p.A.to(torch.bfloat16), B=p.B.to(torch.float16)) for m, p in adapter.items()}
    elif corruption == "int_dtype":
        adapter["q"] = LoraPair(A=adapter["q"].A.to(torch.int32), B=adapter["q"].B)
    elif corruption == "not_a_pair":
        adapter["q"] = (adapter["q"].A, adapter["q"].B)
    return ClientUpdate(adapter=adapter, num_examples=n, client_id=f"c{index}")


HEAD_CORRUPTIONS = [
    "none", "none", "none", "float64", "bfloat16", "wrong_shape", "broadcast", "extra_key", "missing_key", "nan",
    "inf", "int_dtype", "not_a_tensor", "not_a_dict", "sparse", "float8", "huge_norm", "1e300",
]
HEAD_BENIGN = {"none", "float64", "bfloat16"}
HEAD_HUGE = {"huge_norm", "1e300"}
HEAD_BROKEN = set(HEAD_CORRUPTIONS) - HEAD_BENIGN - HEAD_HUGE


def make_global_head(labels: int, hidden: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(labels, hidden, generator=g).to(dtype), "b": torch.randn(labels, generator=g).to(dtype)}


def make_head(global_head, index: int, corruption: str, seed: int) -> object:
    """A client's head: the global one plus a step of norm ~0.1 (all honest steps within 1.5x of each other)."""
    g = torch.Generator().manual_seed(seed)
    step = {k: torch.randn(t.shape, generator=g) for k, t in global_head.items()}
    size = sum(float((s**2).sum()) for s in step.values()) ** 0.5 or 1.0
    head = {k: (t.float() + 0.1 * (1 + 0.1 * index) * step[k] / size) for k, t in global_head.items()}
    w = head["w"]
    if corruption == "float64":
        head = {k: t.double() for k, t in head.items()}
    elif corruption == "bfloat16":
        head = {k: t.to(torch.bfloat16) for k, t in head.items()}
    elif corruption == "wrong_shape":
        head["w"] = torch.cat([w, w[:, :1]], dim=1)
    elif corruption == "broadcast":  # (1, hidden) for (labels, hidden): would silently broadcast into the average
        head["w"] = w[:1] if len(w) > 1 else w.repeat(2, 1)
    elif corruption == "extra_key":
        head["bias2"] = head["b"]
    elif corruption == "missing_key":
        del head["b"]
    elif corruption in ("nan", "inf"):
        w = w.clone()
        w.view(-1)[0] = float(corruption)
        head["w"] = w
    elif corruption == "int_dtype":
        head["w"] = w.to(torch.int32)
    elif corruption == "not_a_tensor":
        head["w"] = w.tolist()
    elif corruption == "not_a_dict":
        return list(head.values())
    elif corruption == "sparse":
        head["w"] = w.to_sparse()
    elif corruption == "float8":
        head["w"] = w.to(torch.float8_e4m3fn)
    elif corruption == "huge_norm":
        head = {k: global_head[k].float() + 1e6 * (t - global_head[k].float()) for k, t in head.items()}
    elif corruption == "1e300":  # finite in float64, Inf in the float32 model
        head = {k: torch.full(t.shape, 1e300, dtype=torch.float64) for k, t in head.items()}
    return head


def minority(count: int, n: int) -> bool:
    """Whether ``count`` outliers among ``n`` leave the round's median (median_low) to the others, or n == 1."""
    return n == 1 or count <= n - 1 - (n - 1) // 2


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(available_methods()),
    clients=st.lists(st.tuples(st.sampled_from(CORRUPTIONS), st.sampled_from(HEAD_CORRUPTIONS)), min_size=1, max_size=5),
    labels=st.integers(1, 3),
    hidden=st.integers(1, 5),
    head_dtype=st.sampled_from([torch.float32, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_hostile_updates_and_heads_never_corrupt_the_global_model(method, clients, labels, hidden, head_dtype, seed):
    g = make_global(seed)
    gh = make_global_head(labels, hidden, head_dtype, seed)
    before, head_before = copy.deepcopy(g), copy.deepcopy(gh)
    results = [ClientResult(make_update(g, i, c, seed + i + 1), make_head(gh, i, h, seed + 100 + i), 0.5, None)
               for i, (c, h) in enumerate(clients)]
    result, head = server_step(method, g, results, global_head=gh)  # must not raise: bad clients are rejections

    rejected = {e["client"] for e in result.metrics["rejected"]}
    assert all(e["reason"] for e in result.metrics["rejected"])
    name = [f"c{i}" for i in range(len(clients))]
    broken = {name[i] for i, (c, h) in enumerate(clients) if c in BROKEN - {"huge_norm"} or h in HEAD_BROKEN}
    honest = {name[i] for i, (c, h) in enumerate(clients) if c not in BROKEN and h in HEAD_BENIGN}
    assert broken <= rejected, (clients, result.metrics["rejected"])
    assert not honest & rejected, (clients, result.metrics["rejected"])
    screened = [i for i, (_, h) in enumerate(clients) if h not in HEAD_BROKEN]  # heads measured against each other
    if minority(sum(clients[i][1] in HEAD_HUGE for i in screened), len(screened)):
        assert {name[i] for i in screened if clients[i][1] in HEAD_HUGE} <= rejected
        factors = [i for i in screened if clients[i][1] not in HEAD_HUGE and clients[i][0] not in BROKEN - {"huge_norm"}]
        if factors and minority(sum(clients[i][0] == "huge_norm" for i in factors), len(factors)):
            assert {name[i] for i in factors if clients[i][0] == "huge_norm"} <= rejected
    for m in g:  # the caller's global model is never modified
        assert torch.equal(g[m].A, before[m].A) and torch.equal(g[m].B, before[m].B)
    assert all(torch.equal(gh[k], head_before[k]) for k in gh)
    if head is None:  # a skipped round leaves the global exactly as it was
        assert result.metrics["skipped"] is True and result.metrics["reason"]
        assert all(torch.equal(result.adapter[m].A, g[m].A) and torch.equal(result.adapter[m].B, g[m].B) for m in g)
        return
    assert result.metrics["skipped"] is False
    for m, pair in result.adapter.items():
        assert torch.isfinite(pair.A).all() and torch.isfinite(pair.B).all()
        assert pair.A.shape == g[m].A.shape and pair.B.shape == g[m].B.shape
    assert all(torch.isfinite(d).all() for d in result.base_delta.values())
    assert set(head) == set(gh)
    for k, t in head.items():
        assert t.shape == gh[k].shape and t.dtype == gh[k].dtype and torch.isfinite(t).all()
    accepted = [r for r in results if r.update.client_id not in rejected]
    if not {r.update.client_id for r in accepted} <= honest:  # hostile majority: it sets the round's median
        return
    clean, clean_head = server_step(method, g, accepted, global_head=gh)
    for m in g:  # rejected clients leave no trace
        assert torch.equal(result.adapter[m].A, clean.adapter[m].A) and torch.equal(result.adapter[m].B, clean.adapter[m].B)
    assert clean_head is not None and all(torch.equal(head[k], clean_head[k]) for k in gh)


def test_a_client_with_a_broken_head_is_rejected_before_the_head_average():
    g = make_global(0)
    gh = {"w": torch.zeros(2)}
    good = [ClientResult(make_update(g, i, "none", i), {"w": torch.full((2,), 0.1 * (i + 1))}, 0.5, None) for i in range(2)]
    bad = ClientResult(make_update(g, 2, "none", 9), {"w": torch.tensor([float("nan"), 1.0])}, 0.5, None)
    result, head = server_step("fedit", g, good + [bad], global_head=gh)
    assert [e["client"] for e in result.metrics["rejected"]] == ["c2"]
    assert torch.isfinite(head["w"]).all()
    _, only_good = server_step("fedit", g, good, global_head=gh)
    assert torch.equal(head["w"], only_good["w"])
    skipped, none = server_step("fedit", g, [bad], global_head=gh)
    assert none is None and skipped.metrics["skipped"] is True
