"""Property-based fuzzing of the aggregation entry point with malformed and hostile client updates.

Whatever the clients send, `aggregate` (default on_invalid="reject") never crashes, never returns
NaN, rejects exactly the broken clients, and the new global adapter is what the accepted clients
alone would give: rejected clients leave no trace.
"""

from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.aggregation import ClientUpdate, LoraPair, aggregate, available_methods
from fedlora.client import ClientResult
from fedlora.server import server_step

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


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(available_methods()),
    corruptions=st.lists(st.sampled_from(CORRUPTIONS), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_hostile_updates_never_corrupt_the_global_adapter(method, corruptions, seed):
    g = make_global(seed)
    before = copy.deepcopy(g)
    updates = [make_update(g, i, c, seed + i + 1) for i, c in enumerate(corruptions)]
    result = aggregate(method, g, updates)  # must not raise: per-client problems are rejections

    rejected = {e["client"] for e in result.metrics["rejected"]}
    broken = {f"c{i}" for i, c in enumerate(corruptions) if c in BROKEN - {"huge_norm"}}
    # A huge update is relative: it is caught when the round's (lower) median norm is a normal client's.
    valid = [c for c in corruptions if c not in BROKEN or c == "huge_norm"]
    huge = valid.count("huge_norm")
    if huge and huge <= len(valid) - 1 - (len(valid) - 1) // 2:
        broken |= {f"c{i}" for i, c in enumerate(corruptions) if c == "huge_norm"}
    assert rejected == broken, (corruptions, result.metrics["rejected"])
    for m in g:  # the caller's global adapter is never modified
        assert torch.equal(g[m].A, before[m].A) and torch.equal(g[m].B, before[m].B)
    for m, pair in result.adapter.items():
        assert torch.isfinite(pair.A).all() and torch.isfinite(pair.B).all()
        assert pair.A.shape == g[m].A.shape and pair.B.shape == g[m].B.shape
    accepted = [u for u in updates if u.client_id not in rejected]
    if not accepted:
        assert result.metrics["skipped"] is True
        assert all(torch.equal(result.adapter[m].A, g[m].A) and torch.equal(result.adapter[m].B, g[m].B) for m in g)
        return
    clean = aggregate(method, g, accepted)
    for m in g:  # rejected clients leave no trace
        assert torch.equal(result.adapter[m].A, clean.adapter[m].A) and torch.equal(result.adapter[m].B, clean.adapter[m].B)


def test_a_client_with_a_broken_head_is_rejected_before_the_head_average():
    g = make_global(0)
    good = [ClientResult(make_update(g, i, "none", i), {"w": torch.full((2,), float(i))}, 0.5, None) for i in range(2)]
    bad = ClientResult(make_update(g, 2, "none", 9), {"w": torch.tensor([float("nan"), 1.0])}, 0.5, None)
    result, head = server_step("fedit", g, good + [bad])
    assert [e["client"] for e in result.metrics["rejected"]] == ["c2"]
    assert torch.isfinite(head["w"]).all()
    _, only_good = server_step("fedit", g, good)
    assert torch.equal(head["w"], only_good["w"])
    skipped, none = server_step("fedit", g, [bad])
    assert none is None and skipped.metrics["skipped"] is True
