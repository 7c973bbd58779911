"""Aggregation runs on whatever single device its inputs are on, and refuses inputs spread over several.

Without an accelerator the ``meta`` device plays the second device: it carries shapes, dtypes and
devices but no values, which is enough for every method whose maths does not look at values. The
value-dependent methods (svd, flora-na) are checked by a spy on torch's tensor factories instead:
every tensor they create must be asked for on the input device. On machines with CUDA or MPS the
last test compares every method's result there with the CPU result.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from torch import Tensor

from fedlora.aggregation import AggregationError, ClientUpdate, LoraPair, aggregate, available_methods
from fedlora.aggregation.outcome import walk_tensors
from fedlora.testing.synthetic import least_squares_clients

SHAPES = {"attn.q": (6, 5), "attn.v": (6, 5), "mlp.up": (4, 7)}  # (d, k): non-square, two of one shape
RANK = 2
CLIENTS = 3
ALL = available_methods()
# Methods that run on the meta device (no decision on the host depends on a tensor value; FedSVD's
# and FedRot-LoRA's QR/SVDs have meta kernels) and those that do not (an SVD's numerical rank, a
# solver's convergence test).
VALUE_FREE = {"fedit", "ffa-lora", "fedex-lora", "flora", "fedsa-lora", "fedsvd", "rolora", "fedrot-lora", "fedask"}
VALUE_DEPENDENT = {"svd", "flora-na", "svd-ef", "flora-na-stable"}
# Every method, plus the options that take other code paths (uniform weights, FLoRA-NA's solvers,
# scopes and its "authors" weighting, which builds its own solve weights).
CASES = [(m, {}) for m in ALL] + [
    ("fedit", {"weighting": "uniform"}),
    ("flora", {"seed": 7}),
    ("flora-na", {"solver": "adamw", "steps": 3}),
    ("flora-na", {"scope": "global"}),
    ("flora-na", {"weighting": "authors"}),
    ("flora-na", {"ridge": 1.0, "max_deviation": 0.1}),
    ("flora-na", {"align": "rotation"}),
]
CASE_IDS = [m + "".join(f"-{k}={v}" for k, v in o.items()) for m, o in CASES]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (
    ["mps"] if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available() else []
)


@pytest.fixture(scope="module")
def clients() -> tuple[dict[str, LoraPair], list[ClientUpdate]]:
    return least_squares_clients(SHAPES, RANK, CLIENTS, seed=4)


def moved_pair(pair: LoraPair, device: str | torch.device, factor: str = "AB") -> LoraPair:
    return LoraPair(
        A=pair.A.to(device) if "A" in factor else pair.A,
        B=pair.B.to(device) if "B" in factor else pair.B,
    )


def moved(adapter: dict[str, LoraPair], device: str | torch.device) -> dict[str, LoraPair]:
    return {m: moved_pair(p, device) for m, p in adapter.items()}


def moved_update(update: ClientUpdate, device: str | torch.device) -> ClientUpdate:
    return ClientUpdate(moved(update.adapter, device), update.num_examples, update.client_id)


tensors = walk_tensors  # every tensor inside a value, with where it sits (the engine's own walker)


def result_tensors(result) -> list[tuple[str, Tensor]]:
    return [
        *tensors(result.adapter, "adapter"),
        *tensors(result.base_delta, "base_delta"),
        *tensors(result.extras, "extras"),
    ]


def assert_scalar_metrics(metrics: dict[str, Any]) -> None:
    assert not list(tensors(metrics)), "metrics must hold no tensors"
    for key in ("divergence", "eckart_young_bound", "solve_seconds"):
        assert type(metrics[key]) is float, (key, type(metrics[key]))
    assert all(type(v) is float for v in metrics["divergence_per_module"].values())


def test_every_method_is_classified_for_the_meta_device():
    assert VALUE_FREE | VALUE_DEPENDENT == set(ALL) and not VALUE_FREE & VALUE_DEPENDENT


# (1) Results come back on the input device.


@pytest.mark.parametrize("method,options", [c for c in CASES if c[0] in VALUE_FREE],
                         ids=[i for i, c in zip(CASE_IDS, CASES) if c[0] in VALUE_FREE])
def test_results_come_back_on_the_meta_device(clients, method, options):
    g, ups = clients
    result = aggregate(method, moved(g, "meta"), [moved_update(u, "meta") for u in ups], **options)
    found = result_tensors(result)
    assert {p for p, _ in found} >= {f"adapter[{m!r}].{f}" for m in SHAPES for f in "AB"}
    assert not [p for p, t in found if t.device.type != "meta"], [(p, t.device) for p, t in found]
    for m, (d, k) in SHAPES.items():
        assert result.adapter[m].A.shape == (RANK, k) and result.adapter[m].B.shape == (d, RANK)
        assert result.adapter[m].A.dtype == g[m].A.dtype and result.adapter[m].B.dtype == g[m].B.dtype
    assert all(t.dtype == g["attn.q"].A.dtype and t.shape == SHAPES[m] for m, t in result.base_delta.items())
    if method in ("fedex-lora", "flora"):
        assert set(result.base_delta) == set(SHAPES)
    assert_scalar_metrics(result.metrics)  # NaN on meta, but Python floats
    assert result.metrics["rejected"] == [] and result.metrics["skipped"] is False


@pytest.mark.parametrize("method", sorted(VALUE_DEPENDENT))
def test_value_dependent_methods_refuse_the_meta_device_by_name(clients, method):
    g, ups = clients
    with pytest.raises(AggregationError, match=rf"{method}.*meta device"):
        aggregate(method, moved(g, "meta"), [moved_update(u, "meta") for u in ups])


FACTORIES = (
    "empty", "zeros", "ones", "full", "eye", "tensor", "as_tensor", "arange", "linspace",
    "rand", "randn", "randint", "randperm", "empty_strided", "scalar_tensor",
)


@pytest.fixture
def factory_calls(monkeypatch) -> list[tuple[str, str, dict[str, Any]]]:
    """Record every torch factory call made directly by fedlora.aggregation code: (caller, factory, kwargs)."""
    calls: list[tuple[str, str, dict[str, Any]]] = []
    for name in FACTORIES:
        original = getattr(torch, name)

        def spy(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("fedlora.aggregation"):
                calls.append((caller, _name, dict(kwargs)))
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, spy)
    return calls


@pytest.mark.parametrize("method,options", CASES, ids=CASE_IDS)
def test_every_tensor_created_inside_aggregation_is_asked_for_on_the_input_device(
    clients, factory_calls, method, options
):
    """The mocked second device: a factory call without ``device=`` would land on the CPU.

    Random draws from a generator are the one exception, on the CPU by design (FLoRA's re-init is
    drawn there so that every device and the Flower client get the same numbers).
    """
    g, ups = clients
    device = g["attn.q"].A.device
    result = aggregate(method, g, ups, **options)
    assert factory_calls, "the spy saw no factory call at all: it is not watching"
    wrong = []
    for caller, name, kwargs in factory_calls:
        expected = torch.device("cpu") if "generator" in kwargs else device
        if "device" not in kwargs or torch.device(kwargs["device"]) != expected:
            wrong.append((caller, name, kwargs.get("device", "<no device>")))
    assert not wrong, f"tensors created off the input device: {wrong}"
    assert all(t.device == device for _, t in result_tensors(result))


# (2) Mixed devices: the global adapter raises; clients are rejected, naming the device.


@pytest.mark.parametrize(
    "spread",
    [
        pytest.param(lambda g: {**g, "mlp.up": moved_pair(g["mlp.up"], "meta", "B")}, id="B-of-one-module"),
        pytest.param(lambda g: {**g, "attn.v": moved_pair(g["attn.v"], "meta", "A")}, id="A-of-one-module"),
        pytest.param(lambda g: {**g, "attn.v": moved_pair(g["attn.v"], "meta")}, id="one-whole-module"),
    ],
)
@pytest.mark.parametrize("method", ALL)
def test_a_global_adapter_on_mixed_devices_raises_naming_the_device(clients, spread, method):
    g, ups = clients
    with pytest.raises(AggregationError, match=r"global adapter.*device meta") as info:
        aggregate(method, spread(g), ups)
    assert "cpu" in str(info.value)


def bad_clients(ups: list[ClientUpdate], device: str) -> list[ClientUpdate]:
    """Two more clients like the first: one wholly on ``device``, one with a single factor there."""
    whole = ClientUpdate(moved(ups[0].adapter, device), ups[0].num_examples, "whole-on-" + device)
    one = dict(ups[1].adapter)
    one["attn.v"] = moved_pair(one["attn.v"], device, "B")
    return [whole, ClientUpdate(one, ups[1].num_examples, "one-factor-on-" + device)]


@pytest.mark.parametrize("method", ALL)
def test_clients_on_another_device_are_rejected_with_the_device_in_the_reason(clients, method):
    g, ups = clients
    bad = bad_clients(ups, "meta")
    result = aggregate(method, g, ups[:1] + bad + ups[1:], on_invalid="reject")
    reasons = {e["client"]: e["reason"] for e in result.metrics["rejected"]}
    assert set(reasons) == {u.client_id for u in bad}
    assert all("meta" in reason and "cpu" in reason for reason in reasons.values()), reasons
    assert "'attn.v'" in reasons["one-factor-on-meta"]
    # The rejected clients leave no trace: the round is what the good clients alone give.
    clean = aggregate(method, g, ups)
    for m in SHAPES:
        assert torch.equal(result.adapter[m].A, clean.adapter[m].A) and torch.equal(result.adapter[m].B, clean.adapter[m].B)
    assert all(t.device.type == "cpu" for _, t in result_tensors(result))


@pytest.mark.parametrize("method", ALL)
def test_clients_on_another_device_raise_when_asked_to(clients, method):
    g, ups = clients
    with pytest.raises(AggregationError, match=r"whole-on-meta.*device meta") as info:
        aggregate(method, g, ups + bad_clients(ups, "meta"), on_invalid="raise")
    assert "one-factor-on-meta" in str(info.value)


@pytest.mark.parametrize("method", ALL)
def test_a_cpu_client_is_refused_by_a_round_on_another_device(clients, method):
    g, ups = clients
    on_meta = [moved_update(u, "meta") for u in ups[1:]]
    with pytest.raises(AggregationError, match=rf"{ups[0].client_id}.*device cpu.*device meta"):
        aggregate(method, moved(g, "meta"), ups[:1] + on_meta, on_invalid="raise")


# (3) Every available device gives the CPU's answer.


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method,options", CASES, ids=CASE_IDS)
def test_every_device_gives_the_cpu_result(clients, device, method, options):
    g, ups = clients
    reference = aggregate(method, g, ups, **options)
    result = aggregate(method, moved(g, device), [moved_update(u, device) for u in ups], **options)
    expected, got = dict(result_tensors(reference)), dict(result_tensors(result))
    assert set(got) == set(expected)
    target = torch.empty(0, device=device).device  # "cuda" resolved to the current index
    for path, tensor in got.items():
        assert tensor.device == target, (path, tensor.device)
        reference_tensor = expected[path]
        assert tensor.shape == reference_tensor.shape, path
        if path.startswith(("adapter", "base_delta")):
            assert tensor.dtype == reference_tensor.dtype, path
        torch.testing.assert_close(
            tensor.cpu().to(reference_tensor.dtype), reference_tensor, rtol=1e-4, atol=1e-6, msg=lambda m, path=path: f"{path}: {m}"
        )
    if method == "flora":  # the re-initialised adapter is drawn on the CPU: bit-identical everywhere
        assert all(torch.equal(result.adapter[m].A.cpu(), reference.adapter[m].A) for m in SHAPES)
    assert_scalar_metrics(result.metrics)
    for key in ("divergence", "eckart_young_bound"):
        assert result.metrics[key] == pytest.approx(reference.metrics[key], rel=1e-4, abs=1e-9)
