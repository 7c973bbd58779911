"""How much privacy a run spends: user-level (ε, δ) of DP-FedAvg, from Google's ``dp-accounting`` RDP accountant.

The mechanism (:mod:`fedlora.privacy.gaussian`): each round the server samples m of the N clients
uniformly without replacement (:func:`fedlora.protocol.plan.sample_clients`, fixed size), clips
each client's update to L2 norm C, sums them, and adds Gaussian noise N(0, (z·C)² I) to the sum.

Adjacency is *replace one client* (N is public, as it is for fixed-size sampling): swapping one
client's data swaps one clipped update u for u', and the sum moves by ‖u − u'‖ ≤ 2C, so the noise
multiplier relative to that sensitivity is z / 2. The round is the sampled-without-replacement
Gaussian mechanism (Wang, Balle & Kasiviswanathan, AISTATS 2019, Thm 27), composed over the rounds:
``SelfComposedDpEvent(SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2)), T)``, with
``RdpAccountant(neighboring_relation=REPLACE_ONE)``. (Poisson sampling with add/remove adjacency
would account with sensitivity C, a factor 2 less noise for the same ε, but it is not how the
engines sample: accounting must match the sampler, so we pay the factor.)

Every run accounts the same way in both engines; what the guarantee covers is the sequence of global
models (adapter and head). Diagnostics that read individual clients (each client's train loss and
local metrics in ``metrics.jsonl``) are not covered: see docs/privacy.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import dp_accounting
from dp_accounting.rdp import RdpAccountant

NeighborRel = dp_accounting.privacy_accountant.NeighboringRelation
# Orders: the library's default grid is too coarse near 1 for large ε, too short for tiny ε; this one covers both.
ORDERS = tuple([1 + x / 20.0 for x in range(1, 100)] + list(range(6, 64)) + [80, 96, 128, 192, 256, 512, 1024])


def _event(noise_multiplier: float, rounds: int, sampled: int, population: int) -> dp_accounting.DpEvent:
    """T rounds of the fixed-size sampled Gaussian mechanism at noise ``z`` (sensitivity 2C under replace-one)."""
    round_event = dp_accounting.SampledWithoutReplacementDpEvent(
        population, sampled, dp_accounting.GaussianDpEvent(noise_multiplier / 2.0))
    return dp_accounting.SelfComposedDpEvent(round_event, rounds)


@lru_cache(maxsize=4096)
def epsilon_spent(noise_multiplier: float, rounds: int, sampled: int, population: int, delta: float) -> float:
    """ε after ``rounds`` rounds of DP-FedAvg at noise multiplier z (σ = z·C), m of N clients a round, at δ.

    0 rounds spend nothing; z = 0 (no noise) is not private: ``inf``.
    """
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    accountant = RdpAccountant(list(ORDERS), NeighborRel.REPLACE_ONE)
    accountant.compose(_event(noise_multiplier, rounds, sampled, population))
    return float(accountant.get_epsilon(delta))


def calibrate_noise(epsilon: float, delta: float, rounds: int, sampled: int, population: int) -> float:
    """The smallest noise multiplier z whose ``rounds`` rounds spend at most ``epsilon`` at ``delta`` (bisection)."""
    z = dp_accounting.calibrate_dp_mechanism(
        lambda: RdpAccountant(list(ORDERS), NeighborRel.REPLACE_ONE),
        lambda noise: _event(noise, rounds, sampled, population),
        epsilon, delta,
        dp_accounting.mechanism_calibration.LowerEndpointAndGuess(1e-3, 1.0),
        tol=1e-4)
    return float(z)


@dataclass(frozen=True)
class PrivacyBudget:
    """A run's DP at one level: clip C, noise multiplier z, δ, and the ε budget it may not exceed (None: no cap).

    ``level="user"`` (DP-FedAvg): one Gaussian mechanism per round over the m of N clients sampled.
    ``level="record"`` (DP-SGD inside each client, :mod:`fedlora.models.dp_sgd`): ``steps_per_round``
    mechanisms per round over a batch of b of the client's n examples; the population is the smallest
    client's n and every round counts, so the ε reported bounds every client's (one that sat out a round
    spent less; one with more examples, less).
    """

    clip: float  # C: every update (a client's: factors and head jointly; a record's gradient) has L2 norm <= C
    noise_multiplier: float  # z: the sum's noise has std z·C per coordinate
    delta: float
    epsilon_budget: float | None
    sampled: int  # m clients per round, or b records per step (fixed)
    population: int  # N clients, or n records
    steps_per_round: int = 1
    level: str = "user"

    @classmethod
    def plan(cls, *, clip: float, delta: float, rounds: int, sampled: int, population: int,
             noise: float | None = None, epsilon: float | None = None, steps_per_round: int = 1,
             level: str = "user") -> PrivacyBudget:
        """``noise`` given: use it (ε is reported; with ``epsilon`` too, the run stops at that budget);
        only ``epsilon``: the z that spends exactly that over ``rounds`` planned rounds."""
        if noise is None:
            if epsilon is None:
                raise ValueError("differential privacy needs an epsilon to calibrate the noise to, or the noise")
            noise = calibrate_noise(epsilon, delta, rounds * steps_per_round, sampled, population)
        return cls(clip, noise, delta, epsilon, sampled, population, steps_per_round, level)

    def spent(self, rounds: int) -> float:
        """ε after ``rounds`` rounds."""
        return epsilon_spent(self.noise_multiplier, rounds * self.steps_per_round, self.sampled, self.population,
                             self.delta)

    def affordable(self, rounds: int) -> bool:
        """Whether ``rounds`` rounds stay within the budget (always, when there is none)."""
        # 1e-6: a calibrated z lands on the budget up to the bisection's tolerance, from below.
        return self.epsilon_budget is None or self.spent(rounds) <= self.epsilon_budget * (1 + 1e-6)

    def last_affordable(self, rounds: int) -> int:
        """The last round t <= ``rounds`` whose t rounds stay within the budget (ε grows with t: bisection)."""
        low, high = 0, rounds
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if self.affordable(mid) else (low, mid - 1)
        return low

    def record(self, rounds: int) -> dict[str, float]:
        """What a round's metrics line says about privacy after ``rounds`` rounds (``dp_*``; record level ``dp_sgd_*``)."""
        prefix = "dp" if self.level == "user" else "dp_sgd"
        return {f"{prefix}_epsilon": self.spent(rounds), f"{prefix}_delta": self.delta,
                f"{prefix}_noise_multiplier": self.noise_multiplier, f"{prefix}_clip": self.clip}

    def noise_std(self) -> float:
        """σ = z·C, the std of the noise added to the sum of clipped updates."""
        return self.noise_multiplier * self.clip
