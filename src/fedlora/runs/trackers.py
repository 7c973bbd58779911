"""Optional experiment trackers (TensorBoard, Weights & Biases, MLflow) fed from the round records.

Why here: both engines write every round through :class:`fedlora.runs.outputs.RunFolder`, so one hook there
covers ``fedlora run``, the demo, the bench and Flower alike. Off by default (``--log-to``
empty); each tracker is imported only when asked for, and a missing one is a one-line error that
says what to install. Names are those of ``metrics.jsonl``: a top-level number keeps its key
(``global_metric``, ``divergence``), a nested one joins keys with ``/`` (``global/accuracy``,
``local_metric/client-3``), so per-client and global values land in their own groups.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from fedlora.config.run import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow")
INSTALL = {"tensorboard": "pip install 'fedlora[tensorboard]' (or: pip install tensorboard)",
           "wandb": "pip install wandb", "mlflow": "pip install mlflow"}


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of one metrics.jsonl record, ``{name: value}``; lists, strings, booleans, None and
    ``round`` (the step) are left out."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and name != "round":
            flat[name] = float(value)
    return flat


def check_targets(names: str | Iterable[str]) -> tuple[str, ...]:
    """``names`` ("tensorboard,wandb", or a list) validated against :data:`TRACKERS` (ConfigError naming the bad one)."""
    names = tuple(names.replace(",", " ").split()) if isinstance(names, str) else tuple(names)
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"--log-to {' '.join(unknown)}: unknown tracker; use any of {', '.join(TRACKERS)}")
    return names


def check_installed(names: str | Iterable[str]) -> tuple[str, ...]:
    """``names`` validated, and each tracker's package present (ConfigError with the pip command), without
    importing any: called before a run writes anything, so a missing package costs no run directory."""
    names = check_targets(names)
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"--log-to {name}: the {name} package is not installed; {INSTALL[name]}")
    return names


class _TensorBoard:
    def __init__(self, out: Path, config_json: str) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", f"```\n{config_json}\n```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a crashed run keeps every finished round

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, out: Path, config_json: str) -> None:
        wandb = importlib.import_module("wandb")

        self.run = wandb.init(project="fedlora", name=out.name, dir=str(out), config=json.loads(config_json))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, out: Path, config_json: str) -> None:
        mlflow = importlib.import_module("mlflow")

        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=out.name)
        mlflow.log_params({k: str(v)[:500] for k, v in json.loads(config_json).items()})

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


_OPENERS: dict[str, Callable[[Path, str], Tracker]] = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


def open_trackers(names: str | Iterable[str], out: Path, config_json: str) -> list[Tracker]:
    """One tracker per name, writing next to the run (TensorBoard: ``<out>/tensorboard``)."""
    trackers: list[Tracker] = []
    for name in check_targets(names):
        try:
            trackers.append(_OPENERS[name](out, config_json))
        except ImportError:
            raise ConfigError(f"--log-to {name}: the {name} package is not installed; {INSTALL[name]}") from None
    return trackers


def log_records(trackers: list[Tracker], records: Iterable[Mapping[str, Any]]) -> None:
    """Send each record's numbers to every tracker, at step = its round."""
    for record in records:
        metrics = flatten(record)
        for tracker in trackers:
            tracker.log(metrics, int(record["round"]))
