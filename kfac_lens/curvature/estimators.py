"""Matrix-free estimators: randomized Frobenius norms, (generalized) Lanczos with full reorthogonalisation, CG.

Operators are functions on column blocks: ``matmul(V)`` maps a (P, m) matrix to (P, m), so a product with
the exact Fisher (:func:`~kfac_lens.fisher_vector_product`) can be batched later without changing these.

- :func:`relative_frobenius_errors`: ‖F − F_a‖_F / ‖F‖_F by Hutchinson's estimator
  ``‖B‖²_F = tr(B²) = E‖Bv‖²`` (E[vvᵀ] = I), deflated by an orthonormal basis Q whose products FQ are known
  (Hutch++-style, Meyer et al. 2021): ``tr(B²) = ‖BQ‖²_F + E‖B(I − QQᵀ)v‖²``, with Fieller's confidence
  interval for the ratio (:func:`ratio_estimate`).
- :func:`lanczos`: Ritz values of M⁻¹A for symmetric A and symmetric positive definite M given only
  through M⁻¹ (M = I without a preconditioner): the Lanczos process in the M-inner product, which is the
  preconditioned conjugate-gradient process, so started from M⁻¹b it also solves ``A x = b``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..progress import LARGE_OPERATOR, progress_bar

Matmul = Callable[[torch.Tensor], torch.Tensor]
PROBE_DISTRIBUTIONS = ("rademacher", "gaussian")


def normal_quantile(confidence: float) -> float:
    """z with P(|N(0,1)| ≤ z) = confidence."""
    return math.sqrt(2.0) * float(torch.special.erfinv(torch.tensor(confidence, dtype=torch.float64)))


def student_quantile(confidence: float, dof: int) -> float:
    """Two-sided Student-t quantile: exact for 1 and 2 degrees of freedom, else the Cornish–Fisher expansion
    around the normal one (relative error below 1e-3 from 3 degrees of freedom)."""
    p = 0.5 + confidence / 2
    if dof == 1:
        return math.tan(math.pi * (p - 0.5))
    if dof == 2:
        q = 4 * p * (1 - p)
        return 2 * (p - 0.5) * math.sqrt(2 / q)
    z = normal_quantile(confidence)
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + g1 / dof + g2 / dof ** 2 + g3 / dof ** 3 + g4 / dof ** 4


def probe_vectors(n: int, m: int, generator: torch.Generator | None, distribution: str = "rademacher",
                  dtype=torch.float64, device=None) -> torch.Tensor:
    """m probe vectors with E[vvᵀ] = I as the columns of an (n, m) matrix."""
    if distribution == "rademacher":
        bits = torch.randint(0, 2, (n, m), generator=generator, device=device)
        return bits.to(dtype) * 2 - 1
    if distribution == "gaussian":
        return torch.randn(n, m, generator=generator, dtype=dtype, device=device)
    raise ValueError(f"distribution must be one of {PROBE_DISTRIBUTIONS}, got {distribution!r}.")


@dataclass
class RatioEstimate:
    """``value`` = sqrt(num/den) with a ``confidence`` interval [ci_low, ci_high]; ``num``, ``den`` are the
    estimated squared norms (exact part plus the probes' mean) from ``probes`` probes."""

    value: float
    ci_low: float
    ci_high: float
    num: float
    den: float
    probes: int
    confidence: float


def ratio_estimate(num_gram: torch.Tensor, den_gram: torch.Tensor, num_exact: float = 0.0, den_exact: float = 0.0,
                   confidence: float = 0.95) -> RatioEstimate:
    """sqrt(a/b) for ``a = num_exact + mean_i ‖Bw_i‖²``, ``b = den_exact + mean_i ‖Fw_i‖²`` with a Fieller interval.

    ``num_gram`` = (BW)ᵀ(BW) and ``den_gram`` = (FW)ᵀ(FW) are the m×m Gram matrices of the probes' images
    (w_i = probes, deflated or not). With C = B² − T F² restricted to the probed subspace, ``a − T b`` has mean
    0 at the true T = a/b and variance ≤ 2 tr(C²)/m (equality for Gaussian probes, below it for Rademacher),
    and tr(C²) is estimated without bias by the m(m−1) off-diagonal Gram entries, since for independent
    isotropic w_i, w_j ``E[(w_iᵀ C w_j)²] = tr(C²)`` — far steadier than the sample variance of m skewed sums of
    squares. Fieller's interval ``{T : (a − T b)² ≤ z²·(2/m)·(S_BB − 2T S_BF + T² S_FF)}`` (S the pair means)
    is then mapped through the square root, with z the Student-t quantile for m − 1 degrees of freedom (the
    pair means are themselves estimates); it is unbounded above when b is not significantly positive. With
    fewer than two probes (or nothing random) the interval is the value.
    """
    m = num_gram.shape[0]
    xs, ys = torch.diagonal(num_gram).double(), torch.diagonal(den_gram).double()
    a = num_exact + (float(xs.mean()) if m else 0.0)
    b = den_exact + (float(ys.mean()) if m else 0.0)
    if not b > 0:
        nan = float("nan")
        return RatioEstimate(nan, nan, nan, a, b, m, confidence)
    T = max(a, 0.0) / b
    value = math.sqrt(T)
    if m < 2:
        return RatioEstimate(value, value, value, a, b, m, confidence)
    off = ~torch.eye(m, dtype=torch.bool, device=num_gram.device)
    GB, GF = num_gram.double()[off], den_gram.double()[off]
    s_bb, s_bf, s_ff = float((GB * GB).mean()), float((GB * GF).mean()), float((GF * GF).mean())
    kappa = 2.0 * student_quantile(confidence, m - 1) ** 2 / m
    qa, qb, qc = b * b - kappa * s_ff, a * b - kappa * s_bf, a * a - kappa * s_bb  # qa T² − 2 qb T + qc ≤ 0
    if qa <= 0:  # b is not significantly positive: no upper bound
        return RatioEstimate(value, 0.0, math.inf, a, b, m, confidence)
    disc = max(qb * qb - qa * qc, 0.0)  # ≥ 0 up to rounding: T = a/b always satisfies the inequality
    lo, hi = (qb - math.sqrt(disc)) / qa, (qb + math.sqrt(disc)) / qa
    return RatioEstimate(value, math.sqrt(max(lo, 0.0)), math.sqrt(max(hi, 0.0)), a, b, m, confidence)


def relative_frobenius_errors(fisher_matmul: Matmul, approx_matmuls: Mapping[str, Matmul], n_params: int,
                              probes: int, generator: torch.Generator | None = None,
                              basis: torch.Tensor | None = None, fisher_basis: torch.Tensor | None = None,
                              confidence: float = 0.95, distribution: str = "rademacher", batch: int = 32,
                              dtype=torch.float64, device=None, progress: bool | None = None,
                              ) -> dict[str, RatioEstimate]:
    """‖F − F_a‖_F / ‖F‖_F for each approximation, all from the same probes and the same F-products.

    ``basis`` Q (P, q, orthonormal columns) with ``fisher_basis`` = FQ deflates the estimator (see the module
    docstring): the part of the norms in span(Q) is exact, the probes ``(I − QQᵀ)v`` estimate the rest. The
    estimator is unbiased for any Q chosen independently of the probes. ``batch`` probes go through
    ``fisher_matmul`` at a time; the interval is :func:`ratio_estimate`'s. A progress bar counts the products
    for ``n_params`` ≥ :data:`~kfac_lens.progress.LARGE_OPERATOR` (``progress`` forces it on or off).
    """
    num_exact = dict.fromkeys(approx_matmuls, 0.0)
    den_exact = 0.0
    starts = range(0, probes, batch)
    bar = progress_bar(total=len(approx_matmuls) * (2 if basis is not None else 1) + len(starts),
                       desc="Frobenius estimate", long=n_params >= LARGE_OPERATOR, progress=progress)
    if basis is not None:
        if fisher_basis is None:
            fisher_basis = fisher_matmul(basis).detach()
        den_exact = float(fisher_basis.square().sum())
        for name, mm in approx_matmuls.items():
            num_exact[name] = float((fisher_basis - mm(basis)).square().sum())
            bar.update(1)
    W = probe_vectors(n_params, probes, generator, distribution, dtype, device)
    if basis is not None:
        W = W - basis @ (basis.T @ W)
    parts = []
    for i in starts:
        parts.append(fisher_matmul(W[:, i:i + batch]).detach())
        bar.update(1)
    FW = torch.cat(parts, dim=1)
    den_gram = FW.T @ FW
    out = {}
    for name, mm in approx_matmuls.items():
        D = FW - mm(W)
        out[name] = ratio_estimate(D.T @ D, den_gram, num_exact[name], den_exact, confidence)
        bar.update(1)
    bar.close()
    return out


# ----------------------------------------------------------------------------- Lanczos / CG
@dataclass
class LanczosResult:
    """Ritz values of M⁻¹A (``eigenvalues``, descending) with their residual bounds ``residuals``
    (|θ − λ| ≤ residual for some eigenvalue λ), the M-orthonormal ``basis`` V, ``images`` AV when kept,
    the tridiagonal ``T`` = VᵀAV, ``steps`` taken, and with a right-hand side b the Galerkin (CG) solution
    ``solution`` of ``A x = b`` and its relative residual ``solve_residual`` = ‖M⁻¹(b − Ax)‖_M / ‖M⁻¹b‖_M."""

    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    basis: torch.Tensor
    images: torch.Tensor | None
    T: torch.Tensor
    steps: int
    converged: bool
    solution: torch.Tensor | None = None
    solve_residual: float = float("nan")

    def top(self, k: int) -> list[float]:
        return [float(t) for t in self.eigenvalues[:k]]

    @property
    def condition(self) -> float:
        """θ_max/θ_min of the Ritz values: for a positive definite M⁻¹A a lower bound on its condition
        number (Ritz values lie inside the spectrum), exact once the extreme values have converged."""
        lo, hi = float(self.eigenvalues[-1]), float(self.eigenvalues[0])
        return hi / lo if lo > 0 else math.inf


def _ritz(T: torch.Tensor, beta: float):
    """Ritz values (descending) and their residual bounds β|s_last|."""
    theta, S = torch.linalg.eigh(T)
    order = torch.argsort(theta, descending=True)
    return theta[order], (beta * S[-1, order]).abs()


def lanczos(matmul: Matmul, n: int, k: int = 0, *, rhs: torch.Tensor | None = None,
            precondition: Matmul | None = None, max_steps: int | None = None, tol: float = 1e-8,
            solve_tol: float = 1e-8, generator: torch.Generator | None = None, keep_images: bool = False,
            dtype=torch.float64, device=None, progress: bool | None = None, desc: str = "Lanczos") -> LanczosResult:
    """Lanczos with full reorthogonalisation on M⁻¹A (A = ``matmul``, M⁻¹ = ``precondition``, default I).

    M⁻¹A is self-adjoint in ⟨x, y⟩_M = xᵀMy, so its Lanczos vectors are M-orthonormal; the process keeps
    ``u_j = M v_j`` beside ``v_j`` and needs only M⁻¹ — the generalized symmetric-definite problem
    ``A x = λ M x``. Starts from M⁻¹``rhs`` (then it is preconditioned CG and also returns the solution of
    ``A x = rhs``) or from a random vector. A Krylov space holds one eigenvector per distinct eigenvalue and
    none orthogonal to its start, so an invariant subspace (breakdown) is followed by a restart from a random
    vector M-orthogonal to the basis while ``k`` > 0: run to ``n`` steps this recovers every multiplicity.
    Prefer a random start for spectra (a structured ``rhs`` may miss an invariant subspace). Stops when the
    top ``k`` Ritz values' residual bounds are at most ``tol``·|θ_max| and, with ``rhs``, the relative CG
    residual is at most ``solve_tol``; or after ``max_steps`` (default n) steps. A progress bar (``desc``) counts
    the steps for n ≥ :data:`~kfac_lens.progress.LARGE_OPERATOR` (``progress`` forces it on or off).
    """
    pre = precondition or (lambda U: U)
    steps_cap = n if max_steps is None else min(int(max_steps), n)

    def m_orthonormal(u, Vm=None, Um=None):
        """(v, u) with v = M⁻¹u made M-orthogonal to the basis and of unit M-norm (u = Mv)."""
        for _ in range(2 if Vm is not None else 0):
            u = u - Um.T @ (Vm @ u)
        v = pre(u)
        norm = math.sqrt(max(float((v * u).sum()), 0.0))
        return v / norm, u / norm, norm

    start = (rhs.reshape(n, 1).to(dtype=dtype, device=device) if rhs is not None
             else torch.randn(n, 1, generator=generator, dtype=dtype, device=device))
    v, u, beta0 = m_orthonormal(start)
    if not beta0 > 0:
        raise ValueError("the start vector is zero (or M is not positive definite): nothing to iterate on.")
    # preallocated and row-major (one contiguous row per vector): the basis grows by views, not by copies, and the
    # reorthogonalisation's Vᵀw and U c are matrix-vector products on contiguous rows (on a (n, steps) column
    # layout each touches every row's cache line, ~3x slower at n = 4.5·10⁵)
    V = torch.empty(steps_cap, n, dtype=dtype, device=device)
    U = V if precondition is None else torch.empty_like(V)
    images = torch.empty_like(V) if keep_images else None
    V[0] = v[:, 0]
    U[0] = u[:, 0]
    alphas, betas = [], []
    converged, coef, solve_res = False, None, float("nan")
    bar = progress_bar(total=steps_cap, desc=desc, long=n >= LARGE_OPERATOR, progress=progress)
    while True:
        bar.update(1)
        j = len(alphas)
        y = matmul(V[j][:, None]).detach()  # (an operator built on autograd must not grow a graph here)
        if keep_images:
            images[j] = y[:, 0]
        alphas.append(float((V[j][:, None] * y).sum()))
        w = y - alphas[j] * U[j][:, None] - (betas[-1] * U[j - 1][:, None] if j > 0 else 0.0)
        Vm, Um = V[:j + 1], U[:j + 1]
        for _ in range(2):
            w = w - Um.T @ (Vm @ w)
        wv = pre(w)
        beta = math.sqrt(max(float((wv * w).sum()), 0.0))
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if j > 0:
            off = torch.tensor(betas, dtype=torch.float64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        theta, res = _ritz(T, beta)
        scale = max(float(theta.abs().max()), 1e-300)
        kk = min(k, n)
        spectrum_ok = kk == 0 or (len(alphas) >= kk and bool((res[:kk] <= tol * scale).all()))
        if rhs is not None:
            e1 = torch.zeros(len(alphas), 1, dtype=torch.float64)
            e1[0] = beta0
            coef = torch.linalg.solve(T, e1)
            solve_res = beta * float(coef[-1].abs()) / beta0
        solved = rhs is None or solve_res <= solve_tol
        invariant = beta <= 1e-13 * scale
        if len(alphas) >= steps_cap or (spectrum_ok and solved and not (invariant and kk > 0)):
            converged = spectrum_ok and solved
            break
        if invariant:  # an invariant subspace: go on with a fresh M-orthogonal direction (finds repeated eigenvalues)
            v, u, _ = m_orthonormal(torch.randn(n, 1, generator=generator, dtype=dtype, device=device), Vm, Um)
            betas.append(0.0)
        else:
            v, u = wv / beta, w / beta
            betas.append(beta)
        V[j + 1] = v[:, 0]
        if precondition is not None:
            U[j + 1] = u[:, 0]
    bar.close()
    m = len(alphas)
    basis = V[:m].T  # (n, m), a view of the row-major rows
    solution = None if rhs is None else (basis @ coef.to(dtype)).reshape(rhs.shape)
    return LanczosResult(theta, res, basis, images[:m].T if keep_images else None, T, m, converged, solution,
                         solve_res)


def conjugate_gradient(matmul: Matmul, rhs: torch.Tensor, precondition: Matmul | None = None, tol: float = 1e-8,
                       max_steps: int | None = None) -> LanczosResult:
    """Solve ``A x = rhs`` for symmetric positive definite A by preconditioned CG (the Lanczos form, with full
    reorthogonalisation); ``result.solution`` and ``result.solve_residual``."""
    return lanczos(matmul, rhs.numel(), 0, rhs=rhs, precondition=precondition, solve_tol=tol,
                   max_steps=max_steps, dtype=rhs.dtype, device=rhs.device, desc="conjugate gradient")
