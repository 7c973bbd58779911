"""The federated round protocol, written once and free of Flower.

Both engines are loops over :class:`Server`: the local engine (:mod:`fedlora.engines.local`) trains
the planned clients in-process; the Flower strategy (:mod:`fedlora.engines.flower.strategy`) only
translates the plan into messages and the replies back into :class:`ClientResult` s. Round t:

1. :meth:`Server.plan`: which clients train (seeded sampling), whether they evaluate locally,
   and the method's options for this round (a fresh server seed when the method declares one);
2. :meth:`Server.client_start`: the adapter and head a client starts from: the global ones, with
   the factors the method keeps private (FedSA-LoRA's B) taken from that client's own state;
3. :meth:`Server.finish`: aggregate (:func:`fedlora.protocol.server.server_step`), keep each client's
   private factors, merge ``base_delta`` into the frozen weights, evaluate the global model, append
   the round's record, and checkpoint atomically (the checkpoint is the source of truth for
   ``--resume``);
4. :meth:`Server.save_final`: the final global model handed to the run's outputs.

Files other than the checkpoint (config.json, metrics.jsonl, trackers, generations, the adapter and
its model card, plots) are the business of a :class:`RunOutputs`, in practice
:class:`fedlora.runs.outputs.RunFolder`, which the engines create and hand to :meth:`Server.open`.

Nothing here names a method: what differs between methods is read from their
:class:`~fedlora.aggregation.TrainingPolicy`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Callable
from typing import Any, Protocol

import torch
from peft import PeftModel
from torch import Tensor

from fedlora.aggregation import Adapter, AggregationResult, LoraPair, MethodSpec, get_method
from fedlora.aggregation.ranks import assign_ranks, is_mixed, restrict, sent_start
from fedlora.protocol.checkpoint import ServerState, load_state, save_state
from fedlora.protocol.private_store import PRIVATE_DIR, PrivateStore
from fedlora.protocol.client import ClientResult, derived_seed, evaluate_on
from fedlora.config.run import RunConfig, divergence_due
from fedlora.tasks.fingerprint import record as data_record
from fedlora.testing.failpoints import failpoint
from fedlora.protocol.federation import Federation
from fedlora.util.progress import phase
from fedlora.models.lora_state import (get_adapter, get_head, lora_layers, lora_scaling, merge_base_delta,
                                 merged_base_weights, restore_base_weights, set_adapter, set_head)
from fedlora.protocol.records import round_record
from fedlora.protocol.phases import InProcessChannel, PhaseChannel, phased_server_step
from fedlora.protocol.private import (noise_generator, private_server_step, privacy_budget, record_budget,
                                     summed_server_step)
from fedlora.protocol.plan import SERVER_SEED, RoundPlan, sample_clients
from fedlora.protocol.server import ServerStep, server_step

log = logging.getLogger(__name__)


def frozen_weights(model: torch.nn.Module) -> dict[str, Tensor]:
    """A copy of every LoRA-adapted module's frozen weight W0, (d, k)."""
    weights: dict[str, Tensor] = {}
    for module, layer in lora_layers(model).items():
        base: Any = layer.get_base_layer()  # PEFT's LoraLayer; typed as a plain Module upstream
        weights[module] = base.weight.detach().clone()
    return weights


@dataclass(frozen=True)
class BaseMerge:
    """One round's change of the frozen weights, as clients that have not merged it yet download it."""

    delta: dict[str, Tensor]  # product space, {module: (d, k)}
    stacked: dict[str, LoraPair] | None  # the same as stacked factors (FLoRA), when the method sends those


class RunOutputs(Protocol):
    """Where a run's results go besides the checkpoint (:class:`fedlora.runs.outputs.RunFolder`)."""

    def prepare(self, resume: bool) -> None:
        """Before anything is loaded or written: refuse what cannot be written (someone else's folder)."""

    def started(self, state: ServerState) -> None:
        """The run's state is known: fresh (round 0) or resumed from the checkpoint."""

    def round_done(self, state: ServerState, samples: list[dict[str, Any]]) -> None:
        """Round ``state.round`` is checkpointed; ``samples``: what a generative task's model wrote."""

    def finished(self, model: PeftModel, state: ServerState) -> None:
        """The run is over; ``model`` holds the final global adapter and head."""


class Server:
    """The server side of a run: its state, its model, and the round protocol around them."""

    def __init__(self, config: RunConfig, model: PeftModel, tokenizer: Any, federation: Federation,
                 state: ServerState, outputs: RunOutputs, *, keep_merges: bool = False) -> None:
        self.config, self.model, self.tokenizer, self.federation, self.state = config, model, tokenizer, federation, state
        self.outputs = outputs
        self.spec: MethodSpec = get_method(config.method)
        self.out = Path(config.out)
        # Engines whose clients hold their own frozen weights (Flower) need every merge a client
        # has missed; the local engine shares one model, so it keeps none.
        self.merges: dict[int, BaseMerge] | None = {} if keep_merges else None
        ranks = assign_ranks(config.client_ranks, config.clients, config.rank, config.seed)
        self.mixed_ranks = is_mixed(ranks, config.rank)
        self.rank_of = {c.client_id: r for c, r in zip(federation.clients, ranks)}
        self.privacy = privacy_budget(config)  # DP-FedAvg's clip, noise and budget; None without DP
        self.record_privacy = record_budget(config, [c.num_examples for c in federation.clients])  # DP-SGD's

    @classmethod
    def open(cls, config: RunConfig, model: PeftModel, tokenizer: Any, federation: Federation,
             outputs: RunOutputs, *, resume: bool = False, keep_merges: bool = False) -> Server:
        """Start a run in ``config.out`` (a round-0 checkpoint) or resume it from its checkpoint."""
        out = Path(config.out)
        outputs.prepare(resume)
        if resume:
            state = load_state(out)
            if state.data is None:  # a checkpoint from before data fingerprints: record the data from now on
                state.data = data_record(config)
            pristine = frozen_weights(model)  # before the checkpoint's merged weights replace them
            restore_base_weights(model, state.base_weights)
            state.private.clean()  # private-factor files a crashed round wrote after this checkpoint
            server = cls(config, model, tokenizer, federation, state, outputs, keep_merges=keep_merges)
            server._catch_up_merge(pristine)
            log.info("resuming %s after round %d", out, state.round)
        else:
            state = ServerState(round=0, adapter=get_adapter(model), head=get_head(model), data=data_record(config),
                                private=PrivateStore(out / PRIVATE_DIR))
            server = cls(config, model, tokenizer, federation, state, outputs, keep_merges=keep_merges)
            save_state(state, out)  # round 0: a crash in the first round can resume too
        outputs.started(server.state)
        return server

    def _catch_up_merge(self, pristine: dict[str, Tensor]) -> None:
        """After a resume, one merge that brings an untouched client to the checkpoint's frozen weights."""
        if self.merges is None or not self.state.base_weights:
            return
        delta = {m: (w.float() - pristine[m].float()) / lora_scaling(self.model, m)  # (d, k), product space
                 for m, w in self.state.base_weights.items()}
        self.merges[self.state.round] = BaseMerge(delta=delta, stacked=None)

    # -- the round ----------------------------------------------------------------------------
    def remaining_rounds(self) -> range:
        """The rounds still to run: up to ``--rounds``, or with a privacy budget, the last one it affords."""
        last = self.config.rounds
        for budget in (self.privacy, self.record_privacy):
            if budget is not None and budget.epsilon_budget is not None:
                affordable = budget.last_affordable(self.config.rounds)
                if affordable < self.config.rounds:
                    log.warning("%s-level privacy budget: ε=%g at δ=%g affords %d of the %d planned rounds (noise "
                                "multiplier %.4g); the run stops after round %d", budget.level, budget.epsilon_budget,
                                budget.delta, affordable, self.config.rounds, budget.noise_multiplier, affordable)
                last = min(last, affordable)
        return range(self.state.round + 1, last + 1)

    def plan(self, round_: int) -> RoundPlan:
        every = self.config.eval_local_every
        options = dict(self.config.method_options)
        if self.spec.policy.server_seed:
            options["seed"] = derived_seed(self.config.seed, round_, SERVER_SEED + 1)
        return RoundPlan(round_, tuple(sample_clients(self.config, round_)),
                         local_eval=every > 0 and (round_ % every == 0 or round_ == self.config.rounds), options=options,
                         dp_sgd_noise=self.record_privacy.noise_multiplier if self.record_privacy else 0.0)

    def client_start(self, client_id: str) -> tuple[Adapter, dict[str, Tensor]]:
        """The adapter and head ``client_id`` starts its round from (its private factors included).

        With mixed ranks: mapped to the client's rank (``--rank-map``) and zero-padded back to the
        server's, the form a rank-r_u client trains in (:mod:`fedlora.aggregation.ranks`).
        """
        adapter = sent_start(self.state.adapter, self.rank_of.get(client_id, self.config.rank), self.config.rank_map)
        private = self.state.private.get(client_id)
        if private is not None:
            adapter = {m: LoraPair(A=p.A, B=private[m]) for m, p in adapter.items()}
        return adapter, self.state.head

    def bounded(self, results: list[ClientResult]) -> list[ClientResult]:
        """Each result bounded by what its client holds: the components beyond its rank zeroed, and its
        example count the server's own (the partition table), not the one it claims: trusted counts need
        no weight cap (:mod:`fedlora.aggregation.robust`)."""
        counts = {c.client_id: c.num_examples for c in self.federation.clients}
        results = [replace(r, update=replace(r.update, num_examples=counts[r.update.client_id]))
                   if r.update.client_id in counts else r for r in results]
        if not self.mixed_ranks:
            return results
        return [replace(r, update=replace(r.update, adapter=restrict(r.update.adapter, self.rank_of[r.update.client_id])))
                for r in results]

    def sends_private(self, client_id: str) -> bool:
        """Whether a client that does not hold its private factors must download them: it has its own
        on the server (a resumed run), or the global ones have left the init every client draws itself."""
        aggregated = any(not r.get("skipped") for r in self.state.history)
        return bool(self.spec.policy.private_factors) and (client_id in self.state.private or aggregated)

    def finish(self, plan: RoundPlan, results: list[ClientResult], started: float,
               extra: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
               channel: PhaseChannel | None = None,
               summed: tuple[Adapter, dict[str, Tensor]] | None = None, summed_is_result: bool = False,
               summed_bytes: tuple[int, int] | None = None) -> dict[str, Any]:
        """Aggregate, merge, evaluate, record and checkpoint round ``plan.round``; returns its record.

        ``extra``: the engine's fields for the record, or a function giving them once the aggregation is done
        (a phased method's later phases add to Flower's wire bytes). ``channel``: how a phased method's later
        phases reach the clients (default: in this process, from ``results``). ``summed``: the clients' weighted
        mean (adapter, head) when that is all the server learns (secure aggregation); ``results`` then carry only
        what each client reported besides (loss, local metrics). ``summed_is_result``: ``summed`` is already the
        method's result (a phased method whose every phase was a secure sum), with ``summed_bytes`` (up, down) of
        its phases."""
        server_start = time.perf_counter()
        results = self.bounded(results)
        ranks = {r.update.client_id: self.rank_of[r.update.client_id] for r in results} if self.mixed_ranks else None
        with phase("aggregation"):
            step = self._aggregate(plan, results, ranks, channel, summed, summed_is_result, summed_bytes)
        failpoint("aggregate", plan.round)
        # FedSA-LoRA: a client keeps its own B whatever the server decides; under secure aggregation the server never
        # sees it (only the mean, for evaluation), so it stays on the client alone
        if self.spec.policy.private_factors and summed is None:
            for r in results:
                self.state.private.put(r.update.client_id, {m: p.B for m, p in r.update.adapter.items()}, plan.round)
        agg = step.result
        if not step.skipped:  # skipped: too few valid updates, nothing changes
            assert step.head is not None
            self._apply(plan, agg, step.head)
        server_seconds = time.perf_counter() - server_start

        set_adapter(self.model, self.state.adapter)
        set_head(self.model, self.state.head)
        samples: list[dict[str, Any]] = []
        with phase("global evaluation"):
            global_metrics = evaluate_on(self.model, self.federation.test, self.federation.task, self.tokenizer,
                                         samples=samples)
        record = round_record(plan.round, results, agg.metrics, global_metrics, server_seconds, self.state.head)
        for budget in (self.privacy, self.record_privacy):
            if budget is not None:
                record.update(budget.record(plan.round))
        record.update((extra() if callable(extra) else extra) or {})
        record["wall_seconds"] = time.perf_counter() - started
        self.state.round = plan.round
        self.state.history.append(record)
        self.state.base_weights = merged_base_weights(self.model)
        save_state(self.state, self.out)
        self.state.private.commit()  # the private-factor files this checkpoint no longer names
        self.outputs.round_done(self.state, samples)
        return record

    def _aggregate(self, plan: RoundPlan, results: list[ClientResult], ranks: dict[str, int] | None,
                   channel: PhaseChannel | None, summed: tuple[Adapter, dict[str, Tensor]] | None,
                   summed_is_result: bool = False, summed_bytes: tuple[int, int] | None = None) -> ServerStep:
        """The round's server step: plain (validated, robustly clipped), from a secure sum, phased (sums over
        several round trips), or DP-FedAvg's noised mean."""
        if summed is not None:  # secure aggregation: the mean is all the server has (noised here under user-level DP)
            return summed_server_step(self.config.method, self.state.adapter, summed, len(results),
                                      round_index=plan.round, state=self.state.method_state,
                                      is_result=summed_is_result, phase_bytes=summed_bytes,
                                      global_head=self.state.head, budget=self.privacy, planned=len(plan.clients),
                                      generator=noise_generator(self.config.seed, plan.round), **plan.options)
        if self.spec.phased is not None:
            return phased_server_step(self.config.method, self.state.adapter, results, global_head=self.state.head,
                                      channel=channel or InProcessChannel(self.spec.phased, results, plan.options),
                                      options=plan.options, round_index=plan.round, min_clients=self.config.min_clients,
                                      clip=self.config.clip_factor or None)
        if self.privacy is not None:
            return private_server_step(self.config.method, self.state.adapter, results, global_head=self.state.head,
                                       budget=self.privacy, planned=len(plan.clients),
                                       generator=noise_generator(self.config.seed, plan.round),
                                       round_index=plan.round, state=self.state.method_state, **plan.options)
        return server_step(self.config.method, self.state.adapter, results, global_head=self.state.head,
                           min_clients=self.config.min_clients, clip=self.config.clip_factor or None,
                           measure_divergence=divergence_due(self.config.divergence, plan.round, self.config.rounds),
                           weight_cap=None,  # counts are the partition table's (bounded), not claims
                           round_index=plan.round, state=self.state.method_state, client_ranks=ranks,
                           rank_map=self.config.rank_map,  # each update is measured from what client_start sent
                           **plan.options)

    def _apply(self, plan: RoundPlan, agg: AggregationResult, head: dict[str, Tensor]) -> None:
        if agg.base_delta:
            merge_base_delta(self.model, agg.base_delta)
            if self.merges is not None:
                stacked = agg.extras.get("stacked")
                self.merges[plan.round] = BaseMerge(
                    delta=agg.base_delta,
                    stacked={m: p.to(torch.float32) for m, p in stacked.items()} if stacked else None)
        if self.spec.policy.server_seed:
            self.state.init_seed = int(plan.options["seed"])
        if self.spec.policy.stateful:
            self.state.method_state = agg.state
        self.state.adapter, self.state.head = agg.adapter, head

    # -- the end -----------------------------------------------------------------------------
    def save_final(self) -> None:
        """The final global model set on the model and handed to the run's outputs (adapter, card, plots)."""
        set_adapter(self.model, self.state.adapter)
        set_head(self.model, self.state.head)
        self.outputs.finished(self.model, self.state)
