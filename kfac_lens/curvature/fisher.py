"""The Fisher: exact, Monte-Carlo and empirical, dense or as products (docs/math.md §2, Appendix J).

Dense matrices use the paper layout (docs/math.md §1). They are assembled per block pair (i, j) from
the capture without ever forming per-(case, direction) gradient rows: for one case
``Σ_r w vec(g_r ā_iᵀ) vec(g_r ā_jᵀ)ᵀ = (ā_i ā_jᵀ) ⊗ M`` with ``M = w Σ_r g_{r,i} g_{r,j}ᵀ``, so a block is
one GEMM over cases of the flattened ``ā_i ā_jᵀ`` against the flattened ``M`` — R times fewer
flops than ``UᵀU`` with one row per (case, direction).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp

from ..capture import (
    Capture,
    all_finite,
    analysis_view,
    as_view,
    check_estimator,
    check_inputs,
    iter_captures,
    make_generator,
)
from ..errors import NonFiniteError
from ..likelihoods import Likelihood, get_likelihood
from ..memory import check_dense_fits
from ..nets import NetworkView


def _block_update(cap: Capture, ki: int, kj: int) -> torch.Tensor:
    """Σ_n (ā_i ā_jᵀ) ⊗ (w Σ_r g_i g_jᵀ) over the chunk, in paper layout (a_i·d_i × a_j·d_j)."""
    ai, aj, gi, gj = cap.a[ki], cap.a[kj], cap.g[ki], cap.g[kj]
    n, Di, Dj, di, dj = ai.shape[0], ai.shape[1], aj.shape[1], gi.shape[2], gj.shape[2]
    AA = (ai[:, :, None] * aj[:, None, :]).reshape(n, Di * Dj)
    MM = torch.einsum("rni,rnj->nij", gi, gj).reshape(n, di * dj)
    B = (AA.T @ MM).mul_(cap.weight)  # (Di·Dj, di·dj), indices (k1, k3, k2, k4)
    return B.reshape(Di, Dj, di, dj).permute(0, 2, 1, 3).reshape(Di * di, Dj * dj)


def dense_fisher_from_captures(captures: Iterable[Capture], view: NetworkView, layers: Sequence[int],
                               n_cases: int, out: torch.Tensor) -> torch.Tensor:
    """Accumulate (1/N) Σ over captured cases into ``out`` (P×P, zeroed), upper block triangle then mirror.

    The result is exactly symmetric by construction: a diagonal block is replaced by ½(B + Bᵀ) (its GEMM
    need not round symmetrically) and each lower block is the transpose of its upper one.
    """
    slices = view.block_slices(layers)
    for cap in captures:
        for bi, ki in enumerate(layers):
            for bj in range(bi, len(layers)):
                out[slices[bi], slices[bj]] += _block_update(cap, ki, layers[bj])
    out /= n_cases
    for bi in range(len(layers)):
        B = out[slices[bi], slices[bi]]
        out[slices[bi], slices[bi]] = 0.5 * (B + B.T)
        for bj in range(bi + 1, len(layers)):
            out[slices[bj], slices[bi]] = out[slices[bi], slices[bj]].T
    return out


def fisher(model, X, likelihood: str | Likelihood, estimator: str = "exact", y=None, layers=None,
           samples: int = 1, generator: torch.Generator | None = None, seed: int | None = None,
           dtype: torch.dtype | None = torch.float64, chunk_size: int | None = None,
           progress: bool | None = None, max_bytes: int | None = None) -> torch.Tensor:
    """Dense P×P Fisher of ``layers`` (all by default) in the paper layout.

    ``estimator``: "exact" (expectation over y ∼ r(y|z) taken exactly through a square root of F_R),
    "mc" (``samples`` sampled targets per case) or "empirical" (training targets ``y``; *not* the
    Fisher — Appendix D, footnote 2).
    """
    lik = get_likelihood(likelihood)
    check_estimator(estimator, y, samples)
    view = analysis_view(model, dtype)
    sel = view.select(layers)
    X, y = check_inputs(view, X, y, likelihood=lik)
    P = view.n_params(sel)
    check_dense_fits(P, view.dtype, view.device, max_bytes=max_bytes, what=f"{estimator} Fisher")
    shapes = [view.layers[k].shape for k in sel]
    extra = max(Di * Dj + di * dj for (di, Di) in shapes for (dj, Dj) in shapes)
    gen = make_generator(view.device, generator, seed)
    caps = iter_captures(view, X, lik, sel, estimator, y, samples, gen, chunk_size,
                         extra_per_case=extra, progress=progress, desc=f"{estimator} Fisher")
    out = torch.zeros(P, P, dtype=view.dtype, device=view.device)
    F = dense_fisher_from_captures(caps, view, sel, X.shape[0], out)
    if not all_finite([F]):
        raise NonFiniteError(
            f"the {estimator} Fisher overflows {view.dtype} although X and the weights are finite (largest |x| = "
            f"{float(X.abs().max()):.3g}): its entries are products of squared activations. Scale the inputs down.")
    return F


def exact_fisher(model, X, likelihood, layers=None, dtype=torch.float64, **kw) -> torch.Tensor:
    """The exact Fisher ``F = (1/N) Σ_n J_nᵀ F_R(z_n) J_n`` (= the GGN), expectation over y exact (docs/math.md §2)."""
    return fisher(model, X, likelihood, "exact", layers=layers, dtype=dtype, **kw)


def mc_fisher(model, X, likelihood, samples: int = 1, layers=None, generator=None, seed=None,
              dtype=torch.float64, **kw) -> torch.Tensor:
    """Monte-Carlo Fisher: ``samples`` targets per case drawn from the model's r(y|z) (Appendix D)."""
    return fisher(model, X, likelihood, "mc", layers=layers, samples=samples, generator=generator,
                  seed=seed, dtype=dtype, **kw)


def empirical_fisher(model, X, y, likelihood, layers=None, dtype=torch.float64, **kw) -> torch.Tensor:
    """EMPIRICAL Fisher — gradients of the *training* targets. This is NOT the Fisher.

    It lacks the Fisher's equivalence to the GGN and breaks Lemma 4 / Appendix B (Appendix D,
    footnote 2). It exists only for comparison.
    """
    return fisher(model, X, likelihood, "empirical", y=y, layers=layers, dtype=dtype, **kw)


# ----------------------------------------------------------------------------- matrix-free products
def _layer_function(view: NetworkView, X: torch.Tensor, sel: Sequence[int]):
    """f(weights, biases) → z for the selected layers (others fixed), plus the current values."""
    names = view.parameter_names(sel)
    params = {}
    for (wn, bn), k in zip(names, sel):
        mod = view.layers[k].module
        params[wn] = mod.weight.detach()
        if bn is not None:
            params[bn] = mod.bias.detach()

    # An in-place module must not write into X, which the transforms below capture.
    inplace = any(getattr(mod, "inplace", False) for mod in view.sequence)

    def f(p):
        return functional_call(view.model, p, (X.clone() if inplace else X,))

    return f, params, names


def _tangent(view: NetworkView, sel, names, mats) -> dict[str, torch.Tensor]:
    t = {}
    for (wn, bn), k, M in zip(names, sel, mats):
        w, b = view.split(k, M.to(device=view.device, dtype=view.dtype))
        t[wn] = w
        if bn is not None:
            t[bn] = b
    return t


def _as_mats(view: NetworkView, sel, v) -> list[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return view.unflatten(v.to(device=view.device, dtype=view.dtype), sel)
    mats = list(v)
    if len(mats) != len(sel):
        raise ValueError(f"expected {len(sel)} per-layer matrices (one per selected layer), got {len(mats)}.")
    return mats


_ELEMENTWISE_DERIVATIVE = {
    nn.Tanh: lambda x, y: 1 - y * y,
    nn.Sigmoid: lambda x, y: y * (1 - y),
    nn.ReLU: lambda x, y: (x > 0).to(y.dtype),
    nn.Identity: None,
}


def _linearized_module(mod: nn.Module, a: torch.Tensor, da: torch.Tensor | None):
    """(mod(a), J_mod(a) · da[t] for each tangent t) for a parameter-free module.

    An in-place module (``inplace=True``) runs on a fresh copy of its input at every call: it would
    otherwise overwrite ``a``, and the next tangent's product would apply it a second time.
    """
    run = (lambda u: mod(u.clone())) if getattr(mod, "inplace", False) else mod
    if type(mod) in _ELEMENTWISE_DERIVATIVE:
        y = run(a)
        deriv = _ELEMENTWISE_DERIVATIVE[type(mod)]
        if da is None:
            return y, None
        return y, (da if deriv is None else da * deriv(a, y))
    if da is None:
        return run(a), None
    outs = [jvp(run, (a,), (t,)) for t in da]
    return outs[0][0], torch.stack([o[1] for o in outs])


@torch.no_grad()
def jacobian_products(model, X, vectors: Sequence, layers=None, *, dtype: torch.dtype | None = torch.float64,
                      checked: bool = False):
    """``(z, [J v for v in vectors])`` by one linearised forward pass (Appendix J); each Jv is (N, C).

    The primal pass is shared by all tangents: ``ṡ_k = W_k ȧ_k + V_k ā_k`` at the Linear layers and
    ``ȧ = φ'(s) ⊙ ṡ`` (or a forward-mode product) at the parameter-free modules. Each v is a flat
    θ-vector (paper layout, restricted to ``layers``) or a list of per-layer matrices. Computed and
    returned in ``dtype`` (None: the model's dtype); ``checked`` skips the input checks when X is
    already on the model's device and in its dtype.
    """
    given = as_view(model)
    view = analysis_view(given, dtype)
    sel = view.select(layers)
    if not checked or view is not given:
        X, _ = check_inputs(view, X)
    T = len(vectors)
    tang = {k: [] for k in sel}
    for v in vectors:
        for k, M in zip(sel, _as_mats(view, sel, v)):
            tang[k].append(M.to(device=view.device, dtype=view.dtype))
    tang = {k: torch.stack(ms) for k, ms in tang.items()}  # (T, d_out, a_dim)
    index = {id(L.module): L for L in view.layers}
    a, da = X, None
    for mod in view.sequence:
        L = index.get(id(mod))
        if L is None:
            a, da = _linearized_module(mod, a, da)
            continue
        s = mod(a)
        ds = None if da is None else da @ mod.weight.T
        if L.index in tang and T:
            V = tang[L.index]
            term = a @ V[:, :, :L.d_in].transpose(1, 2)
            if L.has_bias:
                term = term + V[:, None, :, -1]
            ds = term if ds is None else ds + term
        a, da = s, ds
    z = a
    if da is None:
        da = torch.zeros(T, *z.shape, dtype=z.dtype, device=z.device)
    return z.detach(), list(da)


def fisher_gram(model, X, likelihood, vectors: Sequence, layers=None, *, checked: bool = False,
                dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """Gram matrix ``[v_iᵀ F v_j]`` of the exact Fisher on (X), from J-products only (Appendix J).

    Computed and returned in ``dtype`` (default float64; None: the model's dtype, as the optimizer uses).
    """
    lik = get_likelihood(likelihood)
    z, Jvs = jacobian_products(model, X, vectors, layers, dtype=dtype, checked=checked)
    n = len(Jvs)
    out = torch.empty(n, n, dtype=z.dtype, device=z.device)
    FJ = [lik.fisher_vp(z, Jv) for Jv in Jvs]
    for i in range(n):
        for j in range(i, n):
            out[i, j] = out[j, i] = (Jvs[i] * FJ[j]).sum() / z.shape[0]
    return out


def fisher_vector_product(model, X, likelihood, v, layers=None, dtype: torch.dtype | None = torch.float64,
                          chunk_size: int = 4096):
    """Matrix-free ``F v`` with the exact expectation over y: ``(1/N) Σ_n J_nᵀ F_R J_n v`` (Appendix J).

    For networks too large to densify. ``v`` is a flat θ-vector (paper layout, restricted to
    ``layers``) or a list of per-layer matrices; the result has the same form. Computed and returned
    in ``dtype`` (default float64; None: the model's dtype). ``chunk_size`` cases are pushed through
    the network at a time.
    """
    lik = get_likelihood(likelihood)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer number of cases, got {chunk_size!r}.")
    view = analysis_view(model, dtype)
    sel = view.select(layers)
    X, _ = check_inputs(view, X, likelihood=lik)
    flat = isinstance(v, torch.Tensor)
    mats = _as_mats(view, sel, v)
    acc = None
    for start in range(0, X.shape[0], chunk_size):
        Xc = X[start:start + chunk_size]
        f, params, names = _layer_function(view, Xc, sel)
        z, Jv = jvp(f, (params,), (_tangent(view, sel, names, mats),))
        _, pullback = vjp(f, params)
        (grads,) = pullback(lik.fisher_vp(z, Jv) / X.shape[0])
        part = []
        for (wn, bn) in names:
            part.append(grads[wn] if bn is None else torch.cat([grads[wn], grads[bn][:, None]], dim=1))
        acc = part if acc is None else [a + p for a, p in zip(acc, part)]
    return view.flatten(acc) if flat else acc
