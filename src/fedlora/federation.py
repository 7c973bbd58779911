"""Build the federation from a config: the task's data split into clients, tokenised once.

Client u gets a Dirichlet(α) (or IID) share of the task's training set; 20% of it (by default)
is held out as u's local test split for personalised accuracy, and the task's dev set is the
global test set. Everything is a function of ``config.seed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
from transformers import PreTrainedTokenizerBase

from fedlora.config import RunConfig
from fedlora.data import get_task, label_histogram, load_glue, partition, split_local, tokenize
from fedlora.data.tasks import TaskSpec


@dataclass(frozen=True)
class ClientData:
    client_id: str
    train: datasets.Dataset  # tokenised, torch format
    local_test: datasets.Dataset  # tokenised, capped at config.max_local_eval_examples

    @property
    def num_examples(self) -> int:
        """n_u: the client's training examples, its weight in every average."""
        return len(self.train)


@dataclass(frozen=True)
class Federation:
    task: TaskSpec
    clients: list[ClientData]
    test: datasets.Dataset  # the global test set (the task's dev split), tokenised
    histogram: str  # per-client label counts, for the log


def build_federation(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> Federation:
    task = get_task(config.task)
    raw = load_glue(task, config.data_dir)
    parts = partition(raw["train"], config.clients, config.alpha, seed=config.seed)
    clients = []
    for index, part in enumerate(parts):
        local_train, local_test = split_local(part, config.local_test_fraction, seed=config.seed + index)
        local_test = local_test.select(range(min(len(local_test), config.max_local_eval_examples)))
        clients.append(
            ClientData(
                client_id=f"client-{index}",
                train=tokenize(local_train, tokenizer, task, config.max_length),
                local_test=tokenize(local_test, tokenizer, task, config.max_length),
            )
        )
    test = raw["test"]
    if config.max_eval_examples is not None and len(test) > config.max_eval_examples:
        # A seeded subsample keeps the label mix of the dev set (its first rows need not).
        test = test.shuffle(seed=config.seed).select(range(config.max_eval_examples))
    return Federation(
        task=task,
        clients=clients,
        test=tokenize(test, tokenizer, task, config.max_length),
        histogram=label_histogram(parts, max(task.num_labels, 2) if not task.is_regression else 5),
    )
