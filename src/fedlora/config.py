"""One frozen, validated configuration per federated run (local engine and Flower alike).

Every option is checked up front, before any model or data is loaded, with a message that
names the option and the accepted values; a run that starts will not die on a typo later.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.aggregation import available_methods, get_method
from fedlora.data import TASKS, get_task


class ConfigError(ValueError):
    """An invalid option; the message names it and what is accepted."""


@dataclass(frozen=True)
class RunConfig:
    task: str = "sst2"
    data_dir: str | None = None  # GLUE layout directory; None: $FEDLORA_DATA_DIR, else the hub
    model: str | None = None  # hub id or local path; None: the bundled all-MiniLM-L6-v2
    method: str = "flora-na"
    method_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"solver": "adamw"}
    rounds: int = 20
    clients: int = 10
    alpha: float | None = 0.5  # Dirichlet concentration over labels; None = IID
    fraction: float = 1.0  # share of clients sampled each round
    min_clients: int = 1  # fewer valid updates than this: the round is skipped, the global model kept
    local_steps: int = 10
    batch_size: int = 32
    lr: float = 5e-3  # AdamW on LoRA + head; checked on MiniLM/SST-2 (5e-4 barely moves in 40 steps)
    max_length: int = 64
    rank: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = ("query", "value")
    seed: int = 0
    eval_local_every: int = 5  # rounds between local (personalised) evaluations; 0: never
    local_test_fraction: float = 0.2
    max_eval_examples: int | None = None  # cap on the global test set (None: all of it)
    max_local_eval_examples: int = 200  # cap per client's local test split
    out: str = "runs/latest"

    def __post_init__(self) -> None:
        _validate(self)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "RunConfig":
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(RunConfig)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"config.json has unknown options {unknown}; known: {sorted(known)}")
        if "target_modules" in raw:
            raw["target_modules"] = tuple(raw["target_modules"])
        return RunConfig(**raw)

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    @property
    def num_sampled(self) -> int:
        return max(1, round(self.fraction * self.clients))


def _require(ok: bool, option: str, value: Any, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"--{option.replace('_', '-')}={value!r} is invalid: {accepted}")


def _validate(c: RunConfig) -> None:
    try:
        get_task(c.task)
    except ValueError:
        _require(False, "task", c.task, f"use one of {', '.join(sorted(TASKS))}")
    _require(c.method in available_methods(), "method", c.method, f"use one of {', '.join(available_methods())}")
    spec = get_method(c.method)
    allowed = set(spec.options) | {"weighting"}
    bad = sorted(set(c.method_options) - allowed)
    _require(not bad, "method_option", bad, f"{c.method} accepts {', '.join(sorted(allowed)) or 'no options'}")
    weighting = c.method_options.get("weighting", "examples")
    _require(weighting in spec.weightings, "method_option", f"weighting={weighting}", f"use one of {spec.weightings}")
    for name in ("rounds", "clients", "local_steps", "batch_size", "max_length", "rank", "min_clients"):
        value = getattr(c, name)
        _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, value, "must be an integer >= 1")
    _require(c.alpha is None or c.alpha > 0, "alpha", c.alpha, "the Dirichlet concentration must be > 0 (or 'iid')")
    _require(0 < c.fraction <= 1, "fraction", c.fraction, "the share of clients per round must be in (0, 1]")
    _require(c.lr > 0, "lr", c.lr, "the learning rate must be > 0")
    _require(c.lora_alpha > 0, "lora_alpha", c.lora_alpha, "must be > 0 (the LoRA scaling is lora_alpha / rank)")
    _require(len(c.target_modules) > 0, "target_modules", c.target_modules, "name at least one Linear layer, e.g. query value")
    _require(c.eval_local_every >= 0, "eval_local_every", c.eval_local_every, "must be >= 0 (0 disables local evaluation)")
    _require(0 < c.local_test_fraction < 1, "local_test_fraction", c.local_test_fraction, "must be in (0, 1)")
    _require(c.max_eval_examples is None or c.max_eval_examples >= 1, "max_eval_examples", c.max_eval_examples, "must be >= 1")
    _require(c.max_local_eval_examples >= 1, "max_local_eval_examples", c.max_local_eval_examples, "must be >= 1")
    if c.data_dir is not None:
        _require(Path(c.data_dir).is_dir(), "data_dir", c.data_dir, "no such directory; point it at a GLUE folder such as ../shared/data/glue")
    if c.model is not None and (c.model.startswith((".", "/", "~")) or Path(c.model).exists()):
        _require(Path(c.model).expanduser().is_dir(), "model", c.model, "no such model directory; give a hub id or a local model folder")
