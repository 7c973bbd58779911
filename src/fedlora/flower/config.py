"""``[tool.flwr.app.config]`` (a Flower ``UserConfig``) → :class:`fedlora.config.RunConfig`.

The keys are the ``fedlora run`` option names (``local-steps``, ``lora-alpha``, ...), so a run
is described the same way on both engines and ``flwr run --run-config 'rounds=3'`` reads like
``fedlora run --rounds 3``. TOML has no null, so "unset" is spelled ``""`` (data-dir, model)
or ``0`` (max-eval-examples); ``alpha = "iid"`` is accepted as on the CLI. This is the only
place that translates; the ServerApp and every ClientApp call :func:`run_config_from_flower`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from fedlora.cli import parse_alpha, parse_method_option  # the CLI's own parsers: one meaning per option
from fedlora.config import ConfigError, RunConfig

# Options that exist only on Flower (node sampling and fault tolerance).
FLOWER_ONLY = ("min-train-nodes", "min-available-nodes", "round-timeout")


@dataclass(frozen=True)
class FlowerOptions:
    min_train_nodes: int = 1  # replies needed to aggregate a round; fewer: the global state is kept
    min_available_nodes: int = 0  # SuperNodes to wait for before round 1; 0 = config.clients
    round_timeout: float = 600.0  # seconds the ServerApp waits for one round's replies


def _none_if_empty(value: Any) -> Any:
    return None if value in ("", None) else value


def run_config_from_flower(user_config: Mapping[str, Any]) -> tuple[RunConfig, FlowerOptions]:
    """Build the run's RunConfig (validated) and the Flower-only options."""
    c = dict(user_config)
    fields = {
        "task": ("task", str),
        "data-dir": ("data_dir", lambda v: _none_if_empty(str(v))),
        "model": ("model", lambda v: _none_if_empty(str(v))),
        "method": ("method", str),
        "method-options": ("method_options", lambda v: dict(parse_method_option(t) for t in str(v).split())),
        "rounds": ("rounds", int),
        "clients": ("clients", int),
        "alpha": ("alpha", lambda v: parse_alpha(str(v))),
        "fraction": ("fraction", float),
        "min-clients": ("min_clients", int),
        "local-steps": ("local_steps", int),
        "batch-size": ("batch_size", int),
        "lr": ("lr", float),
        "max-length": ("max_length", int),
        "rank": ("rank", int),
        "lora-alpha": ("lora_alpha", float),
        "target-modules": ("target_modules", lambda v: tuple(str(v).replace(",", " ").split())),
        "seed": ("seed", int),
        "eval-local-every": ("eval_local_every", int),
        "local-test-fraction": ("local_test_fraction", float),
        "max-eval-examples": ("max_eval_examples", lambda v: int(v) or None),
        "max-local-eval-examples": ("max_local_eval_examples", int),
        "out": ("out", str),
    }
    unknown = sorted(set(c) - set(fields) - set(FLOWER_ONLY))
    if unknown:
        raise ConfigError(f"[tool.flwr.app.config] has unknown keys {unknown}; known: {sorted(fields) + list(FLOWER_ONLY)}")
    kwargs: dict[str, Any] = {}
    for key, (name, convert) in fields.items():
        if key in c:
            try:
                kwargs[name] = convert(c[key])
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"[tool.flwr.app.config] {key}={c[key]!r} is invalid: {exc}") from exc
    options = FlowerOptions(
        min_train_nodes=int(c.get("min-train-nodes", 1)),
        min_available_nodes=int(c.get("min-available-nodes", 0)),
        round_timeout=float(c.get("round-timeout", 600.0)),
    )
    if options.min_train_nodes < 1:
        raise ConfigError(f"min-train-nodes={options.min_train_nodes} is invalid: at least one reply is needed")
    return RunConfig(**kwargs), options
