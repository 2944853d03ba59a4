"""Dense approximation quality, cached per layer subset and γ, for interactive use (the ApproximationExplorer).

:class:`ApproximationQuality` holds, per subset of layers, the exact Fisher F, every approximation F_a
(:mod:`~kfac_lens.curvature.approximations`) and ∇h, and per (subset, γ) the damped inverses, so a
control that returns to a value costs nothing. The quantities are those of
:func:`~kfac_lens.curvature.quality.compare_approximations` with ``method="dense"`` (docs/math.md §2, §5;
K-FAC Sections 3.2–3.3, Appendix E.3): ``rel_frobenius`` = ‖F − F_a‖_F / ‖F‖_F, ``ng_cosine`` against
(F + γ²I)⁻¹∇h, and the top of the spectrum of ``(F_a,γ)⁻¹(F + γ²I)``, here by generalized Lanczos on the
dense matrices (:func:`~kfac_lens.curvature.estimators.lanczos`, converged to ``tol``), which needs a
fraction of the time of a dense eigendecomposition; ``precond_cond`` is the Ritz ratio θ_max/θ_min, a lower
bound on the condition number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import torch

from ..capture import analysis_view, check_inputs
from ..likelihoods import get_likelihood
from .approximations import APPROXIMATIONS, build_approximations, parse_approximations
from .estimators import lanczos
from .fisher import exact_fisher
from .operators import spd_cholesky
from .quality import loss_gradient

MAX_PARAMS = 5000  # dense P × P matrices of every approximation: 6 × 200 MB at this size


class ApproximationQuality:
    """Dense F, every F_a and ∇h per layer subset, damped inverses per (subset, γ), all cached.

    ``model``, ``X``, ``likelihood``, ``y`` (for ``ng_cosine``; None leaves it NaN), ``layers`` (the pool
    the subsets come from; default all), ``approximations`` (names of
    :class:`~kfac_lens.curvature.approximation_names.Approximation`), ``pi`` and ``neighbours`` as in
    :func:`~kfac_lens.compare_approximations`. Subsets with more than ``max_params`` parameters are refused
    (ValueError naming ``layers``)."""

    def __init__(self, model, X, likelihood, y=None, layers=None, approximations: Sequence[str] = APPROXIMATIONS,
                 *, pi="trace", neighbours: str = "network", top_k: int = 10, tol: float = 1e-8,
                 max_params: int = MAX_PARAMS):
        self.lik = get_likelihood(likelihood)
        self.view = analysis_view(model, torch.float64)
        self.layers = self.view.select(layers)
        self.X, self.y = check_inputs(self.view, X, y, likelihood=self.lik)
        self.names = parse_approximations(approximations)
        self.pi, self.neighbours, self.top_k, self.tol, self.max_params = pi, neighbours, top_k, tol, max_params
        self._base: dict = {}
        self._damped: dict = {}
        self._spectra: dict = {}

    def check_layers(self, layers) -> tuple[int, ...]:
        sel = tuple(self.view.select(layers))
        extra = [k for k in sel if k not in self.layers]
        if extra:
            raise ValueError(f"layers {extra} are outside this comparison's layers {list(self.layers)}; "
                             "build it with layers= including them.")
        P = self.view.n_params(list(sel))
        if P > self.max_params:
            raise ValueError(f"layers {list(sel)} have P = {P} parameters, above max_params = {self.max_params} for "
                             "dense P × P matrices; select fewer layers, or use compare_approximations(..., "
                             "method='matrix-free').")
        return sel

    def base(self, layers) -> dict:
        """F, the undamped operators, their dense matrices, ∇h and the γ-free errors for ``layers`` (cached)."""
        sel = self.check_layers(layers)
        if sel not in self._base:
            F = exact_fisher(self.view, self.X, self.lik, layers=list(sel), progress=False)
            ops = build_approximations(self.view, self.X, self.lik, self.names, list(sel), self.pi, self.neighbours)
            dense = {name: op.dense() for name, op in ops.items()}
            Fn = float(F.norm())
            rel = {name: float((F - D).norm()) / Fn if Fn > 0 else math.nan for name, D in dense.items()}
            grad = None if self.y is None else loss_gradient(self.view, self.X, self.y, self.lik, list(sel))
            self._base[sel] = dict(F=F, ops=ops, dense=dense, rel=rel, grad=grad, P=F.shape[0])
        return self._base[sel]

    def damped(self, layers, gamma: float) -> dict:
        """For (``layers``, γ): each approximation's ``M⁻¹`` as a function on (P, m) blocks, the exact damped
        natural gradient and each ``ng_cosine`` (cached)."""
        sel = self.check_layers(layers)
        key = (sel, float(gamma))
        if key not in self._damped:
            b = self.base(sel)
            eye = torch.eye(b["P"], dtype=torch.float64, device=b["F"].device)
            Fg = b["F"] + gamma ** 2 * eye
            solves = {}
            for name, op in b["ops"].items():
                d = op.damped(gamma)
                inv = d.inverse()
                if inv is not None:
                    solves[name] = inv.__matmul__
                else:
                    L = spd_cholesky(d.dense(), f"damped {name} (γ = {gamma:g})")
                    solves[name] = (lambda U, L=L: torch.cholesky_solve(U, L))
            cos = dict.fromkeys(b["ops"], math.nan)
            if b["grad"] is not None:
                ref = torch.cholesky_solve(b["grad"][:, None], spd_cholesky(Fg, f"F + γ²I (γ = {gamma:g})"))[:, 0]
                for name, solve in solves.items():
                    u = solve(b["grad"][:, None])[:, 0]
                    nu, nr = float(u.norm()), float(ref.norm())
                    cos[name] = float(u @ ref) / (nu * nr) if nu > 0 and nr > 0 else math.nan
            self._damped[key] = dict(Fg=Fg, solves=solves, cos=cos)
        return self._damped[key]

    def spectrum(self, layers, gamma: float, name) -> list[float]:
        """The top ``top_k`` eigenvalues of ``(F_a,γ)⁻¹(F + γ²I)`` for approximation ``name`` (descending),
        with the Ritz ratio θ_max/θ_min as the last entry's companion in :meth:`table` (cached)."""
        sel = self.check_layers(layers)
        name = parse_approximations(name, "name")[0]
        key = (sel, float(gamma), name)
        if key not in self._spectra:
            d = self.damped(sel, gamma)
            P = d["Fg"].shape[0]
            Fg = d["Fg"]
            run = lanczos(lambda V: Fg @ V, P, min(self.top_k, P), precondition=d["solves"][name],
                          max_steps=min(P, 4 * self.top_k + 40), tol=self.tol,
                          generator=torch.Generator().manual_seed(0), device=Fg.device)
            self._spectra[key] = (run.top(min(self.top_k, P)), run.condition)
            self.lanczos_steps = run.steps
        return self._spectra[key][0]

    def table(self, layers, gamma: float | None, spectra: Sequence[str] = ()) -> pd.DataFrame:
        """One row per approximation: approximation, rel_frobenius, ng_cosine, theta_max, precond_cond (the
        last two for ``spectra`` only, else NaN; ng_cosine NaN without y or γ)."""
        b = self.base(layers)
        wanted = parse_approximations(spectra, "spectra") if len(spectra) else []
        d = self.damped(layers, gamma) if gamma is not None else None
        rows = []
        for name in self.names:
            top, cond = math.nan, math.nan
            if d is not None and name in wanted:
                eigs = self.spectrum(layers, gamma, name)
                top, cond = eigs[0], self._spectra[(self.check_layers(layers), float(gamma), name)][1]
            rows.append({"approximation": str(name), "rel_frobenius": b["rel"][name],
                         "ng_cosine": math.nan if d is None else d["cos"][name], "theta_max": top,
                         "precond_cond": cond})
        return pd.DataFrame(rows)


__all__ = ["MAX_PARAMS", "ApproximationQuality"]
