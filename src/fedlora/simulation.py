"""The local engine: U simulated clients around one frozen base model in one process.

Clients are adapter states swapped in and out of a single PEFT model, so memory does not grow
with U beyond the adapters. Per round: sample clients → each trains from the global state →
``aggregate`` → merge ``base_delta`` into the frozen weights where the method asks → FedAvg the
head → evaluate → checkpoint. Deterministic given ``config.seed``; ``resume=True`` continues
from the last checkpoint and ends with exactly the metrics of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fedlora.aggregation import get_method
from fedlora.checkpoint import ServerState, atomic_write_text, load_state, save_state
from fedlora.client import ClientResult, derived_seed, evaluate_on, train_client
from fedlora.config import RunConfig
from fedlora.data import get_task
from fedlora.failpoints import failpoint
from fedlora.federation import build_federation
from fedlora.model import default_model_path, load_model
from fedlora.server import server_step
from fedlora.peft_bridge import (
    get_adapter,
    get_head,
    merge_base_delta,
    merged_base_weights,
    restore_base_weights,
    save_adapter,
    set_adapter,
    set_head,
)

log = logging.getLogger(__name__)
HEAD_ROUND_SEED = 1_000_003  # separates the server's own seeds (client sampling, FLoRA re-init) from clients'


def sample_clients(config: RunConfig, round_: int) -> list[int]:
    if config.num_sampled >= config.clients:
        return list(range(config.clients))
    rng = np.random.default_rng(derived_seed(config.seed, round_, HEAD_ROUND_SEED))
    return sorted(rng.choice(config.clients, size=config.num_sampled, replace=False).tolist())


def run(config: RunConfig, resume: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Run (or resume) a federated job; returns the per-round metrics records."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    resumed = load_state(out) if resume else None  # first: a bad checkpoint fails before minutes of loading
    torch.manual_seed(config.seed)
    task_num_labels = get_task(config.task).num_labels
    model, tokenizer = load_model(
        config.model or default_model_path(), task_num_labels, config.rank, config.lora_alpha,
        list(config.target_modules), seed=config.seed,
    )
    federation = build_federation(config, tokenizer)
    if progress:  # the partition is part of the experiment: show it
        print(f"{config.clients} clients, alpha={config.alpha if config.alpha is not None else 'iid'}, label counts:\n{federation.histogram}")
    log.info("clients' label histogram:\n%s", federation.histogram)
    spec = get_method(config.method)

    if resumed is not None:
        state = resumed
        restore_base_weights(model, state.base_weights)
        log.info("resuming %s after round %d", out, state.round)
    else:
        state = ServerState(round=0, adapter=get_adapter(model), head=get_head(model))
        atomic_write_text(out / "config.json", config.to_json())
        save_state(state, out)  # round 0: a crash in the first round can resume too
    _write_metrics(out, state.history)

    bar = tqdm(range(state.round + 1, config.rounds + 1), desc=f"{config.method}", disable=not progress, unit="round")
    for round_ in bar:
        start = time.perf_counter()
        sampled = sample_clients(config, round_)
        local_round = config.eval_local_every > 0 and (round_ % config.eval_local_every == 0 or round_ == config.rounds)
        results = []
        for index in sampled:
            client = federation.clients[index]
            bar.set_postfix_str(f"round {round_} {client.client_id}")
            result = train_client(
                model, client_id=client.client_id, train=client.train,
                local_test=client.local_test if local_round else None, task=federation.task, tokenizer=tokenizer,
                global_adapter=state.adapter, global_head=state.head, local_B=state.local_B.get(client.client_id),
                policy=spec.policy, steps=config.local_steps, batch_size=config.batch_size, lr=config.lr,
                seed=derived_seed(config.seed, round_, index),
            )
            results.append(result)
            failpoint("train", round_)
            if spec.policy.local_B:  # FedSA-LoRA: B never leaves the client
                state.local_B[client.client_id] = {m: p.B for m, p in result.update.adapter.items()}

        server_start = time.perf_counter()
        options = dict(config.method_options)
        if config.method == "flora":
            options["seed"] = derived_seed(config.seed, round_, HEAD_ROUND_SEED + 1)
        agg, head = server_step(config.method, state.adapter, results, min_clients=config.min_clients, **options)
        failpoint("aggregate", round_)
        if head is not None:  # None: too few valid updates, the round is skipped and nothing changes
            if agg.base_delta:
                merge_base_delta(model, agg.base_delta)
            state.adapter, state.head = agg.adapter, head
        server_seconds = time.perf_counter() - server_start

        set_adapter(model, state.adapter)
        set_head(model, state.head)
        global_metrics = evaluate_on(model, federation.test, federation.task, tokenizer)
        record = round_record(round_, results, agg.metrics, global_metrics, server_seconds, state.head)
        record["wall_seconds"] = time.perf_counter() - start
        state.round = round_
        state.history.append(record)
        state.base_weights = merged_base_weights(model)
        save_state(state, out)  # the checkpoint is the source of truth; metrics.jsonl is rewritten from it
        _write_metrics(out, state.history)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", **{federation.task.metric[:8]: f"{record['global_metric']:.4f}"})
        log.info("round %d: %s=%.4f divergence=%.4g", round_, federation.task.metric, record["global_metric"], record["divergence"])

    set_adapter(model, state.adapter)
    set_head(model, state.head)
    _save_adapter_atomically(model, out / "adapter")
    from fedlora.reporting import plot_run  # matplotlib only when a run finishes

    plot_run(out)
    return state.history


def _save_adapter_atomically(model: torch.nn.Module, target: Path) -> None:
    # PEFT writes several files; build them in a scratch directory and swap it in whole.
    scratch, old = target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")
    for leftover in (scratch, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    save_adapter(model, scratch)
    if target.exists():
        target.rename(old)
    scratch.rename(target)
    if old.exists():
        shutil.rmtree(old)


def round_record(
    round_: int, results: list[ClientResult], agg_metrics: dict[str, Any], global_metrics: dict[str, float],
    server_seconds: float, head: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """One line of metrics.jsonl; the Flower ServerApp writes the same fields."""
    locals_ = {r.update.client_id: r.local_metrics["main"] for r in results if r.local_metrics is not None}
    head_bytes = sum(t.numel() for t in head.values()) * 4 * len(results)  # the head travels both ways (FedAvg)
    return {
        "round": round_,
        "clients": [r.update.client_id for r in results],
        "global": global_metrics,
        "global_metric": global_metrics["main"],
        "local_metric_mean": float(np.mean(list(locals_.values()))) if locals_ else None,
        "local_metric": locals_ or None,
        "train_loss": float(np.mean([r.loss for r in results])),
        "divergence": agg_metrics["divergence"],
        "eckart_young_bound": agg_metrics["eckart_young_bound"],
        "solve_seconds": agg_metrics["solve_seconds"],
        "server_seconds": server_seconds,
        "bytes_up": agg_metrics["bytes_up"] + head_bytes,
        "bytes_down": agg_metrics["bytes_down"] + head_bytes,
        "lora_bytes_up": agg_metrics["bytes_up"],
        "lora_bytes_down": agg_metrics["bytes_down"],
        "rejected": agg_metrics["rejected"],
        "skipped": agg_metrics["skipped"],
        **({"objective": agg_metrics["objective"], "objective_fedit": agg_metrics["objective_fedit"]} if "objective" in agg_metrics else {}),
    }


def _write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
