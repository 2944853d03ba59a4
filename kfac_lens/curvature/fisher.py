"""The Fisher: exact, Monte-Carlo and empirical, dense or as products (docs/math.md §2, Appendix J).

Dense matrices use the paper layout (docs/math.md §1). They are assembled per block pair (i, j) from
the capture without ever forming per-(case, direction) gradient rows: for one case
``Σ_r w vec(g_r ā_iᵀ) vec(g_r ā_jᵀ)ᵀ = (ā_i ā_jᵀ) ⊗ M`` with ``M = w Σ_r g_{r,i} g_{r,j}ᵀ``, so a block is
one GEMM over cases of the flattened ``ā_i ā_jᵀ`` against the flattened ``M`` — R times fewer
flops than ``UᵀU`` with one row per (case, direction).

A layer with several uses per case (tied weights, (N, T, D) inputs, convolutions) has the per-case
gradient ``Σ_u g_u ā_uᵀ``, which is no Kronecker product: a chunk holding such a layer is accumulated
as ``UᵀU`` from its rows ``vec(Σ_u g_{r,u} ā_uᵀ)`` per (case, direction), one (n·R × P) GEMM (docs/math.md §1).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp, vmap

from ..capture import (
    Capture,
    all_finite,
    analysis_view,
    as_view,
    check_estimator,
    check_inputs,
    iter_captures,
    make_generator,
    n_directions,
)
from ..errors import NonFiniteError
from ..likelihoods import Likelihood, get_likelihood
from ..distributed import CaseShards
from ..memory import check_dense_fits
from ..nets import NetworkView, mats_to_vec


def _pair_rows(ai: torch.Tensor, aj: torch.Tensor, same: bool) -> torch.Tensor:
    """Per case, the products ā_i[k1]·ā_j[k3]: every (k1, k3), or only k1 ≤ k3 when i = j (a diagonal block is
    symmetric in them, which halves the work of the dominant first-layer block)."""
    if same:  # row k1 of the upper triangle at a time, into one buffer: ~10x faster than a gather
        n, D = ai.shape
        out = ai.new_empty(n, D * (D + 1) // 2)
        start = 0
        for k1 in range(D):
            torch.mul(ai[:, k1:k1 + 1], ai[:, k1:], out=out[:, start:start + D - k1])
            start += D - k1
        return out
    return (ai[:, :, None] * aj[:, None, :]).reshape(ai.shape[0], -1)


def _accumulate_block(acc: dict, key, cap: Capture, ki: int, kj: int) -> None:
    """acc[key] += Σ_n (ā_i ā_jᵀ)[pairs] · vec(w Σ_r g_i g_jᵀ)ᵀ over the chunk: one GEMM, kept in the
    (pairs × d_i·d_j) layout until :func:`_assemble_block`, so that the chunks add without re-layout."""
    gi, gj = cap.g[ki], cap.g[kj]
    AA = _pair_rows(cap.a[ki], cap.a[kj], ki == kj)
    MM = torch.einsum("rni,rnj->nij", gi, gj).reshape(gi.shape[1], gi.shape[2] * gj.shape[2])
    if key in acc:
        acc[key].addmm_(AA.T, MM, alpha=cap.weight)
    else:
        acc[key] = torch.mm(AA.T, MM).mul_(cap.weight)


def _assemble_block(B: torch.Tensor, Di: int, Dj: int, di: int, dj: int, same: bool) -> torch.Tensor:
    """The (a_i·d_i × a_j·d_j) block in paper layout from :func:`_accumulate_block`'s sums."""
    if same:
        r, c = torch.triu_indices(Di, Di, device=B.device)
        full = B.new_empty(Di, Di, di * dj)
        full[r, c] = B
        full[c, r] = B  # Σ ā[k3]ā[k1] M[k2, k4] = Σ ā[k1]ā[k3] M[k2, k4]
        B = full
    return B.reshape(Di, Dj, di, dj).permute(0, 2, 1, 3).reshape(Di * di, Dj * dj)


def gradient_rows(cap: Capture, k: int) -> torch.Tensor:
    """Rows ``vec(Σ_u g_{r,u} ā_uᵀ)`` of layer k, one per (direction, case): shape (R·n, a_dim·d_out)."""
    a, g = cap.a[k], cap.g[k]
    rows = torch.einsum("rno,na->rnao", g, a) if a.ndim == 2 else torch.einsum("rnuo,nua->rnao", g, a)
    return rows.reshape(g.shape[0] * g.shape[1], -1)


def dense_fisher_from_captures(captures: Iterable[Capture], view: NetworkView, layers: Sequence[int],
                               n_cases: int, out: torch.Tensor, shards: CaseShards | None = None) -> torch.Tensor:
    """Accumulate (1/N) Σ over captured cases into ``out`` (P×P, zeroed), upper block triangle then mirror.

    The result is exactly symmetric by construction: a diagonal block is replaced by ½(B + Bᵀ) (its GEMM
    need not round symmetrically) and each lower block is the transpose of its upper one. With ``shards``
    the sums of all ranks are added before dividing by ``n_cases``, the global N.
    """
    slices = view.block_slices(layers)
    acc: dict = {}

    def accumulate():
        for cap in captures:
            if any(cap.a[k].ndim == 3 for k in layers):
                U = torch.cat([gradient_rows(cap, k) for k in layers], dim=1)
                out.addmm_(U.T, U, alpha=cap.weight)
                continue
            for bi, ki in enumerate(layers):
                for bj in range(bi, len(layers)):
                    _accumulate_block(acc, (bi, bj), cap, ki, layers[bj])
        for (bi, bj), B in acc.items():
            Li, Lj = view.layers[layers[bi]], view.layers[layers[bj]]
            out[slices[bi], slices[bj]] += _assemble_block(B, Li.a_dim, Lj.a_dim, Li.d_out, Lj.d_out, bi == bj)
        acc.clear()

    if shards is None:
        accumulate()
    else:
        shards.run(accumulate, "the Fisher's sum over this rank's cases")
        shards.sum_(out)
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
           progress: bool | None = None, max_bytes: int | None = None, distributed=None) -> torch.Tensor:
    """Dense P×P Fisher of ``layers`` (all by default) in the paper layout.

    ``estimator``: "exact" (expectation over y ∼ r(y|z) taken exactly through a square root of F_R),
    "mc" (``samples`` sampled targets per case) or "empirical" (training targets ``y``; *not* the
    Fisher — Appendix D, footnote 2). ``distributed``: each rank passes its shard of X (and y) and every
    rank receives the Fisher of all cases (:mod:`kfac_lens.distributed`; rank r samples with its own seed).
    """
    shards = CaseShards(distributed)
    lik = get_likelihood(likelihood)
    estimator = check_estimator(estimator, y, samples)
    view = analysis_view(model, dtype)
    sel = view.select(layers)
    X, y = shards.run(lambda: check_inputs(view, X, y, likelihood=lik), "checking X and y")
    n_cases = shards.global_count(X.shape[0], like=X)
    P = view.n_params(sel)
    check_dense_fits(P, view.dtype, view.device, max_bytes=max_bytes, what=f"{estimator} Fisher")
    shapes = [view.layers[k].shape for k in sel]
    extra = max(Di * Dj + di * dj for (di, Di) in shapes for (dj, Dj) in shapes)
    if not view.is_chain:  # room for the (n·R × P) gradient rows of layers with several uses
        extra = max(extra, n_directions(view, estimator, samples) * P)
    gen = make_generator(view.device, generator, shards.seed(seed) if shards.active else seed)
    caps = iter_captures(view, X, lik, sel, estimator, y, samples, gen, chunk_size,
                         extra_per_case=extra, progress=progress, desc=f"{estimator} Fisher")
    out = torch.zeros(P, P, dtype=view.dtype, device=view.device)
    F = dense_fisher_from_captures(caps, view, sel, n_cases, out, shards if shards.active else None)
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
    inplace = not view.is_chain or any(getattr(mod, "inplace", False) for mod in view.sequence)

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
    if not view.is_chain:
        return _functional_jacobian_products(view, X, sel, [tang[k] for k in sel])
    tang = {k: torch.stack(ms) for k, ms in tang.items()}  # (T, d_out, a_dim)
    index = {id(L.module): L for L in view.layers}
    a, da = X, None
    for mod in view.sequence:
        L = index.get(id(mod))
        if L is None:
            a, da = _linearized_module(mod, a, da)
            continue
        if a.ndim != 2:  # a Linear on (N, T, D) inputs: forward-mode products through the whole network
            return _functional_jacobian_products(view, X, sel, [list(tang[k]) for k in sel])
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


def output_fisher_vp(lik: Likelihood, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``F_R(z) v`` per case; an (N, T, C) output has one likelihood term per position (docs/math.md §2)."""
    if z.ndim == 2:
        return lik.fisher_vp(z, v)
    return lik.fisher_vp(z.reshape(-1, z.shape[-1]), v.reshape(-1, z.shape[-1])).reshape(v.shape)


def _functional_jacobian_products(view: NetworkView, X: torch.Tensor, sel, tangents):
    """``(z, [J v])`` by ``torch.func.jvp`` through any module; ``tangents[i][t]`` is layer sel[i]'s matrix."""
    f, params, names = _layer_function(view, X, sel)
    T = len(tangents[0]) if tangents else 0
    if T == 0:
        return f(params).detach(), []
    Jvs = []
    for t in range(T):
        z, Jv = jvp(f, (params,), (_tangent(view, sel, names, [m[t] for m in tangents]),))
        Jvs.append(Jv.detach())
    return z.detach(), Jvs


def fisher_gram(model, X, likelihood, vectors: Sequence, layers=None, *, checked: bool = False,
                dtype: torch.dtype | None = torch.float64, distributed=None) -> torch.Tensor:
    """Gram matrix ``[v_iᵀ F v_j]`` of the exact Fisher on (X), from J-products only (Appendix J).

    Computed and returned in ``dtype`` (default float64; None: the model's dtype, as the optimizer uses).
    ``distributed``: X is this rank's shard; the Gram matrix is that of all ranks' cases.
    """
    lik = get_likelihood(likelihood)
    shards = CaseShards(distributed)
    z, Jvs = shards.run(lambda: jacobian_products(model, X, vectors, layers, dtype=dtype, checked=checked),
                        "the J-products on this rank's cases")
    n_cases = shards.global_count(z.shape[0], like=z)
    n = len(Jvs)
    out = torch.empty(n, n, dtype=z.dtype, device=z.device)
    FJ = [output_fisher_vp(lik, z, Jv) for Jv in Jvs]
    for i in range(n):
        for j in range(i, n):
            out[i, j] = out[j, i] = (Jvs[i] * FJ[j]).sum()
    shards.sum_(out)
    return out / n_cases


def fisher_vector_product(model, X, likelihood, v, layers=None, dtype: torch.dtype | None = torch.float64,
                          chunk_size: int = 4096, distributed=None):
    """Matrix-free ``F v`` with the exact expectation over y: ``(1/N) Σ_n J_nᵀ F_R J_n v`` (Appendix J).

    For networks too large to densify. ``v`` is a flat θ-vector (paper layout, restricted to
    ``layers``) or a list of per-layer matrices; the result has the same form. Computed and returned
    in ``dtype`` (default float64; None: the model's dtype). ``chunk_size`` cases are pushed through
    the network at a time. ``distributed``: X is this rank's shard; every rank receives F v over all cases.
    """
    lik = get_likelihood(likelihood)
    shards = CaseShards(distributed)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer number of cases, got {chunk_size!r}.")
    view = analysis_view(model, dtype)
    sel = view.select(layers)
    X, _ = shards.run(lambda: check_inputs(view, X, likelihood=lik), "checking X")
    n_cases = shards.global_count(X.shape[0], like=X)
    flat = isinstance(v, torch.Tensor)
    mats = _as_mats(view, sel, v)

    def local_sum():
        acc = None
        for start in range(0, X.shape[0], chunk_size):
            Xc = X[start:start + chunk_size]
            f, params, names = _layer_function(view, Xc, sel)
            z, Jv = jvp(f, (params,), (_tangent(view, sel, names, mats),))
            _, pullback = vjp(f, params)
            (grads,) = pullback(output_fisher_vp(lik, z, Jv) / n_cases)
            part = []
            for (wn, bn) in names:
                w = grads[wn].reshape(grads[wn].shape[0], -1)  # a convolution's (out, in, kh, kw) → (out, in·kh·kw)
                part.append(w if bn is None else torch.cat([w, grads[bn][:, None]], dim=1))
            acc = part if acc is None else [a + p for a, p in zip(acc, part)]
        return acc

    acc = shards.run(local_sum, "F v on this rank's cases")
    shards.sum_(*acc)
    return view.flatten(acc) if flat else acc


def fisher_matrix_product(model, X, likelihood, V: torch.Tensor, layers=None,
                          dtype: torch.dtype | None = torch.float64, chunk_size: int = 4096,
                          distributed=None) -> torch.Tensor:
    """Matrix-free ``F V`` for a block of m vectors, the columns of V (P × m), in one pass (Appendix J).

    The same product as :func:`fisher_vector_product`, column by column, but the m tangents share one primal
    forward pass (:func:`jacobian_products`, ``J V``), ``F_R`` acts on each, and one pullback is vectorised
    over them (``torch.func.vmap``), so the layer GEMMs run on m·n rows at a time. Memory grows with
    m·``chunk_size`` activations: lower ``chunk_size`` for wide blocks. ``dtype``: the computation's and the
    result's (float32 halves the time on a CPU; the products then carry float32 rounding, ~1e-7 relative).
    ``distributed``: X is this rank's shard; every rank receives F V over all cases (docs/math.md §2).
    """
    lik = get_likelihood(likelihood)
    shards = CaseShards(distributed)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer number of cases, got {chunk_size!r}.")
    if not isinstance(V, torch.Tensor) or V.ndim != 2:
        raise ValueError(f"V must be a (P, m) tensor whose columns are flat θ-vectors, got "
                         f"{type(V).__name__} of shape {tuple(getattr(V, 'shape', ()))}; for one vector use "
                         "fisher_vector_product or V[:, None].")
    view = analysis_view(model, dtype)
    sel = view.select(layers)
    P = view.n_params(sel)
    if V.shape[0] != P:
        raise ValueError(f"V must have P = {P} rows (the parameters of layers {list(sel)}), got {V.shape[0]}.")
    X, _ = shards.run(lambda: check_inputs(view, X, likelihood=lik), "checking X")
    n_cases = shards.global_count(X.shape[0], like=X)
    m = V.shape[1]
    if m == 0:
        return V.new_zeros(P, 0).to(device=view.device, dtype=view.dtype)
    Vd = V.to(device=view.device, dtype=view.dtype)
    columns = [Vd[:, t] for t in range(m)]

    def local_sum():
        acc = torch.zeros(m, P, dtype=view.dtype, device=view.device)
        for start in range(0, X.shape[0], chunk_size):
            Xc = X[start:start + chunk_size]
            z, Jvs = jacobian_products(view, Xc, columns, sel, dtype=view.dtype, checked=True)
            U = torch.stack([output_fisher_vp(lik, z, Jv) for Jv in Jvs]) / n_cases
            f, params, names = _layer_function(view, Xc, sel)
            _, pullback = vjp(f, params)
            try:
                (grads,) = vmap(pullback)(U)
            except RuntimeError:  # a module vmap cannot batch: one pullback per column
                per = [pullback(u)[0] for u in U]
                grads = {key: torch.stack([g[key] for g in per]) for key in per[0]}
            mats = []
            for wn, bn in names:
                w = grads[wn].reshape(m, grads[wn].shape[1], -1)  # a convolution's (out, in·kh·kw)
                mats.append(w if bn is None else torch.cat([w, grads[bn][:, :, None]], dim=2))
            acc += mats_to_vec(mats)
        return acc

    acc = shards.run(local_sum, "F V on this rank's cases")
    shards.sum_(acc)
    return acc.T
