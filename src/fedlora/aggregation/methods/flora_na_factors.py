"""FLoRA-NA's ALS without Gram matrices: the same half-steps, solved matrix-free from the factors (many clients).

:mod:`fedlora.aggregation.methods.flora_na_als` forms the (J r)² Gram blocks of the J = U + 1 bases per module
and solves U×U systems: 2·M·(J r)² floats, 12 GiB at U = 1,000 on MiniLM shapes (M = 12, r = 8), and O(U³)
per half-step. Here nothing of size U×U or (J r)² exists. With S the fixed side's r×r product (ÂÂᵀ when B is
free, B̂ᵀB̂ when A is free) and X_j the free side's bases, the quadratic of the module docstring there is

    (H c)_j = ⟨X_j, X̂(c) S⟩  (B free; S X̂(c) when A is free),   h_j = ⟨X_j, R⟩,
    R = T Âᵀ = Σ_u w_u B_u (A_u Âᵀ)   (B free),   R = B̂ᵀ T = Σ_u w_u (B̂ᵀ B_u) A_u   (A free),

so a product with the normal matrix K = Dᵀ H D costs O(J·r·(d + k)·r) and the half-step's system K δ = rhs
(+ the ridge λ) is solved by conjugate gradients with a Jacobi preconditioner, from δ = 0, which converges to
the minimum-norm solution the Gram route takes with a pseudo-inverse (the normal equations of a least-squares
problem are consistent). ‖T‖² is formed module by module from the dense T (d×k, then dropped). Products over every
client run a chunk of clients at a time (``CHUNK``), so no temporary of the bases' size exists: at U = 1,000 on MiniLM
shapes the whole aggregation peaks under 2 GiB (benchmarks/aggregation.py --clients).

Same iterates as the Gram route up to the CG tolerance (tests/unit/aggregation/test_flora_na_factors.py);
chosen by :func:`fedlora.aggregation.methods.flora_na._als` when the Grams would exceed ``GRAM_BUDGET_BYTES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from fedlora.aggregation.methods.flora_na_als import AlsSolution, converged, record_sweep

CG_TOL = 1e-9  # relative residual of each half-step's solve (measured: the same objective to 1e-13 as 1e-12, 25% fewer iterations)
CG_MAX_ITER = 500
# Clients per chunk where a product over every client would make a (M, U, d, r)-sized temporary: at U = 1,000 on
# MiniLM shapes such a temporary is 295 MB; chunks keep them at 64 / U of that.
CHUNK = 64


@dataclass(frozen=True)
class FactorProblem:
    """M same-shape modules' bases: A (M, J, r, k), B (M, J, d, r), index 0 = the global factor."""

    A: Tensor
    B: Tensor
    w: Tensor  # (U,) solve weights
    target_sq_: Tensor  # (M,) ‖T‖²

    @staticmethod
    def build(A: Tensor, B: Tensor, w: Tensor) -> "FactorProblem":
        """From :func:`fedlora.aggregation.methods.flora_na_bases.stacked_blocks`' A (M, J, r, k) and B (M, J, d, r)."""
        M = A.shape[0]
        target_sq = torch.empty(M, dtype=A.dtype, device=A.device)
        for m in range(M):  # T (d, k) one module at a time: memory d·k, not M·d·k
            T = torch.zeros(B.shape[2], A.shape[3], dtype=A.dtype, device=A.device)
            for lo in range(0, w.shape[0], CHUNK):  # Σ_u w_u B_u A_u, a chunk of clients at a time
                hi = min(lo + CHUNK, w.shape[0])
                Bw = B[m, 1 + lo:1 + hi] * w[lo:hi, None, None]  # (c, d, r)
                T += torch.einsum("udr,urk->dk", Bw, A[m, 1 + lo:1 + hi])
            target_sq[m] = (T * T).sum()
        return FactorProblem(A=A, B=B, w=w, target_sq_=target_sq)

    def coefficients(self, x: Tensor) -> Tensor:
        """Basis coefficients (M, J) from client coefficients x (M, U): [1 − Σ w x, w ⊙ x]."""
        wx = self.w * x
        return torch.cat([1 - wx.sum(dim=1, keepdim=True), wx], dim=1)

    def target_sq(self) -> Tensor:
        return self.target_sq_

    def combine(self, c: Tensor, free_is_B: bool) -> Tensor:
        """Σ_j c_j X_j (M, d, r) for B or (M, r, k) for A."""
        return _combine(c, self.B if free_is_B else self.A)

    def objective(self, p: Tensor, q: Tensor) -> Tensor:
        """L per module (M,) for client coefficients p, q (M, U), as GramProblem.objective."""
        return _system(self, p, free_is_B=True).value(q)


@dataclass(frozen=True)
class HalfStep:
    """The quadratic in the free side's client coefficients x, with the other side fixed (see module docstring)."""

    problem: FactorProblem
    free_is_B: bool
    S: Tensor  # (M, r, r)
    R: Tensor  # (M, d, r) or (M, r, k)

    def _H(self, c: Tensor) -> Tensor:
        """H c (M, J) for basis coefficients c (M, J)."""
        X = self.problem.B if self.free_is_B else self.problem.A
        hat = _combine(c, X)
        Z = hat @ self.S if self.free_is_B else self.S @ hat
        return _inner(X, Z)

    def h(self) -> Tensor:
        X = self.problem.B if self.free_is_B else self.problem.A
        return _inner(X, self.R)

    def matvec(self, v: Tensor) -> Tensor:
        """K v (M, U), K = Dᵀ H D."""
        w = self.problem.w
        y = self._H(torch.cat([-(w * v).sum(1, keepdim=True), w * v], dim=1))
        return w * (y[:, 1:] - y[:, :1])

    def rhs(self, x: Tensor) -> Tensor:
        """Dᵀ (h − H c(x)) (M, U)."""
        y = self.h() - self._H(self.problem.coefficients(x))
        return self.problem.w * (y[:, 1:] - y[:, :1])

    def diagonal(self) -> Tensor:
        """diag K (M, U) = w_u² (H_00 − 2 H_0u + H_uu), for the preconditioner and the ridge's scale.

        From r×r products only (S symmetric): H_jj = ⟨X_jᵀX_j, S⟩ and H_0j = ⟨X_0ᵀX_j, S⟩ when B is free,
        ⟨X_j X_jᵀ, S⟩ and ⟨X_j X_0ᵀ, S⟩ when A is free; nothing of the bases' size is formed.
        """
        X = self.problem.B if self.free_is_B else self.problem.A
        M, J = X.shape[:2]
        S = self.S[:, None]  # (M, 1, r, r)
        H_jj = torch.empty(M, J, dtype=X.dtype, device=X.device)
        H_0j = torch.empty_like(H_jj)
        for lo in range(0, J, CHUNK):  # chunks: a batched product over every block would copy the bases
            Xc = X[:, lo:lo + CHUNK]
            X0 = X[:, :1].expand_as(Xc)
            own, cross = (Xc.mT @ Xc, X0.mT @ Xc) if self.free_is_B else (Xc @ Xc.mT, Xc @ X0.mT)  # (M, c, r, r)
            H_jj[:, lo:lo + CHUNK], H_0j[:, lo:lo + CHUNK] = (own * S).sum((2, 3)), (cross * S).sum((2, 3))
        w = self.problem.w
        return w * w * (H_jj[:, :1] - 2 * H_0j[:, 1:] + H_jj[:, 1:])

    def value(self, x: Tensor) -> Tensor:
        """L (M,) at client coefficients x of the free side."""
        c = self.problem.coefficients(x)
        return (c * self._H(c)).sum(1) - 2 * (c * self.h()).sum(1) + self.problem.target_sq()


def _combine(c: Tensor, X: Tensor) -> Tensor:
    """Σ_j c_j X_j (M, a, b) from c (M, J) and X (M, J, a, b): one batched GEMV over the contiguous bases."""
    M, J, a, b = X.shape
    return (c[:, None, :] @ X.view(M, J, a * b)).view(M, a, b)


def _inner(X: Tensor, Z: Tensor) -> Tensor:
    """⟨X_j, Z⟩ for every j (M, J): one batched GEMV."""
    M, J, a, b = X.shape
    return (X.view(M, J, a * b) @ Z.reshape(M, a * b, 1))[..., 0]


def _system(problem: FactorProblem, other: Tensor, free_is_B: bool) -> HalfStep:
    p = problem
    fixed = p.combine(p.coefficients(other), free_is_B=not free_is_B)  # Â (M, r, k) or B̂ (M, d, r)
    U = p.w.shape[0]
    if free_is_B:
        S = fixed @ fixed.mT  # ÂÂᵀ
        R = torch.zeros(fixed.shape[0], p.B.shape[2], fixed.shape[1], dtype=fixed.dtype, device=fixed.device)
        for lo in range(0, U, CHUNK):  # T Âᵀ = Σ_u w_u B_u (A_u Âᵀ), a chunk of clients at a time
            hi = min(lo + CHUNK, U)
            AA = torch.einsum("murk,msk->murs", p.A[:, 1 + lo:1 + hi], fixed)  # A_u Âᵀ
            R += torch.einsum("u,mudr,murs->mds", p.w[lo:hi], p.B[:, 1 + lo:1 + hi], AA)
    else:
        S = fixed.mT @ fixed  # B̂ᵀB̂
        R = torch.zeros(fixed.shape[0], fixed.shape[2], p.A.shape[3], dtype=fixed.dtype, device=fixed.device)
        for lo in range(0, U, CHUNK):  # B̂ᵀ T = Σ_u w_u (B̂ᵀ B_u) A_u
            hi = min(lo + CHUNK, U)
            BB = torch.einsum("mds,mudr->musr", fixed, p.B[:, 1 + lo:1 + hi])  # B̂ᵀ B_u
            R += torch.einsum("u,musr,murk->msk", p.w[lo:hi], BB, p.A[:, 1 + lo:1 + hi])
    return HalfStep(problem=p, free_is_B=free_is_B, S=S, R=R)


def _pcg(matvec: Callable[[Tensor], Tensor], rhs: Tensor, diag: Tensor, shift: Tensor) -> Tensor:
    """Solve (K + shift I) δ = rhs for each row (M, U) by Jacobi-preconditioned CG from δ = 0."""
    d = diag + shift
    inv = torch.where(d > 0, 1 / d.clamp_min(torch.finfo(d.dtype).tiny), torch.ones_like(d))
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = inv * r
    p = z.clone()
    rz = (r * z).sum(-1, keepdim=True)
    goal = CG_TOL * rhs.norm(dim=-1, keepdim=True)
    for _ in range(min(CG_MAX_ITER, 4 * rhs.shape[-1] + 10)):
        if bool((r.norm(dim=-1, keepdim=True) <= goal).all()):
            break
        Kp = matvec(p) + shift * p
        pKp = (p * Kp).sum(-1, keepdim=True)
        step = torch.where(pKp > 0, rz / pKp.clamp_min(torch.finfo(pKp.dtype).tiny), torch.zeros_like(pKp))
        x = x + step * p
        r = r - step * Kp
        z = inv * r
        rz_new = (r * z).sum(-1, keepdim=True)
        p = z + torch.where(rz > 0, rz_new / rz.clamp_min(torch.finfo(rz.dtype).tiny), torch.zeros_like(rz)) * p
        rz = rz_new
    return x


def solve_als_factors(
    problems: list[FactorProblem], shared: bool, max_sweeps: int, tol: float, ridge: float = 0.0
) -> AlsSolution:
    """:func:`fedlora.aggregation.methods.flora_na_als.solve_als`, matrix-free: same start, steps, ridge and stop rule."""
    U = problems[0].w.shape[0]
    dtype, device = problems[0].A.dtype, problems[0].A.device
    ps = [torch.ones(pr.A.shape[0], U, dtype=dtype, device=device) for pr in problems]
    qs = [torch.ones(pr.A.shape[0], U, dtype=dtype, device=device) for pr in problems]
    lams = _ridge_strengths(problems, ps, shared, ridge) if ridge > 0 else None

    def penalty(ps_: list[Tensor], qs_: list[Tensor]) -> float:
        if lams is None:
            return 0.0
        if shared:
            return float(lams[0][0] * (((ps_[0][0] - 1) ** 2).sum() + ((qs_[0][0] - 1) ** 2).sum()))
        return float(sum((lam * (((p - 1) ** 2).sum(1) + ((q - 1) ** 2).sum(1))).sum()
                         for lam, p, q in zip(lams, ps_, qs_)))

    trace = [float(sum(pr.objective(p, q).sum() for pr, p, q in zip(problems, ps, qs)))]
    penalised = list(trace)
    for _ in range(max_sweeps):
        new_qs, _ = _step_all(problems, qs, ps, True, shared, lams)
        new_ps, systems = _step_all(problems, ps, new_qs, False, shared, lams)
        value = float(sum(s.value(p).sum() for s, p in zip(systems, new_ps)))
        if not record_sweep(trace, penalised, value, value + penalty(new_ps, new_qs)):
            break
        ps, qs = new_ps, new_qs
        if converged(penalised, tol):
            break
    return AlsSolution(ps, qs, trace, penalised)


def _ridge_strengths(problems: list[FactorProblem], ones: list[Tensor], shared: bool, ridge: float) -> list[Tensor]:
    """λ as flora_na_als.Ridge.scaled: ridge × the mean diagonal of K_q and K_p at p = q = 1."""
    diagonals = []
    for pr, x in zip(problems, ones):
        kq = _system(pr, x, True).diagonal().mean(1)
        kp = _system(pr, x, False).diagonal().mean(1)
        diagonals.append((kq + kp) / 2)  # (M,)
    if not shared:
        return [ridge * d for d in diagonals]
    total = cast(Tensor, sum(d.sum() for d in diagonals))
    return [(ridge * total).expand(d.shape[0]) for d in diagonals]


def _step_all(problems: list[FactorProblem], xs: list[Tensor], others: list[Tensor], free_is_B: bool, shared: bool,
              lams: list[Tensor] | None) -> tuple[list[Tensor], list[HalfStep]]:
    """One exact half-step (up to the CG tolerance) for every group, per module or shared by the model."""
    systems = [_system(pr, o, free_is_B) for pr, o in zip(problems, others)]
    if not shared:
        out = []
        for x, s, i in zip(xs, systems, range(len(xs))):
            lam = lams[i][:, None] if lams is not None else torch.zeros_like(x[:, :1])
            out.append(x + _pcg(s.matvec, s.rhs(x) - lam * (x - 1), s.diagonal(), lam))
        return out, systems
    # Shared scope: one x for every module; the model's normal equations are the sum of the modules'.
    x0 = xs[0][:1]  # (1, U)
    lam = lams[0][0].reshape(1, 1) if lams is not None else torch.zeros_like(x0[:, :1])

    def matvec(v: Tensor) -> Tensor:
        return cast(Tensor, sum(s.matvec(v.expand(s.problem.A.shape[0], -1)).sum(0, keepdim=True) for s in systems))

    rhs = cast(Tensor, sum(s.rhs(x).sum(0, keepdim=True) for s, x in zip(systems, xs))) - lam * (x0 - 1)
    diag = cast(Tensor, sum(s.diagonal().sum(0, keepdim=True) for s in systems))
    delta = _pcg(matvec, rhs, diag, lam)  # (1, U)
    return [x + delta for x in xs], systems
