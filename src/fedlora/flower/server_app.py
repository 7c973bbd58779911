"""The ServerApp: FedLoraStrategy for the rounds, plus the local engine's central evaluation and outputs.

Each round the global adapter, head and merged frozen weights are evaluated on the global
test set (the task's dev split, exactly the local engine's), and ``<out>/metrics.jsonl`` gets
the local engine's record for that round (same fields, same function). The server state is
checkpointed after every round (``checkpoint.safetensors``, as the local engine writes it), and
the final global model is saved with :func:`fedlora.peft_bridge.save_adapter` in ``<out>/adapter``.
"""

from __future__ import annotations

import json
import time
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedlora.checkpoint import ServerState, atomic_write_text, save_state
from fedlora.client import evaluate_on
from fedlora.config import RunConfig
from fedlora.federation import Federation, build_federation
from fedlora.flower import data_cache
from fedlora.flower.config import run_config_from_flower
from fedlora.flower.strategy import FedLoraStrategy
from fedlora.flower.wire import model_record, record_to_model
from fedlora.model import default_model_path, load_model
from fedlora.peft_bridge import get_adapter, get_head, merge_base_delta, merged_base_weights, save_adapter
from fedlora.peft_bridge import set_adapter, set_head
from fedlora.simulation import round_record  # the engine's record builder: identical metrics.jsonl fields

app = ServerApp()


class CentralEvaluation:
    """``evaluate_fn`` for ``Strategy.start``: evaluate round ``t``'s global model and write its record."""

    def __init__(self, config: RunConfig, strategy: FedLoraStrategy, model: torch.nn.Module, tokenizer, federation: Federation) -> None:
        self.config, self.strategy, self.model, self.tokenizer, self.federation = config, strategy, model, tokenizer, federation
        self.out = Path(config.out)
        self.merged_rounds: set[int] = set()
        self.history: list[dict] = []
        self.round_start = time.perf_counter()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:  # the local engine does not evaluate the initial model
            self.round_start = time.perf_counter()
            return None
        last = self.strategy.last_round
        if last is None or last["round"] != server_round:
            log(WARNING, "round %d was not aggregated; the global model is unchanged and no record is written", server_round)
            return None
        for r in sorted(set(self.strategy.base_deltas) - self.merged_rounds):  # the server's own frozen weights
            merge_base_delta(self.model, self.strategy.base_deltas[r])
            self.merged_rounds.add(r)
        adapter, head = record_to_model(arrays)
        set_adapter(self.model, adapter)
        set_head(self.model, head)
        global_metrics = evaluate_on(self.model, self.federation.test, self.federation.task, self.tokenizer)
        results = last["results"]
        record = round_record(server_round, results, last["metrics"], global_metrics, last["server_seconds"], last["head"])
        record["failed_nodes"] = last.get("failed_nodes", [])  # SuperNodes lost this round, by node id
        record.update(last["wire"])  # array bytes measured in this round's messages (wire_*_bytes_up/down)
        record["wall_seconds"] = time.perf_counter() - self.round_start
        self.round_start = time.perf_counter()
        self.history.append(record)
        state = ServerState(round=server_round, adapter=adapter, head=head,
                            base_weights=merged_base_weights(self.model), history=self.history)
        save_state(state, self.out)
        atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))
        log(INFO, "round %d: %s=%.4f divergence=%.4g", server_round, self.federation.task.metric,
            record["global_metric"], record["divergence"])
        return MetricRecord({"global-metric": float(record["global_metric"]), "divergence": float(record["divergence"])})


@app.main()
def main(grid: Grid, context: Context) -> None:
    config, options = run_config_from_flower(context.run_config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", config.to_json())
    atomic_write_text(out / "metrics.jsonl", "")
    torch.manual_seed(config.seed)
    from fedlora.data import get_task

    model, tokenizer = load_model(
        config.model or default_model_path(), get_task(config.task).num_labels, config.rank, config.lora_alpha,
        list(config.target_modules), seed=config.seed,
    )
    federation = build_federation(config, tokenizer)
    data_cache.warm(config, tokenizer, federation)  # SuperNodes sharing this disk (simulation, tests) reuse it
    strategy = FedLoraStrategy(config, min_train_nodes=options.min_train_nodes, min_available_nodes=options.min_available_nodes,
                               connect_timeout=options.round_timeout)
    evaluation = CentralEvaluation(config, strategy, model, tokenizer, federation)
    strategy.start(
        grid=grid, initial_arrays=model_record(get_adapter(model), get_head(model)), num_rounds=config.rounds,
        timeout=options.round_timeout, evaluate_fn=evaluation,
    )
    save_adapter(model, out / "adapter")  # the model holds the last aggregated global state
    if evaluation.history:
        from fedlora.reporting import plot_run  # matplotlib only when a run finishes

        plot_run(out)
    log(INFO, "fedlora: %d rounds of %s written to %s", len(evaluation.history), config.method, out)
