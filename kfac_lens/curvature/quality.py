"""How good is each approximation of the Fisher? :func:`compare_approximations` (one row per approximation)
and :func:`compare_approximation_blocks` (one row per approximation and block), dense or matrix-free.

Definitions (all in float64, exact expectation over y throughout):

- ``rel_frobenius`` = ‖F − F_a‖_F / ‖F‖_F for the *undamped* approximation F_a and the exact Fisher F.
- ``ng_cosine``: cosine between ``(F_a,γ)⁻¹∇h`` and the exact damped natural gradient ``(F + γ²I)⁻¹∇h``,
  as :meth:`~kfac_lens.study.CurvatureStudy.exact_natural_gradient` defines it: factored Tikhonov with
  strength γ (Appendix E.3) adds ``πγ I⊗G + (γ/π) Ā⊗I + γ² I`` to a Kronecker block, whose isotropic part
  is γ²I. F_a,γ is factored Tikhonov for "kfac", "kfac-blockdiag", "kfac-tridiag", "kfac-reduce" (as the
  inverse operators do) and F_a + γ²I for "ekfac", "diagonal", "blockdiag-exact". ∇h is the gradient of the mean
  loss on the targets ``y``; without ``y`` (or without ``gamma``) the column is NaN.
- ``top_eigs_F``: the largest ``top_k`` eigenvalues of F (undamped).
- ``top_eigs_precond`` and ``precond_cond``: the largest eigenvalues and the condition number of the
  preconditioned operator ``(F_a,γ)⁻¹(F + γ²I)`` — the spectrum K-FAC leaves to the optimizer (F̆⁻¹F for
  "kfac-blockdiag", F̂⁻¹F for "kfac-tridiag"); None/NaN without ``gamma``.

``method="dense"`` forms F and every F_a (small networks; values exact, ``ci_low = ci_high = value``).
``method="matrix-free"`` never forms them; it uses products with F (blocks of columns at a time,
:func:`~kfac_lens.curvature.fisher.fisher_matrix_product`)
and with the operators of :mod:`~kfac_lens.curvature.approximations`:

1. Lanczos (full reorthogonalisation) on F gives ``top_eigs_F`` and a basis Q of its Krylov space with FQ.
2. ‖F − F_a‖²_F and ‖F‖²_F by Hutchinson's estimator deflated by Q (exact on span Q, ``probes`` Rademacher
   probes on the rest); a ``confidence`` interval for the ratio by Fieller's method with the variance
   estimated from pairs of probes (:func:`~kfac_lens.curvature.estimators.ratio_estimate`). All
   approximations share the same F-products.
3. With γ and y: the exact damped natural gradient by CG on F + γ²I preconditioned by F̂_γ⁻¹ (F̆_γ⁻¹ when
   the layers are not consecutive). Approximate directions use the cheap inverses (F̆⁻¹, F̂⁻¹, "kfac-reduce"'s
   F̆⁻¹, EK-FAC, diagonal) or CG on cheap products ("kfac", "blockdiag-exact").
4. With γ: for each approximation in ``spectra``, generalized Lanczos on ``(F + γ²I) x = λ M x`` in the
   M-inner product (M = F_a,γ; only M⁻¹ is applied, no M^{-1/2} is needed), from a random start.
   ``precond_cond`` is θ_max/θ_min of the Ritz values, a lower bound that is exact once the extreme values
   converge. Lanczos finds each distinct eigenvalue once: multiplicities (e.g. the damping-only
   eigenvalues of a softmax output's null direction) show up only when it runs to P steps.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Sequence

import pandas as pd
import torch
from torch.func import functional_call

from ..capture import analysis_view, check_inputs, positive_int
from ..distributed import CaseShards
from ..errors import DenseTooLargeError
from ..likelihoods import get_likelihood
from ..memory import available_bytes
from ..nets import mats_to_vec
from .approximations import (
    APPROXIMATIONS,
    Approximation,
    BlockDiagonalKronecker,
    BlockTridiagonalKronecker,
    build_approximations,
    check_capture_memory,
    factor_pairs,
    parse_approximations,
)
from .blocks import block_kind
from .chain_products import CACHE_CHUNK, ChainFisherProduct, cache_bytes
from .estimators import conjugate_gradient, lanczos, probe_vectors, ratio_estimate, relative_frobenius_errors
from .fisher import exact_fisher, fisher_matrix_product
from .operators import spd_cholesky, spd_inverse
from .output_fisher import exact_factors, supports_output_fisher

METHODS = ("dense", "matrix-free")
COLUMN_BATCH = 8        # F-product columns per linearised pass
ROWS_PER_PASS = 40_000  # cases × columns held at once (activations of every tangent)


# ----------------------------------------------------------------------------- argument checks
def _check_method(method) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}: 'dense' forms F (small networks), "
                         "'matrix-free' estimates from products with F (any size).")
    return method


def _check_gamma(gamma) -> float | None:
    if gamma is None:
        return None
    ok = isinstance(gamma, numbers.Real) and not isinstance(gamma, bool)
    if not ok or not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be None (no damping: ng_cosine and the preconditioned spectra are left NaN) "
                         f"or a finite number ≥ 0, got {gamma!r}; pass e.g. gamma=1e-3.")
    return float(gamma)


def _check_confidence(confidence) -> float:
    if not (isinstance(confidence, float) and 0 < confidence < 1):
        raise ValueError(f"confidence must be a probability strictly between 0 and 1, got {confidence!r}; "
                         "e.g. confidence=0.95.")
    return confidence


def _check_spectra(spectra, names: list[Approximation], method: str) -> list[Approximation]:
    if spectra is None:
        if method == "dense":
            return list(names)
        return [a for a in (Approximation.KFAC_BLOCKDIAG, Approximation.KFAC_TRIDIAG) if a in names]
    wanted = parse_approximations(spectra, "spectra") if len(spectra) else []
    extra = [str(a) for a in wanted if a not in names]
    if extra:
        raise ValueError(f"spectra names {extra}, which are not among approximations={[str(a) for a in names]}; "
                         "add them there or drop them from spectra.")
    return wanted


# ----------------------------------------------------------------------------- the loss gradient ∇h
def loss_gradient(model, X, y, likelihood, layers=None, chunk_size: int = 4096, distributed=None) -> torch.Tensor:
    """∇h of the mean loss ``h = (1/N) Σ_n L(y_n, f(x_n, θ))`` for ``layers``, as a flat θ-vector (paper layout).

    ``distributed``: (X, y) are this rank's shard and N counts every rank's cases."""
    lik = get_likelihood(likelihood)
    shards = CaseShards(distributed)
    view = analysis_view(model, torch.float64)
    sel = view.select(layers)
    X, y = shards.run(lambda: check_inputs(view, X, y, likelihood=lik), "checking X and y")
    n_cases = shards.global_count(X.shape[0], like=X)
    names = view.parameter_names(sel)
    params = {}
    for (wn, bn), k in zip(names, sel):
        mod = view.layers[k].module
        params[wn] = mod.weight.detach().clone().requires_grad_(True)
        if bn is not None:
            params[bn] = mod.bias.detach().clone().requires_grad_(True)
    grads = dict.fromkeys(params, 0.0)

    def local_sum():
        with torch.enable_grad():
            for start in range(0, X.shape[0], chunk_size):
                z = functional_call(view.model, params, (X[start:start + chunk_size],))
                h = lik.per_case_nll(z, lik.check_targets(z, y[start:start + chunk_size])).sum() / n_cases
                for key, gr in zip(params, torch.autograd.grad(h, list(params.values()))):
                    grads[key] = grads[key] + gr

    shards.run(local_sum, "∇h on this rank's cases")
    weights = [grads[wn].reshape(grads[wn].shape[0], -1) for wn, _ in names]  # a convolution's (out, in·kh·kw)
    mats = [w if bn is None else torch.cat([w, grads[bn][:, None]], dim=1) for w, (_, bn) in zip(weights, names)]
    flat = mats_to_vec(mats)
    shards.sum_(flat)
    return flat


# ----------------------------------------------------------------------------- shared set-up
class _Setup:
    """The checked inputs, the factors, the operators and the gradient shared by both methods."""

    def __init__(self, model, X, likelihood, approximations, y, layers, pi, neighbours, chunk_size,
                 distributed=None, fisher_dtype=torch.float64, setup_dtype=torch.float64):
        self.fisher_dtype = fisher_dtype
        self.lik = get_likelihood(likelihood)
        self.distributed = distributed
        shards = CaseShards(distributed)
        self.view = analysis_view(model, torch.float64)
        self.sel = self.view.select(layers)
        self.X, self.y = shards.run(lambda: check_inputs(self.view, X, y, likelihood=self.lik), "checking X and y")
        self.names = parse_approximations(approximations)
        self.pi, self.neighbours, self.chunk_size = pi, neighbours, chunk_size
        if Approximation.BLOCKDIAG_EXACT in self.names:  # before any work
            check_capture_memory(self.view, self.sel, self.X.shape[0])
        pairs = factor_pairs(self.view, self.sel, self.names, self.X)
        work = self.view.astype(setup_dtype)  # the passes over the cases; their statistics are kept in float64
        factors, diagonal = exact_factors(work, self.X.to(setup_dtype), self.lik, self.sel, pairs,
                                          chunk_size=chunk_size, diagonal=Approximation.DIAGONAL in self.names,
                                          distributed=distributed)
        self.factors = factors.to(torch.float64)
        diagonal = None if diagonal is None else [d.double() for d in diagonal]
        self.ops = build_approximations(self.view, self.X, self.lik, self.names, self.sel, pi, neighbours,
                                        chunk_size, factors=self.factors, distributed=distributed, diagonal=diagonal,
                                        pass_dtype=setup_dtype)
        self.grad = None if self.y is None else loss_gradient(self.view, self.X, self.y, self.lik, self.sel,
                                                              distributed=distributed)
        self.P = self.view.n_params(self.sel)
        self.fisher_products = 0
        self.chain_product: ChainFisherProduct | None = None

    def fisher_matmul(self, V: torch.Tensor) -> torch.Tensor:
        """F V by :func:`fisher_matrix_product` (a Linear chain on one process: :class:`ChainFisherProduct`, the
        primal pass cached), ``COLUMN_BATCH`` columns per pass, computed in ``fisher_dtype`` and returned in
        float64 (the cache only where it takes at most a quarter of the free memory); the cases go in chunks of at
        most ``ROWS_PER_PASS``/columns."""
        self.fisher_products += V.shape[1]
        chunk = 4096 if self.chunk_size is None else int(self.chunk_size)
        one_process = not CaseShards(self.distributed).active
        if self.chain_product is None and one_process and supports_output_fisher(self.view) \
                and cache_bytes(self.view, len(self.X), self.fisher_dtype) <= available_bytes(self.view.device) // 4:
            view = self.view.astype(self.fisher_dtype)
            self.chain_product = ChainFisherProduct(view, self.X.to(self.fisher_dtype), self.lik, self.sel,
                                                    min(chunk, CACHE_CHUNK))
        parts = []
        for i in range(0, V.shape[1], COLUMN_BATCH):
            block = V[:, i:i + COLUMN_BATCH]
            rows = max(1, min(chunk, ROWS_PER_PASS // block.shape[1]))
            parts.append((self.chain_product(block) if self.chain_product is not None else fisher_matrix_product(
                self.view, self.X, self.lik, block, layers=self.sel, dtype=self.fisher_dtype, chunk_size=rows,
                distributed=self.distributed)).to(V.dtype))
        return torch.cat(parts, dim=1) if parts else V.new_zeros(V.shape)

    def reference_preconditioner(self, gamma: float, inverses: dict):
        """F̂_γ⁻¹ where the layers allow it (consecutive layers with neighbour factors), else F̆_γ⁻¹ (reusing
        ``inverses``)."""
        chain = self.neighbours == "selected" or all(b == a + 1 for a, b in zip(self.sel, self.sel[1:]))
        chain = chain and all((a, b) in self.factors.A for a, b in zip(self.sel, self.sel[1:]))
        kind = Approximation.KFAC_TRIDIAG if chain else Approximation.KFAC_BLOCKDIAG
        if inverses.get(kind) is not None:
            return inverses[kind]
        if chain:
            return BlockTridiagonalKronecker(self.factors, gamma, self.pi, self.sel, self.neighbours).inverse()
        return BlockDiagonalKronecker(self.factors, gamma, self.pi, self.sel).inverse()


def _products_in(op, dtype: torch.dtype):
    """``V ↦ op @ V`` computed in ``dtype`` where the operator can be cast (the rounding of the F-products it is
    compared with), returned in V's dtype."""
    low = op.astype(dtype)
    return lambda V: (low @ V.to(low.dtype)).to(V.dtype)


def _cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    nu, nv = float(u.norm()), float(v.norm())
    return float(u.reshape(-1) @ v.reshape(-1)) / (nu * nv) if nu > 0 and nv > 0 else float("nan")


def _row(name, method, gamma, value, lo, hi, cos, eigs_F, eigs_pre, cond) -> dict:
    return {"approximation": str(name), "method": method, "gamma": gamma, "rel_frobenius": value, "ci_low": lo,
            "ci_high": hi, "ng_cosine": cos, "top_eigs_F": eigs_F, "top_eigs_precond": eigs_pre,
            "precond_cond": cond}


# ----------------------------------------------------------------------------- dense
def _dense_fisher(s: _Setup) -> torch.Tensor:
    try:
        return exact_fisher(s.view, s.X, s.lik, layers=s.sel, chunk_size=s.chunk_size, distributed=s.distributed)
    except DenseTooLargeError as err:
        raise DenseTooLargeError(f"{err} Here: pass method='matrix-free'.") from None


def _dense(s: _Setup, gamma, top_k, spectra) -> tuple[list[dict], dict]:
    F = _dense_fisher(s)
    eigs_F = [float(t) for t in torch.linalg.eigvalsh(F).flip(0)[:top_k]]
    Fn = float(F.norm())
    reference = Fg = None
    if gamma is not None:
        Fg = F + gamma ** 2 * torch.eye(s.P, dtype=F.dtype, device=F.device)
        if s.grad is not None:
            reference = torch.cholesky_solve(s.grad[:, None], spd_cholesky(Fg, f"F + γ²I (γ = {gamma:g})"))[:, 0]
    rows = []
    for name, op in s.ops.items():
        rel = float((F - op.dense()).norm()) / Fn if Fn > 0 else float("nan")
        cos, eigs, cond = float("nan"), None, float("nan")
        if gamma is not None:
            damped = op.damped(gamma)
            inv = damped.inverse()
            if inv is not None:
                M_inv = inv.dense()
            else:
                M_inv = spd_inverse(damped.dense(), f"damped {name} (γ = {gamma:g})")
            if reference is not None:
                cos = _cosine(M_inv @ s.grad, reference)
            if name in spectra:
                C = spd_cholesky(M_inv, f"the inverse of damped {name} (γ = {gamma:g})")
                ev = torch.linalg.eigvalsh(C.T @ Fg @ C).flip(0)
                eigs, cond = [float(t) for t in ev[:top_k]], float(ev[0] / ev[-1])
        rows.append(_row(name, "dense", gamma, rel, rel, rel, cos, eigs_F, eigs, cond))
    return rows, {}


# ----------------------------------------------------------------------------- matrix-free
def _matrix_free(s: _Setup, gamma, top_k, spectra, probes, gen, confidence, deflate, max_steps, tol, cg_tol,
                 ) -> tuple[list[dict], dict]:
    info: dict = {}
    steps = min(s.P, 4 * top_k + 40) if max_steps is None else max_steps
    clock = time.perf_counter()

    def lap(key):
        nonlocal clock
        now = time.perf_counter()
        info[f"seconds_{key}"] = info.get(f"seconds_{key}", 0.0) + now - clock
        clock = now

    if gamma is not None:  # the damped operators first: refuse a spectrum without a cheap inverse before any work
        damped = {name: op.damped(gamma) for name, op in s.ops.items()}
        inverses = {name: d.inverse() for name, d in damped.items()}
        for name in spectra:
            if inverses[name] is None:
                raise ValueError(f"spectra: '{name}' has no cheap inverse, so method='matrix-free' cannot precondition "
                                 "with it; drop it from spectra or use method='dense'.")
        pre = s.reference_preconditioner(gamma, inverses)
        cg_steps = min(s.P, 500) if max_steps is None else max_steps
        lap("damping")
    lz = lanczos(s.fisher_matmul, s.P, top_k, max_steps=steps, tol=tol, generator=gen, keep_images=deflate,
                 desc="Lanczos on F")
    lap("lanczos_F")
    eigs_F = lz.top(top_k)
    info.update(lanczos_F_steps=lz.steps, lanczos_F_converged=lz.converged,
                deflation_rank=lz.steps if deflate else 0)
    est = relative_frobenius_errors(s.fisher_matmul, {name: _products_in(op, s.fisher_dtype) for name, op in
                                                      s.ops.items()}, s.P,
                                    probes, gen, basis=lz.basis if deflate else None, fisher_basis=lz.images,
                                    confidence=confidence)
    del lz
    lap("frobenius")
    cos = dict.fromkeys(s.names, float("nan"))
    eigs: dict = dict.fromkeys(s.names)
    cond = dict.fromkeys(s.names, float("nan"))
    if gamma is not None:
        def Fg(V):
            return s.fisher_matmul(V) + gamma ** 2 * V

        reference = None
        if s.grad is not None:
            run = conjugate_gradient(Fg, s.grad, pre.__matmul__, tol=cg_tol, max_steps=cg_steps)
            reference = run.solution
            info.update(ng_reference_residual=run.solve_residual, ng_reference_steps=run.steps)
        lap("ng_reference")
        for name in spectra:
            run = lanczos(Fg, s.P, top_k, precondition=inverses[name].__matmul__, max_steps=steps, tol=tol,
                          generator=gen, desc=f"Lanczos on ({name})⁻¹F")
            eigs[name], cond[name] = run.top(top_k), run.condition
            info[f"lanczos_{name}_steps"] = run.steps
            info[f"lanczos_{name}_converged"] = run.converged
            lap(f"spectrum_{name}")
        if reference is not None:
            fallback = inverses.get(Approximation.KFAC_BLOCKDIAG)
            if fallback is None:
                fallback = BlockDiagonalKronecker(s.factors, gamma, s.pi, s.sel).inverse()
            for name, d in damped.items():
                if inverses[name] is not None:
                    u = inverses[name] @ s.grad
                else:
                    cg = conjugate_gradient(d.__matmul__, s.grad,
                                            pre.__matmul__ if name == Approximation.KFAC else fallback.__matmul__,
                                            tol=cg_tol, max_steps=cg_steps)
                    u = cg.solution
                    info[f"ng_{name}_residual"] = cg.solve_residual
                cos[name] = _cosine(u, reference)
            lap("ng_approximations")
    rows = [_row(name, "matrix-free", gamma, est[name].value, est[name].ci_low, est[name].ci_high, cos[name],
                 eigs_F, eigs[name], cond[name]) for name in s.names]
    return rows, info


# ----------------------------------------------------------------------------- entry points
def compare_approximations(model, X, likelihood, approximations: Sequence[str] = APPROXIMATIONS, *, y=None,
                           gamma: float | None = None, method: str = "dense", probes: int = 30,
                           seed: int | None = 0, layers=None, top_k: int = 10, spectra=None, pi="trace",
                           neighbours: str = "network", confidence: float = 0.95, deflate: bool = True,
                           max_steps: int | None = None, tol: float = 1e-4, cg_tol: float = 1e-6,
                           chunk_size: int | None = None, distributed=None,
                           fisher_dtype: torch.dtype = torch.float64) -> pd.DataFrame:
    """One row per approximation of the exact Fisher of ``model`` on X (see the module docstring).

    Columns: approximation, method, gamma, rel_frobenius, ci_low, ci_high, ng_cosine, top_eigs_F,
    top_eigs_precond, precond_cond. ``approximations``: names of :class:`Approximation`. ``y``: targets for
    ∇h (ng_cosine). ``gamma``: damping (None: no damped columns). ``probes``: Hutchinson probes and ``seed``
    their generator (matrix-free). ``top_k``: eigenvalues reported. ``spectra``: which approximations get
    the preconditioned spectrum (default: all for "dense", F̆ and F̂ for "matrix-free", where each costs a
    Lanczos run of F-products). ``deflate``: deflate the trace estimator by F's Krylov basis. ``max_steps``:
    Lanczos steps (default min(P, 4·top_k + 40); 500 for the CG solves); ``tol``: Ritz residual bound
    relative to θ_max, which bounds each reported eigenvalue's error (usually far smaller; 0: always run
    ``max_steps``, which at P steps gives every eigenvalue); ``cg_tol``: relative residual of the CG solves.
    Diagnostics (F-products used, steps, residuals, seconds) are in ``df.attrs``. ``distributed``: X (and y)
    are this rank's shard; every rank gets the table for all cases (the probes use ``seed`` on every rank).
    ``fisher_dtype``: the dtype of the matrix-free passes over the cases — the set-up's factor statistics,
    diag(F) and EK-FAC scalings (kept in float64 once summed) and the F-products — and of the approximations'
    products that the Frobenius estimate compares with those F-products. torch.float32 about halves their time
    on a CPU at ~1e-7 relative rounding; the operators, their inverses, Lanczos, CG and the estimators' sums
    stay float64. ``method="dense"`` is float64 throughout.
    """
    t0 = time.perf_counter()
    method = _check_method(method)
    gamma = _check_gamma(gamma)
    probes = positive_int(probes, "probes", "random probe vectors for method='matrix-free', e.g. probes=30")
    top_k = positive_int(top_k, "top_k", "eigenvalues to report, e.g. top_k=10")
    confidence = _check_confidence(confidence)
    if max_steps is not None:
        max_steps = positive_int(max_steps, "max_steps", "Lanczos steps, or None for automatic")
    if fisher_dtype not in (torch.float64, torch.float32):
        raise ValueError(f"fisher_dtype must be torch.float64 or torch.float32, got {fisher_dtype!r}.")
    s = _Setup(model, X, likelihood, approximations, y, layers, pi, neighbours, chunk_size, distributed,
               fisher_dtype, setup_dtype=fisher_dtype if method == "matrix-free" else torch.float64)
    seconds_setup = time.perf_counter() - t0
    spectra = _check_spectra(spectra, s.names, method)
    top_k = min(top_k, s.P)
    gen = None if seed is None else torch.Generator(device=s.view.device).manual_seed(int(seed))
    if method == "dense":
        rows, info = _dense(s, gamma, top_k, spectra)
    else:
        rows, info = _matrix_free(s, gamma, top_k, spectra, probes, gen, confidence, deflate, max_steps, tol, cg_tol)
    df = pd.DataFrame(rows)
    df.attrs.update(info, fisher_products=s.fisher_products, probes=probes if method != "dense" else 0,
                    confidence=confidence, n_params=s.P, seconds_setup=seconds_setup,
                    seconds=time.perf_counter() - t0)
    return df


def compare_approximation_blocks(model, X, likelihood, approximations: Sequence[str] = APPROXIMATIONS, *,
                                 method: str = "dense", probes: int = 30, seed: int | None = 0, layers=None,
                                 pi="trace", neighbours: str = "network", confidence: float = 0.95,
                                 chunk_size: int | None = None, distributed=None) -> pd.DataFrame:
    """Per-block ‖F_kl − F_a,kl‖_F / ‖F_kl‖_F (undamped) for every approximation and block (k, l).

    Columns: approximation, block_row, block_col (layer indices), kind (diagonal / tridiagonal /
    off-tridiagonal), rel_frobenius, ci_low, ci_high. Matrix-free: for each block column l, ``probes`` probes
    supported on block l give every block (k, l) by Hutchinson's estimator (ℓ·probes F-products); NaN where
    F_kl = 0.
    """
    method = _check_method(method)
    probes = positive_int(probes, "probes", "random probe vectors for method='matrix-free', e.g. probes=30")
    confidence = _check_confidence(confidence)
    s = _Setup(model, X, likelihood, approximations, None, layers, pi, neighbours, chunk_size, distributed)
    slices = s.view.block_slices(s.sel)
    gen = None if seed is None else torch.Generator(device=s.view.device).manual_seed(int(seed))
    rows = []
    if method == "dense":
        F = _dense_fisher(s)
        for name, op in s.ops.items():
            D = F - op.dense()
            for i, si in enumerate(slices):
                for j, sj in enumerate(slices):
                    ref = float(F[si, sj].norm())
                    rel = float(D[si, sj].norm()) / ref if ref > 0 else float("nan")
                    rows.append((name, i, j, rel, rel, rel))
    else:
        for j, sj in enumerate(slices):
            V = torch.zeros(s.P, probes, dtype=torch.float64, device=s.view.device)
            V[sj] = probe_vectors(sj.stop - sj.start, probes, gen, device=s.view.device)
            FV = s.fisher_matmul(V)
            for name, op in s.ops.items():
                D = FV - op @ V
                for i, si in enumerate(slices):
                    e = ratio_estimate(D[si].T @ D[si], FV[si].T @ FV[si], confidence=confidence)
                    rows.append((name, i, j, e.value, e.ci_low, e.ci_high))
    rows.sort(key=lambda r: (s.names.index(r[0]), r[1], r[2]))
    out = pd.DataFrame([{"approximation": str(name), "block_row": s.sel[i], "block_col": s.sel[j],
                         "kind": block_kind(i, j).value, "rel_frobenius": v, "ci_low": lo, "ci_high": hi}
                        for name, i, j, v, lo, hi in rows])
    out.attrs.update(fisher_products=s.fisher_products, method=method)
    return out
