"""Differential privacy through `fedlora run`: user-level DP-FedAvg and record-level DP-SGD (the local engine;
Flower: tests/integration/test_flower_simulation.py runs both and checks they equal the local engine).

Properties: with a vanishing noise and a clip nobody reaches, DP-FedAvg is FedIT with uniform weights (the
mechanism adds nothing else); every round records the ε the accountant says it spent, growing, and the
divergence is not measured (it would need individual updates); a budget smaller than the planned rounds
stops the run after the last round it affords, with the final adapter saved; the same seed gives the same
noised run, another seed another; a resumed DP run ends where an uninterrupted one does. Record-level DP-SGD
records the ε that bounds every client's (the smallest client, every round), stops at its budget, and is
refused where the split or the training knobs cannot give it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlora.config.run import ConfigError, RunConfig
from fedlora.engines.local import run
from fedlora.privacy.accountant import epsilon_spent

TINY = dict(task="toy", rounds=3, clients=4, alpha=None, local_steps=2, batch_size=4, lr=5e-3, max_length=32,
            eval_local_every=0, max_eval_examples=16, seed=0, method="fedit")


def _run(tmp_path: Path, name: str, model: str, **changes) -> tuple[list[dict], dict[str, torch.Tensor]]:
    out = tmp_path / name
    history = run(RunConfig(model=model, out=str(out), **(TINY | changes)), progress=False)
    return history, load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_dp_without_noise_or_clipping_is_fedit_with_uniform_weights(tmp_path, tiny_bert_path):
    # IID equal-size clients: FedIT's example-weighted head average is uniform too
    _, plain = _run(tmp_path, "plain", tiny_bert_path, clip_factor=0.0, method_options={"weighting": "uniform"})
    history, private = _run(tmp_path, "dp", tiny_bert_path, dp_clip=1e6, dp_noise=1e-12)
    assert plain.keys() == private.keys()
    for key in plain:
        # float32 rounding: the mean of (update - start) + start vs the mean of updates, over 3 rounds (max seen 9e-6)
        assert torch.allclose(plain[key], private[key], rtol=1e-4, atol=3e-5), key
    assert all(r["divergence"] is None and not r["divergence_measured"] for r in history)
    assert all(r["clipped"] == [] for r in history)


def test_every_round_records_the_epsilon_spent_and_noise_moves_the_model(tmp_path, tiny_bert_path):
    history, noised = _run(tmp_path, "dp", tiny_bert_path, dp_clip=0.05, dp_epsilon=5.0)
    z = history[0]["dp_noise_multiplier"]
    spent = [r["dp_epsilon"] for r in history]
    assert spent == [pytest.approx(epsilon_spent(z, t, 4, 4, 1e-5)) for t in (1, 2, 3)]
    assert spent[0] < spent[1] < spent[2] == pytest.approx(5.0, rel=1e-3)
    assert all(r["dp_clip"] == 0.05 and r["dp_delta"] == 1e-5 for r in history)
    assert any(r["clipped"] for r in history)  # C = 0.05 is below these clients' update norms
    card = (tmp_path / "dp" / "adapter" / "README.md").read_text()
    assert "ε = 5" in card and "δ = 1e-05" in card
    again, same = _run(tmp_path, "dp-again", tiny_bert_path, dp_clip=0.05, dp_epsilon=5.0)
    assert all(torch.equal(noised[k], same[k]) for k in noised)  # seeded noise: reproducible
    _, other = _run(tmp_path, "dp-seed1", tiny_bert_path, dp_clip=0.05, dp_epsilon=5.0, seed=1)
    assert not all(torch.equal(noised[k], other[k]) for k in noised)


def test_a_budget_smaller_than_the_plan_stops_the_run_after_the_last_affordable_round(tmp_path, tiny_bert_path,
                                                                                     caplog):
    z = 2.0
    budget = (epsilon_spent(z, 2, 4, 4, 1e-5) + epsilon_spent(z, 3, 4, 4, 1e-5)) / 2  # affords 2 rounds, not 3
    with caplog.at_level("WARNING"):
        history, _ = _run(tmp_path, "budget", tiny_bert_path, dp_clip=0.1, dp_noise=z, dp_epsilon=budget)
    assert [r["round"] for r in history] == [1, 2]
    assert history[-1]["dp_epsilon"] <= budget
    assert "affords 2 of the 3 planned rounds" in caplog.text
    assert (tmp_path / "budget" / "adapter" / "adapter_model.safetensors").exists()
    lines = (tmp_path / "budget" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]


def test_a_resumed_dp_run_ends_where_an_uninterrupted_one_does(tmp_path, tiny_bert_path):
    _, whole = _run(tmp_path, "whole", tiny_bert_path, dp_clip=0.1, dp_noise=1.0)
    out = tmp_path / "resumed"
    run(RunConfig(model=tiny_bert_path, out=str(out), **(TINY | dict(rounds=1, dp_clip=0.1, dp_noise=1.0))),
        progress=False)
    run(RunConfig(model=tiny_bert_path, out=str(out), **(TINY | dict(dp_clip=0.1, dp_noise=1.0))), resume=True,
        progress=False)
    resumed = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(torch.allclose(whole[k], resumed[k], atol=1e-6) for k in whole)


@pytest.mark.parametrize("changes, message", [
    (dict(method="flora-na"), "need only sums"),
    (dict(method="fedsa-lora"), "private B"),
    (dict(dp_epsilon=0.0), "--dp-epsilon"),
    (dict(dp_delta=0.5), "1/--clients"),
    (dict(client_ranks=(4, 8, 8, 8)), "mixed client ranks"),
    (dict(method_options={"weighting": "examples"}), "weighs every client equally"),
])
def test_dp_refuses_what_it_cannot_make_private(changes, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**(TINY | dict(dp_clip=1.0, dp_epsilon=3.0) | changes))
    with pytest.raises(ConfigError, match="--dp-clip"):
        RunConfig(**(TINY | dict(dp_epsilon=3.0)))


def test_record_level_dp_sgd_records_the_bound_of_every_client_and_stops_at_its_budget(tmp_path, tiny_bert_path,
                                                                                      caplog):
    from fedlora.protocol.federation import build_federation, load_data

    config = RunConfig(model=tiny_bert_path, out=str(tmp_path / "x"), **(TINY | dict(dp_sgd_clip=1.0, dp_sgd_noise=1.5,
                                                                                       dp_sgd_delta=1e-3)))
    from fedlora.tasks.build import build_model

    _, tokenizer = build_model(config)
    smallest = min(c.num_examples for c in build_federation(config, tokenizer, load_data(config)).clients)
    after = [epsilon_spent(1.5, t * TINY["local_steps"], TINY["batch_size"], smallest, 1e-3) for t in (1, 2, 3)]
    budget = (after[1] + after[2]) / 2  # affords 2 of the 3 rounds
    with caplog.at_level("WARNING"):
        history, _ = _run(tmp_path, "dp-sgd", tiny_bert_path, dp_sgd_clip=1.0, dp_sgd_noise=1.5, dp_sgd_delta=1e-3,
                          dp_sgd_epsilon=budget)
    assert [r["dp_sgd_epsilon"] for r in history] == [pytest.approx(e) for e in after[:2]]
    assert "record-level privacy budget" in caplog.text and "dp_epsilon" not in history[0]
    card = (tmp_path / "dp-sgd" / "adapter" / "README.md").read_text()
    assert "record-level" in card


@pytest.mark.parametrize("changes, message", [
    (dict(client_batch=2), "one client at a time"),
    (dict(grad_accum=2), "whole batches"),
    (dict(precision="bf16"), "fp32 only"),
    (dict(max_grad_norm=1.0), "instead"),
    (dict(dp_sgd_epsilon=0.0), "--dp-sgd-epsilon"),
])
def test_dp_sgd_refuses_the_knobs_it_replaces_or_cannot_take(changes, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**(TINY | dict(dp_sgd_clip=1.0, dp_sgd_epsilon=3.0) | changes))
    with pytest.raises(ConfigError, match="--dp-sgd-clip"):
        RunConfig(**(TINY | dict(dp_sgd_noise=1.0)))


@pytest.mark.parametrize("changes, message", [(dict(batch_size=200), "lower --batch-size"),
                                               (dict(dp_sgd_delta=0.5), "not below 1 /")])
def test_dp_sgd_is_refused_before_training_where_the_split_cannot_take_it(tmp_path, tiny_bert_path, changes, message):
    config = RunConfig(model=tiny_bert_path, out=str(tmp_path / "r"),
                       **(TINY | dict(dp_sgd_clip=1.0, dp_sgd_noise=1.0) | changes))
    with pytest.raises(ConfigError, match=message):
        run(config, progress=False)
