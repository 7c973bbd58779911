"""The server's step of a round when it may not, or cannot, read single updates: user-level differential privacy
(DP-FedAvg, :func:`private_server_step`) and secure aggregation (only the clients' mean arrives,
:func:`summed_server_step`, noised there too under DP); and the run's two privacy budgets. Both engines.

What a client contributes is one vector: every factor it uploads (by the method's policy for the
round) and its classifier head, each minus what it was sent. The server validates each client as in a
plain round (a malformed client contributes nothing), then hands the updates to
:func:`fedlora.privacy.gaussian.noisy_mean` (clip to C, sum, add N(0, (z·C)² I), divide by the m
clients planned). The method then sees one pseudo-client, "the noised mean", with weight 1: the
methods DP accepts need only sums (``needs_individual_updates=False``: fedit, ffa-lora, fedsvd,
rolora), so their result from the mean equals their result from the clients, the mean being noised.
A factor a client does not upload stays the global's, as the method keeps it anyway.

Nothing here reads one client's update beyond clipping it: no median-relative norm bound or clip (they
would make one client's treatment depend on the others', outside the sensitivity analysis), no
divergence report (it needs every client's product; the record's divergence is null).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from fedlora.aggregation import Adapter, AggregationResult, ClientUpdate, LoraPair, aggregate
from fedlora.aggregation.communication import round_bytes
from fedlora.aggregation.outcome import skipped_result
from fedlora.aggregation.registry import get_method
from fedlora.aggregation.validation import collect_problems
from fedlora.config.privacy import dp_enabled, dp_sgd_enabled
from fedlora.config.run import ConfigError, RunConfig
from fedlora.privacy.accountant import PrivacyBudget
from fedlora.privacy.gaussian import Delta, noised_mean, noisy_mean
from fedlora.protocol.client import ClientResult, derived_seed
from fedlora.protocol.phases import phased_step
from fedlora.protocol.server import ServerStep, malformed

log = logging.getLogger(__name__)
NOISE_SEED = 1_000_099  # separates the noise's seeds from the clients' and the server's other draws
HEAD = "head."  # names of head tensors in a client's update vector; factors are "<module>.A" / "<module>.B"


def privacy_budget(config: RunConfig) -> PrivacyBudget | None:
    """The run's :class:`PrivacyBudget` (noise calibrated to ``--dp-epsilon`` where not given), None without DP."""
    if not dp_enabled(config):
        return None
    return PrivacyBudget.plan(clip=config.dp_clip, delta=config.dp_delta, rounds=config.rounds,
                              sampled=config.num_sampled, population=config.clients,
                              noise=config.dp_noise or None, epsilon=config.dp_epsilon or None)


def record_budget(config: RunConfig, client_sizes: list[int]) -> PrivacyBudget | None:
    """Record-level DP-SGD's budget over the run (None without it), for the smallest client: the bound of all.

    Raises :class:`ConfigError` when the split cannot take it: a client smaller than a batch, or δ >= 1/n."""
    if not dp_sgd_enabled(config):
        return None
    smallest = min(client_sizes)
    if config.batch_size > smallest:
        raise ConfigError(f"--batch-size={config.batch_size} is larger than the smallest client's {smallest} training "
                          "examples; record-level DP-SGD draws a full batch every step: lower --batch-size")
    if config.dp_sgd_delta >= 1 / smallest:
        raise ConfigError(f"--dp-sgd-delta={config.dp_sgd_delta:g} is not below 1 / {smallest} (the smallest client's "
                          "training examples): a δ that large lets the mechanism reveal a whole record; lower it")
    return PrivacyBudget.plan(clip=config.dp_sgd_clip, delta=config.dp_sgd_delta, rounds=config.rounds,
                              sampled=config.batch_size, population=smallest, noise=config.dp_sgd_noise or None,
                              epsilon=config.dp_sgd_epsilon or None, steps_per_round=config.local_steps, level="record")


def noise_generator(seed: int, round_: int) -> torch.Generator:
    """The seeded generator of round ``round_``'s noise: a run is reproducible, and a resumed one draws the same."""
    return torch.Generator().manual_seed(derived_seed(seed, round_, NOISE_SEED))


def client_delta(result: ClientResult, start: Adapter, head: dict[str, Tensor], *, A: bool, B: bool) -> Delta:
    """One client's update vector: its uploaded factors and head, minus what it was sent."""
    delta: Delta = {}
    for module, sent in start.items():
        pair = result.update.adapter[module]
        if A:
            delta[f"{module}.A"] = pair.A.double() - sent.A.double()  # (r, k)
        if B:
            delta[f"{module}.B"] = pair.B.double() - sent.B.double()  # (d, r)
    for name, sent_t in head.items():
        if not sent_t.is_meta:
            delta[HEAD + name] = result.head[name].double() - sent_t.double()
    return delta


def private_server_step(method: str, global_adapter: Adapter, results: list[ClientResult], *,
                        global_head: dict[str, Tensor], budget: PrivacyBudget, planned: int,
                        generator: torch.Generator, round_index: int, state: dict[str, Tensor] | None,
                        **options: Any) -> ServerStep:
    """The round's :class:`ServerStep` from the noised mean of the valid clients' clipped updates.

    ``planned``: m, the clients sampled for the round (the denominator, public); ``generator`` draws the noise.
    """
    policy = get_method(method).policy.for_round(round_index)
    names, rejected = malformed(results, global_head)
    blamed = {e["client"] for e in rejected}
    candidates = [(n, r) for n, r in zip(names, results) if n not in blamed]
    problems = collect_problems(global_adapter, [r.update for _, r in candidates])
    rejected += [{"client": c, "reason": reason} for c, reason in problems]
    for entry in rejected:
        log.warning("round update from client %s rejected: %s", entry["client"], entry["reason"])
    blamed = {e["client"] for e in rejected}
    kept = [r for n, r in candidates if n not in blamed]
    if not kept:  # nothing arrived: skipped like a plain round (releases nothing, spends no more than planned)
        return ServerStep(skipped_result(method, global_adapter, state, "no valid client update this round",
                                         num_clients=0, rejected=rejected), None)

    deltas = [client_delta(r, global_adapter, global_head, A=policy.upload_A, B=policy.upload_B) for r in kept]
    mean, norms = noisy_mean(deltas, clip=budget.clip, noise_std=budget.noise_std(), denominator=planned,
                             generator=generator, like=deltas[0])
    pseudo = {m: LoraPair(A=_moved(p.A, mean.get(f"{m}.A")), B=_moved(p.B, mean.get(f"{m}.B")))
              for m, p in global_adapter.items()}
    result = aggregate(method, global_adapter, [ClientUpdate(pseudo, 1, "dp-noised-mean")], weighting="uniform",
                       norm_bound=None, clip=None, weight_cap=None, measure_divergence=False,
                       round_index=round_index, state=state, **_without_weighting(options))
    up, down = round_bytes(policy, global_adapter, len(kept))
    result.metrics.update(num_clients=len(kept), bytes_up=up, bytes_down=down, rejected=rejected,
                          weights={r.update.client_id: 1.0 / planned for r in kept},
                          clipped=[{"client": r.update.client_id, "norm": n, "bound": budget.clip}
                                   for r, n in zip(kept, norms) if n > budget.clip])
    if result.metrics["skipped"]:
        return ServerStep(result, None)
    head = {name: t if t.is_meta else _moved(t, mean[HEAD + name]) for name, t in global_head.items()}
    if not all(bool(torch.isfinite(t).all()) for t in head.values() if not t.is_meta):
        reason = "the noised classifier head is not finite in the global head's dtype; the global is left unchanged"
        return ServerStep(skipped_result(method, global_adapter, state, reason, num_clients=len(kept),
                                         rejected=rejected), None)
    return ServerStep(result, head)


def _moved(sent: Tensor, delta: Tensor | None) -> Tensor:
    """``sent + delta`` in ``sent``'s dtype; ``sent`` itself where nothing was uploaded for it."""
    return sent.clone() if delta is None else (sent.double() + delta).to(sent.dtype)


def summed_server_step(method: str, global_adapter: Adapter, summed: tuple[Adapter, dict[str, Tensor]],
                       clients: int, *, round_index: int, state: dict[str, Tensor] | None,
                       global_head: dict[str, Tensor] | None = None, budget: PrivacyBudget | None = None,
                       planned: int = 0, generator: torch.Generator | None = None, is_result: bool = False,
                       phase_bytes: tuple[int, int] | None = None, **options: Any) -> ServerStep:
    """The round's :class:`ServerStep` from the clients' weighted mean alone (secure aggregation hands only that
    over): the method sees it as one pseudo-client, as under DP; ``clients``: how many the mean is over.

    With ``budget`` (user-level DP, the clients clipped their own updates and weighed 1 each): the mean of the
    ``clients`` that reported is brought to the fixed denominator ``planned`` and noised, as
    :func:`private_server_step` does from the individual updates: Σ_u clip(Δ_u) = mean x clients, then
    (Σ + N(0, (zC)^2)) / planned."""
    mean, head = summed
    if is_result:  # a phased method whose every phase was a secure sum: the new global adapter itself
        up, down = phase_bytes or (0, 0)
        return phased_step(method, global_adapter, AggregationResult(adapter=mean), head, clients=clients,
                           round_index=round_index, bytes_up=up, phase_bytes_down=down)
    if budget is not None:
        assert generator is not None and global_head is not None and planned >= 1
        mean, head = _noised(global_adapter, global_head, mean, head, clients, budget, planned, generator,
                             get_method(method).policy.for_round(round_index))
    result = aggregate(method, global_adapter, [ClientUpdate(mean, 1, "secure-sum")], weighting="uniform",
                       norm_bound=None, clip=None, weight_cap=None, measure_divergence=False,
                       round_index=round_index, state=state, **_without_weighting(options))
    up, down = round_bytes(get_method(method).policy.for_round(round_index), global_adapter, clients)
    result.metrics.update(num_clients=clients, bytes_up=up, bytes_down=down)
    if result.metrics["skipped"]:
        return ServerStep(result, None)
    if not all(bool(torch.isfinite(t).all()) for t in head.values() if not t.is_meta):
        reason = "the summed classifier head is not finite; the global is left unchanged"
        return ServerStep(skipped_result(method, global_adapter, state, reason, num_clients=clients, rejected=[]), None)
    return ServerStep(result, head)


def _without_weighting(options: dict[str, Any]) -> dict[str, Any]:
    """The method's options less ``weighting``: the pseudo-client's mean is weighted already (one client, weight 1)."""
    return {k: v for k, v in options.items() if k != "weighting"}


def _noised(global_adapter: Adapter, global_head: dict[str, Tensor], mean: Adapter, head: dict[str, Tensor],
            clients: int, budget: PrivacyBudget, planned: int, generator: torch.Generator,
            policy: Any) -> tuple[Adapter, dict[str, Tensor]]:
    """The secure mean of clipped updates as DP-FedAvg's noised mean over the ``planned`` clients."""
    sums: Delta = {}
    for module, sent in global_adapter.items():
        if policy.upload_A:
            sums[f"{module}.A"] = (mean[module].A.double() - sent.A.double()) * clients  # (r, k)
        if policy.upload_B:
            sums[f"{module}.B"] = (mean[module].B.double() - sent.B.double()) * clients  # (d, r)
    for name, sent_t in global_head.items():
        sums[HEAD + name] = (head[name].double() - sent_t.double()) * clients
    noised = noised_mean(sums, noise_std=budget.noise_std(), denominator=planned, generator=generator)
    adapter = {m: LoraPair(A=_moved(p.A, noised.get(f"{m}.A")), B=_moved(p.B, noised.get(f"{m}.B")))
               for m, p in global_adapter.items()}
    return adapter, {name: _moved(t, noised[HEAD + name]) for name, t in global_head.items()}
