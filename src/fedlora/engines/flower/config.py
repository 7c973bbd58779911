"""Flower's run config (``[tool.flwr.app.config]``, ``--run-config``) → :class:`RunConfig` + :class:`FlowerOptions`.

Nothing is listed here by hand: the keys are the dashed names of :class:`fedlora.config.run.RunConfig`'s
declared fields (``local-steps``, ``lora-alpha``, ...), so ``flwr run --run-config 'rounds=3'`` reads
like ``fedlora run --rounds 3``, and values are read by the same parsers as the command line
(:mod:`fedlora.config.schema`). The few options that exist only on Flower (node sampling and fault
tolerance) are declared the same way in :class:`FlowerOptions`. TOML has no null, so an unset
value is ``""`` (``alpha = "iid"``, ``max-eval-examples = "all"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedlora.config.run import ConfigError, RunConfig
from fedlora.config.schema import flag, flower_table, from_flower, option

FLOWER_OUT = "runs/flower"  # the app's default run directory (the local engine's is runs/<method>-<task>)


@dataclass(frozen=True)
class FlowerOptions:
    min_train_nodes: int = option(1, "flower", "replies needed to aggregate a round; fewer: the global state is kept")
    min_available_nodes: int = option(0, "flower", "SuperNodes to wait for before round 1; 0: as many as clients")
    round_timeout: float = option(600.0, "flower", "seconds the ServerApp waits for one round's replies")
    resume: bool = option(False, "flower", "continue the run in `out` from its last checkpoint")
    secure_aggregation: bool = option(False, "flower", "run the rounds through Flower's SecAgg+: the server learns "
                                      "only the clients' weighted sum (methods that need only sums; docs/privacy.md)")
    secagg_shares: float = option(1.0, "flower", "SecAgg+: each client's secret is shared with this share of the round's "
                                  "clients (Flower's num_shares)")
    secagg_threshold: float = option(0.6, "flower", "SecAgg+: the share of those shares needed to unmask (Flower's "
                                     "reconstruction_threshold); a round survives dropouts down to it")

    def __post_init__(self) -> None:
        if not isinstance(self.min_train_nodes, int) or self.min_train_nodes < 1:
            raise ConfigError(f"min-train-nodes={self.min_train_nodes} is invalid: at least one reply is needed")
        if not isinstance(self.min_available_nodes, int) or self.min_available_nodes < 0:
            raise ConfigError(f"min-available-nodes={self.min_available_nodes} is invalid: must be >= 0")
        for name in ("secagg_shares", "secagg_threshold"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name.replace('_', '-')}={getattr(self, name)} is invalid: a share in (0, 1]")
        if not self.round_timeout > 0:
            raise ConfigError(f"round-timeout={self.round_timeout} is invalid: must be > 0 seconds")


def known_keys() -> list[str]:
    return [flag(f.name) for cls in (RunConfig, FlowerOptions) for f in dataclasses.fields(cls)]


def run_config_from_flower(user_config: Mapping[str, Any]) -> tuple[RunConfig, FlowerOptions]:
    """Build the run's RunConfig (validated) and the Flower-only options."""
    unknown = sorted(set(user_config) - set(known_keys()))
    if unknown:
        raise ConfigError(f"[tool.flwr.app.config] has unknown keys {unknown}; known: {sorted(known_keys())}")
    run = from_flower(RunConfig, user_config, ConfigError)
    options = from_flower(FlowerOptions, user_config, ConfigError)
    return RunConfig(**run), FlowerOptions(**options)


def app_config_table() -> dict[str, Any]:
    """What ``[tool.flwr.app.config]`` in pyproject.toml must hold: every declared field at its default."""
    return flower_table(RunConfig, FlowerOptions, overrides={"out": FLOWER_OUT})


def run_config_overrides(config: RunConfig, **flower: Any) -> str:
    """``config`` (and Flower options) as a ``flwr run --run-config`` string."""
    table = flower_table(RunConfig, overrides=dataclasses.asdict(config))
    table |= {flag(k): v for k, v in flower.items()}
    return " ".join(f"{k}={_toml(v)}" for k, v in table.items())


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "") + "'"


def print_app_config_table() -> None:
    """Print ``[tool.flwr.app.config]`` as pyproject.toml must hold it."""
    import json

    print("[tool.flwr.app.config]")
    for key, value in app_config_table().items():
        print(f"{key} = {json.dumps(value)}")
