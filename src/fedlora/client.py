"""One client's round: start from the global adapter, train locally, upload.

Shared by the local simulation engine and the Flower ClientApp, so both train identically.
Batches for (round, client) are drawn from a generator seeded by (seed, round, client): a
resumed run, or a client on another machine, sees exactly the same examples in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from torch import Tensor, nn
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from fedlora.aggregation import Adapter, ClientUpdate, LoraPair, TrainingPolicy
from fedlora.data import compute_metrics
from fedlora.data.tasks import TaskSpec
from fedlora.peft_bridge import get_adapter, get_head, set_adapter, set_head
from fedlora.training import evaluate, train_local


def derived_seed(seed: int, round_: int, client: int) -> int:
    """A distinct, reproducible seed per (run seed, round, client)."""
    return int(np.random.SeedSequence([seed, round_, client]).generate_state(1)[0])


def round_batches(
    data: datasets.Dataset, steps: int, batch_size: int, seed: int, tokenizer: PreTrainedTokenizerBase
) -> Iterator[dict[str, Tensor]]:
    """``steps`` padded batches sampled without replacement (cycling if the client is small)."""
    generator = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    order = torch.cat([torch.randperm(len(data), generator=generator) for _ in range(-(-needed // len(data)))])
    collate = DataCollatorWithPadding(tokenizer)
    for step in range(steps):
        rows = data[order[step * batch_size : (step + 1) * batch_size].tolist()]
        yield collate([{k: rows[k][i] for k in rows} for i in range(len(rows["labels"]))])


def eval_loader(data: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, batch_size: int = 128):
    collate = DataCollatorWithPadding(tokenizer)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate)


def evaluate_on(model: nn.Module, data: datasets.Dataset, task: TaskSpec, tokenizer: PreTrainedTokenizerBase) -> dict[str, float]:
    preds, labels = evaluate(model, eval_loader(data, tokenizer), task.num_labels)
    return compute_metrics(task, preds, labels)


@dataclass
class ClientResult:
    update: ClientUpdate
    head: dict[str, Tensor]
    loss: float
    local_metrics: dict[str, float] | None  # personalised metrics on the client's local test split


def train_client(
    model: nn.Module,
    *,
    client_id: str,
    train: datasets.Dataset,
    local_test: datasets.Dataset | None,
    task: TaskSpec,
    tokenizer: PreTrainedTokenizerBase,
    global_adapter: Adapter,
    global_head: dict[str, Tensor],
    local_B: dict[str, Tensor] | None,
    policy: TrainingPolicy,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> ClientResult:
    """Load the global state (with the client's own B under FedSA-LoRA), train, and report."""
    start = global_adapter
    if policy.local_B and local_B is not None:
        start = {m: LoraPair(A=p.A, B=local_B[m]) for m, p in global_adapter.items()}
    set_adapter(model, start)
    set_head(model, global_head)
    stats = train_local(model, round_batches(train, steps, batch_size, seed, tokenizer), steps, lr, policy, seed)
    local_metrics = evaluate_on(model, local_test, task, tokenizer) if local_test is not None and len(local_test) else None
    update = ClientUpdate(adapter=get_adapter(model), num_examples=len(train), client_id=client_id)
    return ClientResult(update=update, head=get_head(model), loss=float(stats["loss"]), local_metrics=local_metrics)


def average_heads(heads: list[dict[str, Tensor]], weights: Tensor) -> dict[str, Tensor]:
    """FedAvg of the classifier heads, Σ_u w_u head_u."""
    return {k: sum(float(w) * h[k] for w, h in zip(weights, heads)) for k in heads[0]}

