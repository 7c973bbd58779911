"""The "Extending fedlora" examples (docs/extending.md) work as written: a new method and a new task, one file each."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedlora.aggregation import ClientUpdate, LoraPair, aggregate, available_methods, get_method  # noqa: E402
from fedlora.aggregation import registry as method_registry  # noqa: E402
from fedlora.config.run import ConfigError, RunConfig  # noqa: E402


@pytest.fixture(scope="module")
def median_method():
    module = importlib.import_module("examples.custom_method")
    yield module
    method_registry._REGISTRY.pop("median", None)  # noqa: SLF001 -- keep other tests' method lists as shipped


def adapter(seed: int, d: int = 6, k: int = 5, r: int = 2) -> dict[str, LoraPair]:
    g = torch.Generator().manual_seed(seed)
    return {m: LoraPair(A=torch.randn(r, k, generator=g), B=torch.randn(d, r, generator=g)) for m in ("q", "v")}


def test_a_new_method_is_one_decorated_function(median_method):
    assert "median" in available_methods()
    assert get_method("median").options == ("min_clients_for_median",)
    honest = [ClientUpdate(adapter(s), 10, f"c{s}") for s in range(4)]
    poisoned = ClientUpdate({m: LoraPair(A=p.A * 50, B=p.B * 50) for m, p in adapter(9).items()}, 10, "evil")
    result = aggregate("median", adapter(0), [*honest, poisoned], norm_bound=None)
    for module, pair in result.adapter.items():  # one outlier cannot leave the honest clients' range
        As = torch.stack([u.adapter[module].A for u in honest])
        assert bool(((pair.A >= As.min(0).values - 1e-6) & (pair.A <= As.max(0).values + 1e-6)).all())
    fedit = aggregate("fedit", adapter(0), [*honest, poisoned], norm_bound=None)
    assert (result.metrics["bytes_up"], result.metrics["bytes_down"]) == (fedit.metrics["bytes_up"], fedit.metrics["bytes_down"])
    permuted = aggregate("median", adapter(0), [poisoned, *reversed(honest)], norm_bound=None)
    assert all(torch.equal(permuted.adapter[m].A, result.adapter[m].A) for m in result.adapter)


def test_a_new_methods_options_are_checked_from_its_signature(median_method):
    assert RunConfig(method="median", method_options={"min_clients_for_median": "5"}).method_options == {"min_clients_for_median": 5}
    with pytest.raises(ConfigError, match="min_clients_for_median=0 is invalid: must be >= 1"):
        RunConfig(method="median", method_options={"min_clients_for_median": 0})


@pytest.fixture(scope="module")
def reviews_task():
    from fedlora.tasks import base as task_registry

    module = importlib.import_module("examples.custom_task")
    yield module
    task_registry._REGISTRY.pop("reviews", None)  # noqa: SLF001


@pytest.mark.slow
def test_a_new_task_is_one_decorated_class_and_runs_end_to_end(reviews_task, tmp_path):
    import json

    from fedlora.engines import local as simulation

    words = {0: ["dull", "awful", "boring", "bad"], 1: ["great", "lovely", "superb", "good"]}
    for split, n in (("train", 24), ("test", 8)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"text": f"a {words[i % 2][i % 4]} film", "label": i % 2}) + "\n")
    config = RunConfig(task="reviews", data_dir=str(tmp_path), method="fedit", rounds=1, clients=2, local_steps=2,
                       batch_size=4, max_length=16, eval_local_every=0, out=str(tmp_path / "run"))
    history = simulation.run(config, progress=False)
    assert history[-1]["round"] == 1 and 0.0 <= history[-1]["global_metric"] <= 1.0
    assert history[-1]["clients"] == ["client-0", "client-1"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    with pytest.raises(ConfigError, match="--task"):
        RunConfig(task="reviewz")
