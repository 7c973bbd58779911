"""Benchmark presets: which tasks × methods × settings × seeds to run, at what budget, and what it costs.

A preset is data, not code: the grid runner expands it into one RunConfig per run. The cost model
is deliberately simple (training steps × step time + evaluated rows × forward time + a fixed
per-run start-up) so the estimate printed before a grid starts can be checked by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedlora.config.run import RunConfig
from fedlora.reporting.labels import register_labels

# Measured on an idle 2-core CPU with the bundled MiniLM: one AdamW step at batch 32 × 64 tokens.
STEP_SECONDS = 0.35
REFERENCE_TOKENS = 32 * 64
# A forward pass costs about a third of a training step (no backward, no optimiser).
FORWARD_FRACTION = 1 / 3
# Model load + tokenising the task's training split; SST-2 (67k rows) is the slow one.
RUN_OVERHEAD_SECONDS = {"sst2": 15.0, "cola": 6.0, "mrpc": 5.0, "rte": 5.0}
DEV_ROWS = {"sst2": 872, "rte": 277, "mrpc": 408, "cola": 1043}


@dataclass(frozen=True)
class Variant:
    """One method as it appears in a table: the registry name plus options, under a readable label."""

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Setting:
    """One point on an ablation axis (e.g. alpha=0.1): RunConfig changes and a label suffix."""

    label: str
    changes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    tasks: tuple[str, ...]
    methods: tuple[Variant, ...]
    seeds: tuple[int, ...]
    base: dict[str, Any]  # RunConfig fields shared by every run
    settings: tuple[Setting, ...] = (Setting(""),)
    budget_minutes: float | None = None  # the promise stated in the table header; None: no promise


FEDIT = Variant("fedit", "fedit")
SVD = Variant("svd", "svd")
FLORA_NA = Variant("flora-na", "flora-na")  # ALS solver, per-module scope (the defaults)
ALL_METHODS = (
    FEDIT, Variant("ffa-lora", "ffa-lora"), Variant("fedex-lora", "fedex-lora"), Variant("flora", "flora"),
    Variant("fedsa-lora", "fedsa-lora"), SVD, FLORA_NA, Variant("flora-na (adamw)", "flora-na", {"solver": "adamw"}),
)
PAPER_TASKS = ("sst2", "rte", "mrpc", "cola")
# The 2025–26 methods and the stabilised FLoRA-NA, next to every method above: the frontier's grid.
NEW_METHODS = (
    Variant("flora-na-stable", "flora-na-stable"), Variant("fedsvd", "fedsvd"), Variant("rolora", "rolora"),
    Variant("fedrot-lora", "fedrot-lora"), Variant("svd-ef", "svd-ef"),
)
# What the stabilised FLoRA-NA was chosen from, and the control for its mechanism: a ridge/bound on p, q
# (with and without the balanced broadcast), and FedIT's own product re-split into balanced factors.
STABILISATION_PROBES = (
    Variant("flora-na (ridge=1, max_deviation=0.5)", "flora-na", {"ridge": 1.0, "max_deviation": 0.5}),
    Variant("flora-na-stable (ridge=1, max_deviation=0.5)", "flora-na-stable", {"ridge": 1.0, "max_deviation": 0.5}),
    Variant("fedit (rebalanced)", "fedit", {"rebalance": True}),
)
# The 50-client frontier: FedIT against the exact and the 2025 aggregators that need no extra bytes (fedsvd re-splits).
MANY_CLIENT_METHODS = (FEDIT, FLORA_NA, NEW_METHODS[0], SVD, NEW_METHODS[2], NEW_METHODS[1])
FRONTIER_METHODS = tuple(v for v in ALL_METHODS if v.label != "flora-na (adamw)") + NEW_METHODS + STABILISATION_PROBES

# The headline budget: 96 runs (4 tasks x 8 methods x 3 seeds) in <= 90 min on 2 cores, i.e. under a
# minute per run. Per run: 8 rounds x 10 clients x 4 local steps at batch 8 x 48 tokens (320 client
# steps), 200 dev rows per round, local evaluation once, at the last round, on <= 50 rows per client.
# Batch 8 rather than 16: on this CPU a step costs about linearly in tokens, so halving the batch
# doubles the optimiser steps for the same time, and SST-2 learns markedly faster per second
# (round-8 accuracy 0.73 vs 0.70 with 8 x 2 steps at batch 16, fedit seed 0). Small, but every
# method sees the same budget; docs/results.md states what it does and does not separate.
HEADLINE_BASE: dict[str, Any] = dict(
    clients=10, alpha=0.5, rounds=8, local_steps=4, batch_size=8, max_length=48, lr=5e-3, rank=8,
    lora_alpha=16.0, eval_local_every=8, max_eval_examples=200, max_local_eval_examples=50,
)
ABLATION_BASE = {**HEADLINE_BASE}
ABLATION_METHODS = (FEDIT, SVD, FLORA_NA)

# The LLM half of the paper at CPU scale: SmolLM2-135M-Instruct, GSM8K and MBPP, every method the paper
# compares, 3 seeds: 42 runs in ~50 min on 2 cores with --workers 2 (budget stated: 90). Per run: 4 clients
# (quantity skew, Dirichlet 1.0), 2 rounds x 2 local steps at batch 2 x <= 192 tokens; every round the
# global teacher-forced loss on 32 test rows and greedy generation (64 new tokens) for 8 of them; local
# evaluation at the last round on 2 held-out rows per client. Measured: ~130 s per run per worker, of
# which generation is about half. Exact match / pass@1 of a 135M model at this size are near zero: the
# teacher-forced loss is the signal (docs/results.md).
LLM_METHODS = tuple(v for v in ALL_METHODS if v.label != "flora-na (adamw)")
LLM_BASE: dict[str, Any] = dict(
    clients=4, alpha=1.0, rounds=2, local_steps=2, batch_size=2, max_length=192, lr=5e-4, rank=8, lora_alpha=16.0,
    eval_local_every=2, max_eval_examples=32, max_eval_generations=8, max_new_tokens=64, max_local_eval_examples=2,
)

# Privacy (issue 24): the methods whose server needs only sums, at record-level DP-SGD budgets ε ∈ {1, 3, 8} per
# client record (δ = 1e-5, per-example clip 1) and without DP, paired against FedIT in each setting. Record level
# because user-level DP-FedAvg over 10 clients drowns any signal (the noise on the mean is z·C/10 per coordinate
# with z ≈ 4 at ε = 8 over 8 rounds: docs/privacy.md); this is also the published FedASK setting.
PRIVATE_METHODS = (FEDIT, Variant("ffa-lora", "ffa-lora"), Variant("fedsvd", "fedsvd"), Variant("rolora", "rolora"),
                   Variant("fedask", "fedask"))
DP_SETTINGS = (Setting("no DP"),) + tuple(
    Setting(f"ε={e:g}", {"dp_sgd_clip": 1.0, "dp_sgd_epsilon": float(e), "dp_sgd_delta": 1e-5}) for e in (1, 3, 8))

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("quick", "CI smoke test: RTE, 2 clients, 1 round, 1 step, tiny eval", ("rte",), ABLATION_METHODS, (0,),
               dict(clients=2, alpha=0.5, rounds=1, local_steps=1, batch_size=4, max_length=32, lr=1e-3,
                    eval_local_every=1, max_eval_examples=16, max_local_eval_examples=8)),
        Preset("headline", "GLUE (SST-2, RTE, MRPC, CoLA), U=10, Dirichlet alpha=0.5, every method, 3 seeds",
               PAPER_TASKS, ALL_METHODS, (0, 1, 2), HEADLINE_BASE, budget_minutes=90),
        Preset("ablation-alpha", "label heterogeneity: Dirichlet alpha in {0.1, 0.5, 1.0} and IID", ("sst2",),
               ABLATION_METHODS, (0, 1, 2), ABLATION_BASE,
               tuple(Setting(f"alpha={a}", {"alpha": a}) for a in (0.1, 0.5, 1.0)) + (Setting("iid", {"alpha": None}),)),
        Preset("ablation-clients", "client count U in {10, 30, 50} (50 samples 20% per round)", ("sst2",),
               ABLATION_METHODS, (0, 1, 2), ABLATION_BASE,
               (Setting("U=10", {"clients": 10}), Setting("U=30", {"clients": 30}),
                Setting("U=50", {"clients": 50, "fraction": 0.2}))),
        Preset("ablation-solver", "FLoRA-NA solver (AdamW 50/200/1000 steps vs ALS) and scope (global vs per-module)",
               ("sst2",),
               (FEDIT, SVD, FLORA_NA, Variant("flora-na (global)", "flora-na", {"scope": "global"}))
               # 200 is the solver's default: spelled {"solver": "adamw"} it is the headline's config, so --reuse finds it.
               + tuple(Variant(f"flora-na (adamw {s})", "flora-na", {"solver": "adamw", **({} if s == 200 else {"steps": s})})
                       for s in (50, 200, 1000))
               + (Variant("flora-na (adamw 200, global)", "flora-na", {"solver": "adamw", "steps": 200, "scope": "global"}),),
               (0, 1, 2), ABLATION_BASE),
        Preset("ablation-rank", "LoRA rank r in {4, 8, 16} (lora_alpha = 2r, so the scaling stays 2)", ("sst2",),
               ABLATION_METHODS, (0, 1, 2), ABLATION_BASE,
               tuple(Setting(f"r={r}", {"rank": r, "lora_alpha": 2.0 * r}) for r in (4, 8, 16))),
        # Accuracy per byte: every method on SST-2 at the headline budget (5 seeds: the stabilised FLoRA-NA's
        # "never worse than FedIT" is a paired claim) and at twice the rounds (3 seeds), where SST-2 separates better.
        Preset("frontier", "accuracy per byte: SST-2 at the headline budget, every method (old and new), 5 seeds",
               ("sst2",), FRONTIER_METHODS, (0, 1, 2, 3, 4), HEADLINE_BASE),
        Preset("frontier-long", "accuracy per byte at 16 rounds: SST-2, the leading methods at FedIT's bytes, 5 seeds",
               ("sst2",), (FEDIT, SVD, FLORA_NA, NEW_METHODS[4], STABILISATION_PROBES[2], NEW_METHODS[0]), (0, 1, 2, 3, 4),
               {**HEADLINE_BASE, "rounds": 16, "eval_local_every": 16}),
        # Many clients (issue 23 §5): 50 clients with half of them in every round, where exact aggregation is said to
        # pay off most (RoLoRA / FedRot-LoRA report +10 points over FedIT at 50 clients). Client batching trains each
        # round's 25 clients in groups ('auto': up to 4,096 stacked tokens per step on a CPU).
        Preset("clients-50", "many clients: SST-2, U=50 with 25 sampled per round (Dirichlet alpha=0.5), the exact "
               "aggregators against FedIT, 3 seeds", ("sst2",), MANY_CLIENT_METHODS, (0, 1, 2),
               {**HEADLINE_BASE, "clients": 50, "fraction": 0.5, "client_batch": None, "eval_local_every": 8}),
        # The frontier's leaders on GSM8K's teacher-forced loss (fedit, svd, flora-na reusable from `llm` with --reuse).
        Preset("frontier-llm", "the stabilised FLoRA-NA and svd-ef on GSM8K (SmolLM2-135M), against fedit, svd, flora-na",
               ("gsm8k",), (FEDIT, SVD, FLORA_NA, NEW_METHODS[0], NEW_METHODS[4]), (0, 1, 2), LLM_BASE),
        Preset("llm", "decoder LLM (SmolLM2-135M-Instruct): GSM8K and MBPP, U=4, quantity skew, 7 methods, 3 seeds",
               ("gsm8k", "mbpp"), LLM_METHODS, (0, 1, 2), LLM_BASE, budget_minutes=90),
        Preset("llm-quick", "LLM smoke test: GSM8K, 2 clients, 1 round, 1 step, 2 generations", ("gsm8k",),
               ABLATION_METHODS, (0,),
               dict(LLM_BASE, clients=2, rounds=1, local_steps=1, eval_local_every=1, max_eval_examples=4,
                    max_eval_generations=2, max_new_tokens=16, max_local_eval_examples=2)),
        Preset("privacy", "record-level DP-SGD on SST-2 (U=10, alpha=0.5): the sums-only methods at ε in {1, 3, 8} "
               "and without DP, 3 seeds", ("sst2",), PRIVATE_METHODS, (0, 1, 2), HEADLINE_BASE, DP_SETTINGS),
        Preset("privacy-llm", "record-level DP-SGD on GSM8K (SmolLM2-135M): fedit and fedask at ε = 8 and without DP",
               ("gsm8k",), (FEDIT, PRIVATE_METHODS[-1]), (0, 1, 2), LLM_BASE, (DP_SETTINGS[0], DP_SETTINGS[-1])),
        # Communication: formulas at RoBERTa-large / LLaMA-2-7B shapes + one tiny real run per method.
        Preset("comm", "bytes per round: formulas at paper shapes, checked against tiny real runs", ("rte",),
               tuple(v for v in ALL_METHODS if v.label != "flora-na (adamw)"), (0,),
               dict(clients=2, alpha=0.5, rounds=1, local_steps=1, batch_size=4, max_length=32, lr=1e-3,
                    eval_local_every=0, max_eval_examples=8, max_local_eval_examples=8)),
    )
}
# Each variant label keeps one colour and marker in every plot (fedlora.reporting.style.method_style).
register_labels(v.label for preset in PRESETS.values() for v in preset.methods)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}") from None


# SmolLM2-135M with LoRA on q/v, 2 threads of this CPU: training ~140 tokens/s, a forward pass ~3x
# that, greedy decoding ~0.17 s per new token for a batch of 8 prompts; rows average ~0.8 of max_length.
LLM_TRAIN_TOKENS_PER_S, LLM_FORWARD_TOKENS_PER_S, LLM_DECODE_STEP_S, LLM_FILL = 140.0, 420.0, 0.17, 0.8
LLM_RUN_OVERHEAD_S = 12.0  # imports, cached model load, tokenising GSM8K


def estimate_llm_seconds(config: RunConfig, step_seconds: float = STEP_SECONDS) -> float:
    """Expected wall time of one LLM-task run: training tokens + teacher-forced rows + decode steps.

    ``step_seconds`` scales the measured rates like the GLUE estimate does (a busy machine is slower).
    """
    slow = step_seconds / STEP_SECONDS
    row = (config.max_length or 512) * LLM_FILL
    train = config.rounds * config.num_sampled * config.local_steps * config.batch_size * row / LLM_TRAIN_TOKENS_PER_S

    def evaluation(rows: int) -> float:
        generated = min(rows, config.max_eval_generations or rows)
        batches = -(-generated // 8)
        return rows * row / LLM_FORWARD_TOKENS_PER_S + batches * config.max_new_tokens * LLM_DECODE_STEP_S

    total = train + config.rounds * evaluation(config.max_eval_examples or 1000)
    if config.eval_local_every > 0:
        local_rounds = len({r for r in range(1, config.rounds + 1) if r % config.eval_local_every == 0 or r == config.rounds})
        total += local_rounds * config.num_sampled * evaluation(config.max_local_eval_examples)
    return slow * total + LLM_RUN_OVERHEAD_S


def estimate_seconds(config: RunConfig, step_seconds: float = STEP_SECONDS) -> float:
    """Expected wall time of one run (idle machine): train + global/local evaluation + start-up."""
    from fedlora.tasks import get_task
    from fedlora.tasks.causal_lm import CausalLMTask

    if isinstance(get_task(config.task), CausalLMTask):
        return estimate_llm_seconds(config, step_seconds)
    max_length = config.max_length or get_task(config.task).default_max_length
    scale = config.batch_size * max_length / REFERENCE_TOKENS
    train = config.rounds * config.num_sampled * config.local_steps * step_seconds * scale
    forward_row = step_seconds * FORWARD_FRACTION / 32 * max_length / 64
    dev = DEV_ROWS.get(config.task, 1000)
    eval_rows = config.rounds * min(dev, config.max_eval_examples or dev)
    if config.eval_local_every > 0:
        local_rounds = len({r for r in range(1, config.rounds + 1) if r % config.eval_local_every == 0 or r == config.rounds})
        eval_rows += local_rounds * config.num_sampled * config.max_local_eval_examples
    return train + eval_rows * forward_row + RUN_OVERHEAD_SECONDS.get(config.task, 8.0)


def measure_step_seconds(steps: int = 3) -> float:
    """Time AdamW steps of the bundled MiniLM at batch 32 × 64 on this machine, now.

    The default STEP_SECONDS holds for an idle 2-core machine; a shared one can be many times
    slower, and an estimate is only useful if it says so before an hour is committed.
    """
    import time

    import torch

    from fedlora.models.classifier import default_model_path, load_model

    model, _ = load_model(default_model_path(), 2, 8, 16.0, ["query", "value"], seed=0)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 5000, (32, 64), generator=generator)
    labels = torch.randint(0, 2, (32,), generator=generator)
    times = []
    for _ in range(steps + 1):  # the first step pays one-off allocation costs: not timed
        start = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]  # median: robust to one step hit by a neighbour's job
