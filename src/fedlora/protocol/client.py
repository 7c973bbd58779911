"""One client's round: start from the global adapter, train locally, upload.

Shared by the local simulation engine and the Flower ClientApp, so both train identically.
Batches for (round, client) are drawn from a generator seeded by (seed, round, client): a
resumed run, or a client on another machine, sees exactly the same examples in the same order.
What a batch holds and how the model is scored is the task's business (:mod:`fedlora.tasks`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from fedlora.aggregation import Adapter, ClientUpdate, TrainingPolicy
from fedlora.models.optim import LocalOptim
from fedlora.util.progress import phase
from fedlora.models.lora_state import get_adapter, get_head, set_adapter, set_head
from fedlora.models.runtime import Runtime, runtime_of
from fedlora.tasks import Collate, Task
from fedlora.models.dp_sgd import train_local_dp
from fedlora.models.training import train_local
from fedlora.models.client_batch import ClientJob, train_together


def derived_seed(seed: int, round_: int, client: int) -> int:
    """A distinct, reproducible seed per (run seed, round, client)."""
    return int(np.random.SeedSequence([seed, round_, client]).generate_state(1)[0])


def round_batches(
    data: datasets.Dataset, steps: int, batch_size: int, seed: int, collate: Collate
) -> Iterator[dict[str, Tensor]]:
    """``steps`` batches of ``batch_size`` rows sampled without replacement (cycling if the client is
    small), each made by the task's ``collate``."""
    generator = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    order = torch.cat([torch.randperm(len(data), generator=generator) for _ in range(-(-needed // len(data)))])
    for step in range(steps):
        index = order[step * batch_size : (step + 1) * batch_size].tolist()
        rows = data[index]  # {column: values of the selected rows}
        yield collate([{k: rows[k][i] for k in rows} for i in range(len(index))])


def sampled_batches(
    data: datasets.Dataset, steps: int, batch_size: int, seed: int, collate: Collate
) -> Iterator[dict[str, Tensor]]:
    """``steps`` batches, each ``batch_size`` rows drawn uniformly without replacement, independently of the
    other steps: the sampling record-level DP-SGD's accountant assumes (:func:`round_batches` shuffles instead)."""
    if batch_size > len(data):
        raise ValueError(f"DP-SGD batch of {batch_size} rows from a client with {len(data)}: lower --batch-size")
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randperm(len(data), generator=generator)[:batch_size].tolist()
        rows = data[index]
        yield collate([{k: rows[k][i] for k in rows} for i in range(len(index))])


def evaluate_on(
    model: nn.Module, data: datasets.Dataset, task: Task, tokenizer: PreTrainedTokenizerBase,
    runtime: Runtime | None = None, samples: list[dict[str, Any]] | None = None,
) -> dict[str, float]:
    """The task's metrics on encoded ``data`` (``"main"`` included); ``runtime`` defaults to the model's.
    A generative task appends what it generated to ``samples`` when given a list."""
    return task.evaluate(model, data, tokenizer, runtime or runtime_of(model), samples)


@dataclass
class ClientResult:
    """What one client's round produced, as the server consumes it (both engines build this).

    ``update`` carries the client id, its adapter after training (CPU float32, at the server's rank) and
    the example count it claims (the server replaces that with its own partition table's count);
    ``head`` is the classifier head after training ({} for a causal LM); ``loss`` the mean training loss.
    """

    update: ClientUpdate
    head: dict[str, Tensor]
    loss: float
    local_metrics: dict[str, float] | None  # personalised metrics on the client's local test split
    # A phased method's (FedASK) phase-1 upload, computed right after training; then ``update`` is what the
    # client keeps for the later phases, and its factors never reach the server (Flower sends none).
    first_upload: dict[str, Tensor] | None = None


def train_client(
    model: nn.Module,
    *,
    client_id: str,
    train: datasets.Dataset,
    local_test: datasets.Dataset | None,
    task: Task,
    tokenizer: PreTrainedTokenizerBase,
    global_adapter: Adapter,
    global_head: dict[str, Tensor],
    policy: TrainingPolicy,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    runtime: Runtime | None = None,
    grad_accum: int = 1,
    optim: LocalOptim | None = None,
) -> ClientResult:
    """Start from ``global_adapter`` and ``global_head``, train, and report.

    ``global_adapter`` is the start the server planned for this client (:meth:`fedlora.protocol.rounds.Server.client_start`):
    it already holds the client's own private factors (FedSA-LoRA's B).

    ``runtime`` (device, precision) defaults to the one :func:`fedlora.tasks.build.build_model` attached
    to the model. ``grad_accum``: micro-batches per step, ``optim``: weight decay, clipping and the lr
    schedule (:func:`fedlora.models.training.train_local`; both engines pass :meth:`LocalOptim.for_round`). The
    update and head come back as CPU float32 tensors.
    """
    runtime = runtime or runtime_of(model)
    set_adapter(model, global_adapter)
    set_head(model, global_head)
    if optim is not None and optim.dp_sgd:  # record-level DP-SGD: independent fixed-size draws, Opacus
        with phase("training (DP-SGD)"):
            stats = train_local_dp(model, sampled_batches(train, steps, batch_size, seed, task.collate(tokenizer)),
                                   steps, lr, policy, seed, optim, runtime, task.example_losses, batch_size)
    else:
        batches = round_batches(train, steps, batch_size, seed, task.collate(tokenizer))
        with phase("training"):
            stats = train_local(model, batches, steps, lr, policy, seed, runtime=runtime, micro_batches=grad_accum,
                                loss_weight=task.loss_weight, optim=optim)
    local_metrics = None
    if local_test is not None and len(local_test):
        with phase("local evaluation"):
            local_metrics = evaluate_on(model, local_test, task, tokenizer, runtime)
    update = ClientUpdate(adapter=get_adapter(model), num_examples=len(train), client_id=client_id)
    return ClientResult(update=update, head=get_head(model), loss=float(stats["loss"]), local_metrics=local_metrics)


@dataclass
class ClientPlan:
    """One client of a group trained together: who it is, its data, where it starts and its batch seed."""

    client_id: str
    train: datasets.Dataset
    local_test: datasets.Dataset | None
    adapter: Adapter  # the start the server planned (private factors included)
    head: dict[str, Tensor]
    seed: int  # its batches' seed, as :func:`train_client`'s


def train_clients_together(
    model: nn.Module,
    clients: list[ClientPlan],
    *,
    task: Task,
    tokenizer: PreTrainedTokenizerBase,
    policy: TrainingPolicy,
    steps: int,
    batch_size: int,
    lr: float,
    runtime: Runtime | None = None,
    grad_accum: int = 1,
    optim: LocalOptim | None = None,
) -> list[ClientResult]:
    """:func:`train_client` for several clients at once: their local training is one batched pass per step
    (:func:`fedlora.models.client_batch.train_together`), from the same starts, on the same batches, to the same
    results up to float rounding; each is then evaluated on its local test split. Results in ``clients`` order."""
    runtime = runtime or runtime_of(model)
    collate = task.collate(tokenizer)
    jobs = [ClientJob(adapter=c.adapter, head=c.head, batches=round_batches(c.train, steps, batch_size, c.seed, collate))
            for c in clients]
    with phase("training"):
        outcomes = train_together(model, jobs, steps, lr, policy, clients[0].seed, loss=task.loss,
                                  loss_weight=task.loss_weight, optim=optim, runtime=runtime, micro_batches=grad_accum)
    tested = [i for i, c in enumerate(clients) if c.local_test is not None and len(c.local_test)]
    local: dict[int, dict[str, float]] = {}
    if tested:
        with phase("local evaluation"):
            # Shared passes only on an accelerator: evaluation batches already fill a CPU, and stacking them was
            # slower there (8 SST-2 clients × 200 rows: 10.7 s stacked vs 7.8 s one by one, docs/client-batching.md).
            together = task.evaluate_together(model, [clients[i].local_test for i in tested], tokenizer, runtime,
                                              [(outcomes[i].adapter, outcomes[i].head) for i in tested]
                                              ) if runtime.device.type == "cuda" else None
            if together is not None:  # the task evaluates the group in shared passes
                local = dict(zip(tested, together))
            else:  # one client at a time (e.g. a generative task)
                for i in tested:
                    set_adapter(model, outcomes[i].adapter)
                    set_head(model, outcomes[i].head)
                    local[i] = evaluate_on(model, clients[i].local_test, task, tokenizer, runtime)
    results = []
    for i, (client, outcome) in enumerate(zip(clients, outcomes)):
        update = ClientUpdate(adapter=outcome.adapter, num_examples=len(client.train), client_id=client.client_id)
        results.append(ClientResult(update=update, head=outcome.head, loss=outcome.loss, local_metrics=local.get(i)))
    return results


def average_heads(
    heads: list[dict[str, Tensor]], weights: Tensor, like: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """FedAvg of the classifier heads, Σ_u w_u head_u, summed in float64.

    ``like``: the global head, whose dtype and device the result takes (a float64 head of 1e300
    then shows up as Inf for the caller to refuse, rather than hiding in a float64 average); by
    default the first head's. Heads must have been validated (same keys and shapes).
    """
    reference = like if like is not None else heads[0]
    out: dict[str, Tensor] = {}
    for k, ref in reference.items():
        total = sum(float(w) * h[k].double() for w, h in zip(weights, heads))  # (same shape as ref)
        out[k] = torch.as_tensor(total).to(dtype=ref.dtype, device=ref.device)
    return out
