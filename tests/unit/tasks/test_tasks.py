"""The task interface: registry, the built-in ``toy`` task, GLUE parity, and a task defined right here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedlora.aggregation import TrainingPolicy  # noqa: E402
from fedlora.protocol.client import evaluate_on, train_client  # noqa: E402
from fedlora.protocol.federation import build_federation  # noqa: E402
from fedlora.models.lora_state import get_adapter, get_head  # noqa: E402
from fedlora.models.runtime import Runtime  # noqa: E402
from fedlora.tasks import Task, available_tasks, get_task, register_task  # noqa: E402
from fedlora.tasks.classification import SequenceClassificationTask, accuracy  # noqa: E402

GLUE = Path(__file__).resolve().parents[4] / "shared" / "data" / "glue"
CPU = Runtime(torch.device("cpu"))


@register_task("twentyrows")
class TwentyRows(SequenceClassificationTask):
    """20 rows, defined in this file: a new task is one class and a decorator, no engine change."""

    metric = "share_right"  # a metric name no built-in task uses: the engine must take it from here

    def load(self, data_dir):
        words = [("good", 1), ("bad", 0)] * 10
        rows = {"sentence": [f"it was {w} number {i}" for i, (w, _) in enumerate(words)], "label": [y for _, y in words]}
        full = datasets.Dataset.from_dict(rows)
        return datasets.DatasetDict(train=full.select(range(16)), test=full.select(range(16, 20)))

    def score(self, predictions, labels):
        value = accuracy(predictions, labels)
        return {"share_right": value, "main": value}


@dataclass(frozen=True)
class Cfg:
    """The fields build_federation reads (RunConfig has them too)."""

    task: str = "toy"
    data_dir: str | None = None
    clients: int = 2
    alpha: float | None = 0.5
    skew: str = "auto"
    seed: int = 0
    max_length: int = 32
    local_test_fraction: float = 0.2
    max_local_eval_examples: int = 8
    max_eval_examples: int | None = None


@pytest.fixture(scope="module")
def toy_model():
    model, tokenizer = get_task("toy").build_model(None, 4, 8.0, ["query", "value"], seed=0)
    return model, tokenizer


# --- registry ------------------------------------------------------------------------------------


def test_registry_lists_glue_toy_and_tasks_registered_elsewhere() -> None:
    names = available_tasks()
    assert {"sst2", "mrpc", "rte", "cola", "qnli", "qqp", "mnli", "stsb", "toy", "twentyrows"} <= set(names)
    assert names == sorted(names)
    assert get_task("SST-2") is get_task("sst2") and get_task("glue/cola").name == "cola"
    assert get_task(get_task("toy")) is get_task("toy")
    assert isinstance(get_task("twentyrows"), TwentyRows) and get_task("twentyrows").name == "twentyrows"


def test_unknown_task_names_every_available_one() -> None:
    with pytest.raises(ValueError, match="Unknown task 'imdb'") as err:
        get_task("imdb")
    assert all(name in str(err.value) for name in available_tasks())


def test_register_task_refuses_duplicates_bad_names_and_non_tasks() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register_task("toy")(TwentyRows)
    with pytest.raises(ValueError, match="lower-case"):
        register_task("My-Task")(TwentyRows)
    with pytest.raises(TypeError, match="Task subclass"):
        register_task("notatask")(dict)
    assert "notatask" not in available_tasks()


def test_a_task_without_a_partition_key_has_its_client_sizes_skewed_not_its_mix() -> None:
    class Keyless(TwentyRows):
        def partition_key(self, train):
            return None

        def encode(self, ds, tokenizer, max_length):
            return ds

    keyless = Keyless()
    keyless.name = "keyless"
    config = Cfg(task=keyless, clients=2, skew="key")  # build_federation accepts a Task object as config.task
    with pytest.raises(ValueError, match="--skew quantity .* or --alpha iid"):
        build_federation(config, tokenizer=None)
    federation = build_federation(Cfg(task=keyless, clients=2), tokenizer=None)  # skew auto: quantity
    sizes = [len(c.train) + len(c.local_test) for c in federation.clients]
    assert sum(sizes) == 16 and min(sizes) >= 2
    table = keyless.partition_table([keyless.load(None)["train"]])
    assert table.splitlines() == ["client   n", "     0  16"]


# --- the toy task --------------------------------------------------------------------------------


def test_toy_data_is_fixed_balanced_and_disjoint() -> None:
    toy = get_task("toy")
    a, b = toy.load(None), toy.load("/ignored")
    assert (len(a["train"]), len(a["test"])) == (256, 64)
    assert a["train"]["sentence"] == b["train"]["sentence"] and a["test"]["label"] == b["test"]["label"]
    for split in a.values():
        assert np.bincount(split["label"]).tolist() == [len(split) // 2] * 2
        assert len(set(split["sentence"])) == len(split)
    assert not set(a["train"]["sentence"]) & set(a["test"]["sentence"])
    assert np.array_equal(toy.partition_key(a["train"]), np.asarray(a["train"]["label"]))


def test_toy_is_learned_in_a_few_local_steps(toy_model) -> None:
    model, tokenizer = toy_model
    toy = get_task("toy")
    data = toy.load(None)
    train, test = toy.encode(data["train"], tokenizer, 32), toy.encode(data["test"], tokenizer, 32)
    before = evaluate_on(model, test, toy, tokenizer)
    start_adapter, start_head = get_adapter(model), get_head(model)
    result = train_client(
        model, client_id="c", train=train, local_test=test, task=toy, tokenizer=tokenizer,
        global_adapter=start_adapter, global_head=start_head, policy=TrainingPolicy(),
        steps=8, batch_size=16, lr=5e-3, seed=0,
    )
    assert set(before) == {"accuracy", "main"} and before["main"] < 0.75
    assert result.local_metrics["main"] >= 0.9 > before["main"]


# --- a task registered in this file, through the engine ------------------------------------------


def test_a_twenty_row_task_trains_and_evaluates_through_the_engine_functions() -> None:
    task = get_task("twentyrows")
    model, tokenizer = task.build_model(None, 2, 4.0, ["query"], seed=0)
    federation = build_federation(Cfg(task="twentyrows"), tokenizer)
    assert federation.task is task and len(federation.clients) == 2 and len(federation.test) == 4
    assert sum(c.num_examples + len(c.local_test) for c in federation.clients) == 16
    result = train_client(
        model, client_id="client-0", train=federation.clients[0].train, local_test=federation.clients[0].local_test,
        task=task, tokenizer=tokenizer, global_adapter=get_adapter(model), global_head=get_head(model),
        policy=TrainingPolicy(), steps=2, batch_size=4, lr=1e-3, seed=0,
    )
    assert set(result.local_metrics) == {"share_right", "main"}
    assert set(evaluate_on(model, federation.test, task, tokenizer)) == {"share_right", "main"}
    assert result.update.num_examples == federation.clients[0].num_examples and result.loss > 0


# --- GLUE through the task interface = GLUE through the data functions, bit for bit ---------------

needs_glue = pytest.mark.skipif(not (GLUE / "SST-2").is_dir(), reason=f"real GLUE files expected at {GLUE}")


def columns(ds: datasets.Dataset) -> dict[str, list]:
    return {k: [v.tolist() for v in ds[k]] for k in ds.column_names}


@needs_glue
def test_sst2_task_loads_partitions_encodes_and_scores_like_the_glue_functions(toy_model) -> None:
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    from fedlora.tasks.glue import compute_metrics, load_glue, partition, tokenize
    from fedlora.tasks.partitioning import column  # one Arrow read (iterating a Column is slow)
    from fedlora.models.training import evaluate

    model, tokenizer = toy_model  # the same MiniLM; the head size (2) fits SST-2
    sst2 = get_task("sst2")
    raw, old = sst2.load(GLUE), load_glue("sst2", GLUE)
    assert all(raw[s].data.table.equals(old[s].data.table) for s in ("train", "test"))
    keys = sst2.partition_key(raw["train"])
    assert keys.dtype == np.int64 and np.array_equal(keys, column(old["train"], "label"))
    # Partitioning 67k rows costs ~5 s a time; the dev rows run the same code on the same kind of data.
    keys = sst2.partition_key(raw["test"])
    new_parts = partition(raw["test"], 3, 0.5, seed=0, keys=keys)
    old_parts = partition(old["test"], 3, 0.5, seed=0)
    assert len(new_parts) == len(old_parts) == 3
    assert all(np.array_equal(column(a, "sentence"), column(b, "sentence")) for a, b in zip(new_parts, old_parts))
    test = raw["test"].select(range(96))
    encoded = sst2.encode(test, tokenizer, 32)
    assert columns(encoded) == columns(tokenize(test, tokenizer, "sst2", 32))
    loader = DataLoader(encoded, batch_size=128, shuffle=False, collate_fn=DataCollatorWithPadding(tokenizer))
    assert sst2.evaluate(model, encoded, tokenizer, CPU) == compute_metrics("sst2", *evaluate(model, loader, 2))


@needs_glue
@pytest.mark.parametrize("clients", [3, 100])  # 100: above partitioning.FEW, the many-client index paths
def test_build_federation_on_glue_equals_the_pre_task_pipeline(toy_model, clients: int) -> None:
    from fedlora.tasks.glue import label_histogram, load_glue, partition, split_local, tokenize

    _, tokenizer = toy_model
    config = Cfg(task="rte", data_dir=str(GLUE), clients=clients, max_eval_examples=50)
    federation = build_federation(config, tokenizer)
    # What build_federation did before tasks existed, line for line (one client per dataset pass, flwr's
    # load_partition for each client).
    raw = load_glue("rte", GLUE)
    parts = partition(raw["train"], clients, 0.5, seed=0)
    for index, (part, client) in enumerate(zip(parts, federation.clients)):
        if index not in (0, 1, clients // 2, clients - 1):
            continue
        local_train, local_test = split_local(part, 0.2, seed=index)
        local_test = local_test.select(range(min(len(local_test), 8)))
        assert columns(client.train) == columns(tokenize(local_train, tokenizer, "rte", 32))
        assert columns(client.local_test) == columns(tokenize(local_test, tokenizer, "rte", 32))
    test = raw["test"].shuffle(seed=0).select(range(50))
    assert columns(federation.test) == columns(tokenize(test, tokenizer, "rte", 32))
    assert federation.histogram == label_histogram(parts, 2)
