"""The ServerApp: the run's :class:`fedlora.protocol.rounds.Server`, driven by :class:`FedLoraStrategy`.

Everything a round does on the server (aggregation, merges, central evaluation on the global
test set, the ``metrics.jsonl`` record, the atomic checkpoint) is the local engine's own code in
:class:`~fedlora.protocol.rounds.Server`; this app builds it and lets Flower deliver the messages. The run
config is ``[tool.flwr.app.config]`` (the ``fedlora run`` names); ``resume=true`` continues the run
in ``out`` from its checkpoint, like ``fedlora run --resume``. The final global model is saved in
``<out>/adapter`` (built aside and swapped in whole).
"""

from __future__ import annotations

from logging import ERROR, INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedlora.protocol.checkpoint import load_state
from fedlora.protocol.federation import build_federation, load_data
from fedlora.engines.flower import data_cache
from fedlora.engines.flower.config import run_config_from_flower
from fedlora.engines.flower.config import FlowerOptions
from fedlora.engines.flower.nodes import FederationError, NodeMap
from fedlora.engines.flower.secure import CLIPPING_RANGE, PhasedFit, SecureStrategy, check_secure
from fedlora.engines.flower.strategy import FedLoraStrategy
from fedlora.tasks.build import build_model
from fedlora.runs.outputs import RunFolder
from fedlora.protocol.rounds import Server
from fedlora.runs.run_dir import check_resume, check_start
from fedlora.tasks import task_for

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config, options = run_config_from_flower(context.run_config)
    if options.secure_aggregation:  # a method that needs each client's update: one line, before anything loads
        check_secure(config)
    task_for(config).preflight()  # e.g. no code sandbox for mbpp: refused before minutes of loading
    if options.resume:  # the same experiment or nothing: refused before minutes of loading (as fedlora run --resume)
        check_resume(load_state(Path(config.out)), config)
    check_start(config, options.resume)
    raw = load_data(config)  # before the model: a bad data file is one line in seconds
    torch.manual_seed(config.seed)
    model, tokenizer = build_model(config)
    federation = build_federation(config, tokenizer, raw)
    data_cache.warm(config, tokenizer, federation)  # SuperNodes sharing this disk (simulation, tests) reuse it
    server = Server.open(config, model, tokenizer, federation, RunFolder(config), resume=options.resume,
                         keep_merges=True)
    remaining = len(server.remaining_rounds())
    if remaining and options.secure_aggregation:
        run_secure(grid, context, server, options, remaining)
    elif remaining:
        strategy = FedLoraStrategy(server, options)
        try:
            # no initial arrays: the global model is server.state, and every TRAIN message is built from it
            strategy.start(grid=grid, initial_arrays=ArrayRecord(),
                           num_rounds=remaining, timeout=options.round_timeout)
        except FederationError as exc:  # too few usable SuperNodes: say what is missing, not only a traceback
            log(ERROR, "fedlora: %s", exc)
            raise
    server.save_final()
    log(INFO, "fedlora: %d rounds of %s written to %s", server.state.round, config.method, config.out)


def run_secure(grid: Grid, context: Context, server: Server, options: FlowerOptions, rounds: int) -> None:
    """The rounds through Flower's SecAgg+ workflow (:mod:`fedlora.engines.flower.secure`)."""
    config = server.config
    nodes = NodeMap(config.clients)
    nodes.wait_for(grid, want=options.min_available_nodes or config.clients, need=options.min_train_nodes,
                   timeout=options.round_timeout)
    strategy = SecureStrategy(server, nodes)
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=rounds, round_timeout=options.round_timeout),
                           strategy=strategy)
    # weights are the example counts clients report, at most the largest partition; 1 each under user-level DP
    largest = 1 if config.dp_clip else max(c.num_examples for c in server.federation.clients)
    secagg = SecAggPlusWorkflow(num_shares=options.secagg_shares, reconstruction_threshold=options.secagg_threshold,
                                max_weight=largest, clipping_range=CLIPPING_RANGE, timeout=options.round_timeout)
    DefaultWorkflow(fit_workflow=PhasedFit(secagg, strategy))(grid, legacy)  # a phased method: one sum per phase
