"""Build the federation from a config: the task's data split into clients, encoded once.

Client u gets a Dirichlet(α) share of the task's training set, skewed over the task's partition
key (GLUE: the labels; ``mathcode``: the domain) or, with ``--skew quantity``, an IID sample whose
size is skewed (client shares ~ Dirichlet(α)); or an IID share (``--alpha iid``); 20% of it (by default) is held out as u's local test
split for personalised metrics, and the task's test split is the global test set. Everything is
a function of ``config.seed``; what the rows are and how they are encoded is the task's business.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
from transformers import PreTrainedTokenizerBase

from fedlora.config.run import RunConfig
from fedlora.tasks.partitioning import partition, quantity_partition, split_local
from fedlora.tasks import Task, task_for


@dataclass(frozen=True)
class ClientData:
    client_id: str
    train: datasets.Dataset  # encoded by the task, torch format
    local_test: datasets.Dataset  # encoded, capped at config.max_local_eval_examples

    @property
    def num_examples(self) -> int:
        """n_u: the client's training examples, its weight in every average."""
        return len(self.train)


@dataclass(frozen=True)
class Federation:
    """The clients' data of one run, built once from the task and the config's partition (seeded).

    ``clients`` holds each client's encoded train and local-test splits, in partition order (index =
    partition id); ``test`` is the global test set every round is evaluated on.
    """

    task: Task
    clients: list[ClientData]
    test: datasets.Dataset  # the global test set (the task's test split), encoded
    histogram: str  # per-client sizes and partition-key counts, for the log


def load_data(config: RunConfig) -> datasets.DatasetDict:
    """``config.task``'s raw train and test splits from ``config.data_dir``. The engines call it before
    loading the model, so a missing or malformed file is one line in seconds, not after minutes of loading.

    Raises:
        ValueError: a malformed file (the task's message names file and line), or no train or test split.
    """
    task = task_for(config)
    raw = task.load(config.data_dir)
    missing = sorted({"train", "test"} - set(raw))
    if missing:
        raise ValueError(f"task {task.name!r} loaded splits {sorted(raw)}; it must provide train and test "
                         f"(missing {missing})")
    return raw


def build_federation(config: RunConfig, tokenizer: PreTrainedTokenizerBase,
                     raw: datasets.DatasetDict | None = None) -> Federation:
    """Load (unless ``raw``, :func:`load_data`'s result, is given), split, cap and encode ``config.task``'s
    data for ``config.clients`` clients.

    Reads ``task, data_dir, clients, alpha, skew, seed, max_length, local_test_fraction,
    max_local_eval_examples, max_eval_examples`` (and the task's own settings, :meth:`Task.configure`).

    Raises:
        ValueError: the task's data lacks a train or test split, or a Dirichlet split (``alpha``) was
            asked of a task without a partition key.
    """
    task = task_for(config)
    max_length = config.max_length or task.default_max_length
    raw = load_data(config) if raw is None else raw
    keys = task.partition_key(raw["train"]) if config.skew != "quantity" else None
    if config.alpha is not None and (config.skew == "quantity" or (config.skew == "auto" and keys is None)):
        parts = quantity_partition(raw["train"], config.clients, config.alpha, seed=config.seed)
    else:
        if keys is None and config.alpha is not None:
            raise ValueError(f"task {task.name!r} has no partition key, so --alpha {config.alpha} cannot skew its "
                             "mix; use --skew quantity (skewed client sizes) or --alpha iid")
        parts = partition(raw["train"], config.clients, config.alpha, seed=config.seed, keys=keys)
    clients = []
    for index, part in enumerate(parts):
        local_train, local_test = split_local(part, config.local_test_fraction, seed=config.seed + index)
        local_test = local_test.select(range(min(len(local_test), config.max_local_eval_examples)))
        clients.append(
            ClientData(
                client_id=f"client-{index}",
                train=task.encode(local_train, tokenizer, max_length),
                local_test=task.encode(local_test, tokenizer, max_length),
            )
        )
    test = raw["test"]
    if config.max_eval_examples is not None and len(test) > config.max_eval_examples:
        # A seeded subsample keeps the label mix of the test set (its first rows need not).
        test = test.shuffle(seed=config.seed).select(range(config.max_eval_examples))
    return Federation(
        task=task,
        clients=clients,
        test=task.encode(test, tokenizer, max_length),
        histogram=task.partition_table(parts),
    )
