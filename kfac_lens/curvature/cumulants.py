"""Appendix B: where F̃ errs, as joint cumulants (MATH.md §6).

For an entry of block (k, l) with ``a = ā_k[k1]``, ``b = g_k[k2]``, ``c = ā_l[k3]``, ``d = g_l[k4]``:

    F − F̃ = E[abcd] − E[ac]E[bd] = κ(a,b,c,d) + κ(a)κ(c,b,d) + κ(c)κ(a,b,d)

Joint cumulants come from the moment-partition formula. The identity is exact when the expectation
over y is exact, which :func:`cumulant_terms` does for categorical outputs by enumerating every class
y weighted by p(y|x). For Bernoulli and Gaussian outputs the expectation over y is **sampled**
(``samples`` targets per case), so the identity holds only up to Monte-Carlo error. With
``estimator="empirical"`` (training targets) Lemma 4 fails and so does the identity — on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from ..capture import analysis_view, backward_directions, check_inputs, forward, make_generator
from ..likelihoods import Categorical, get_likelihood


@dataclass
class CumulantTerms:
    """4-index tensors (k1, k2, k3, k4) of shape (a_dim_k, d_k, a_dim_l, d_l) for block (k, l)."""

    k: int
    l: int
    difference: torch.Tensor      # F − F̃
    kappa4: torch.Tensor          # κ(ā(1), g(1), ā(2), g(2))
    mean_a1_kappa3: torch.Tensor  # κ(ā(1)) κ(ā(2), g(1), g(2))
    mean_a2_kappa3: torch.Tensor  # κ(ā(2)) κ(ā(1), g(1), g(2))
    estimator: str
    exact: bool

    @property
    def terms_sum(self) -> torch.Tensor:
        return self.kappa4 + self.mean_a1_kappa3 + self.mean_a2_kappa3

    @property
    def residual(self) -> torch.Tensor:
        """(F − F̃) − (sum of the three terms): ~0 (rounding) when the expectation over y is exact."""
        return self.difference - self.terms_sum

    def as_block(self, name: str) -> torch.Tensor:
        """A term as the (a_dim_k·d_k) × (a_dim_l·d_l) block of the paper layout (row k1·d_k + k2)."""
        t = getattr(self, name)
        Dk, dk, Dl, dl = t.shape
        return t.reshape(Dk * dk, Dl * dl)

    def summary(self) -> pd.DataFrame:
        """Frobenius norm of each term, absolute and relative to ‖F − F̃‖."""
        ref = float(self.difference.norm())
        rows = []
        for name in ("difference", "kappa4", "mean_a1_kappa3", "mean_a2_kappa3", "residual"):
            v = float(getattr(self, name).norm())
            rows.append({"term": name, "frobenius": v, "relative_to_difference": v / ref if ref else float("nan")})
        return pd.DataFrame(rows).assign(block=f"({self.k},{self.l})", estimator=self.estimator)


def _moments(a, b, c, d, w):
    """Weighted moments E[·] over rows; a (R, Da), b (R, db), c (R, Dc), d (R, dd), w (R,)."""
    E1 = {n: (w[:, None] * x).sum(0) for n, x in zip("abcd", (a, b, c, d))}

    def E2(x, y):
        return (w[:, None] * x).T @ y

    def E3(x, y, z):
        return torch.einsum("r,ri,rj,rk->ijk", w, x, y, z)

    R = a.shape[0]
    ab = (w[:, None, None] * a[:, :, None] * b[:, None, :]).reshape(R, -1)
    cd = (c[:, :, None] * d[:, None, :]).reshape(R, -1)
    E4 = (ab.T @ cd).reshape(a.shape[1], b.shape[1], c.shape[1], d.shape[1])
    return E1, E2, E3, E4


def _terms_from_rows(a, b, c, d, w):
    """(difference, κ4, κ(a)κ3(c,b,d), κ(c)κ3(a,b,d)), each indexed [i (a), j (b), m (c), n (d)]."""
    E1, E2, E3, E4 = _moments(a, b, c, d, w)
    Ea, Eb, Ec, Ed = E1["a"], E1["b"], E1["c"], E1["d"]
    Eab, Eac, Ead = E2(a, b), E2(a, c), E2(a, d)
    Ebc, Ebd, Ecd = E2(b, c), E2(b, d), E2(c, d)
    Eabc, Eabd, Eacd, Ebcd = E3(a, b, c), E3(a, b, d), E3(a, c, d), E3(b, c, d)

    def o(*vs):  # outer product with an explicit index pattern
        return torch.einsum(*vs)

    # κ4 by the 15-partition formula, indices i j m n for a b c d.
    k4 = (E4
          - o("ijm,n->ijmn", Eabc, Ed) - o("ijn,m->ijmn", Eabd, Ec)
          - o("imn,j->ijmn", Eacd, Eb) - o("jmn,i->ijmn", Ebcd, Ea)
          - o("ij,mn->ijmn", Eab, Ecd) - o("im,jn->ijmn", Eac, Ebd) - o("in,jm->ijmn", Ead, Ebc)
          + 2 * (o("ij,m,n->ijmn", Eab, Ec, Ed) + o("im,j,n->ijmn", Eac, Eb, Ed)
                 + o("in,j,m->ijmn", Ead, Eb, Ec) + o("jm,i,n->ijmn", Ebc, Ea, Ed)
                 + o("jn,i,m->ijmn", Ebd, Ea, Ec) + o("mn,i,j->ijmn", Ecd, Ea, Eb))
          - 6 * o("i,j,m,n->ijmn", Ea, Eb, Ec, Ed))
    # κ3(c, b, d) over indices (m, j, n) and κ3(a, b, d) over (i, j, n).
    k3_cbd = (Ebcd - o("jm,n->jmn", Ebc, Ed) - o("mn,j->jmn", Ecd, Eb) - o("jn,m->jmn", Ebd, Ec)
              + 2 * o("j,m,n->jmn", Eb, Ec, Ed))
    k3_abd = (Eabd - o("ij,n->ijn", Eab, Ed) - o("in,j->ijn", Ead, Eb) - o("jn,i->ijn", Ebd, Ea)
              + 2 * o("i,j,n->ijn", Ea, Eb, Ed))
    t_a = o("i,jmn->ijmn", Ea, k3_cbd)
    t_c = o("m,ijn->ijmn", Ec, k3_abd)
    diff = E4 - o("im,jn->ijmn", Eac, Ebd)
    return diff, k4, t_a, t_c


def cumulant_terms(model, X, likelihood, k: int, l: int, estimator: str | None = None, y=None,
                   samples: int = 64, generator=None, seed: int | None = 0,
                   dtype: torch.dtype = torch.float64) -> CumulantTerms:
    """The Appendix B decomposition of block (k, l) of F − F̃ (0-based Linear layers k ≤ l or any order).

    ``estimator``: None picks "exact" for categorical outputs (y enumerated, weighted by p) and
    "mc" otherwise (``samples`` sampled targets per case — a *sampled* estimate); "empirical" uses
    the training targets ``y`` (the identity then fails, which is the point of showing it).
    """
    lik = get_likelihood(likelihood)
    view = analysis_view(model, dtype)
    k, l = view.select([k])[0], view.select([l])[0]
    X, y = check_inputs(view, X, y)
    N = X.shape[0]
    if estimator is None:
        estimator = "exact" if isinstance(lik, Categorical) else "mc"
    if estimator == "exact" and not isinstance(lik, Categorical):
        raise ValueError(
            f"the exact enumeration over y is only available for categorical outputs; for {lik.name} "
            "use estimator='mc' (sampled, with samples= and seed=)."
        )
    layers = sorted({k, l})
    z, a, s = forward(view, X, layers)
    zd = z.detach()
    if estimator == "exact":
        C = zd.shape[1]
        p = torch.softmax(zd, dim=1)
        ys = torch.arange(C, device=zd.device)
        V = torch.stack([lik.grad_z(zd, ys[c].expand(N)) for c in range(C)])  # (C, N, C)
        w = (p.T / N).reshape(-1)                                                # row (c, n)
    elif estimator == "mc":
        if int(samples) < 1:
            raise ValueError(f"samples must be a positive integer, got {samples!r}.")
        gen = make_generator(view.device, generator, seed)
        V = torch.stack([lik.grad_z(zd, lik.sample(zd, gen)) for _ in range(int(samples))])
        w = torch.full((V.shape[0] * N,), 1.0 / (V.shape[0] * N), dtype=zd.dtype, device=zd.device)
    elif estimator == "empirical":
        if y is None:
            raise ValueError("estimator='empirical' needs the training targets: pass y=.")
        V = lik.grad_z(zd, lik.check_targets(zd, y))[None]
        w = torch.full((N,), 1.0 / N, dtype=zd.dtype, device=zd.device)
    else:
        raise ValueError(f"estimator must be None, 'exact', 'mc' or 'empirical', got {estimator!r}.")
    g = backward_directions(z, s, layers, V)
    R = V.shape[0]

    def rows_a(m):
        return a[m].expand(R, *a[m].shape).reshape(R * N, -1)

    def rows_g(m):
        return g[m].reshape(R * N, -1)

    diff, k4, ta, tc = _terms_from_rows(rows_a(k), rows_g(k), rows_a(l), rows_g(l), w)
    return CumulantTerms(k, l, diff, k4, ta, tc, estimator, exact=(estimator == "exact"))
