"""The quadratic model M(δ) and its minimisation over span{Δ, δ₀} (Appendices E.4, F; docs/math.md §7).

``M(δ) = ½ δᵀ(F + (λ+η)I)δ + ∇hᵀδ`` with the mini-batch exact F. For ``δ = Σ_i c_i v_i``:
``M = ½ cᵀ Q c + bᵀ c`` with ``Q_ij = v_iᵀ F v_j + (λ+η) v_iᵀ v_j`` and ``b_i = ∇hᵀ v_i``.
The F-part of Q comes from J-products only (Appendix J, :func:`kfac_lens.fisher_gram`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def dot(u: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> torch.Tensor:
    """⟨u, v⟩ for per-layer matrix lists."""
    return sum((a * b).sum() for a, b in zip(u, v))


@dataclass
class SubspaceModel:
    """M restricted to span{v_i}: ``Q = gram_F + damping · gram_I``, ``b_i = ∇hᵀ v_i``."""

    gram_F: torch.Tensor
    gram_I: torch.Tensor
    b: torch.Tensor
    damping: float

    @property
    def Q(self) -> torch.Tensor:
        return self.gram_F + self.damping * self.gram_I

    def value(self, c: torch.Tensor) -> float:
        """M(Σ c_i v_i)."""
        return float(0.5 * c @ self.Q @ c + self.b @ c)

    def minimize(self) -> torch.Tensor:
        """c* = −Q⁻¹ b (so that M(δ*) = ½ bᵀc*). Drops directions that make Q singular (e.g. δ₀ = 0)."""
        Q, b = self.Q.double(), self.b.double()
        n = Q.shape[0]
        if n > 1:
            scale = torch.sqrt(torch.clamp(torch.diagonal(Q), min=1e-300))
            Qn = Q / scale[:, None] / scale[None, :]
            if not torch.isfinite(Qn).all() or float(torch.linalg.eigvalsh(Qn).min()) < 1e-10 \
                    or float(torch.diagonal(self.gram_I.double()).min()) == 0.0:
                c0 = SubspaceModel(self.gram_F[:1, :1], self.gram_I[:1, :1], self.b[:1], self.damping).minimize()
                return torch.cat([c0, torch.zeros(n - 1, dtype=c0.dtype, device=c0.device)])
        if float(Q[0, 0]) <= 0:
            raise ValueError(
                f"the quadratic model has non-positive curvature ΔᵀFΔ + (λ+η)‖Δ‖² = {float(Q[0, 0]):.3g} "
                "along the proposal; increase lambda or eta."
            )
        c = -torch.linalg.solve(Q, b)
        return c.to(self.b.dtype)


def alpha_star(dFd: float, dd: float, gd: float, damping: float) -> float:
    """Appendix E.4: α* = −∇hᵀΔ / (ΔᵀFΔ + (λ+η)‖Δ‖²)."""
    return -gd / (dFd + damping * dd)


# Columns of :func:`solve_subspaces`' result.
SOLUTION_FIELDS = ("alpha", "mu", "M", "Q00", "quad", "lin", "dFd", "gd")


def solve_subspaces(gram_F: torch.Tensor, gram_I: torch.Tensor, b: torch.Tensor, damping: float,
                    rescale: bool) -> torch.Tensor:
    """:meth:`SubspaceModel.minimize` for K models at once, on the device and without host syncs.

    ``gram_F``, ``gram_I``: (K, n, n), ``b``: (K, n), n = 1 (Δ) or 2 (Δ, δ₀). Returns (K, 8) in float64
    with the columns :data:`SOLUTION_FIELDS`: c = (α, μ) (μ = 0 for n = 1; α = 1, μ = 0 without re-scaling),
    M(δ) = ½cᵀQc + bᵀc, Q₀₀ (the caller refuses Q₀₀ ≤ 0 when re-scaling), cᵀQc, bᵀc, ΔᵀFΔ and ∇hᵀΔ.
    As in :meth:`SubspaceModel.minimize`, δ₀ is dropped (μ = 0) where the 2×2 model is singular or
    ill-conditioned (smallest eigenvalue of the diagonally scaled Q below 1e-10) or δ₀ = 0.
    """
    gram_F, gram_I, b = gram_F.double(), gram_I.double(), b.double()
    Q = gram_F + damping * gram_I
    K, n = b.shape
    c = torch.zeros(K, 2, dtype=torch.float64, device=b.device)
    if not rescale:
        c[:, 0] = 1.0
    else:
        alpha_only = -b[:, 0] / Q[:, 0, 0]
        if n == 1:
            c[:, 0] = alpha_only
        else:
            d = torch.diagonal(Q, dim1=1, dim2=2)
            scale = torch.sqrt(torch.clamp(d, min=1e-300))
            Qn = Q / scale[:, :, None] / scale[:, None, :]
            finite = torch.isfinite(Qn).all(dim=2).all(dim=1)
            Qn = torch.where(finite[:, None, None], Qn, torch.eye(2, dtype=Qn.dtype, device=Qn.device))
            # smallest eigenvalue of the symmetric 2×2 Qn
            tr, gap = Qn[:, 0, 0] + Qn[:, 1, 1], Qn[:, 0, 0] - Qn[:, 1, 1]
            low = 0.5 * (tr - torch.sqrt(gap * gap + 4 * Qn[:, 0, 1] * Qn[:, 1, 0]))
            zero_d0 = torch.diagonal(gram_I, dim1=1, dim2=2).amin(dim=1) == 0
            drop = ~finite | (low < 1e-10) | zero_d0
            both = -torch.linalg.solve_ex(Q, b[:, :, None])[0][:, :, 0]
            c[:, 0] = torch.where(drop, alpha_only, both[:, 0])
            c[:, 1] = torch.where(drop, torch.zeros_like(alpha_only), both[:, 1])
    cn = c[:, :n]
    quad = (cn[:, :, None] * Q * cn[:, None, :]).sum(dim=(1, 2))
    lin = (b * cn).sum(dim=1)
    M = 0.5 * quad + lin
    return torch.stack([c[:, 0], c[:, 1], M, Q[:, 0, 0], quad, lin, gram_F[:, 0, 0], b[:, 0]], dim=1)
