"""What K-FAC would do, without doing it: the proposals behind Figure 7 (Appendices E.4, E.6, F).

:class:`ProposalAnalysis` gives :class:`~kfac_lens.KFAC` its analysis methods: :meth:`~ProposalAnalysis.propose`
(one update on a batch at the current factors, with any γ, λ or update variant) and
:meth:`~ProposalAnalysis.proposals` (a grid of γ and variants sharing one gradient pass; the data of
:func:`kfac_lens.sweep.gamma_sweep`). They read the optimizer's state and never change it.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..capture import check_inputs
from ..curvature.inverses import factor_eigs
from .proposals import Proposal, ProposalCache


class ProposalAnalysis:
    """Mixin of :class:`~kfac_lens.KFAC`: its proposals, computed with its own pieces of Algorithm 2."""

    def _shared_eigs(self, n_gammas: int):
        """For several block-diagonal inverses of the same factors (:meth:`proposals`), one
        eigendecomposition of each undamped factor serves every γ."""
        if self.inverse_kind == "blockdiag" and n_gammas > 1:
            return factor_eigs(self.factors)
        return None

    @torch.no_grad()
    def _improvement(self, delta, x, y, eta, h0: float | None = None) -> float:
        h0 = self._objective(x, y, eta) if h0 is None else h0
        saved = self.view.weight_matrices()  # restore exactly: θ + δ − δ ≠ θ in floating point
        self.view.add_to_weights(delta)
        try:
            h1 = self._objective(x, y, eta)
        finally:
            self.view.set_weight_matrices(saved)
        return h0 - h1

    def propose(self, x, y, gamma: float | None = None, *, rescale: bool = True, momentum: bool = True,
                lam: float | None = None, eval_x=None, eval_y=None) -> Proposal:
        """Compute (without applying) the update K-FAC would make on (x, y) with the current factors.

        ``gamma`` overrides the factored-Tikhonov strength (a fresh inverse is built for it),
        ``rescale=False`` returns the raw Δ, ``momentum=False`` drops δ₀, ``lam`` overrides λ.
        The improvement h(θ) − h(θ+δ) is measured on (eval_x, eval_y), default (x, y). Uses the
        factors as they are (they must exist: take at least one :meth:`step` first). The exact-F
        products use all of x (no τ₂ subset), so the result is deterministic.
        """
        if self.factors is None:
            raise ValueError("propose() needs the Kronecker factors: run at least one step() first.")
        x, y = check_inputs(self.view, x, y, what="x")
        eta = self.hyper.at(self.k).eta
        lam = self.lam if lam is None else float(lam)
        with self._own_passes():
            batch, grad, params = self._gradient_pass(x, y)
            g = self.gamma if gamma is None else float(gamma)
            inv = self.inverse if (gamma is None and self.inverse is not None) else self._build_inverse(g)
            Delta = self._proposal_direction(inv, grad, batch, params, eta, x.shape[0])
            prop = self._combine(Delta, grad, (batch, None), lam, eta, g, rescale, momentum)
            ex, ey = (x, y) if eval_x is None else check_inputs(self.view, eval_x, eval_y, what="eval_x")
            prop.improvement = self._improvement(prop.delta, ex, ey, eta)
        return prop

    def proposals(self, x, y, gammas, updates=((True, True),), *, lam: float | None = None, eval_x=None,
                  eval_y=None, cache: ProposalCache | None = None, progress: bool = False) -> list[list[Proposal]]:
        """For each γ of ``gammas`` and each ``(rescale, momentum)`` of ``updates``, the update K-FAC would make
        on (x, y) with the current factors, λ and δ₀ (without applying it), with its improvement
        h(θ) − h(θ+δ) on (eval_x, eval_y), default (x, y) (Appendices E.4, F; Figure 7's data, see
        :func:`kfac_lens.sweep.gamma_sweep`).

        The gradient is computed once and each γ's Δ is shared by the updates. ``cache`` (a
        :class:`~kfac_lens.optim.proposals.ProposalCache` kept between calls on the same x, y) holds the
        gradient pass, h(θ) and each γ's Δ and Gram matrices, so that a later call with another λ or γ
        grid only recomputes what changed. Returns one list of proposals per γ, in the order of ``updates``.
        """
        if self.factors is None:
            raise ValueError("proposals() needs the Kronecker factors: run at least one step() first.")
        x, y = check_inputs(self.view, x, y, what="x")
        ex, ey = (x, y) if eval_x is None else check_inputs(self.view, eval_x, eval_y, what="eval_x")
        eta = self.hyper.at(self.k).eta
        lam = self.lam if lam is None else float(lam)
        cache = ProposalCache() if cache is None else cache
        gammas = [float(g) for g in gammas]
        out = []
        with self._own_passes():
            if cache.gradient is None:
                cache.gradient = self._gradient_pass(x, y)
            batch, grad, params = cache.gradient
            if cache.h0 is None or eval_x is not None:
                cache.h0 = self._objective(ex, ey, eta)
            for g in tqdm(gammas, desc="γ sweep", disable=not progress, leave=False):
                if g not in cache.directions:
                    if not cache.eigs_ready:
                        cache.eigs, cache.eigs_ready = self._shared_eigs(len(gammas)), True
                    inv = self._build_inverse(g, eigs=cache.eigs)
                    cache.directions[g] = self._proposal_direction(inv, grad, batch, params, eta, x.shape[0])
                Delta = cache.directions[g]
                if g not in cache.grams:
                    cache.grams[g] = self._grams([Delta], grad, batch, None, with_delta0=True)
                row = []
                for rescale, momentum in updates:
                    prop = self._combine(Delta, grad, None, lam, eta, g, rescale, momentum, grams=cache.grams[g])
                    prop.improvement = self._improvement(prop.delta, ex, ey, eta, h0=cache.h0)
                    row.append(prop)
                out.append(row)
        return out
