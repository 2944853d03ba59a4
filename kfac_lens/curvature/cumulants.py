"""Appendix B: where F̃ errs, as joint cumulants.

For an entry of block (k, l) with ``a = ā_k[k1]``, ``b = g_k[k2]``, ``c = ā_l[k3]``, ``d = g_l[k4]``:

    F − F̃ = E[abcd] − E[ac]E[bd] = κ(a,b,c,d) + κ(a)κ(c,b,d) + κ(c)κ(a,b,d)

The identity is exact when the expectation over y is exact, which :func:`cumulant_terms` does for
categorical outputs by enumerating every class y weighted by p(y|x). For Bernoulli and Gaussian outputs
the expectation over y is **sampled** (``samples`` targets per case), so the identity holds only up to
Monte-Carlo error. With ``estimator="empirical"`` (training targets) Lemma 4 fails and so does the
identity — on purpose.

Numerics: everything is computed from *centred* moments (two passes over chunks of cases: the means
first, then the centred sums), never from raw moments. With activations of mean 10⁴ the raw-moment
partition formula for κ4 loses about half the digits; the centred form does not (see
:func:`_assemble` for the expansion of F − F̃).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from ..capture import (
    analysis_view,
    as_view,
    backward_directions,
    check_inputs,
    default_chunk,
    forward,
    make_generator,
    positive_int,
)
from ..errors import DenseTooLargeError
from ..distributed import CaseShards
from ..likelihoods import Categorical, get_likelihood
from ..memory import available_bytes
from ..nets import layer_index

N_OUTPUT_TENSORS = 5  # 4-index tensors alive at the peak: the 4 results and one temporary


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


# ----------------------------------------------------------------------------- checks and planning
def _plan_chunk(view, k: int, l: int, R: int, N: int | None, dtype: torch.dtype, chunk_size: int | None,
                max_bytes: int | None) -> int:
    """Cases per chunk; raises :class:`DenseTooLargeError` before any work when block (k, l) cannot fit."""
    Lk, Ll = view.layers[k], view.layers[l]
    Da, db, Dc, dd = Lk.a_dim, Lk.d_out, Ll.a_dim, Ll.d_out
    # per case: a'⊗c', Σ_r w b'd'ᵀ and the centred, weighted directions of both layers
    extra = Da * Dc + db * dd + 3 * R * (db + dd) + Da + Dc
    chunk = default_chunk(view, R, extra) if chunk_size is None else chunk_size
    if N is not None:
        chunk = max(1, min(chunk, N))
    widths = sum(L.d_out for L in view.layers) + view.output_dim
    per_case = R * widths + sum(L.a_dim for L in view.layers) + extra
    itemsize = torch.empty((), dtype=dtype).element_size()
    T = Da * db * Dc * dd
    need = (N_OUTPUT_TENSORS * T + chunk * per_case) * itemsize
    limit = int(0.8 * available_bytes(view.device)) if max_bytes is None else int(max_bytes)
    if need > limit:
        raise DenseTooLargeError(
            f"cumulant_terms for block (k={k}, l={l}) needs about {need / 2**30:.3g} GiB: "
            f"{N_OUTPUT_TENSORS} tensors of a_dim_k·d_k·a_dim_l·d_l = {Da}·{db}·{Dc}·{dd} = {T} numbers "
            f"({itemsize} bytes each) plus a working set of {chunk} case(s), but only {limit / 2**30:.3g} GiB "
            f"may be used on {view.device}. Pick a block (k, l) of smaller layers, or study a network with "
            "fewer units in layers k and l (a smaller chunk_size only shrinks the working set)."
        )
    return chunk


# ----------------------------------------------------------------------------- passes over chunks
def _chunks(view, X, y, lik, k, l, estimator, samples, gen, chunk, N):
    """Yield (ā_k (n, Da), g_k (R, n, db), ā_l (n, Dc), g_l (R, n, dd), w (R, n)) per chunk; Σ w = 1 over
    the N cases of all ranks."""
    layers = sorted({k, l})
    for start in range(0, X.shape[0], chunk):
        sl = slice(start, start + chunk)
        z, a, s = forward(view, X[sl], layers)
        zd = z.detach()
        n = zd.shape[0]
        if estimator == "exact":  # every class y, weighted by p(y|x) / N
            C = zd.shape[1]
            ys = torch.arange(C, device=zd.device)
            V = torch.stack([lik.grad_z(zd, ys[c].expand(n)) for c in range(C)])  # (C, n, C)
            w = torch.softmax(zd, dim=1).T / N
        elif estimator == "mc":
            V = torch.stack([lik.grad_z(zd, lik.sample(zd, gen)) for _ in range(samples)])
            w = torch.full((samples, n), 1.0 / (samples * N), dtype=zd.dtype, device=zd.device)
        else:  # empirical
            V = lik.grad_z(zd, lik.check_targets(zd, y[sl]))[None]
            w = torch.full((1, n), 1.0 / N, dtype=zd.dtype, device=zd.device)
        g = backward_directions(z, s, layers, V.to(zd.dtype))
        for j in layers:
            if a[j].ndim == 3:  # one use per case, given as (n, 1, ·): the plain rows
                _refuse_multi_use(view, j, a[j].shape[1])
                a[j], g[j] = a[j][:, 0], g[j][:, :, 0]
        yield a[k], g[k], a[l], g[l], w


def _means(chunks):
    """Pass 1: E[a], E[b], E[c], E[d] over all cases."""
    mu = None
    for ak, gk, al, gl, w in chunks:
        om = w.sum(0)
        part = (om @ ak, torch.einsum("rn,rnj->j", w, gk), om @ al, torch.einsum("rn,rnj->j", w, gl))
        mu = part if mu is None else tuple(m + p for m, p in zip(mu, part))
    return mu


def _centred_sums(chunks, mu):
    """Pass 2: the centred moments E[x'y'], E[x'y'z'] and E[a'b'c'd'] (x' = x − E[x]) as a dict."""
    S: dict[str, torch.Tensor] = {}

    def add(key, value):
        if key in S:
            S[key] += value
        else:
            S[key] = value

    for ak, gk, al, gl, w in chunks:
        A, B, C, D = ak - mu[0], gk - mu[1], al - mu[2], gl - mu[3]
        n, Da, Dc = A.shape[0], A.shape[1], C.shape[1]
        db, dd = B.shape[2], D.shape[2]
        wB = w[:, :, None] * B
        om = w.sum(0)                                                   # Σ_r w        (n,)
        beta = wB.sum(0)                                                # Σ_r w b'     (n, db)
        delta = torch.einsum("rn,rnq->nq", w, D)                        # Σ_r w d'     (n, dd)
        Bn = torch.bmm(wB.permute(1, 2, 0), D.permute(1, 0, 2))         # Σ_r w b'd'ᵀ  (n, db, dd)
        Bf = Bn.reshape(n, db * dd)
        add("ab", A.T @ beta)
        add("ac", (om[:, None] * A).T @ C)
        add("ad", A.T @ delta)
        add("cb", C.T @ beta)                                           # [m, j]
        add("cd", C.T @ delta)
        add("bd", Bn.sum(0))
        add("abc", torch.einsum("ni,nj,nm->ijm", A, beta, C))
        add("abd", (A.T @ Bf).reshape(Da, db, dd))
        add("acd", torch.einsum("ni,nm,nq->imq", A, C, delta))
        add("cbd", (C.T @ Bf).reshape(Dc, db, dd))                      # [m, j, q]
        AC = (A[:, :, None] * C[:, None, :]).reshape(n, Da * Dc)
        P = (AC.T @ Bf).reshape(Da, Dc, db, dd).permute(0, 2, 1, 3)     # [i, j, m, q]
        if "abcd" not in S:
            S["abcd"] = P.contiguous()
        else:
            S["abcd"] += P
        del P, AC
    return S


def _assemble(S, mu):
    """(F − F̃, κ4, κ(a)κ3(c,b,d), κ(c)κ3(a,b,d)) from centred moments m and means μ.

    κ4 = m_abcd − m_ab m_cd − m_ac m_bd − m_ad m_bc and κ3(x,y,z) = m_xyz. With a = μa + a' etc.,
    F − F̃ = E[abcd] − E[ac]E[bd] = m_abcd − m_ac m_bd + μa m_bcd + μc m_abd + μb m_acd + μd m_abc
            + μc μd m_ab + μb μc m_ad + μa μd m_bc + μa μb m_cd
    (no E[b] = E[d] = 0 assumed). When E[b|x] = E[d|x] = 0 the μb, μd, m_ab, m_ad, m_bc, m_cd, m_abc and
    m_acd terms vanish and the Appendix B identity follows.
    """
    ma, mb, mc, md = mu
    ta = torch.einsum("i,mjq->ijmq", ma, S["cbd"]).contiguous()
    tc = torch.einsum("m,ijq->ijmq", mc, S["abd"]).contiguous()
    diff = S["abcd"] - torch.einsum("im,jq->ijmq", S["ac"], S["bd"])
    diff += ta
    diff += tc
    diff += torch.einsum("ijm,q->ijmq", S["abc"] + torch.einsum("ij,m->ijm", S["ab"], mc), md)
    diff += torch.einsum("imq,j->ijmq", S["acd"] + torch.einsum("iq,m->imq", S["ad"], mc), mb)
    diff += torch.einsum("i,mj,q->ijmq", ma, S["cb"], md)
    diff += torch.einsum("i,j,mq->ijmq", ma, mb, S["cd"])
    k4 = S.pop("abcd")
    k4 -= torch.einsum("ij,mq->ijmq", S["ab"], S["cd"])
    k4 -= torch.einsum("im,jq->ijmq", S["ac"], S["bd"])
    k4 -= torch.einsum("iq,mj->ijmq", S["ad"], S["cb"])
    return diff, k4, ta, tc


def _refuse_multi_use(view, k: int, uses: int | None) -> None:
    """Appendix B pairs one ā_k with one g_k per case; a layer used U > 1 times per case has the gradient
    Σ_u g_u ā_uᵀ, and neither KFAC-expand nor KFAC-reduce is E[ā āᵀ] ⊗ E[g gᵀ] of one such pair."""
    if uses is not None and uses > 1:
        L = view.layers[k]
        raise ValueError(
            f"cumulant_terms: layer {k} ('{L.name}', {type(L.module).__name__}) is used {uses} times per case "
            "(tied weights, sequence positions or a convolution's positions). The Appendix B identity is "
            "stated for layers used once per case, so cumulant_terms supports those only: pick blocks (k, l) "
            "of such layers (see view.summary(), column 'uses').")


def _refuse_outputs_per_position(view) -> None:
    shape = view.output_shape
    if shape is not None and len(shape) != 2:
        raise ValueError(
            f"cumulant_terms: the network output has shape {shape}, one likelihood term per position; the "
            "Appendix B terms are computed for outputs of shape (N, C). Pool or flatten the positions in "
            "forward to study this network's cumulants.")


# ----------------------------------------------------------------------------- public entry point
def cumulant_terms(model, X, likelihood, k: int, l: int, estimator: str | None = None, y=None,
                   samples: int = 64, generator=None, seed: int | None = 0,
                   dtype: torch.dtype = torch.float64, chunk_size: int | None = None,
                   max_bytes: int | None = None, distributed=None) -> CumulantTerms:
    """The Appendix B decomposition of block (k, l) of F − F̃ (0-based layers k ≤ l or any order; docs/math.md §6).

    Layers used once per case only (a ``ValueError`` names a tied, sequence or convolution layer), on
    outputs of shape (N, C).

    ``estimator``: None picks "exact" for categorical outputs (y enumerated, weighted by p) and
    "mc" otherwise (``samples`` sampled targets per case — a *sampled* estimate); "empirical" uses
    the training targets ``y`` (the identity then fails, which is the point of showing it).

    Cases are processed ``chunk_size`` at a time (None: automatic); results do not depend on it beyond
    rounding, except that "mc" draws its targets chunk by chunk. Raises :class:`DenseTooLargeError`
    before any work when the five (a_dim_k·d_k·a_dim_l·d_l) tensors would exceed ``max_bytes``
    (default: 80% of the free memory). ``distributed``: X (and y) are this rank's shard; every rank receives
    the terms over all cases (the means and the centred sums are all-reduced; rank r samples with its own
    seed).
    """
    lik = get_likelihood(likelihood)
    shards = CaseShards(distributed)
    samples = positive_int(samples, "samples", "targets sampled per case")
    if chunk_size is not None:
        chunk_size = positive_int(chunk_size, "chunk_size", "a number of cases per chunk, or None for automatic")
    plain = as_view(model)
    k, l = plain.select([layer_index(k, "k")])[0], plain.select([layer_index(l, "l")])[0]
    if estimator is None:
        estimator = "exact" if isinstance(lik, Categorical) else "mc"
    if estimator not in ("exact", "mc", "empirical"):
        raise ValueError(f"estimator must be None, 'exact', 'mc' or 'empirical', got {estimator!r}.")
    if estimator == "exact" and not isinstance(lik, Categorical):
        raise ValueError(
            f"the exact enumeration over y is only available for categorical outputs; for {lik.name} "
            "use estimator='mc' (sampled, with samples= and seed=)."
        )
    if estimator == "empirical" and y is None:
        raise ValueError("estimator='empirical' needs the training targets: pass y=.")
    for j in (k, l):
        _refuse_multi_use(plain, j, plain.layers[j].uses)
    _refuse_outputs_per_position(plain)
    R = {"exact": plain.output_dim, "mc": samples, "empirical": 1}[estimator]
    shape = getattr(X, "shape", None)
    N = int(shape[0]) if shape is not None and len(shape) > 0 else None
    chunk = _plan_chunk(plain, k, l, R, N, dtype or plain.dtype, chunk_size, max_bytes)

    view = analysis_view(model, dtype)
    X, y = shards.run(lambda: check_inputs(view, X, y, likelihood=lik), "checking X and y")
    n_total = shards.global_count(X.shape[0], like=X)
    gen = None
    if estimator == "mc":
        gen = make_generator(view.device, generator, shards.seed(seed) if shards.active else seed)
        if gen is None:  # global RNG: draw a seed from it, so that both passes see the same targets
            gen = make_generator(view.device, None, int(torch.randint(0, 2**62, ()).item()))
        state = gen.get_state()

    def passes():
        if estimator == "mc":
            gen.set_state(state)
        return _chunks(view, X, y, lik, k, l, estimator, samples, gen, chunk, n_total)

    one_chunk, cached = math.ceil(X.shape[0] / chunk) == 1, []  # one chunk: capture once, use it twice

    def local_means():
        if one_chunk:
            cached.extend(passes())
        return _means(cached if one_chunk else passes())

    mu = shards.run(local_means, "the means on this rank's cases")
    shards.sum_(*mu)
    S = shards.run(lambda: _centred_sums(cached if one_chunk else passes(), mu),
                   "the centred sums on this rank's cases")
    shards.sum_(*S.values())
    diff, k4, ta, tc = _assemble(S, mu)
    return CumulantTerms(k, l, diff, k4, ta, tc, estimator, exact=(estimator == "exact"))
