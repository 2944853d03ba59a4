"""The update proposals of one iteration: Δ for each γ candidate and the pieces of M over span{Δ, δ₀}
(Section 3.2, Appendices E.3, E.4, E.6, F, J).

- :func:`subspace_grams`: for K candidates, the λ-independent Gram matrices of M on span{Δ_c, δ₀} from one
  J-product pass over all tangents (δ₀'s product computed once per search).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch



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
