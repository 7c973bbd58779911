"""Split a training set across federated clients (IID or Dirichlet label skew) and locally."""

from __future__ import annotations

import warnings

import datasets
import numpy as np
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

# STS-B scores live in [0, 5]; Dirichlet skew needs classes, so scores are binned into [0,1), ...,
# [4,5] for partitioning only (the partitions keep the float labels).
NUM_REGRESSION_BINS = 5
FEW = 64  # up to this many clients, partitions are read through flwr's public load_partition one by one


def column(ds: datasets.Dataset, name: str) -> np.ndarray:
    """One column as a numpy array in one Arrow read (``np.asarray(ds[name])`` iterates row by row)."""
    return ds.select_columns([name]).with_format("numpy")[:][name]


def partition_labels(train: datasets.Dataset) -> np.ndarray:
    """Integer labels used for partitioning/histograms: class ids, or binned float scores."""
    labels = column(train, "label")
    if np.issubdtype(labels.dtype, np.floating):
        return np.clip(np.floor(labels), 0, NUM_REGRESSION_BINS - 1).astype(np.int64)
    return labels.astype(np.int64)


def partition(
    train: datasets.Dataset,
    num_clients: int,
    alpha: float | None,
    seed: int,
    min_partition_size: int = 2,
    keys: np.ndarray | None = None,
) -> list[datasets.Dataset]:
    """:func:`partition_rows` as datasets: client u's rows of ``train``."""
    if keys is None:
        if alpha is not None and "label" not in train.column_names:
            raise ValueError(f"a Dirichlet split needs partition keys or a 'label' column; the data has "
                             f"{train.column_names}.")
        # IID shards ignore the keys: a keyless data set gets a constant one.
        keys = partition_labels(train) if "label" in train.column_names else np.zeros(len(train), dtype=np.int64)
    return [train.select(r) for r in partition_rows(len(train), num_clients, alpha, seed, min_partition_size, keys)]


def partition_rows(
    n: int,
    num_clients: int,
    alpha: float | None,
    seed: int,
    min_partition_size: int,
    keys: np.ndarray,
) -> list[np.ndarray]:
    """Split rows 0 … n−1 into ``num_clients`` disjoint int64 index arrays that together cover every row.

    ``keys`` (n,) are the integer keys the Dirichlet skew is drawn over (a task's ``partition_key``;
    :func:`partition` defaults them to the ``label`` column, :func:`partition_labels`).
    ``alpha=None`` gives IID shards (rows shuffled with ``seed``, then flwr's ``IidPartitioner``).
    Otherwise flwr's ``DirichletPartitioner`` draws each key's client proportions from
    Dirichlet(alpha); smaller alpha = more skew. It is run with ``self_balancing=False`` (its
    self-balancing renormalisation divides by zero when tiny alphas yield exact-zero proportions)
    and makes up to 11 draws to meet ``min_partition_size``. Small alphas on binary tasks fail that
    often (alpha=0.1, 10 clients on RTE: about half the seeds), so if all draws fail we take a
    draw with no minimum and top up the small clients with rows moved from the largest one. That
    always terminates. Same ``seed`` -> identical partitions.

    Raises:
        ValueError: bad ``num_clients``/``alpha``, or fewer than ``num_clients * min_partition_size`` rows.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}.")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"alpha must be > 0 (or None for IID), got {alpha}.")
    if n < num_clients * max(min_partition_size, 1):
        raise ValueError(
            f"Cannot give {num_clients} clients at least {max(min_partition_size, 1)} rows each "
            f"from {n} rows; use fewer clients or a smaller min_partition_size."
        )
    keys = np.asarray(keys)
    if keys.shape != (n,) or not np.issubdtype(keys.dtype, np.integer):
        raise ValueError(f"partition keys must be an integer array of shape ({n},), got {keys.dtype} {keys.shape}.")
    # Partition a small (row id, key) table, not the text: cheaper, and the row ids let us
    # rebalance and then select from the original dataset with all its columns.
    table = datasets.Dataset.from_dict({"row": np.arange(n), "label": keys})
    if alpha is None:
        rows = _iid_rows(table, num_clients, seed)
    else:
        rows = _dirichlet_rows(table, num_clients, float(alpha), seed, min_partition_size)
    # An empty partition's row column comes back as float64, and ``select`` then fails inside Arrow
    # with an IndexError (many clients, few rows, e.g. 500 clients on RTE): row ids are integers.
    return [np.asarray(r, dtype=np.int64) for r in rows]


def quantity_partition(
    train: datasets.Dataset, num_clients: int, alpha: float, seed: int, min_partition_size: int = 2
) -> list[datasets.Dataset]:
    """:func:`quantity_rows` as datasets: client u's rows of ``train``."""
    return [train.select(r) for r in quantity_rows(len(train), num_clients, alpha, seed, min_partition_size)]


def quantity_rows(n: int, num_clients: int, alpha: float, seed: int, min_partition_size: int = 2) -> list[np.ndarray]:
    """Quantity skew: client shares ~ Dirichlet(alpha · 1), rows assigned IID (shuffled with ``seed``).

    The usual non-IID setting for instruction data, which has no labels to skew: clients hold the
    same kind of rows in very different amounts. Each client gets ``min_partition_size`` rows, the
    rest is split by a multinomial draw with the Dirichlet shares; smaller alpha = more unequal.
    Disjoint, covers every row, deterministic in ``seed``.

    Raises:
        ValueError: bad ``num_clients``/``alpha``, or fewer than ``num_clients * min_partition_size`` rows.
    """
    if num_clients < 1 or not alpha > 0:
        raise ValueError(f"need num_clients >= 1 and alpha > 0, got {num_clients} and {alpha}.")
    if n < num_clients * min_partition_size:
        raise ValueError(f"Cannot give {num_clients} clients at least {min_partition_size} rows each from {n} "
                         "rows; use fewer clients.")
    rng = np.random.default_rng(seed)
    shares = rng.dirichlet(np.full(num_clients, float(alpha)))  # (U,)
    sizes = min_partition_size + rng.multinomial(n - num_clients * min_partition_size, shares)  # (U,), sums to n
    order = rng.permutation(n)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.sort(order[bounds[u]:bounds[u + 1]]) for u in range(num_clients)]


def _iid_rows(table: datasets.Dataset, num_clients: int, seed: int) -> list[np.ndarray]:
    """IidPartitioner shards contiguously, so shuffle first or sorted files would give label skew."""
    partitioner = IidPartitioner(num_partitions=num_clients)
    partitioner.dataset = table.shuffle(seed=seed)
    if num_clients <= FEW:
        return [column(partitioner.load_partition(i), "row") for i in range(num_clients)]
    # Many clients: the same contiguous shards (datasets' Dataset.shard arithmetic) cut from one read of the
    # shuffled rows, not one Arrow select per client (tests/unit/tasks: equal to the flwr path).
    shuffled = column(partitioner.dataset, "row")
    size, extra = divmod(len(shuffled), num_clients)
    starts = [size * i + min(i, extra) for i in range(num_clients + 1)]
    return [shuffled[starts[i]:starts[i + 1]] for i in range(num_clients)]


def _dirichlet_rows(
    table: datasets.Dataset, num_clients: int, alpha: float, seed: int, min_size: int
) -> list[np.ndarray]:
    """Row ids per client from DirichletPartitioner, topped up to ``min_size`` if it gave up."""

    def draw(min_partition_size: int) -> list[np.ndarray]:
        partitioner = DirichletPartitioner(
            num_partitions=num_clients, partition_by="label", alpha=alpha,
            min_partition_size=min_partition_size, self_balancing=False, shuffle=True, seed=seed,
        )
        partitioner.dataset = table
        first = column(partitioner.load_partition(0), "row")  # draws every partition (or raises)
        drawn = getattr(partitioner, "_partition_id_to_indices", None)  # flwr's table of them, if it has one
        if num_clients <= FEW or not isinstance(drawn, dict) or len(drawn) != num_clients:
            return [first] + [column(partitioner.load_partition(i), "row") for i in range(1, num_clients)]
        # Many clients: read the drawn indices instead of one Arrow select per client (the table's row
        # column is its index, so indices are row ids; tests/unit/tasks: equal to the load_partition path).
        return [np.asarray(drawn[i], dtype=np.int64) for i in range(num_clients)]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flwr warns on every redraw; the fallback below handles it
        try:
            return draw(min_size)
        except ValueError:
            rows = draw(0)  # a minimum of 0 is met by the first draw
    return _top_up(rows, min_size)


def _top_up(rows: list[np.ndarray], min_size: int) -> list[np.ndarray]:
    """Move rows from the currently largest client to each client below ``min_size``.

    Terminates: while some client is below ``min_size``, the largest holds more than ``min_size``
    (the caller checked ``total >= num_clients * min_size``), so each step moves >= 1 row. The donor's
    rows are already shuffled, so taking from its tail is a random sample.
    """
    rows = [np.asarray(r, dtype=np.int64) for r in rows]  # an empty draw is float64: keep ids integer
    for i in range(len(rows)):
        while len(rows[i]) < min_size:
            donor = int(np.argmax([len(r) for r in rows]))
            take = min(min_size - len(rows[i]), len(rows[donor]) - min_size)
            rows[i] = np.concatenate([rows[i], rows[donor][-take:]])
            rows[donor] = rows[donor][:-take]
    return rows


def split_local(
    client_train: datasets.Dataset, test_fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split one client's data into (local train, local test) for personalised evaluation.

    ``round(n * test_fraction)`` rows go to test, but at least 1 when ``test_fraction > 0`` and
    at least 1 row stays in train. Deterministic given ``seed``; not stratified.
    """
    train, test = split_local_rows(len(client_train), test_fraction, seed)
    return client_train.select(train), client_train.select(test)


def split_local_rows(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`split_local` on positions 0 … n−1: (local train positions, local test positions)."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}.")
    n_test = round(n * test_fraction)
    if test_fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    elif n < 2:
        n_test = 0  # a single row cannot be split; keep it for training
    order = np.random.default_rng(seed).permutation(n)
    return order[n_test:], order[:n_test]


def label_histogram(parts: list[datasets.Dataset], num_labels: int) -> str:
    """A fixed-width table: one line per client with its size and per-label counts.

    For regression (``num_labels == 1``) the columns are the score bins used by :func:`partition`.
    """
    if num_labels == 1:
        names = [f"[{b},{b + 1})" for b in range(NUM_REGRESSION_BINS - 1)]
        names.append(f"[{NUM_REGRESSION_BINS - 1},{NUM_REGRESSION_BINS}]")
    else:
        names = [str(k) for k in range(num_labels)]
    header = ["client", "n", *names]
    lines = []
    for cid, part in enumerate(parts):
        counts = np.bincount(partition_labels(part), minlength=len(names))
        lines.append([str(cid), str(len(part)), *(str(int(c)) for c in counts)])
    widths = [max(len(row[j]) for row in [header, *lines]) for j in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *lines])
