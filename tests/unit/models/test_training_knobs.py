"""The PEFT/transformers training knobs: --lora-dropout, --weight-decay, --lr-schedule/--warmup-steps,
--max-grad-norm. Their defaults train exactly as before (plain AdamW, constant lr, no clipping, no
dropout); each one changes the trained adapter as documented; both engines (and Flower) get them."""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedlora.aggregation import TrainingPolicy  # noqa: E402
from fedlora.protocol.client import round_batches  # noqa: E402
from fedlora.config.run import ConfigError, RunConfig  # noqa: E402
from fedlora.models.optim import LR_SCHEDULES, LocalOptim, lr_factor  # noqa: E402
from fedlora.models.lora_state import get_adapter, get_head, lora_layers, set_adapter, set_head  # noqa: E402
from fedlora.models.runtime import Runtime  # noqa: E402
from fedlora.tasks import get_task  # noqa: E402
from fedlora.models.training import train_local  # noqa: E402

CPU = Runtime(torch.device("cpu"))
LR = 5e-3


@pytest.fixture(scope="module")
def toy():
    """The toy task's model (MiniLM + rank-4 LoRA), its start state, and 4 fixed batches of 8 rows."""
    task = get_task("toy")
    model, tokenizer = task.build_model(None, 4, 8.0, ["query", "value"], seed=0)
    train = task.encode(task.load(None)["train"], tokenizer, 32)
    batches = list(round_batches(train, 4, 8, seed=0, collate=task.collate(tokenizer)))
    return model, (get_adapter(model), get_head(model)), batches


def trained(toy, optim: LocalOptim | None, steps: int = 3, runtime: Runtime = CPU) -> dict[str, torch.Tensor]:
    """Every trained tensor after ``steps`` local steps from the fixed start, flattened by name."""
    model, (adapter, head), batches = toy
    set_adapter(model, adapter)
    set_head(model, head)
    train_local(model, iter(batches[:steps]), steps, LR, TrainingPolicy(), seed=0, optim=optim, runtime=runtime)
    out = {f"{m}.A": p.A.clone() for m, p in get_adapter(model).items()}
    out |= {f"{m}.B": p.B.clone() for m, p in get_adapter(model).items()}
    return out | {f"head.{k}": v.clone() for k, v in get_head(model).items()}


def record_steps(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, float]]:
    """Patch AdamW.step to record, at each step, the lr it uses and the gradients' global L2 norm."""
    seen: list[dict[str, float]] = []
    real = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        seen.append({"lr": self.param_groups[0]["lr"], "norm": norm})
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


# --- defaults: today's training, bit for bit -------------------------------------------------------


def test_default_knobs_train_bit_identically_to_plain_adamw(toy) -> None:
    """What train_local did before the knobs: a fresh AdamW(lr, weight_decay=0), constant lr, no clipping."""
    defaults = LocalOptim.for_round(RunConfig(task="toy"), round_=1)
    assert defaults == LocalOptim(total_steps=200) and not defaults.scheduled
    model, (adapter, head), batches = toy
    set_adapter(model, adapter)
    set_head(model, head)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    torch.manual_seed(0)
    model.train()
    for batch in batches[:3]:
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()
    plain = {f"{m}.A": p.A for m, p in get_adapter(model).items()} | {f"{m}.B": p.B for m, p in get_adapter(model).items()}
    plain |= {f"head.{k}": v for k, v in get_head(model).items()}
    ours = trained(toy, defaults)
    assert all(torch.equal(ours[k], plain[k]) for k in plain)


# --- the lr schedule -----------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", LR_SCHEDULES)
@pytest.mark.parametrize("warmup", [0, 7])
def test_lr_factor_is_transformers_schedule_over_the_whole_run(schedule: str, warmup: int) -> None:
    from transformers import get_scheduler

    total = 40
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    name = "constant_with_warmup" if schedule == "constant" else schedule
    reference = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    for step in range(total):
        assert lr_factor(schedule, step, total, warmup) == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-12)
        optimizer.step()
        reference.step()


def test_each_step_uses_the_run_schedule_at_its_round_and_local_step(toy, monkeypatch) -> None:
    config = RunConfig(task="toy", rounds=3, local_steps=3, lr=LR, lr_schedule="cosine", warmup_steps=2)
    seen = record_steps(monkeypatch)
    trained(toy, LocalOptim.for_round(config, round_=2))  # run steps 3, 4, 5 of 9
    expected = [LR * lr_factor("cosine", step, 9, 2) for step in (3, 4, 5)]
    assert [s["lr"] for s in seen] == pytest.approx(expected, rel=1e-12)
    assert expected[0] > expected[1] > expected[2] > 0  # past the warm-up: decaying


def test_warmup_starts_each_run_at_zero_lr(toy, monkeypatch) -> None:
    config = RunConfig(task="toy", rounds=2, local_steps=3, lr=LR, warmup_steps=4)
    seen = record_steps(monkeypatch)
    trained(toy, LocalOptim.for_round(config, round_=1))
    assert [s["lr"] for s in seen] == pytest.approx([0.0, LR / 4, LR / 2])


# --- weight decay, clipping ----------------------------------------------------------------------


def test_weight_decay_shrinks_each_factor_by_lr_times_decay(toy) -> None:
    """AdamW's decay is decoupled: one step moves p by -lr·wd·p on top of the same Adam update."""
    start = {f"{m}.A": p.A for m, p in toy[1][0].items()}
    plain, decayed = trained(toy, LocalOptim(), steps=1), trained(toy, LocalOptim(weight_decay=0.5), steps=1)
    for name, a0 in start.items():
        assert torch.allclose(decayed[name] - plain[name], -LR * 0.5 * a0, atol=1e-7)
        assert not torch.equal(decayed[name], plain[name])


@pytest.mark.parametrize("scaled", [False, True])
def test_clipping_bounds_the_global_gradient_norm(toy, monkeypatch, scaled: bool) -> None:
    """The norm AdamW steps with is max_grad_norm when clipping acts; with fp16's loss scaler (here a
    CPU GradScaler, fp16 itself needs CUDA) the scaler's factor is removed before clipping, not after."""
    runtime = CPU
    if scaled:
        monkeypatch.setattr(Runtime, "grad_scaler", lambda self: torch.amp.GradScaler("cpu", init_scale=2.0**12))
    seen = record_steps(monkeypatch)
    trained(toy, LocalOptim(), steps=2, runtime=runtime)
    free = [s["norm"] for s in seen]
    seen.clear()
    bound = min(free) / 10
    clipped = trained(toy, LocalOptim(max_grad_norm=bound), steps=2, runtime=runtime)
    assert all(math.isfinite(n) for n in free) and min(free) > bound
    assert [s["norm"] for s in seen] == pytest.approx([bound, bound], rel=1e-3)  # clipped to the bound, not below
    assert not all(torch.equal(clipped[k], v) for k, v in trained(toy, LocalOptim(), steps=2, runtime=runtime).items())


# --- dropout, and the knobs reaching both engines ------------------------------------------------


def test_lora_dropout_is_set_on_every_peft_module_and_saved_in_its_config() -> None:
    from fedlora.tasks.build import build_model

    model, _ = build_model(RunConfig(task="toy", lora_dropout=0.25, device="cpu", target_modules=("query", "value")))
    layers = lora_layers(model).values()
    assert layers and all(isinstance(m.lora_dropout["default"], nn.Dropout) for m in layers)
    assert {m.lora_dropout["default"].p for m in layers} == {0.25}
    assert model.peft_config["default"].lora_dropout == 0.25
    plain, _ = build_model(RunConfig(task="toy", device="cpu", target_modules=("query", "value")))
    assert all(isinstance(m.lora_dropout["default"], nn.Identity) for m in lora_layers(plain).values())


def test_the_engines_and_flower_pass_the_knobs(monkeypatch) -> None:
    """train_planned (the local engine's and the Flower ClientApp's client step) gives train_client the
    config's knobs for the round; Flower's run config carries them under the same dashed names."""
    from fedlora.protocol import plan as rounds
    from fedlora.engines.flower.config import app_config_table, run_config_from_flower

    knobs = {"lora-dropout": 0.1, "weight-decay": 0.01, "lr-schedule": "linear", "warmup-steps": 5,
             "max-grad-norm": 1.0}
    config, _ = run_config_from_flower(app_config_table() | knobs)
    assert (config.lora_dropout, config.weight_decay, config.lr_schedule, config.warmup_steps,
            config.max_grad_norm) == (0.1, 0.01, "linear", 5, 1.0)
    got: dict = {}
    monkeypatch.setattr(rounds, "train_client", lambda *a, **kw: got.update(kw))
    monkeypatch.setattr(rounds, "get_method", lambda name: type("M", (), {"policy": TrainingPolicy(), "phased": None}))
    client = type("C", (), {"client_id": "c", "train": None, "local_test": None})
    rounds.train_planned(None, client, 0, None, None, config, rounds.RoundPlan(3, (0,), False, {}), ({}, {}))
    assert got["optim"] == LocalOptim(0.01, 1.0, "linear", 5, config.rounds * config.local_steps, 2 * config.local_steps)


@pytest.mark.parametrize("bad", [dict(lora_dropout=1.0), dict(lora_dropout=-0.1), dict(weight_decay=-1e-3),
                                 dict(weight_decay=math.nan), dict(max_grad_norm=math.inf), dict(warmup_steps=-1),
                                 dict(warmup_steps=1.5), dict(lr_schedule="cosine_with_restarts")])
def test_bad_knobs_are_refused_naming_the_flag(bad: dict) -> None:
    (name, value), = bad.items()
    with pytest.raises(ConfigError, match=f"--{name.replace('_', '-')}="):
        RunConfig(task="toy", **bad)


def test_schedule_is_a_function_of_round_and_step_only() -> None:
    """Every client of a round gets the same lrs; consecutive rounds continue one curve."""
    config = RunConfig(task="toy", rounds=4, local_steps=5, lr_schedule="linear", warmup_steps=3)
    curve = [LocalOptim.for_round(config, r).lr_at(1.0, s) for r, s in itertools.product(range(1, 5), range(5))]
    assert curve == [lr_factor("linear", step, 20, 3) for step in range(20)]
