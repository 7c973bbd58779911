"""FedASK (two sketched sums per round): its maths and its multi-phase round.

Properties: with s >= U r sketch columns the result is the Eckart–Young optimum (the ``svd`` yardstick's
product), on non-square modules; fewer columns approximate it no better than the optimum; clients that agree
give exactly their own product (FedIT's, which is exact then); permuting the clients changes nothing; the
round run phase by phase through a channel (what the engines do) equals the one-process reference; a bad or
silent client in phase 2 is left out and named, and the server never receives a client's factors.
"""

from __future__ import annotations

import pytest
import torch

from fedlora.aggregation import ClientUpdate, LoraPair, aggregate, get_method
from fedlora.protocol.client import ClientResult
from fedlora.protocol.phases import InProcessChannel, first_upload, phased_server_step

SHAPES = {"q": (12, 9), "v": (5, 7)}  # (d, k), non-square both ways
RANK = 2


def _adapter(g: torch.Generator, zero_B: bool = False, dtype=torch.float64) -> dict[str, LoraPair]:
    return {m: LoraPair(A=torch.randn(RANK, k, generator=g, dtype=dtype),
                        B=torch.zeros(d, RANK, dtype=dtype) if zero_B else torch.randn(d, RANK, generator=g, dtype=dtype))
            for m, (d, k) in SHAPES.items()}


def _round(clients: int = 3, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    global_adapter = _adapter(g, zero_B=True, dtype=dtype)
    updates = [ClientUpdate(_adapter(g, dtype=dtype), 10 + 5 * i, f"c{i}") for i in range(clients)]
    return global_adapter, updates


def _products(result) -> dict[str, torch.Tensor]:
    return {m: p.product() for m, p in result.adapter.items()}


OFF = dict(clip=None, norm_bound=None)


def test_enough_sketch_columns_give_the_eckart_young_optimum() -> None:
    g, updates = _round()
    fedask = aggregate("fedask", g, updates, seed=7, sketch=6, **OFF)  # s = 6 >= U r = 6 (v: min(d, k) = 5 = rank M)
    optimum = aggregate("svd", g, updates, **OFF)
    for m, product in _products(fedask).items():
        assert torch.allclose(product, optimum.adapter[m].product(), atol=1e-10)
    assert fedask.metrics["divergence"] == pytest.approx(optimum.metrics["divergence"], rel=1e-9)
    small = aggregate("fedask", g, updates, seed=7, sketch=3, **OFF)
    assert small.metrics["divergence"] >= optimum.metrics["divergence"] - 1e-12


def test_clients_that_agree_get_their_own_product_like_fedit() -> None:
    g, updates = _round(clients=1)
    same = [ClientUpdate(updates[0].adapter, 10 * (i + 1), f"c{i}") for i in range(3)]
    fedask = aggregate("fedask", g, same, seed=1, **OFF)  # default s = 4 r
    fedit = aggregate("fedit", g, same, **OFF)
    for m, product in _products(fedask).items():
        assert torch.allclose(product, fedit.adapter[m].product(), atol=1e-10)
        assert torch.allclose(product, same[0].adapter[m].product(), atol=1e-10)


def test_permuting_clients_changes_nothing() -> None:
    g, updates = _round(clients=4)
    a = aggregate("fedask", g, updates, seed=3, sketch=4, **OFF)
    b = aggregate("fedask", g, updates[::-1], seed=3, sketch=4, **OFF)
    for m, product in _products(a).items():
        assert torch.allclose(product, b.adapter[m].product(), atol=1e-12)


def _results(updates, options):
    phased = get_method("fedask").phased
    return [ClientResult(update=u, head={}, loss=0.0, local_metrics=None,
                         first_upload=first_upload(phased, u.adapter, options)) for u in updates]


def test_the_round_phase_by_phase_equals_the_one_process_reference() -> None:
    g, updates = _round(dtype=torch.float32)  # float32 clients, as on the wire
    options = {"seed": 11, "sketch": 4}
    results = _results(updates, options)
    step = phased_server_step("fedask", g, results, global_head={}, options=options, round_index=1,
                              channel=InProcessChannel(get_method("fedask").phased, results, options))
    reference = aggregate("fedask", g, updates, seed=11, sketch=4, weighting="examples", **OFF)
    for m, product in _products(step.result).items():
        assert torch.allclose(product, reference.adapter[m].product(), rtol=1e-4, atol=1e-5)  # float32 uploads
    assert step.result.metrics["num_clients"] == 3 and step.result.metrics["phases"] == 2
    # per client up: Y (d, s) + Z (k, s), float32
    assert step.result.metrics["bytes_up"] == 3 * 4 * sum(4 * (d + k) for d, k in SHAPES.values())


class _Channel:
    """Phase 2 as a hostile or failing network delivers it: c1 sends a wrong shape, c2 does not answer."""

    def __init__(self, honest: InProcessChannel) -> None:
        self.honest = honest
        self.asked: list[dict] = []

    def exchange(self, phase, clients, broadcast):
        self.asked.append({"phase": phase, "clients": list(clients), "broadcast": sorted(broadcast)})
        uploads = self.honest.exchange(phase, clients, broadcast)
        uploads["c1"] = {m: torch.zeros(3, 3) for m in uploads["c1"]}
        del uploads["c2"]
        return uploads


def test_a_client_that_fails_a_later_phase_is_left_out_and_named() -> None:
    g, updates = _round(dtype=torch.float32)
    options = {"seed": 2, "sketch": 4}
    results = _results(updates, options)
    channel = _Channel(InProcessChannel(get_method("fedask").phased, results, options))
    step = phased_server_step("fedask", g, results, global_head={}, options=options, round_index=1, channel=channel)
    assert channel.asked == [{"phase": 2, "clients": ["c0", "c1", "c2"], "broadcast": sorted(SHAPES)}]
    assert [e["client"] for e in step.result.metrics["rejected"]] == ["c1"]
    assert step.result.metrics["num_clients"] == 1 and list(step.result.metrics["weights"]) == ["c0"]
    assert not step.skipped
    broken = [ClientResult(update=results[0].update, head={}, loss=0.0, local_metrics=None, first_upload=None)]
    skipped = phased_server_step("fedask", g, broken, global_head={}, options=options, round_index=1, channel=channel)
    assert skipped.skipped and "phase 1" in skipped.result.metrics["reason"]


def test_fedask_declares_a_sums_only_two_phase_round_that_uploads_no_factor() -> None:
    spec = get_method("fedask")
    assert spec.phased is not None and spec.phased.phases == 2
    assert not spec.policy.needs_individual_updates
    assert not spec.policy.upload_A and not spec.policy.upload_B
