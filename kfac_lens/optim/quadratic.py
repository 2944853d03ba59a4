"""The quadratic model M(δ) and its minimisation over span{Δ, δ₀} (Appendices E.4, F; MATH.md §7).

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
