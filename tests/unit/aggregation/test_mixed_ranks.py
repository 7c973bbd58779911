"""Per-client ranks: the rank boundary (truncate / SVD / zero-padding), exactness, bytes, and both engines' runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedlora.protocol import server as server_module  # noqa: E402
from fedlora.engines import local as simulation  # noqa: E402
from fedlora.aggregation import ClientUpdate, LoraPair, aggregate, get_method  # noqa: E402
from fedlora.aggregation.ranks import assign_ranks, pad, restrict, to_client, truncate  # noqa: E402
from fedlora.config.run import ConfigError, RunConfig  # noqa: E402

D, K, R = 7, 5, 4  # non-square on purpose


def adapter(seed: int, rank: int = R, zero_B: bool = False) -> dict[str, LoraPair]:
    g = torch.Generator().manual_seed(seed)
    return {
        "m1": LoraPair(A=torch.randn(rank, K, generator=g, dtype=torch.float64),
                       B=torch.zeros(D, rank, dtype=torch.float64) if zero_B else torch.randn(D, rank, generator=g, dtype=torch.float64)),
        "m2": LoraPair(A=torch.randn(rank, D, generator=g, dtype=torch.float64),
                       B=torch.randn(K, rank, generator=g, dtype=torch.float64)),
    }


def test_assign_ranks_explicit_drawn_and_default():
    assert assign_ranks((), 3, 8, 0) == [8, 8, 8]
    assert assign_ranks((2, 4, 8), 3, 8, 0) == [2, 4, 8]  # one per client: as given
    drawn = assign_ranks((2, 4), 50, 8, 0)
    assert set(drawn) == {2, 4} and drawn == assign_ranks((2, 4), 50, 8, 0)  # seeded
    assert drawn != assign_ranks((2, 4), 50, 8, 1)


def test_truncate_then_pad_is_restrict_and_keeps_the_leading_components():
    a = adapter(0)
    for rank in (1, 2, R):
        padded = pad(truncate(a, rank), R)
        for m in a:
            assert torch.equal(padded[m].A, restrict(a, rank)[m].A) and torch.equal(padded[m].B, restrict(a, rank)[m].B)
            assert torch.equal(padded[m].A[:rank], a[m].A[:rank]) and not padded[m].A[rank:].any()
            assert padded[m].B.shape == a[m].B.shape and not padded[m].B[:, rank:].any()


def test_svd_map_gives_the_best_rank_r_approximation_of_the_product():
    a = adapter(1)
    for rank in (1, 2, 3):
        mapped = to_client(a, rank, "svd")
        for m, pair in a.items():
            U, S, Vh = torch.linalg.svd(pair.product())
            best = U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]  # Eckart–Young
            assert mapped[m].A.shape == (rank, pair.A.shape[1]) and mapped[m].B.shape == (pair.B.shape[0], rank)
            torch.testing.assert_close(mapped[m].product(), best, atol=1e-9, rtol=1e-9)
            # balanced split: ‖B‖ = ‖A‖, as the SVD aggregator writes it
            assert float(mapped[m].A.norm()) == pytest.approx(float(mapped[m].B.norm()), rel=1e-9)


def test_svd_map_of_a_zero_product_keeps_trainable_factors():
    """Round 1 (B = 0): no singular direction; the client must still get A ≠ 0 or LoRA never trains."""
    a = adapter(2, zero_B=True)
    mapped = to_client(a, 2, "svd")["m1"]
    assert torch.equal(mapped.A, a["m1"].A[:2]) and not mapped.B.any()


def test_svd_aggregate_of_zero_padded_clients_is_exact_when_the_ranks_fit():
    """Σ_u r_u ≤ R: T = Σ w_u B_u A_u has rank ≤ R, so the optimal rank-R aggregate is T itself."""
    ranks = [1, 1, 2]  # Σ = 4 = R
    g = adapter(3, zero_B=True)
    updates = [ClientUpdate(pad(truncate(adapter(10 + u), r), R), 10 + u, f"c{u}") for u, r in enumerate(ranks)]
    exact = aggregate("svd", g, updates, client_ranks={f"c{u}": r for u, r in enumerate(ranks)})
    assert exact.metrics["divergence"] < 1e-7  # Gram-based SVD: exact to ~1e-8 (fedlora.aggregation.lowrank)
    assert aggregate("fedit", g, updates).metrics["divergence"] > 1e-3  # the factor average is not exact here


def test_bytes_count_each_client_at_its_own_rank():
    ranks = {"c0": 1, "c1": 3}
    g = adapter(4)
    updates = [ClientUpdate(pad(truncate(adapter(20 + u), r), R), 5, c) for u, (c, r) in enumerate(ranks.items())]
    result = aggregate("fedit", g, updates, client_ranks=ranks)
    per_rank = sum(r * K + D * r + r * D + K * r for r in ranks.values())  # both modules, A and B
    assert result.metrics["bytes_up"] == result.metrics["bytes_down"] == 4 * per_rank
    ffa = aggregate("ffa-lora", g, updates, client_ranks=ranks)
    assert ffa.metrics["bytes_up"] == 4 * sum(D * r + K * r for r in ranks.values())  # B only


def test_config_validates_client_ranks():
    with pytest.raises(ConfigError, match="client-ranks"):
        RunConfig(rank=4, client_ranks=(2, 5))
    with pytest.raises(ConfigError, match="does not support mixed client ranks"):
        RunConfig(method="flora", rank=4, client_ranks=(2, 4))
    with pytest.raises(ConfigError, match="rank-map"):
        RunConfig(method="ffa-lora", rank=4, client_ranks=(2, 4), rank_map="svd")
    for method in ("fedsvd", "rolora", "fedsa-lora"):  # a frozen/alternating/private factor: truncation only
        with pytest.raises(ConfigError, match="rank-map"):
            RunConfig(method=method, rank=4, client_ranks=(2, 4), rank_map="svd")
    with pytest.raises(ConfigError, match="rank-map"):
        RunConfig(rank_map="bogus")
    assert RunConfig(method="flora", rank=4, client_ranks=(4, 4)).client_ranks == (4, 4)  # equal ranks: not mixed
    assert not get_method("flora").policy.mixed_ranks and get_method("fedit").policy.mixed_ranks


# -- the local engine, end to end on the toy task ---------------------------------------------------------------
def tiny(tmp_path: Path, method: str = "fedit", **changes) -> RunConfig:
    base = dict(task="toy", method=method, rounds=2, clients=3, alpha=0.5, local_steps=2, batch_size=4, lr=1e-2,
                max_length=24, eval_local_every=0, max_eval_examples=16, device="cpu", rank=4, out=str(tmp_path / method))
    return RunConfig(**(base | changes))


def capture_updates(monkeypatch) -> list[list[ClientUpdate]]:
    seen: list[list[ClientUpdate]] = []
    real = server_module.server_step

    def spy(method, global_adapter, results, **kwargs):
        seen.append([r.update for r in results])
        return real(method, global_adapter, results, **kwargs)

    monkeypatch.setattr("fedlora.protocol.rounds.server_step", spy)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("rank_map", ["svd"])  # truncation runs in the Flower test (tests/integration/test_flower_simulation.py)
def test_mixed_rank_clients_train_only_their_components(tmp_path, monkeypatch, rank_map):
    seen = capture_updates(monkeypatch)
    config = tiny(tmp_path, client_ranks=(1, 2, 4), rank_map=rank_map)
    history = simulation.run(config, progress=False)
    assert len(seen) == 2 and all(not r["skipped"] for r in history)
    for updates in seen:
        for update, rank in zip(updates, (1, 2, 4)):
            for pair in update.adapter.values():
                assert not pair.A[rank:].any() and not pair.B[:, rank:].any()  # exactly zero, not just small
                assert pair.A[:rank].abs().sum() > 0
    per_client = {r: 4 * sum(r * (p.A.shape[1] + p.B.shape[0]) for p in seen[0][0].adapter.values()) for r in (1, 2, 4)}
    assert history[0]["lora_bytes_up"] == sum(per_client.values())  # each client at its own rank


@pytest.mark.slow
def test_equal_client_ranks_reproduce_the_plain_run(tmp_path):
    plain = simulation.run(tiny(tmp_path / "plain", rounds=1), progress=False)
    equal = simulation.run(tiny(tmp_path / "equal", rounds=1, client_ranks=(4, 4, 4), rank_map="svd"), progress=False)
    timing = {"wall_seconds", "solve_seconds", "server_seconds"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in plain] == \
           [{k: v for k, v in r.items() if k not in timing} for r in equal]


@pytest.mark.slow
def test_a_client_cannot_write_beyond_its_rank(tmp_path, monkeypatch):
    """An untrusted rank-1 client that fills every component gets only its first one aggregated."""
    import fedlora.protocol.plan as plan_module

    real_train = plan_module.train_planned
    seen = capture_updates(monkeypatch)

    def hostile(model, client, index, task, tokenizer, config, plan, start):
        result = real_train(model, client, index, task, tokenizer, config, plan, start)
        if index == 0:
            for pair in result.update.adapter.values():
                pair.A.fill_(1e3)
                pair.B.fill_(1e3)
        return result

    monkeypatch.setattr("fedlora.engines.local.train_planned", hostile)
    simulation.run(tiny(tmp_path, client_ranks=(1, 4, 4), rounds=1), progress=False)
    for pair in seen[0][0].adapter.values():
        assert not pair.A[1:].any() and not pair.B[:, 1:].any()


@pytest.mark.slow
def test_honest_mixed_rank_clients_of_a_toy_run_are_neither_clipped_nor_rejected(tmp_path):
    """Issue 21, item 7: each update is measured from what its client was sent, not from the full-rank global
    (whose components beyond r_u made a rank-1 client's norm ~50x the median: clipped every round)."""
    history = simulation.run(tiny(tmp_path, rounds=1, client_ranks=(4, 4, 1), lr=2e-4), progress=False)
    assert [(r["clipped"], r["rejected"]) for r in history] == [([], [])]
