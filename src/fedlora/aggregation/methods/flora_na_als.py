"""FLoRA-NA's objective in Gram form, solved exactly by alternating least squares (ALS).

Write both broadcast factors in the basis of the global and client factors (j = 0 is global):
    Â(p) = A_g + Σ_u w_u p_u (A_u − A_g) = Σ_i α_i A_i,   α_0 = 1 − Σ_u w_u p_u,  α_u = w_u p_u
    B̂(q) = Σ_j β_j B_j                                    (β from q the same way)
and T = Σ_u w_u B_u A_u. With the r×r Gram blocks GB[j,l] = B_jᵀB_l and GA[i,m] = A_i A_mᵀ:
    ‖B̂Â‖²     = ⟨B̂ᵀB̂, ÂÂᵀ⟩ = Σ_{j,l} β_j β_l ⟨GB[j,l], SA⟩,   SA = ÂÂᵀ = Σ_{i,m} α_i α_m GA[i,m]
    ⟨B̂Â, T⟩   = Σ_j β_j Σ_u w_u ⟨GB[j,u], CA[u]⟩,                CA[u] = ÂA_uᵀ = Σ_i α_i GA[i,u]
    ‖T‖²      = Σ_{u,v} w_u w_v ⟨GB[u,v], GA[u,v]⟩
so L(p, q) = ‖B̂Â − T‖² = βᵀHβ − 2βᵀh + ‖T‖² is a quadratic in q for fixed p (and, by the
symmetry A ↔ B, in p for fixed q): each half-step is a U×U linear solve. Every half-step is an
exact block minimisation, so L never increases and, starting from p = q = 1 (FedIT), the result
is never worse than FedIT. Nothing of size d×k is ever formed: the Grams cost O((d + k)(U r)²)
once, each sweep O(U² r²) per module.

Modules with equal shapes are solved as one batch (leading dimension M).

Ridge (``ridge`` > 0, the stabilised variant): minimise instead
    J(p, q) = L(p, q) + λ · (‖p − 1‖² + ‖q − 1‖²),
which pulls the coefficients toward FedIT's p = q = 1. Each half-step is still an exact
minimisation, now of J: (K + λI) δ = rhs − λ (x − 1) instead of K δ = rhs. So J never increases
and L_final ≤ J_final ≤ J(1, 1) = L(1, 1): never worse than FedIT in L either. λ is fixed for the
whole solve (so that all half-steps minimise one J): λ = ridge × κ with κ the mean diagonal of the
two U×U normal matrices K_q, K_p at the start p = q = 1, i.e. the average curvature of L in one
client's coefficient at FedIT. That makes ``ridge`` dimensionless: invariant under rescaling A or B
(L and K scale alike) and under the number of clients (w_u ~ 1/U enters L and K alike); ridge = 1
roughly halves the unpenalised step along a direction of average curvature. Per module (its own
κ_m) in the per-module scope; one κ from the summed normal matrices in the global scope.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor


@dataclass(frozen=True)
class GramProblem:
    """Gram blocks of M same-shape modules, viewed as (M, J, r, J, r) with J = U + 1."""

    GB: Tensor  # (M, J, r, J, r): B_jᵀ B_l
    GA: Tensor  # (M, J, r, J, r): A_i A_mᵀ
    w: Tensor  # (U,) solve weights

    @staticmethod
    def build(A_basis: Tensor, B_basis: Tensor, w: Tensor) -> "GramProblem":
        """``A_basis`` (M, J, r, k) and ``B_basis`` (M, J, d, r), index 0 = the global factor."""
        M, J, r, k = A_basis.shape
        E = A_basis.reshape(M, J * r, k)  # (M, J r, k): A_i stacked on top
        F = B_basis.permute(0, 2, 1, 3).reshape(M, B_basis.shape[2], J * r)  # (M, d, J r): B_j side by side
        return GramProblem.from_stacked(E, F, w)

    @staticmethod
    def from_stacked(E: Tensor, F: Tensor, w: Tensor) -> "GramProblem":
        """From ``E`` (M, J r, k) = [A_0; …; A_U] and ``F`` (M, d, J r) = [B_0, …, B_U] per module.

        Both Grams are one batched (J r, ·) @ (·, J r) product with the long dimension contiguous,
        the cheapest layout for the BLAS; this is the only O((d + k)(J r)²) work of the solve.
        """
        M, Jr = E.shape[0], E.shape[1]
        J = w.shape[0] + 1
        r = Jr // J
        GA = (E @ E.mT).view(M, J, r, J, r)
        GB = (F.mT @ F).view(M, J, r, J, r)
        return GramProblem(GB=GB, GA=GA, w=w)

    def coefficients(self, x: Tensor) -> Tensor:
        """Basis coefficients (M, J) from client coefficients x (M, U): [1 − Σ w x, w ⊙ x]."""
        wx = self.w * x  # (M, U)
        return torch.cat([1 - wx.sum(dim=1, keepdim=True), wx], dim=1)

    def basis_map(self) -> Tensor:
        """D (J, U) with coefficients(x) = e_0 + D x."""
        return torch.cat([-self.w[None, :], torch.diag(self.w)], dim=0).to(self.GB.dtype)

    def target_sq(self) -> Tensor:
        """‖T‖² per module (M,)."""
        GBt, GAt = self.GB[:, 1:, :, 1:, :], self.GA[:, 1:, :, 1:, :]
        return torch.einsum("u,v,muavb,muavb->m", self.w, self.w, GBt, GAt)

    def quadratic(self, G_free: Tensor, G_fixed: Tensor, fixed: Tensor) -> tuple[Tensor, Tensor]:
        """H (M, J, J) and h (M, J) of L as a quadratic in the free side's basis coefficients.

        ``fixed`` (M, J) are the other side's basis coefficients. By the A ↔ B symmetry of L the
        same code serves the q-step (free = B) and the p-step (free = A).
        """
        S = torch.einsum("mi,ml,mialb->mab", fixed, fixed, G_fixed)  # (M, r, r): ÂÂᵀ or B̂ᵀB̂
        H = torch.einsum("mjalb,mab->mjl", G_free, S)
        C = torch.einsum("mi,miaub->muab", fixed, G_fixed[:, :, :, 1:, :])  # (M, U, r, r)
        h = torch.einsum("u,mjaub,muab->mj", self.w, G_free[:, :, :, 1:, :], C)
        return H, h

    def objective(self, p: Tensor, q: Tensor) -> Tensor:
        """L per module (M,) for client coefficients p, q (M, U)."""
        alpha, beta = self.coefficients(p), self.coefficients(q)
        H, h = self.quadratic(self.GB, self.GA, alpha)
        return _quadratic_value(H, h, beta) + self.target_sq()


def _quadratic_value(H: Tensor, h: Tensor, c: Tensor) -> Tensor:
    """cᵀHc − 2cᵀh per module (M,): L − ‖T‖² at basis coefficients c (M, J)."""
    return torch.einsum("mj,mjl,ml->m", c, H, c) - 2 * (c * h).sum(1)


def _normal_equations(
    problem: GramProblem, x: Tensor, other: Tensor, free_is_B: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """K (M, U, U) and rhs (M, U) of the normal equations K δ = rhs for the change δ of x, and H, h.

    x is q if ``free_is_B`` else p; the other side is held fixed. From L = cᵀHc − 2cᵀh + const
    with c = e_0 + D x: Dᵀ H D δ = Dᵀ (h − H c). H and h are returned so that L at the new x
    costs no second quadratic.
    """
    G_free, G_fixed = (problem.GB, problem.GA) if free_is_B else (problem.GA, problem.GB)
    H, h = problem.quadratic(G_free, G_fixed, problem.coefficients(other))
    D = problem.basis_map()  # (J, U)
    K = torch.einsum("ju,mjl,lv->muv", D, H, D)
    rhs = torch.einsum("ju,mj->mu", D, h - torch.einsum("mjl,ml->mj", H, problem.coefficients(x)))
    return K, rhs, H, h


def _min_norm_solve(K: Tensor, rhs: Tensor) -> Tensor:
    # Minimum-norm solution: directions L does not see (e.g. identical clients) leave x as it is.
    return (torch.linalg.pinv(K, hermitian=True, rtol=1e-12) @ rhs[..., None])[..., 0]


@dataclass(frozen=True)
class Ridge:
    """The penalty λ (‖p − 1‖² + ‖q − 1‖²), λ fixed for a whole solve.

    ``strengths``: per group, λ per module (M,); in the shared scope every entry is the one λ and
    the penalty counts the shared p, q once.
    """

    strengths: list[Tensor]
    shared: bool

    @staticmethod
    def scaled(problems: list[GramProblem], shared: bool, ridge: float) -> "Ridge":
        """λ = ridge × the mean diagonal of the normal matrices K_q, K_p at p = q = 1 (see the module docstring)."""
        diagonals = []
        for pr in problems:
            ones = torch.ones(pr.GB.shape[0], pr.w.shape[0], dtype=pr.GB.dtype, device=pr.GB.device)
            K_q = _normal_equations(pr, ones, ones, free_is_B=True)[0]  # (M, U, U)
            K_p = _normal_equations(pr, ones, ones, free_is_B=False)[0]
            diagonals.append((K_q.diagonal(dim1=1, dim2=2).mean(1) + K_p.diagonal(dim1=1, dim2=2).mean(1)) / 2)  # (M,)
        if not shared:
            return Ridge([ridge * kappa for kappa in diagonals], shared=False)
        total = cast(Tensor, sum(d.sum() for d in diagonals))  # mean diagonal of the summed K: mean diag is linear
        return Ridge([(ridge * total).expand(d.shape[0]) for d in diagonals], shared=True)

    def penalty(self, ps: list[Tensor], qs: list[Tensor]) -> float:
        if self.shared:
            lam, p, q = self.strengths[0][0], ps[0][0], qs[0][0]
            return float(lam * (((p - 1) ** 2).sum() + ((q - 1) ** 2).sum()))
        return float(sum((lam * (((p - 1) ** 2).sum(1) + ((q - 1) ** 2).sum(1))).sum()
                         for lam, p, q in zip(self.strengths, ps, qs)))


@dataclass(frozen=True)
class AlsSolution:
    """p, q per group; ``trace``: L after each sweep (trace[0] is FedIT); ``penalised``: J likewise (= trace without ridge)."""

    ps: list[Tensor]
    qs: list[Tensor]
    trace: list[float]
    penalised: list[float]


def solve_als(
    problems: list[GramProblem], shared: bool, max_sweeps: int, tol: float, ridge: float = 0.0
) -> AlsSolution:
    """ALS from p = q = 1 over groups of same-shape modules, minimising L (+ the ridge penalty if ``ridge`` > 0).

    With ``shared`` (scope="global") every group's p, q are the same vector, updated from the
    sum of all groups' quadratics.
    """
    U = problems[0].w.shape[0]
    dtype = problems[0].GB.dtype
    ps = [torch.ones(pr.GB.shape[0], U, dtype=dtype, device=pr.GB.device) for pr in problems]
    qs = [torch.ones(pr.GB.shape[0], U, dtype=dtype, device=pr.GB.device) for pr in problems]
    target_sq = [pr.target_sq() for pr in problems]  # ‖T‖² per module, fixed
    penalty = Ridge.scaled(problems, shared, ridge) if ridge > 0 else None

    trace = [float(sum(pr.objective(p, q).sum() for pr, p, q in zip(problems, ps, qs)))]
    penalised = list(trace)  # J(1, 1) = L(1, 1)
    for _ in range(max_sweeps):
        new_qs, _ = _step_all(problems, qs, ps, free_is_B=True, shared=shared, ridge=penalty)
        new_ps, quadratics = _step_all(problems, ps, new_qs, free_is_B=False, shared=shared, ridge=penalty)
        # L at (new p, new q) from the p-step's own quadratic in α (β fixed at the new q).
        value = float(
            sum(
                (_quadratic_value(H, h, pr.coefficients(p)) + t_sq).sum()
                for pr, p, (H, h), t_sq in zip(problems, new_ps, quadratics, target_sq)
            )
        )
        objective = value if penalty is None else value + penalty.penalty(new_ps, new_qs)
        if not record_sweep(trace, penalised, value, objective):
            break
        ps, qs = new_ps, new_qs
        if converged(penalised, tol):
            break
    return AlsSolution(ps, qs, trace, penalised)


def record_sweep(trace: list[float], penalised: list[float], value: float, objective: float) -> bool:
    """Append a sweep's L and J unless J rose (only round-off, or a CG tolerance, can do that: the caller then
    keeps the better iterate); True when recorded."""
    if objective > penalised[-1]:
        return False
    trace.append(value)
    penalised.append(objective)
    return True


def converged(penalised: list[float], tol: float) -> bool:
    """The last sweep lowered J by at most ``tol`` × J at FedIT."""
    return penalised[-2] - penalised[-1] <= tol * max(penalised[0], 1e-300)


def _step_all(
    problems: list[GramProblem],
    xs: list[Tensor],
    others: list[Tensor],
    free_is_B: bool,
    shared: bool,
    ridge: Ridge | None = None,
) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
    """One exact half-step for every group: per module, or one U×U solve for the whole model.

    With ``ridge`` the step minimises L + λ‖x − 1‖²: (K + λI) δ = rhs − λ (x − 1).
    Returns the new x per group and the quadratic (H, h) per group that the step minimised.
    """
    systems = [_normal_equations(pr, x, o, free_is_B) for pr, x, o in zip(problems, xs, others)]
    quadratics = [(H, h) for _, _, H, h in systems]
    if not shared:
        if ridge is None:
            return [x + _min_norm_solve(K, rhs) for x, (K, rhs, _, _) in zip(xs, systems)], quadratics
        steps = []
        for x, (K, rhs, _, _), lam in zip(xs, systems, ridge.strengths):
            eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
            steps.append(x + _min_norm_solve(K + lam[:, None, None] * eye, rhs - lam[:, None] * (x - 1)))
        return steps, quadratics
    # Shared scope: the model's objective is the sum of the modules', so their normal equations add.
    K_sum = cast(Tensor, sum(K.sum(0) for K, _, _, _ in systems))  # cast: sum() of tensors types as Tensor | 0
    rhs_sum = cast(Tensor, sum(rhs.sum(0) for _, rhs, _, _ in systems))
    if ridge is not None:  # the shared x is the same row everywhere; λ counts once
        lam, x0 = ridge.strengths[0][0], xs[0][0]
        K_sum = K_sum + lam * torch.eye(K_sum.shape[-1], dtype=K_sum.dtype, device=K_sum.device)
        rhs_sum = rhs_sum - lam * (x0 - 1)
    delta = _min_norm_solve(K_sum, rhs_sum)  # (U,)
    return [x + delta for x in xs], quadratics
