"""Damping (Appendix E.3, E.6; docs/math.md §4): factored Tikhonov's π and the exact-Tikhonov block inverse."""

from __future__ import annotations

import math
import warnings

import torch

from .blocks import kron
from .operators import BlockOperator, SymmetricEig, check_condition


def check_gamma(gamma) -> float:
    try:
        g = float(gamma)
    except (TypeError, ValueError):
        raise ValueError(f"gamma must be a non-negative number, got {gamma!r}.") from None
    if not math.isfinite(g) or g < 0:
        raise ValueError(f"gamma must be a finite number ≥ 0, got {gamma!r}.")
    return g


def trace_pi(A: torch.Tensor, G: torch.Tensor) -> float:
    """π = sqrt((tr Ā / dim Ā) / (tr G / dim G)), the trace-norm choice of Appendix E.3."""
    ta = float(torch.trace(A)) / A.shape[0]
    tg = float(torch.trace(G)) / G.shape[0]
    if not (ta > 0 and tg > 0 and math.isfinite(ta) and math.isfinite(tg)):
        warnings.warn(f"trace-norm π undefined (mean eigenvalues {ta:.3g}, {tg:.3g}); using π = 1.",
                      RuntimeWarning, stacklevel=3)
        return 1.0
    return math.sqrt(ta / tg)


class ExactTikhonovInverse(BlockOperator):
    """Block-diagonal ``(Ā_kk ⊗ G_kk + ξ I)⁻¹`` with ξ = λ + η (Appendix E.3 eqn. 6, solved by Appendix I).

    With eigendecompositions Ā = E_A diag(s_A) E_Aᵀ, G = E_G diag(s_G) E_Gᵀ:
    ``U = E_G [(E_Gᵀ V E_A) ⊘ (ξ + s_G s_Aᵀ)] E_Aᵀ``. Each block's condition number, max/min of
    ``ξ + s_G s_Aᵀ``, goes through the same guard as the factors' (``check_condition``).
    """

    def __init__(self, factors, damping: float, layers=None):
        damping = check_gamma(damping)
        sel = factors.select(layers)
        super().__init__(sel, [factors.shapes[k] for k in sel])
        self.damping = damping
        self.eA = [SymmetricEig(factors.A[k, k]) for k in sel]
        self.eG = [SymmetricEig(factors.G[k, k]) for k in sel]
        self.den = []
        for i, k in enumerate(sel):
            den = damping + self.eG[i]._s64[:, None] * self.eA[i]._s64[None, :]
            name, out = f"Ā⊗G + ξI of layer {k} (ξ = {damping:g})", "Increase the damping ξ = λ + η (Appendix E.3)."
            lo, hi = float(den.min()), float(den.max())
            if lo <= 0:
                check_condition(math.inf, name, factors.dtype, f"not positive definite: ξ + s_G s_Aᵀ reaches {lo:.3g}",
                                out)
            check_condition(hi / lo, name, factors.dtype, "max/min of ξ + s_G s_Aᵀ", out)
            self.den.append(den.to(factors.dtype))

    def apply_block(self, i: int, V: torch.Tensor) -> torch.Tensor:
        EA, EG = self.eA[i].E, self.eG[i].E
        return EG @ ((EG.T @ V @ EA) / self.den[i]) @ EA.T

    def dense_block(self, i: int) -> torch.Tensor:
        EA, EG = self.eA[i].E, self.eG[i].E
        K = kron(EA, EG)
        inv = (1.0 / self.den[i]).T.reshape(-1)  # vec order: index c·d + r
        return (K * inv) @ K.T


def exact_tikhonov_inverse(factors, damping: float, layers=None) -> ExactTikhonovInverse:
    """``(F̆ + ξI)⁻¹`` for undamped block-diagonal F̆ and ξ = λ + η (Appendix E.3, eqn. 6)."""
    return ExactTikhonovInverse(factors, damping, layers)
