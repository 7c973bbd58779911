"""``load_glue``: one entry point for GLUE, from a local directory (offline) or the Hugging Face hub."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import datasets
import numpy as np

from fedlora.tasks.glue.files import find_layout, read_file
from fedlora.tasks.glue.specs import TaskSpec, get_spec

DATA_DIR_ENV = "FEDLORA_DATA_DIR"
HUB_DATASET = "nyu-mll/glue"
# QNLI's train file is not in the offline snapshot. Its dev set is then split into train/test with a
# FIXED seed (not the experiment seed) so that the global test set is the same in every run.
QNLI_DEV_SPLIT_SEED = 0
QNLI_DEV_TEST_FRACTION = 0.2


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The explicit ``data_dir``, else ``$FEDLORA_DATA_DIR`` (if non-empty), else None (= use the hub)."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    return None if data_dir is None else Path(data_dir).expanduser()


def load_glue(task: str | TaskSpec, data_dir: str | Path | None = None) -> datasets.DatasetDict:
    """Load a GLUE task as ``DatasetDict(train=..., test=...)``.

    ``test`` is the task's labelled dev set (GLUE hides its test labels), used as the global test set.
    Columns are the task's ``text_fields`` plus ``label`` (ClassLabel int, or float32 for STS-B).

    With a ``data_dir`` (or ``$FEDLORA_DATA_DIR``) the original GLUE files are read from disk and the
    network is never touched. Otherwise ``nyu-mll/glue`` is loaded from the hub.

    Offline QNLI without ``QNLI/train.tsv``: the 5,463-row dev set is split deterministically
    (seed 0, 20% test) into train/test, with a ``UserWarning``: the scores are then not comparable to
    published QNLI dev results.

    Raises:
        ValueError: unknown task, or a malformed file (the message gives file and line).
        FileNotFoundError: the directory or a needed file is missing (the message gives the path).
    """
    spec = get_spec(task)
    root = resolve_data_dir(data_dir)
    if root is None:
        return _load_from_hub(spec)
    return _load_from_dir(spec, root)


def _load_from_dir(spec: TaskSpec, root: Path) -> datasets.DatasetDict:
    """Read ``root/<TaskFolder>/...`` in the GLUE layout."""
    folder, layout = find_layout(spec, root)
    test = read_file(spec, folder / layout.test, layout.formats)
    if layout.train is not None:
        train = read_file(spec, folder / layout.train, layout.formats)
        return datasets.DatasetDict(train=train, test=test)
    warnings.warn(
        f"{folder / 'train.tsv'} not found: splitting {folder / layout.test} ({len(test)} rows) into "
        f"train/test ({1 - QNLI_DEV_TEST_FRACTION:.0%}/{QNLI_DEV_TEST_FRACTION:.0%}, seed "
        f"{QNLI_DEV_SPLIT_SEED}). Scores are not comparable to the official {spec.name} dev set.",
        UserWarning,
        stacklevel=3,
    )
    order = np.random.default_rng(QNLI_DEV_SPLIT_SEED).permutation(len(test))
    n_test = round(len(test) * QNLI_DEV_TEST_FRACTION)
    return datasets.DatasetDict(
        train=test.select(np.sort(order[n_test:])), test=test.select(np.sort(order[:n_test]))
    )


class DataUnavailableError(OSError):
    """The data is neither in --data-dir nor reachable on the hub (offline, or no network)."""


def hub_unavailable(what: str, exc: BaseException, example: str) -> DataUnavailableError:
    """One line saying what could not be loaded, why (first line of the hub's error), and the offline fix."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return DataUnavailableError(f"could not load {what} from the Hugging Face hub ({reason}); offline (no network, "
                                f"or HF_HUB_OFFLINE=1), pass --data-dir (or set {DATA_DIR_ENV}) to {example}")


def _load_from_hub(spec: TaskSpec) -> datasets.DatasetDict:
    """Download (or reuse the cache of) ``nyu-mll/glue/<task>``; keep only the columns we use."""
    try:
        hub = datasets.load_dataset(HUB_DATASET, spec.name)
    except Exception as exc:  # offline users get one line and a pointer to the local alternative
        raise hub_unavailable(f"{HUB_DATASET}/{spec.name}", exc, "a GLUE folder such as ../shared/data/glue") from None
    keep = [*spec.text_fields, "label"]
    return datasets.DatasetDict(
        train=hub["train"].select_columns(keep), test=hub[spec.eval_split].select_columns(keep)
    )
