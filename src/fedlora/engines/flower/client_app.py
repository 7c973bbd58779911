"""The ClientApp: one federated client per SuperNode, training with :func:`fedlora.protocol.client.train_client`.

The SuperNode's ``node_config`` says which client it is (``partition-id``, ``num-partitions``);
the client builds the same federation as the local engine and takes its own ClientData. The
model and tokenizer are cached per process and the tokenised client data on disk
(:mod:`fedlora.engines.flower.data_cache`: a SuperNode starts a new ClientApp process per round, and
building the federation tokenises the whole task); everything that belongs to one client lives in ``context.state``, because in
simulation several virtual SuperNodes share one process (and so the cached model):

* ``"base"``: the frozen weights this client has merged ``base_delta`` into, and how many
  rounds of deltas that includes (FedEx-LoRA, FLoRA); restored before each round.
* ``"local-B"``: FedSA-LoRA's private B factors, kept across rounds.
* ``"phase-adapter"``: a phased method's (FedASK) adapter after training, kept for the round's later phases
  (:mod:`fedlora.engines.flower.phases`); its factors never leave the client.

Only the LoRA factors the method shares travel (:mod:`fedlora.engines.flower.wire`); the others come
from the client itself: FFA-LoRA's frozen A is the seed-determined init, FLoRA's re-initialised
global adapter is drawn from the ``init-seed`` the server names, FedSA-LoRA's B is ``"local-B"``
(the init before the client's first round).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from torch import Tensor

from fedlora.aggregation import Adapter, LoraPair, get_method
from fedlora.aggregation.api import SERVER_DTYPE
from fedlora.config.run import ConfigError, RunConfig
from fedlora.protocol.federation import ClientData
from fedlora.engines.flower.data_cache import client_data
from fedlora.engines.flower.config import run_config_from_flower
from fedlora.engines.flower.messages import PHASE_UPLOAD, RankBoundary, TrainDownload, TrainReply, TrainTask
from fedlora.engines.flower.phases import PHASE_BROADCAST
from fedlora.engines.flower.secure import PHASE_KEY, clip_upload, record_from_parameters, wire_keys
from fedlora.engines.flower.wire import (model_record, model_tensors, read_download, record_tensors, record_to_model,
                                         reply_content, reply_metrics, round_record, tensors_record, tensors_to_model)
from fedlora.tasks.build import build_model
from fedlora.protocol.plan import RoundPlan, train_planned
from fedlora.models.lora_state import get_adapter, get_head, lora_layers, merge_base_delta, merged_base_weights, restore_base_weights

log = logging.getLogger(__name__)
FITINS_CONFIG = "fitins.config"  # the legacy FitIns layout SecAgg+ rounds use (flwr's recorddict_compat)


def secure_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of a SecAgg+ round, every other message as it is: one
    ClientApp serves plain and secure runs (``secaggplus_mod`` alone would claim every TRAIN message)."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[secure_mod])
PHASE_ADAPTER, PHASE_STATE = "phase-adapter", "phase-round"  # a phased method's trained adapter, kept between phases


@dataclass
class _Process:
    model: torch.nn.Module
    tokenizer: object
    clients: dict[int, tuple[Any, ClientData]]  # partition -> its data (several in simulation)
    pristine: dict[str, Tensor]  # untouched frozen weights of every LoRA module
    initial: Adapter  # the seed-determined LoRA init, identical on every node and the server
    touched: bool = False  # some client in this process changed the frozen weights


_CACHE: dict[str, _Process] = {}


def _process(config: RunConfig) -> _Process:
    """The process-wide model and tokenizer for ``config`` (keyed by its JSON: RunConfig holds a dict)."""
    key = config.to_json()
    if key not in _CACHE:
        _CACHE.clear()  # a new run in a long-lived process: drop the previous run's model
        _CACHE[key] = _load(config)
    return _CACHE[key]


def _load(config: RunConfig) -> _Process:
    model, tokenizer = build_model(config)
    pristine = {m: layer.get_base_layer().weight.detach().clone() for m, layer in lora_layers(model).items()}
    return _Process(model, tokenizer, {}, pristine, initial=get_adapter(model))


def _partition(context: Context, config: RunConfig) -> int:
    try:
        partition, total = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as exc:
        raise ConfigError(f"SuperNode needs --node-config 'partition-id=<i> num-partitions=<n>' (missing {exc})") from exc
    if total != config.clients or not 0 <= partition < total:
        raise ConfigError(f"node-config partition-id={partition} num-partitions={total} does not fit clients={config.clients}")
    return partition


def _sync_base(proc: _Process, state: RecordDict, deltas: dict[int, dict[str, Tensor]] | None,
               reset: bool = False) -> int:
    """Put this client's frozen weights into the shared model, merge new deltas; return its version.

    ``reset``: the server sends the sum of every merge (this node is new or too far behind for
    the merges it kept one by one, :mod:`fedlora.engines.flower.merges`): start again from the pristine weights.
    """
    if reset:
        for key in ("base", "base-weights"):
            if key in state:
                del state[key]
    if deltas is None and "base" not in state and not proc.touched:
        return 0  # nobody has changed frozen weights (FedIT, FLoRA-NA, ...): nothing to restore
    proc.touched = True
    version = int(state["base"]["version"]) if "base" in state else 0
    weights = record_tensors(state["base-weights"]) if "base-weights" in state else {}
    restore_base_weights(proc.model, {**proc.pristine, **weights})  # pristine where this client merged nothing
    if deltas is None:
        return version
    for round_, delta in deltas.items():
        if round_ > version:  # replay in round order: the same additions the local engine made
            merge_base_delta(proc.model, delta)
            version = round_
    state["base"] = ConfigRecord({"version": version})
    state["base-weights"] = tensors_record(merged_base_weights(proc.model))
    return version


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the ServerApp which client (partition) this SuperNode is: its node config, as given.

    The server checks the claim (:mod:`fedlora.engines.flower.nodes`): a node config that does not fit the
    run is refused there, with the reason in the ServerApp's log, rather than failing here.
    """
    try:
        claim = {key: int(context.node_config[key]) for key in ("partition-id", "num-partitions")}
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"SuperNode needs --node-config 'partition-id=<i> num-partitions=<n>' ({exc!r})") from exc
    record = MetricRecord(claim)
    return Message(RecordDict({"partition": record}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    content = msg.content
    if FITINS_CONFIG in content.config_records:  # a secure round: SecAgg+'s legacy FitIns layout
        return Message(_secure_train(content, context), reply_to=msg)
    if int(content["config"].get("phase", 1)) > 1:  # a phased method's later round trip (FedASK's phase 2)
        config, _ = run_config_from_flower(context.run_config)
        return Message(_phase_reply(content, context, config), reply_to=msg)
    return Message(reply_content(_train(read_download(content), context)), reply_to=msg)


def _secure_train(content: RecordDict, context: Context) -> RecordDict:
    """A SecAgg+ round (:mod:`fedlora.engines.flower.secure`): the same training, translated from ``FitIns`` and
    into ``FitRes`` (the shared factors and head in ``wire_keys`` order), which ``secaggplus_mod`` then masks."""
    config, _ = run_config_from_flower(context.run_config)
    proc = _process(config)
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    settings = ConfigRecord(dict(fitins.config))
    if int(settings.get("phase", 1)) > 1:  # a phased method's later phase, as one more secure sum
        return _secure_phase(fitins, settings, context, config, proc)
    task = TrainTask.from_config(settings)
    policy = get_method(config.method).policy.for_round(task.server_round)
    full = policy.download_full_adapter
    down = wire_keys(proc.initial, get_head(proc.model), A=policy.upload_A or full, B=policy.upload_B or full)
    received = record_from_parameters(fitins.parameters, down)
    reply = _train(TrainDownload(task, record_tensors(received), merges={}), context)
    arrays = dict(reply.arrays)
    if reply.eval_B is not None:  # FedSA-LoRA: the private B is summed too, for the server's evaluation-only mean
        arrays |= reply.eval_B
    if reply.phase_upload is not None:  # a phased method's phase-1 upload (FedASK's sketch) is summed with the head
        arrays |= {PHASE_KEY + k: t for k, t in reply.phase_upload.items()}
    record, weight = round_record(arrays), reply.num_examples
    if config.dp_clip:  # user-level DP: this client clips its own update, and every client weighs 1
        record, weight = clip_upload(record, received, config.dp_clip), 1
    parameters = ndarrays_to_parameters([record[k].numpy() for k in sorted(record.keys())])
    fitres = FitRes(Status(Code.OK, "trained"), parameters, weight, reply_metrics(reply))
    return compat.fitres_to_recorddict(fitres, keep_input=True)


def _secure_phase(fitins: Any, settings: ConfigRecord, context: Context, config: RunConfig, proc: _Process) -> RecordDict:
    """Phase p >= 2 of a phased method under SecAgg+: the broadcast in ``FitIns``, the upload as ``FitRes``, weighed
    by this client's training examples as its phase-1 sum was."""
    phased = get_method(config.method).phased
    if phased is None:
        raise ConfigError(f"a phase message for method {config.method!r}, which has one phase")
    phase = int(settings["phase"])
    names = sorted(phased.broadcasts(phase, proc.initial, dict(config.method_options)))
    broadcast = record_from_parameters(fitins.parameters, names)
    out = _phase_reply(RecordDict({"config": settings, PHASE_BROADCAST: broadcast}), context, config)
    upload = out[PHASE_UPLOAD]
    partition = _partition(context, config)
    if partition not in proc.clients:
        raise ConfigError(f"phase {phase} message for partition {partition}, which has not trained in this process")
    weight = proc.clients[partition][1].num_examples
    parameters = ndarrays_to_parameters([upload[k].numpy() for k in sorted(upload.keys())])
    return compat.fitres_to_recorddict(FitRes(Status(Code.OK, f"phase {phase}"), parameters, weight, {}), keep_input=True)


def _train(download: TrainDownload, context: Context) -> TrainReply:
    """One client's round: the TRAIN message's download in, the reply out."""
    config, _ = run_config_from_flower(context.run_config)
    partition = _partition(context, config)
    proc = _process(config)
    task = download.task
    if task.partition_id != partition:
        raise ConfigError(f"TRAIN message for partition {task.partition_id} reached the SuperNode of partition {partition}")
    spec = get_method(config.method)
    policy = spec.policy.for_round(task.server_round)
    options = dict(config.method_options) | ({"seed": task.method_seed} if task.method_seed >= 0 else {})
    noise = task.dp_sgd_noise
    if config.dp_sgd_clip and (noise <= 0 or noise < config.dp_sgd_noise):  # the client guards its own records
        raise ConfigError(f"the server asks for DP-SGD noise multiplier {noise:g}, below what this run's "
                          f"configuration promises (--dp-sgd-noise {config.dp_sgd_noise:g}, > 0); not training")
    plan = RoundPlan(task.server_round, (partition,), local_eval=task.local_eval, options=options, dp_sgd_noise=noise)
    merges = {r: m.delta for r, m in download.merges.items()} or None
    version = _sync_base(proc, context.state, merges, reset=task.base_reset)
    boundary = RankBoundary(client=task.client_rank, model=config.rank)  # mixed ranks: only r_u components travel

    # The start: what was sent, completed by what the client holds itself (the seeded or re-drawn init; its
    # private B, which wins over a B the server sent), then across the rank boundary once.
    local_B = record_tensors(context.state["local-B"]) if "local-B" in context.state else None
    own = boundary.to_wire(_own_factors(_global_init(config.method, proc.initial, task.init_seed), local_B))
    received, global_head = tensors_to_model(download.arrays, missing_from=own)
    if local_B is not None:
        received = _own_factors(received, {m: p.B for m, p in own.items()})
    if partition not in proc.clients:
        proc.clients[partition] = client_data(config, proc.tokenizer, partition)
    data_task, client = proc.clients[partition]
    start = (boundary.from_wire(received), global_head)
    result = train_planned(proc.model, client, partition, data_task, proc.tokenizer, config, plan, start)
    adapter = result.update.adapter
    if policy.private_factors:  # FedSA-LoRA: B never leaves the client between rounds
        context.state["local-B"] = tensors_record({m: p.B for m, p in adapter.items()})
    if spec.phased is not None and result.first_upload is not None:  # kept here for the later phases, never sent
        context.state[PHASE_ADAPTER] = model_record(adapter, {})
        context.state[PHASE_STATE] = ConfigRecord({"server-round": plan.round})
    sent = boundary.to_wire(adapter)
    return TrainReply(
        arrays=model_tensors(sent, result.head, A=policy.upload_A, B=policy.upload_B),
        # outside FedSA-LoRA's protocol: the server's global B (evaluation only) is the mean of these
        eval_B=model_tensors(sent, {}, A=False) if policy.private_factors else None,
        num_examples=result.update.num_examples, loss=result.loss, local_metrics=result.local_metrics,
        base_version=version, phase_upload=result.first_upload if spec.phased is not None else None,
        partition_id=partition)


def _phase_reply(content: RecordDict, context: Context, config: RunConfig) -> RecordDict:
    """Phase p >= 2: the upload computed from the adapter this client kept after training in this round."""
    settings = content["config"]
    round_, phase = int(settings["server-round"]), int(settings["phase"])
    phased = get_method(config.method).phased
    if phased is None or PHASE_ADAPTER not in context.state:
        raise ConfigError(f"phase {phase} message for a client that holds no trained adapter of a phased method")
    if int(context.state[PHASE_STATE]["server-round"]) != round_:
        raise ConfigError(f"phase {phase} message for round {round_}, but this client last trained in round "
                          f"{int(context.state[PHASE_STATE]['server-round'])}")
    adapter, _ = record_to_model(context.state[PHASE_ADAPTER])
    upload = phased.upload(phase, adapter, record_tensors(content[PHASE_BROADCAST]), dict(config.method_options))
    return RecordDict({PHASE_UPLOAD: tensors_record(upload)})


def _global_init(method: str, initial: Adapter, seed: int) -> Adapter:
    """The global adapter as far as the seed fixes it: the initial one, or the method's rebuild from the server's
    ``seed`` (FLoRA's re-init; ``MethodSpec.rebuild``).

    Drawn in float64 and cast, as the server draws it (in SERVER_DTYPE) before sending float32.
    """
    rebuild = get_method(method).rebuild
    if seed < 0 or rebuild is None:
        return initial
    like = {m: LoraPair(A=p.A.to(SERVER_DTYPE), B=p.B.to(SERVER_DTYPE)) for m, p in initial.items()}
    return {m: LoraPair(A=p.A.float(), B=p.B.float()) for m, p in rebuild(like, seed).items()}


def _own_factors(adapter: Adapter, local_B: dict[str, Tensor] | None) -> Adapter:
    """``adapter`` with the client's own private B where it keeps one."""
    if local_B is None:
        return adapter
    return {m: LoraPair(A=p.A, B=local_B[m]) for m, p in adapter.items()}
