"""The update proposals of one iteration: Δ for each γ candidate and the pieces of M over span{Δ, δ₀}
(Section 3.2, Appendices E.3, E.4, E.6, F, J).

- :func:`eigenbasis_directions`: Δ_γ of the block-diagonal inverse for many γ (E.6) in the factors'
  eigenbasis. With ``Ā = E_A diag(a) E_Aᵀ`` and ``G = E_G diag(g) E_Gᵀ`` the factored-Tikhonov-damped
  block inverse (E.3) applied to ∇h is ``E_G [(E_Gᵀ ∇h E_A) ⊘ ((g + γ/π)(a + πγ)ᵀ)] E_Aᵀ``, so every
  candidate shares one rotated gradient and none forms an inverse. (The optimizer's search has only three
  candidates and keeps the winner's inverse, so it builds one inverse per candidate by Cholesky, which
  costs less than the eigendecompositions.)
- :func:`subspace_grams`: for K candidates, the λ-independent Gram matrices of M on span{Δ_c, δ₀} from one
  J-product pass over all tangents (δ₀'s product computed once per search).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..curvature.factors import KroneckerFactors
from ..errors import SingularFactorError


@dataclass
class Proposal:
    """An update δ = αΔ + μδ₀ and what the quadratic model says of it."""

    delta: list[torch.Tensor]
    Delta: list[torch.Tensor]
    gamma: float
    alpha: float
    mu: float
    M: float
    improvement: float = float("nan")  # h(θ) − h(θ + δ) on the evaluation data, when asked for
    extra: dict = field(default_factory=dict)


@dataclass
class ProposalCache:
    """What :meth:`KFAC.proposals <kfac_lens.optim.kfac.KFAC.proposals>` keeps between calls on the same
    (x, y): the gradient pass, h(θ), the shared eigendecomposition of the factors and, per γ, Δ and the
    Gram matrices of M on span{Δ, δ₀}."""

    gradient: tuple | None = None
    h0: float | None = None
    eigs: dict | None = None
    eigs_ready: bool = False
    directions: dict[float, list[torch.Tensor]] = field(default_factory=dict)
    grams: dict[float, tuple] = field(default_factory=dict)


@dataclass
class FactorEig:
    """A symmetric factor ``E diag(s) Eᵀ``."""

    E: torch.Tensor
    s: torch.Tensor


def factor_eigenbases(factors: KroneckerFactors) -> dict[tuple[str, int], FactorEig]:
    """Eigendecompositions of the undamped diagonal factors in their own dtype (the model's), keyed
    ("Ā" | "G", k). Only the search's Δ come from them; the inverse kept is built separately."""
    out = {}
    for k in factors.layers:
        for name, M in (("Ā", factors.A[k, k]), ("G", factors.G[k, k])):
            s, E = torch.linalg.eigh(0.5 * (M + M.T))
            out[(name, k)] = FactorEig(E, s)
    return out


def eigenbasis_directions(eigs: dict, factors: KroneckerFactors, grad: Sequence[torch.Tensor],
                          gammas: Sequence[float], pi) -> list[list[torch.Tensor]]:
    """Δ_γ = −F̆_γ⁻¹∇h for each γ from one eigendecomposition per factor (``eigs`` from
    :func:`factor_eigenbases`, or anything with ``E`` and ``s`` per ("Ā" | "G", k)). Raises
    :class:`SingularFactorError` when a damped factor is not positive definite."""
    out: list[list[torch.Tensor]] = [[] for _ in gammas]
    for i, k in enumerate(factors.layers):
        eA, eG = eigs[("Ā", k)], eigs[("G", k)]
        p = factors.pi(k, pi)
        R = eG.E.T @ grad[i] @ eA.E
        for c, gamma in enumerate(gammas):
            sA, sG = eA.s + p * gamma, eG.s + gamma / p
            low = min(float(sA.min()), float(sG.min()))
            if not low > 0:
                raise SingularFactorError(
                    f"the damped factors of layer {k} are not positive definite at γ = {gamma:g} (smallest "
                    f"eigenvalue {low:.3g}); increase gamma (factored Tikhonov damping, Appendix E.3).")
            out[c].append(-(eG.E @ (R / torch.outer(sG, sA)) @ eA.E.T))
    return out


def _dot(u: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(u, v)]).double().sum()


def subspace_grams(gram_F_all: torch.Tensor, Deltas: Sequence[Sequence[torch.Tensor]], grad,
                   delta0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gram_F, gram_I, b) of shapes (K, n, n), (K, n, n), (K, n) for the K candidates Δ_c, with n = 2
    (Δ_c, δ₀) when ``delta0`` is given, else 1. ``gram_F_all`` is the F-Gram of ``[*Deltas, delta0]``."""
    K = len(Deltas)
    dd0, gd0 = (None, None) if delta0 is None else (_dot(delta0, delta0), _dot(grad, delta0))
    gF, gI, bs = [], [], []
    for c, D in enumerate(Deltas):
        DD, gD = _dot(D, D), _dot(grad, D)
        if delta0 is None:
            gF.append(gram_F_all[c:c + 1, c:c + 1])
            gI.append(DD.reshape(1, 1))
            bs.append(gD.reshape(1))
            continue
        G = gram_F_all
        gF.append(torch.stack([torch.stack([G[c, c], G[c, K]]), torch.stack([G[K, c], G[K, K]])]))
        Dd0 = _dot(D, delta0)
        gI.append(torch.stack([torch.stack([DD, Dd0]), torch.stack([Dd0, dd0])]))
        bs.append(torch.stack([gD, gd0]))
    return torch.stack(gF), torch.stack(gI), torch.stack(bs)
