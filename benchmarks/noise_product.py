"""How much of DP's damage to a LoRA update is the product of two noises, E_B E_A, by method.

DP (either level) adds Gaussian noise of std σ per coordinate to what the server averages. A method that averages
both factors (fedit) broadcasts (B + E_B)(A + E_A): its product error is E_B A + B E_A + E_B E_A, and the last term,
of norm ~ σ² √(d k r), grows quadratically in σ and does not depend on the signal. A method that trains and averages
only B with A frozen (ffa-lora; fedsvd, whose A is the server's re-factorisation of the noised product; rolora in
its B rounds) broadcasts (B + E_B) A: error E_B A only, linear in σ. This script measures both on one realistic
update at each σ, over several draws, at the shapes of the bundled MiniLM (query/value, 384 × 384) and of a 4096 ×
4096 projection (LLaMA-2-7B), r = 8, and prints the error of each term relative to the update's own product.

    python benchmarks/noise_product.py [--draws 20]

σ here is the noise on the *mean* update: DP-FedAvg's z·C/m, DP-SGD's z·C/b times the local steps' learning rate.
"""

from __future__ import annotations

import argparse
import math

import torch


def update(d: int, k: int, r: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (d, r), A (r, k)) like a LoRA factor pair a few rounds in: A near PEFT's init U(-1/√k, 1/√k), B small."""
    A = (torch.rand(r, k, generator=generator, dtype=torch.float64) * 2 - 1) / math.sqrt(k)  # (r, k)
    B = torch.randn(d, r, generator=generator, dtype=torch.float64) * 0.01  # (d, r)
    return B, A


def measure(d: int, k: int, r: int, sigma: float, draws: int, seed: int = 0) -> dict[str, float]:
    """Mean relative product errors ‖·‖_F / ‖B A‖_F: both factors noised (and its parts), B only."""
    g = torch.Generator().manual_seed(seed)
    B, A = update(d, k, r, g)
    P = B @ A  # (d, k)
    norm = float(P.norm())
    out = {"both": 0.0, "linear": 0.0, "quadratic": 0.0, "B only": 0.0}
    for _ in range(draws):
        E_B = sigma * torch.randn(d, r, generator=g, dtype=torch.float64)  # (d, r)
        E_A = sigma * torch.randn(r, k, generator=g, dtype=torch.float64)  # (r, k)
        out["both"] += float(((B + E_B) @ (A + E_A) - P).norm()) / norm / draws
        out["linear"] += float((E_B @ A + B @ E_A).norm()) / norm / draws
        out["quadratic"] += float((E_B @ E_A).norm()) / norm / draws
        out["B only"] += float((E_B @ A).norm()) / norm / draws
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=20)
    args = parser.parse_args()
    print("| shape (d × k, r = 8) | σ per coordinate | both factors noised (fedit) | of which linear | of which E_B E_A "
          "| B only (ffa-lora, fedsvd) | fedit / B only |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for d, k in ((384, 384), (4096, 4096)):
        for sigma in (1e-4, 1e-3, 1e-2, 1e-1):
            m = measure(d, k, 8, sigma, args.draws)
            print(f"| {d} × {k} | {sigma:g} | {m['both']:.3g} | {m['linear']:.3g} | {m['quadratic']:.3g} | "
                  f"{m['B only']:.3g} | {m['both'] / m['B only']:.1f}× |")


if __name__ == "__main__":
    main()
