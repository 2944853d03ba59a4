"""Figure 7's analysis: how much K-FAC's update improves h as a function of the damping γ (Appendix E.4).

For each γ of a grid, the update K-FAC would make with the current factors, λ and δ₀ is evaluated in
three variants (:class:`UpdateVariant`): re-scaled by α* with K-FAC momentum (Appendix F), re-scaled
without momentum, and the raw proposal Δ. :func:`gamma_sweep` is the sweep on one optimizer;
:func:`figure7_data` adds the grid around the γ K-FAC chose and evaluates in float64 where the
optimizer's own dtype cannot invert the damped factors. The optimizer's side is the public
:meth:`KFAC.proposals <kfac_lens.optim.kfac.KFAC.proposals>`; drawing is :func:`kfac_lens.figures.figure7`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import pandas as pd
import torch

from .curvature.damping import trace_pi
from .curvature.operators import cond_limits
from .errors import SingularFactorError
from .optim.proposals import ProposalCache

__all__ = ["SweepCache", "UpdateVariant", "figure7_data", "figure7_gammas", "gamma_sweep", "variants_shown"]


class UpdateVariant(str, Enum):
    """An update of Figure 7; the value is its name in the data (the ``variant`` column)."""

    RESCALED_MOMENTUM = "re-scaled, momentum"
    RESCALED = "re-scaled, no momentum"
    RAW = "raw Δ (no re-scaling)"

    @property
    def rescale(self) -> bool:
        """Whether Δ is re-scaled by α* (Appendix E.4); the raw Δ takes α = 1."""
        return self is not UpdateVariant.RAW

    @property
    def momentum(self) -> bool:
        """Whether δ₀ joins the update with μ* (Appendix F)."""
        return self is UpdateVariant.RESCALED_MOMENTUM


@dataclass
class SweepCache:
    """What :func:`figure7_data` keeps between calls on the same optimizer and data: the optimizer's
    :class:`~kfac_lens.optim.proposals.ProposalCache`, the dtype a refusal moved the sweep to, and the
    optimizer copies (with their own caches) made for other dtypes."""

    proposals: ProposalCache = field(default_factory=ProposalCache)
    auto_dtype: torch.dtype | None = None
    copies: dict[str, tuple] = field(default_factory=dict)


def gamma_sweep(optimizer, x, y, gammas, *, lam: float | None = None, variants=None, eval_x=None, eval_y=None,
                progress: bool = False, cache: ProposalCache | None = None) -> pd.DataFrame:
    """Figure 7's data on ``optimizer`` (a :class:`~kfac_lens.optim.KFAC` that has taken a step): for each
    γ, the improvement h(θ) − h(θ+δ) of each :class:`UpdateVariant` (default all three), with the current
    factors, λ (or ``lam``) and δ₀.

    ``cache`` as in :meth:`KFAC.proposals <kfac_lens.optim.kfac.KFAC.proposals>`. Returns a DataFrame with
    columns gamma, variant, improvement, M, alpha, mu.
    """
    chosen = list(UpdateVariant) if variants is None else [UpdateVariant(v) for v in variants]
    gammas = [float(g) for g in gammas]
    props = optimizer.proposals(x, y, gammas, [(v.rescale, v.momentum) for v in chosen], lam=lam, eval_x=eval_x,
                                eval_y=eval_y, cache=cache, progress=progress)
    return pd.DataFrame([
        {"gamma": g, "variant": v.value, "improvement": p.improvement, "M": p.M, "alpha": p.alpha, "mu": p.mu}
        for g, row in zip(gammas, props) for v, p in zip(chosen, row)
    ])


def figure7_gammas(chosen: float, below: float = 4.0, above: float = 2.0, points: int = 13) -> np.ndarray:
    """A log grid of γ around the value K-FAC chose: ``below`` decades under it, ``above`` over it."""
    c = math.log10(chosen)
    return np.logspace(c - below, c + above, points)


def figure7_data(optimizer, X, y, gammas=None, *, lam=None, progress=False, cache: SweepCache | None = None,
                 variants=None, dtype="auto") -> pd.DataFrame:
    """The improvement h(θ) − h(θ+δ) against γ for the update variants (:func:`gamma_sweep`).

    K-FAC refuses to invert damped factors that are too ill-conditioned for its dtype
    (:class:`~kfac_lens.SingularFactorError`); in float32 that happens at the small γ of Figure 7's grid.
    ``dtype``:

    - ``"auto"`` (default): the optimizer's own dtype; if K-FAC refuses some γ there, the whole sweep
      is redone in float64 on a copy of the optimizer and its model (same state, same data), so every
      γ gets a value from one consistent computation;
    - ``None``: the optimizer's dtype only; a refused γ is kept as rows with NaN ``improvement``, ``M``,
      ``alpha``, ``mu`` and the reason in a ``refused`` column (present only then);
    - a torch dtype: the sweep in that dtype (on a copy when it differs), refused γ as for ``None``.

    The ``dtype`` column names the dtype the values were computed in. ``cache`` (a :class:`SweepCache`
    kept between calls on the same optimizer and data) makes a later call with another λ or γ grid
    recompute only what changed.
    """
    gammas = figure7_gammas(optimizer.gamma) if gammas is None else np.asarray(gammas, dtype=float)
    cache = SweepCache() if cache is None else cache
    kw = dict(lam=lam, variants=variants, progress=progress)
    own = optimizer.view.dtype
    if dtype == "auto":
        if cache.auto_dtype is None and likely_refused(optimizer, float(np.min(gammas))):
            cache.auto_dtype = torch.float64  # (skip an attempt in the model's dtype that would fail)
        target = torch.float64 if cache.auto_dtype == torch.float64 else own
        try:
            df = _sweep_in(optimizer, X, y, gammas, target, cache, kw, per_gamma=False)
        except SingularFactorError:
            if target != torch.float64:
                cache.auto_dtype = target = torch.float64
                cache.proposals = ProposalCache()  # (free the abandoned attempt's passes)
            df = _sweep_in(optimizer, X, y, gammas, target, cache, kw, per_gamma=True)
    else:
        target = own if dtype is None else dtype
        df = _sweep_in(optimizer, X, y, gammas, target, cache, kw, per_gamma=True)
    return df.assign(figure="7", chosen_gamma=optimizer.gamma,
                     lam=optimizer.lam if lam is None else float(lam),
                     dtype=str(target).removeprefix("torch."))


def likely_refused(optimizer, gamma: float, margin: float = 10.0) -> bool:
    """Whether a damped diagonal factor Ā_kk + πγI or G_kk + (γ/π)I (trace-norm π, Appendix E.3) has a
    condition number κ₂ within ``margin`` of what the optimizer's dtype refuses to invert (:func:`cond_limits`),
    from the factors' eigenvalues. A hint only: a refusal it misses is still caught by :func:`figure7_data`."""
    own = optimizer.view.dtype
    if own == torch.float64 or optimizer.factors is None:
        return False
    limit = cond_limits(own)[1] / margin
    factors = optimizer.factors
    for k in factors.layers:
        A, G = factors.A[k, k].double(), factors.G[k, k].double()
        pi = trace_pi(A, G)
        for M, damping in ((A, pi * gamma), (G, gamma / pi)):
            s = torch.linalg.eigvalsh(0.5 * (M + M.T)) + damping
            if float(s.min()) <= 0 or float(s.max() / s.min()) > limit:
                return True
    return False


def _sweep_in(optimizer, X, y, gammas, dtype, cache: SweepCache, kw: dict, per_gamma: bool) -> pd.DataFrame:
    """One :func:`gamma_sweep` in ``dtype``; ``per_gamma``: on a refusal go γ by γ and keep NaN rows for
    the refused γ."""
    if dtype != optimizer.view.dtype:
        key = str(dtype)
        if key not in cache.copies:
            cache.copies[key] = (_optimizer_copy(optimizer, dtype), ProposalCache())
        opt, proposals = cache.copies[key]
        X = torch.as_tensor(X).to(dtype)
        y = torch.as_tensor(y)
        y = y.to(dtype) if y.is_floating_point() else y
    else:
        opt, proposals = optimizer, cache.proposals
    try:
        return gamma_sweep(opt, X, y, gammas, cache=proposals, **kw)
    except SingularFactorError:
        if not per_gamma:
            raise
    names = [v.value for v in UpdateVariant] if kw.get("variants") is None else list(kw["variants"])
    parts = []
    for g in gammas:
        try:
            parts.append(gamma_sweep(opt, X, y, [float(g)], cache=proposals, **{**kw, "progress": False}))
        except SingularFactorError as exc:
            parts.append(pd.DataFrame({"gamma": float(g), "variant": names, "improvement": np.nan,
                                       "M": np.nan, "alpha": np.nan, "mu": np.nan,
                                       "refused": str(exc).split(":")[0]}))
    return pd.concat(parts, ignore_index=True)


def _optimizer_copy(optimizer, dtype: torch.dtype):
    """A copy of a K-FAC optimizer and its model in ``dtype``, with the same state (factors, λ, γ, δ₀)."""
    memo = {id(optimizer.generator): torch.Generator(device=optimizer.view.device)}  # not deep-copyable
    opt = copy.deepcopy(optimizer, memo)
    opt.model.to(dtype)
    opt.load_state_dict(optimizer.state_dict())  # casts the factors, δ₀ and the inverse to the new dtype
    return opt


def variants_shown(momentum: bool) -> list[UpdateVariant]:
    """The variants an explorer draws: all three, or without the momentum curve."""
    return [v for v in UpdateVariant if momentum or not v.momentum]

