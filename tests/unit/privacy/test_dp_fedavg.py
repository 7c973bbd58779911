"""DP-FedAvg's maths: the accountant (dp-accounting's RDP) and the clipped, noised mean of client updates.

Properties: calibration inverts accounting; ε grows with rounds and sampling and falls with noise; the budget
stops exactly where ε would exceed it; every clipped update lies in the C-ball; with no noise the mean is
the clipped updates' mean over the *planned* clients; the noise has the stated std; replacing one client moves
the noiseless mean by at most 2C/m (the sensitivity the accountant assumes); client order changes nothing.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.privacy.accountant import PrivacyBudget, calibrate_noise, epsilon_spent
from fedlora.privacy.gaussian import clip_update, joint_norm, noisy_mean


@pytest.mark.parametrize("epsilon", [1.0, 3.0, 8.0])
def test_calibrated_noise_spends_the_budget_over_the_planned_rounds(epsilon: float) -> None:
    z = calibrate_noise(epsilon, 1e-5, rounds=20, sampled=4, population=10)
    assert epsilon_spent(z, 20, 4, 10, 1e-5) == pytest.approx(epsilon, rel=1e-3)
    assert epsilon_spent(z, 20, 4, 10, 1e-5) <= epsilon * (1 + 1e-6)
    assert epsilon_spent(z * 0.95, 20, 4, 10, 1e-5) > epsilon  # the smallest such z, not just any


def test_epsilon_grows_with_rounds_and_sampling_and_falls_with_noise() -> None:
    base = epsilon_spent(2.0, 10, 4, 10, 1e-5)
    assert epsilon_spent(2.0, 20, 4, 10, 1e-5) > base
    assert epsilon_spent(2.0, 10, 8, 10, 1e-5) > base
    assert epsilon_spent(4.0, 10, 4, 10, 1e-5) < base
    assert epsilon_spent(2.0, 0, 4, 10, 1e-5) == 0.0
    assert epsilon_spent(0.0, 1, 4, 10, 1e-5) == math.inf


def test_full_participation_matches_the_gaussian_mechanism_in_closed_form() -> None:
    # q = 1: T Gaussian mechanisms with sensitivity 2C and std zC compose to RDP α·T·(2/z)²/2; its ε bound at
    # δ is min over α of [RDP + log(1/δ)/(α-1)] at least (the library uses a tighter conversion: never above).
    z, T, delta = 10.0, 5, 1e-5
    alphas = [1 + x / 100 for x in range(1, 20000)]
    classic = min(a * T * 2 / z**2 + math.log(1 / delta) / (a - 1) for a in alphas)
    spent = epsilon_spent(z, T, 10, 10, delta)
    assert spent <= classic + 1e-6
    assert spent > 0.7 * classic  # the same mechanism, not a looser sensitivity C (which would be ~half)


def test_budget_affords_rounds_up_to_the_last_within_epsilon() -> None:
    budget = PrivacyBudget.plan(clip=1.0, delta=1e-5, rounds=10, sampled=5, population=10, noise=3.0, epsilon=4.0)
    last = budget.last_affordable(50)
    assert budget.spent(last) <= 4.0 < budget.spent(last + 1)
    calibrated = PrivacyBudget.plan(clip=1.0, delta=1e-5, rounds=12, sampled=5, population=10, epsilon=4.0)
    assert calibrated.last_affordable(12) == 12 and calibrated.last_affordable(40) == 12
    assert PrivacyBudget.plan(clip=1.0, delta=1e-5, rounds=3, sampled=5, population=10, noise=3.0).last_affordable(7) == 7


def _updates(n: int, seed: int = 0, scale: float = 1.0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"m.A": scale * torch.randn(2, 5, generator=g, dtype=torch.float64),  # (r, k) non-square
             "m.B": scale * torch.randn(7, 2, generator=g, dtype=torch.float64),  # (d, r)
             "head.w": scale * torch.randn(3, generator=g, dtype=torch.float64)} for _ in range(n)]


def test_clipping_keeps_small_updates_and_pulls_large_ones_onto_the_ball() -> None:
    small, = _updates(1, scale=0.01)
    kept, norm = clip_update(small, clip=1.0)
    assert norm < 1.0 and all(torch.equal(kept[k], small[k]) for k in small)
    large, = _updates(1, scale=10.0)
    clipped, norm = clip_update(large, clip=1.0)
    assert norm > 1.0 and joint_norm(clipped) == pytest.approx(1.0)
    for k in large:  # the direction is kept, jointly: every tensor scaled by the same factor
        assert torch.allclose(clipped[k], large[k] / norm)


def _mean(updates, noise_std=0.0, denominator=None, seed=0):
    return noisy_mean(updates, clip=1.0, noise_std=noise_std, denominator=denominator or len(updates),
                      generator=torch.Generator().manual_seed(seed), like=updates[0])


def test_noiseless_mean_is_the_clipped_sum_over_the_planned_clients() -> None:
    updates = _updates(4, scale=3.0)
    mean, norms = _mean(updates, denominator=6)  # 6 planned, 4 reported: the denominator is public, fixed
    clipped = [clip_update(u, 1.0)[0] for u in updates]
    for k in mean:
        assert torch.allclose(mean[k], sum(c[k] for c in clipped) / 6)
    assert norms == pytest.approx([joint_norm(u) for u in updates])


def test_replacing_one_client_moves_the_mean_by_at_most_2c_over_m() -> None:
    updates = _updates(5, seed=1, scale=4.0)
    other = _updates(1, seed=2, scale=4.0)[0]
    a, _ = _mean(updates)
    b, _ = _mean(updates[:-1] + [other])
    moved = joint_norm({k: a[k] - b[k] for k in a})
    assert 0 < moved <= 2 * 1.0 / 5 + 1e-12


def test_noise_has_the_stated_std_and_is_reproducible_and_order_free() -> None:
    updates = _updates(3)
    zero = [{k: torch.zeros_like(v) for k, v in u.items()} for u in updates]
    noisy, _ = noisy_mean([{k: torch.zeros(400, 50, dtype=torch.float64) for k in ("x",)}], noise_std=2.0,
                          clip=1.0, denominator=4, generator=torch.Generator().manual_seed(3),
                          like={"x": torch.zeros(400, 50)})
    assert float(noisy["x"].std()) == pytest.approx(2.0 / 4, rel=0.03)
    first, _ = _mean(updates, noise_std=0.5, seed=7)
    again, _ = _mean(list(reversed(updates)), noise_std=0.5, seed=7)
    assert all(torch.allclose(first[k], again[k]) for k in first)  # permutation: same draws, same sum
    other, _ = _mean(updates, noise_std=0.5, seed=8)
    assert not torch.allclose(first["m.B"], other["m.B"])
    empty, _ = _mean(zero, noise_std=0.5, seed=7)
    assert float(empty["m.B"].abs().max()) > 0  # the noise is there even when no client moved


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="denominator"):
        _mean(_updates(2), denominator=-1)
    with pytest.raises(ValueError, match="clip bound"):
        noisy_mean(_updates(1), clip=0.0, noise_std=1.0, denominator=1, generator=torch.Generator(),
                   like=_updates(1)[0])
