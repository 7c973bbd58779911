"""Build the federation from a config: the task's data split into clients, encoded once.

Client u gets a Dirichlet(α) share of the task's training set, skewed over the task's partition
key (GLUE: the labels; ``mathcode``: the domain) or, with ``--skew quantity``, an IID sample whose
size is skewed (client shares ~ Dirichlet(α)); or an IID share (``--alpha iid``); 20% of it (by default) is held out as u's local test
split for personalised metrics, and the task's test split is the global test set. Everything is
a function of ``config.seed``; what the rows are and how they are encoded is the task's business.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from fedlora.config.run import RunConfig
from fedlora.tasks.partitioning import partition_rows, quantity_rows, split_local_rows
from fedlora.tasks import Task, task_for
from fedlora.tasks.base import partition_table


class ClientData:
    """One client's data: its encoded training split and its local test split (torch format).

    Either given as datasets, or as row indices into one encoded dataset shared by every client (what
    :func:`build_federation` does): then each split becomes a dataset the first time it is read, so a
    10,000-client federation costs no Arrow work for the clients a run never samples.
    """

    def __init__(self, client_id: str, train: datasets.Dataset | None = None,
                 local_test: datasets.Dataset | None = None, *, source: datasets.Dataset | None = None,
                 train_rows: np.ndarray | None = None, test_rows: np.ndarray | None = None) -> None:
        if (train is None or local_test is None) == (source is None or train_rows is None or test_rows is None):
            raise TypeError("ClientData takes either train and local_test, or source with train_rows and test_rows")
        self.client_id = client_id
        self._source, self._rows = source, {"train": train_rows, "local_test": test_rows}
        if train is not None and local_test is not None:
            self.__dict__.update(train=train, local_test=local_test)  # the cached properties' values

    @functools.cached_property
    def train(self) -> datasets.Dataset:
        return self._take("train")

    @functools.cached_property
    def local_test(self) -> datasets.Dataset:
        return self._take("local_test")

    def _take(self, split: str) -> datasets.Dataset:
        """``source.select(rows)`` with a fingerprint derived from the source's instead of hashing the indices
        (the hash is most of a select's cost; the split is a function of the source and the seed)."""
        assert self._source is not None
        tag = f"{self._source._fingerprint}-{self.client_id}-{split}"
        return self._source.select(self._rows[split], new_fingerprint=hashlib.sha256(tag.encode()).hexdigest()[:32])

    @property
    def num_examples(self) -> int:
        """n_u: the client's training examples, its weight in every average."""
        rows = self._rows["train"]
        return len(rows) if rows is not None else len(self.train)

    @property
    def num_local_test(self) -> int:
        rows = self._rows["local_test"]
        return len(rows) if rows is not None else len(self.local_test)


@dataclass(frozen=True)
class Federation:
    """The clients' data of one run, built once from the task and the config's partition (seeded).

    ``clients`` holds each client's encoded train and local-test splits, in partition order (index =
    partition id); ``test`` is the global test set every round is evaluated on.
    """

    task: Task
    clients: list[ClientData]
    test: datasets.Dataset  # the global test set (the task's test split), encoded
    histogram: str  # per-client sizes and partition-key counts, one line per client, for the log

    def summary(self, max_rows: int = 20) -> str:
        """The partition for a terminal: the whole table up to ``max_rows`` clients; beyond, its first rows and
        the spread of client sizes (a 10,000-client table is for the log, ``-v``)."""
        lines = self.histogram.splitlines()
        if len(self.clients) <= max_rows:
            return self.histogram
        sizes = np.sort([c.num_examples + c.num_local_test for c in self.clients])
        quartiles = np.percentile(sizes, [25, 50, 75])
        return "\n".join([*lines[:1 + max_rows // 2], f"... {len(self.clients) - max_rows // 2} more clients "
                           "(the full table: -v)",
                           f"rows per client: min {sizes[0]}, quartiles {quartiles[0]:g} / {quartiles[1]:g} / "
                           f"{quartiles[2]:g}, max {sizes[-1]}; {int((sizes < 2).sum())} client(s) with fewer than "
                           "2 rows"])


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
    n = len(raw["train"])
    keys = task.partition_key(raw["train"]) if config.skew != "quantity" else None
    if config.alpha is not None and (config.skew == "quantity" or (config.skew == "auto" and keys is None)):
        parts = quantity_rows(n, config.clients, config.alpha, seed=config.seed)
    else:
        if keys is None and config.alpha is not None:
            raise ValueError(f"task {task.name!r} has no partition key, so --alpha {config.alpha} cannot skew its "
                             "mix; use --skew quantity (skewed client sizes) or --alpha iid")
        parts = partition_rows(n, config.clients, config.alpha, config.seed, 2,
                               keys if keys is not None else np.zeros(n, dtype=np.int64))
    # The training set is encoded once and each client gets its rows of it (encoding is row by row, so
    # this is what encoding each share gives); index arithmetic in numpy, one Arrow select per split:
    # 10,000 SST-2 clients took 134 s with an encoding pass and three selects per client.
    encoded = task.encode(raw["train"], tokenizer, max_length)
    clients = []
    for index, rows in enumerate(parts):
        train_pos, test_pos = split_local_rows(len(rows), config.local_test_fraction, seed=config.seed + index)
        test_pos = test_pos[:config.max_local_eval_examples]
        clients.append(ClientData(f"client-{index}", source=encoded, train_rows=rows[train_pos],
                                  test_rows=rows[test_pos]))
    test = raw["test"]
    if config.max_eval_examples is not None and len(test) > config.max_eval_examples:
        # A seeded subsample keeps the label mix of the test set (its first rows need not).
        test = test.shuffle(seed=config.seed).select(range(config.max_eval_examples))
    return Federation(
        task=task,
        clients=clients,
        test=task.encode(test, tokenizer, max_length),
        histogram=partition_table([keys[r] for r in parts] if keys is not None else None, [len(r) for r in parts]),
    )
