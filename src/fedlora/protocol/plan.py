"""A round's plan and what its clients do with it: which clients train, and one call that trains them.

:class:`RoundPlan` is the server's decision for round t (:meth:`fedlora.protocol.rounds.Server.plan`); both
engines' clients train from it through :func:`train_planned` (one client) or :func:`train_planned_together`
(several clients in one pass, ``--client-batch``), so a client's round is the same code in-process and on a
Flower SuperNode. A phased method's clients compute their phase-1 upload here too, right after training.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedlora.aggregation import Adapter, get_method
from fedlora.config.run import RunConfig
from fedlora.models.optim import LocalOptim
from fedlora.protocol.client import ClientPlan, ClientResult, derived_seed, train_client, train_clients_together
from fedlora.protocol.federation import ClientData
from fedlora.protocol.phases import first_upload

SERVER_SEED = 1_000_003  # separates the server's own seeds (client sampling, method seeds) from clients'


def sample_clients(config: RunConfig, round_: int) -> list[int]:
    """The clients (partition indices, sorted) that train in ``round_``: all, or a seeded sample."""
    if config.num_sampled >= config.clients:
        return list(range(config.clients))
    rng = np.random.default_rng(derived_seed(config.seed, round_, SERVER_SEED))
    return sorted(rng.choice(config.clients, size=config.num_sampled, replace=False).tolist())


@dataclass(frozen=True)
class RoundPlan:
    round: int
    clients: tuple[int, ...]  # partition indices, in the order updates are aggregated
    local_eval: bool  # clients evaluate on their local test split after training
    options: dict[str, Any]  # the method's options for this round (with its server seed, if any)
    dp_sgd_noise: float = 0.0  # record-level DP-SGD's noise multiplier (the server calibrates it); 0: off


def train_planned(model: torch.nn.Module, client: ClientData, index: int, task: Any, tokenizer: Any,
                  config: RunConfig, plan: RoundPlan, start: tuple[Adapter, dict[str, Tensor]]) -> ClientResult:
    """Client ``index``'s round of ``plan`` from ``start`` (adapter, head); both engines' clients call this."""
    adapter, head = start
    result = train_client(
        model, client_id=client.client_id, train=client.train, local_test=client.local_test if plan.local_eval else None,
        task=task, tokenizer=tokenizer, global_adapter=adapter, global_head=head,
        policy=get_method(config.method).policy.for_round(plan.round), steps=config.local_steps, batch_size=config.batch_size, lr=config.lr,
        seed=derived_seed(config.seed, plan.round, index), grad_accum=config.grad_accum,
        optim=LocalOptim.for_round(config, plan.round, plan.dp_sgd_noise),  # weight decay, clipping, lr schedule, DP-SGD
    )
    return with_first_upload([result], config, plan)[0]


def train_planned_together(model: torch.nn.Module, clients: list[tuple[ClientData, int]], task: Any, tokenizer: Any,
                           config: RunConfig, plan: RoundPlan, starts: list[tuple[Adapter, dict[str, Tensor]]],
                           ) -> list[ClientResult]:
    """:func:`train_planned` for several (client, index) pairs trained together (``--client-batch``); same results."""
    group = [ClientPlan(client_id=c.client_id, train=c.train, local_test=c.local_test if plan.local_eval else None,
                        adapter=adapter, head=head, seed=derived_seed(config.seed, plan.round, index))
             for (c, index), (adapter, head) in zip(clients, starts)]
    results = train_clients_together(
        model, group, task=task, tokenizer=tokenizer, policy=get_method(config.method).policy.for_round(plan.round),
        steps=config.local_steps, batch_size=config.batch_size, lr=config.lr, grad_accum=config.grad_accum,
        optim=LocalOptim.for_round(config, plan.round, plan.dp_sgd_noise),
    )
    return with_first_upload(results, config, plan)


def with_first_upload(results: list[ClientResult], config: RunConfig, plan: RoundPlan) -> list[ClientResult]:
    """A phased method's clients compute their phase-1 upload right after training (FedASK's sketch)."""
    phased = get_method(config.method).phased
    if phased is None:
        return results
    return [replace(r, first_upload=first_upload(phased, r.update.adapter, plan.options)) for r in results]
