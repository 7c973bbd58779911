"""The local engine: U simulated clients around one frozen base model in one process.

Clients are adapter states swapped in and out of a single PEFT model, so memory does not grow
with U beyond the adapters. The round itself (sampling, private factors, aggregation, merges,
evaluation, checkpoints) is :class:`fedlora.protocol.rounds.Server`'s; this module is only the loop that
trains the planned clients in-process. Deterministic given ``config.seed``; ``resume=True``
continues from the last checkpoint and ends with exactly the metrics of an uninterrupted run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fedlora.protocol.checkpoint import load_state
from fedlora.protocol.client import evaluate_on  # noqa: F401  (re-exported: tests patch it to simulate crashes)
from fedlora.config.run import RunConfig
from fedlora.testing.failpoints import failpoint
from fedlora.protocol.federation import build_federation, load_data
from fedlora.tasks.build import build_model
from fedlora.util.progress import current_phase, on_phase
from fedlora.runs.run_dir import check_resume, check_start
from fedlora.runs.lock import locked
from fedlora.tasks import task_for
from fedlora.runs.outputs import RunFolder
from fedlora.protocol.plan import sample_clients, train_planned, train_planned_together  # noqa: F401  (sample_clients: public API)
from fedlora.protocol.rounds import Server

log = logging.getLogger(__name__)


def run(config: RunConfig, resume: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Run (or resume) a federated job; returns the per-round metrics records.

    The run directory is locked for the whole run (:mod:`fedlora.runs.lock`): a second run on the
    same ``config.out`` fails at once instead of interleaving its files with this one's.
    """
    with locked(config.out):
        return _run(config, resume, progress)


def _run(config: RunConfig, resume: bool, progress: bool) -> list[dict[str, Any]]:
    task_for(config).preflight()  # e.g. no code sandbox for mbpp: refused before minutes of loading
    if resume:  # first: a bad checkpoint or another experiment's fails before minutes of loading
        check_resume(load_state(Path(config.out)), config)
    check_start(config, resume)
    raw = load_data(config)  # before the model: a bad data file is one line in seconds
    torch.manual_seed(config.seed)
    model, tokenizer = build_model(config)
    federation = build_federation(config, tokenizer, raw)
    if progress:  # the partition is part of the experiment: show it
        print(f"{config.clients} clients, alpha={config.alpha if config.alpha is not None else 'iid'}, "
              f"partition:\n{federation.summary()}")
    log.info("clients' partition histogram:\n%s", federation.histogram)
    server = Server.open(config, model, tokenizer, federation, RunFolder(config), resume=resume)

    step_tokens = config.batch_size * (config.max_length or federation.task.default_max_length)  # for 'auto'
    bar = tqdm(server.remaining_rounds(), desc=config.method, disable=not progress, unit="round")
    where = ""  # "round 2 client-1"; the running phase is appended ("round 2 client-1: local evaluation")

    def show(running: str) -> None:
        bar.set_postfix_str(f"{where}: {running}" if running else where)

    with on_phase(show):
        for round_ in bar:
            started = time.perf_counter()
            plan = server.plan(round_)
            results = []
            for group in client_groups(plan.clients, config.client_batch, model, step_tokens):
                clients = [(federation.clients[i], i) for i in group]
                names = [c.client_id for c, _ in clients]
                where = f"round {round_} {names[0]}" + (f"..{names[-1]} ({len(names)} together)" if len(names) > 1 else "")
                show(current_phase())
                starts = [server.client_start(c.client_id) for c, _ in clients]
                results += _train_group(model, clients, starts, federation.task, tokenizer, config, plan)
                failpoint("train", round_)
            where = f"round {round_} server"
            record = server.finish(plan, results, started)
            bar.set_postfix(loss=_show(record.get("train_loss"), ".3f"),
                            main=_show(record.get("global_metric"), ".4f"))
            log.info("round %d: main metric %s, divergence %s", round_, _show(record.get("global_metric"), ".4f"),
                     _show(record.get("divergence"), ".4g"))

    server.save_final()
    return server.state.history


def _train_group(model: torch.nn.Module, clients: list[tuple[Any, int]], starts: list[Any], task: Any,
                 tokenizer: Any, config: RunConfig, plan: Any) -> list[Any]:
    """Train ``clients`` together (one alone as before); out of GPU memory, each half again, losing nothing
    (every client restarts from its planned start with its own seeded batches)."""
    if len(clients) == 1:
        (client, index), = clients
        return [train_planned(model, client, index, task, tokenizer, config, plan, starts[0])]
    try:
        return train_planned_together(model, clients, task, tokenizer, config, plan, starts)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        half = len(clients) // 2
        log.warning("out of GPU memory training %d clients together; retrying them %d and %d at a time",
                    len(clients), half, len(clients) - half)
        return (_train_group(model, clients[:half], starts[:half], task, tokenizer, config, plan)
                + _train_group(model, clients[half:], starts[half:], task, tokenizer, config, plan))


CPU_STACK_TOKENS = 4096  # 'auto' on a CPU: stack clients up to this many tokens per step (measured below)


def client_groups(clients: list[int], client_batch: int | None, model: torch.nn.Module,
                  tokens_per_client_step: int = CPU_STACK_TOKENS) -> list[list[int]]:
    """The round's clients in groups trained together (``--client-batch``), in plan order.

    ``None`` ('auto'): on CUDA the whole round (halved on out-of-memory); on a CPU as many clients as keep the
    stacked step within :data:`CPU_STACK_TOKENS` tokens (batch × max length each). Measured on 2 cores
    (docs/client-batching.md): 16 clients at 2 × 32 tokens ran 2.6× faster stacked, 8 at 8 × 64 tokens
    0.98-1.37× (noise around the single-adapter limit); a CPU gains only where each client's step is small.
    """
    if client_batch is None:
        if next(model.parameters()).device.type == "cuda":
            client_batch = len(clients)
        else:
            client_batch = CPU_STACK_TOKENS // max(1, tokens_per_client_step)
    size = max(1, client_batch)
    return [clients[i:i + size] for i in range(0, len(clients), size)]


def _show(value: Any, spec: str) -> str:
    """A record's number for the progress bar; None (not measured, or not finite in strict JSON) as '-'."""
    return "-" if value is None else format(value, spec)
