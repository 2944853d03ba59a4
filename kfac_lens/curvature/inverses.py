"""The two approximate inverses of F̃ (Sections 3.2, 3.3; docs/math.md §5) and the Appendix I solver.

- :class:`BlockDiagonalInverse` — F̆⁻¹: ``U_k = G_kk⁻¹ V_k Ā_kk⁻¹`` with damped diagonal factors.
- :class:`BlockTridiagonalInverse` — F̂⁻¹ = Ξᵀ Λ Ξ, where F̂ agrees with the damped F̃ on the
  tridiagonal blocks and F̂⁻¹ is block-tridiagonal.
- :class:`KroneckerSumInverse` — ``(A⊗B ± C⊗D)⁻¹`` for symmetric PSD A, B, C, D (Appendix I).

Layers are 0-based Linear indices. Every factor and Schur complement inverted here goes through the
same guard, :func:`~kfac_lens.curvature.operators.check_condition`: ``SingularFactorError`` when it is not
positive definite or its condition number is above 1/(100·eps) of the result's dtype, ``RuntimeWarning``
above eps^(-2/3); nothing is clamped.
"""

from __future__ import annotations

import math

import torch

from ..memory import check_dense_fits
from ..options import InverseKind, parse
from .blocks import block_offsets, kron
from .damping import check_gamma
from .factors import KroneckerFactors
from .operators import BlockOperator, PDFactor, SymmetricEig, check_condition, cond1, spd_inverse

NEIGHBOURS = ("network", "selected")


def chain(L: torch.Tensor, V: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``L V R`` multiplied in the cheaper order (V may carry leading batch dimensions): with a wide first
    or last layer, left to right can cost 40% more."""
    m, (p, q), r = L.shape[0], V.shape[-2:], R.shape[-1]
    return (L @ V) @ R if m * q * (p + r) <= p * r * (q + m) else L @ (V @ R)


class KroneckerSumInverse:
    """``(A⊗B ± C⊗D)⁻¹`` via Appendix I, for A, B positive definite and C, D PSD.

    With ``A^{-1/2} C A^{-1/2} = E₁S₁E₁ᵀ`` and ``B^{-1/2} D B^{-1/2} = E₂S₂E₂ᵀ``, ``K₁ = A^{-1/2}E₁``,
    ``K₂ = B^{-1/2}E₂``: ``(A⊗B ± C⊗D)⁻¹ vec(V) = vec(K₂ [(K₂ᵀ V K₁) ⊘ (11ᵀ ± s₂s₁ᵀ)] K₁ᵀ)``.
    Any whitener W with W A Wᵀ = I may stand for A^{-1/2}; the Cholesky one is used (cheaper).
    V has shape (dim B, dim A), matching ``(A⊗B) vec(V) = vec(B V Aᵀ)``. Cholesky factorisations of A and
    B already at hand may be passed as ``pd_A`` / ``pd_B`` (:class:`PDFactor`).

    A and B (by :class:`PDFactor`) and the whitened sum ``I ± S₂⊗S₁``, whose condition number is exactly
    ``max/min`` of ``1 ± s₂s₁ᵀ``, are checked by ``check_condition`` for a result kept in ``dtype``
    (default A's): ``SingularFactorError`` when not positive definite or too ill-conditioned, else a
    ``RuntimeWarning`` when nearly singular.
    """

    def __init__(self, A, B, C, D, sign: int = -1, name: str = "A⊗B ± C⊗D", strict: bool = False,
                 pd_A: PDFactor | None = None, pd_B: PDFactor | None = None, dtype: torch.dtype | None = None):
        if sign not in (1, -1):
            raise ValueError("sign must be +1 or -1.")
        # Whiten with Cholesky factors (W M Wᵀ = I; Appendix I only needs some such W, A^{-1/2} being one),
        # in float64 whatever the dtype: 1 − s₂s₁ᵀ loses all precision in float32 at small γ.
        dtype = dtype or A.dtype
        WA = (pd_A or PDFactor(A, f"{name}: A", strict, dtype)).whitener()
        WB = (pd_B or PDFactor(B, f"{name}: B", strict, dtype)).whitener()
        e1 = SymmetricEig(WA @ C.double() @ WA.T)
        e2 = SymmetricEig(WB @ D.double() @ WB.T)
        den = 1.0 + sign * (e2.s[:, None] * e1.s[None, :])
        lo, hi = float(den.min()), float(den.max())
        pm = "+" if sign == 1 else "−"
        if lo <= 0:
            check_condition(math.inf, name, dtype, f"not positive definite: 1 {pm} s₂s₁ᵀ of Appendix I reaches "
                                                   f"{lo:.3g}")
        self.cond = check_condition(hi / lo, name, dtype, f"max/min of 1 {pm} s₂s₁ᵀ, Appendix I")
        self.K1, self.K2 = (WA.T @ e1.E).to(dtype), (WB.T @ e2.E).to(dtype)
        self.den = den.to(dtype)

    def to(self, dtype: torch.dtype) -> KroneckerSumInverse:
        self.K1, self.K2, self.den = self.K1.to(dtype), self.K2.to(dtype), self.den.to(dtype)
        return self

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        return self.K2 @ ((self.K2.T @ V @ self.K1) / self.den) @ self.K1.T

    def dense(self) -> torch.Tensor:
        K = kron(self.K1, self.K2)
        return (K * (1.0 / self.den).T.reshape(-1)) @ K.T


class FactoredKroneckerSumInverse:
    """``(A⊗B − (PPᵀ)⊗(QQᵀ))⁻¹`` by Appendix I, from the factors P (dim A × r₁) and Q (dim B × r₂).

    Σ_{k|k+1} has this form (P = Ā[k,k+1] L⁻ᵀ with Ā[k+1,k+1] = L Lᵀ, Q alike), and C = PPᵀ has rank
    ≤ r₁ (the next layer's width), often below dim A. With W = L_A⁻¹ (W A Wᵀ = I) and M = WP, the
    whitened ``W C Wᵀ = M Mᵀ`` has Appendix I's eigenvalues s₁ (those of the smaller Gram, MᵀM or MMᵀ) and
    is 0 on the rest, where ``1 − s₂s₁ᵀ = 1``. Hence ``Σ⁻¹ vec(V) = vec(B⁻¹ V A⁻¹ + K₂ [(K₂ᵀ V K₁) ⊙ T] K₁ᵀ)``
    with, per side, ``K = Wᵀ M E`` and weight 1 (``MᵀM = E diag(s) Eᵀ``, r ≤ dim) or ``K = Wᵀ E`` and
    weight s (``MMᵀ = E diag(s) Eᵀ``), and ``T = w₂w₁ᵀ ⊘ (1 − s₂s₁ᵀ)``: no eigendecomposition of a
    dim A × dim A matrix when r₁ < dim A. Computed in float64 from the Cholesky factors ``pd_A``, ``pd_B``
    (:class:`PDFactor`), kept in ``dtype``; the condition number, max/min of ``1 − s₂s₁ᵀ`` over all pairs,
    goes through ``check_condition`` as in :class:`KroneckerSumInverse`.
    """

    def __init__(self, pd_A: PDFactor, pd_B: PDFactor, P: torch.Tensor, Q: torch.Tensor, name: str,
                 dtype: torch.dtype):
        sides = []
        for pd, F in ((pd_A, P), (pd_B, Q)):
            M = torch.linalg.solve_triangular(pd.L, F.double(), upper=False)
            n, r = M.shape
            if r <= n:  # on the range of W C Wᵀ: K = Wᵀ M E = A⁻¹ P E, weight 1
                s, E = torch.linalg.eigh(M.T @ M)
                inv = pd.inv()
                K, w = inv @ (F.to(inv.dtype) @ E.to(inv.dtype)), torch.ones_like(s)
            else:
                s, E = torch.linalg.eigh(M @ M.T)
                K, w = torch.linalg.solve_triangular(pd.L.T, E, upper=True), s
            sides.append((K, s, w, r >= n))
        (K1, s1, w1, full1), (K2, s2, w2, full2) = sides
        den = 1.0 - s2[:, None] * s1[None, :]
        lo, hi = float(den.min()), float(den.max())
        if not (full1 and full2):  # the pairs with s₁ = 0 or s₂ = 0 have 1 − s₂s₁ = 1
            lo, hi = min(lo, 1.0), max(hi, 1.0)
        if lo <= 0:
            check_condition(math.inf, name, dtype, f"not positive definite: 1 − s₂s₁ᵀ of Appendix I reaches {lo:.3g}")
        self.cond = check_condition(hi / lo, name, dtype, "max/min of 1 − s₂s₁ᵀ, Appendix I")
        self.K1, self.K2 = K1.to(dtype), K2.to(dtype)
        self.A_inv, self.B_inv = pd_A.inv().to(dtype), pd_B.inv().to(dtype)
        self.T = ((w2[:, None] * w1[None, :]) / den).to(dtype)

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        return self.B_inv @ V @ self.A_inv + chain(self.K2, chain(self.K2.T, V, self.K1) * self.T, self.K1.T)

    def dense(self) -> torch.Tensor:
        K = kron(self.K1, self.K2)
        return kron(self.A_inv, self.B_inv) + (K * self.T.T.reshape(-1)) @ K.T


class BlockDiagonalInverse(BlockOperator):
    """F̆⁻¹ with factored Tikhonov damping: ``U_k = (G_kk + γ/π I)⁻¹ V_k (Ā_kk + πγ I)⁻¹`` (Section 3.2, E.3)."""

    def __init__(self, factors: KroneckerFactors, gamma: float, layers=None, pi="trace", eigs: dict | None = None):
        """``eigs`` (from :func:`factor_eigs`) shares one eigendecomposition of the undamped factors between
        several γ (the optimizer's γ search); without it each damped factor is inverted by Cholesky."""
        self.gamma = check_gamma(gamma)
        sel = factors.select(layers)
        super().__init__(sel, [factors.shapes[k] for k in sel])
        self.pi = {k: factors.pi(k, pi) for k in sel}
        damped = factors.damped(self.gamma, pi)
        self.factors = damped
        dtype = damped.dtype
        # Damped (γ > 0) factors are inverted in the result's dtype (its κ limit keeps the inverse exact to
        # two digits or more); an undamped one in float64, where its singularity is diagnosed.
        work = dtype if self.gamma > 0 and dtype in (torch.float32, torch.float64) else torch.float64
        self.A_inv, self.G_inv = [], []
        for k in sel:
            for table, out, shift, nm in ((damped.A, self.A_inv, self.pi[k] * self.gamma, "Ā"),
                                          (damped.G, self.G_inv, self.gamma / self.pi[k], "G")):
                name = f"{nm}[{k},{k}] of layer {k} (damped, γ={self.gamma:g})"
                if eigs is not None and self.gamma > 0:
                    # the same rule and κ₁ as PDFactor's, so that both paths accept the same factors
                    e = eigs[(nm, k)]
                    s_d = e._s64 + shift
                    if float(s_d.min()) <= 0:
                        check_condition(math.inf, name, dtype, "not positive definite: smallest eigenvalue "
                                                               f"{float(s_d.min()):.3g}")
                    inv = (e._E64 / s_d) @ e._E64.T
                    M = table[k, k].double()
                    check_condition(cond1(0.5 * (M + M.T), inv), name, dtype, "1-norm")
                    out.append(inv.to(dtype))
                else:
                    out.append(PDFactor(table[k, k], name, self.gamma == 0, dtype, work).inv().to(dtype))

    def apply_block(self, i, V):
        """``G⁻¹ V Ā⁻¹``, computed in the inverse's dtype and returned in V's (a float64 inverse serves a
        float32 model, see :func:`~kfac_lens.optim.kfac.KFAC`)."""
        G_inv, A_inv = self.G_inv[i], self.A_inv[i]
        return (G_inv @ V.to(G_inv.dtype) @ A_inv).to(V.dtype)

    def apply_low_rank(self, i: int, g_cols: torch.Tensor, a_rows: torch.Tensor, scale: float) -> torch.Tensor:
        """Appendix G's low-rank trick for a gradient ``scale · g_cols a_rows`` (g_cols d×m, a_rows m×a_dim):
        ``U = scale · (G⁻¹ g_cols)(a_rows Ā⁻¹)`` costs O(d²m) instead of O(d³)."""
        G_inv, A_inv = self.G_inv[i], self.A_inv[i]
        U = (G_inv @ g_cols.to(G_inv.dtype)) @ (a_rows.to(A_inv.dtype) @ A_inv) * scale
        return U.to(g_cols.dtype)

    def dense_block(self, i):
        return kron(self.A_inv[i], self.G_inv[i])

    def dense_approximation(self, max_bytes=None) -> torch.Tensor:
        """F̆ itself: the diagonal blocks of the damped F̃ (needs no cross factors)."""
        ref = self.A_inv[0]
        check_dense_fits(self.n_params, ref.dtype, ref.device, max_bytes=max_bytes, what="dense F̆")
        return torch.block_diag(*[kron(self.factors.A[k, k], self.factors.G[k, k]) for k in self.layers])


class BlockTridiagonalInverse(BlockOperator):
    """F̂⁻¹ = Ξᵀ Λ Ξ (Section 3.3), with factored Tikhonov damping on the diagonal factors.

    ``Ψ^Ā_k = Ā[k,k+1] Ā[k+1,k+1]⁻¹``, ``Ψ^G_k = G[k,k+1] G[k+1,k+1]⁻¹``; Λ holds the inverses of the
    conditional covariances ``Σ_{k|k+1} = Ā_kk⊗G_kk − (Ψ^Ā_k Ā[k+1,k]) ⊗ (Ψ^G_k G[k+1,k])``
    (Appendix I solver, :class:`FactoredKroneckerSumInverse`) and ``Σ_last = Ā⊗G``. Cross factors are used
    undamped.

    ``neighbours="network"`` (default): F̂'s neighbours are layers k and k+1 of the network, so ``layers``
    must be consecutive. F̂ of such a sub-chain is the paper's F̂ of the whole network restricted to those
    layers (a Gaussian chain's marginal on a contiguous segment is the chain of the same neighbour blocks).
    ``neighbours="selected"``: consecutive *selected* layers are treated as neighbours (F̃₀,₂ for layers
    [0, 2]); that is not the paper's F̂ of the network, whose (0, 2) block is F̃₀,₁F̃₁,₁⁻¹F̃₁,₂.
    """

    def __init__(self, factors: KroneckerFactors, gamma: float, layers=None, pi="trace",
                 neighbours: str = "network"):
        self.gamma = check_gamma(gamma)
        sel = factors.select(layers)
        check_neighbours(sel, neighbours)
        self.neighbours = neighbours
        super().__init__(sel, [factors.shapes[k] for k in sel])
        for k, l in zip(sel[:-1], sel[1:]):
            if (k, l) not in factors.A or (k, l) not in factors.G:
                raise ValueError(
                    f"the block-tridiagonal inverse needs the cross factors A[{k},{l}] and G[{k},{l}]; "
                    "compute the factors with pairs='tridiag' or 'all'."
                )
        self.pi = {k: factors.pi(k, pi) for k in sel}
        d = factors.damped(self.gamma, pi)
        self.factors = d
        # The Cholesky factors, whitening and Appendix I eigenproblem in float64 whatever the factors' dtype
        # (the Schur complements lose definiteness in float32 at small γ); the factors' own inverses and Ψ
        # (γ > 0) in the factors' dtype, in which all results are kept.
        dtype, low = d.dtype, d
        d = d.to(torch.float64)
        strict = self.gamma == 0
        inv_dtype = dtype if self.gamma > 0 and dtype in (torch.float32, torch.float64) else torch.float64
        if inv_dtype != dtype:
            low = d
        eigA = [PDFactor(d.A[k, k], f"Ā[{k},{k}] of layer {k} (damped, γ={self.gamma:g})", strict, dtype,
                         inv_dtype=inv_dtype) for k in sel]
        eigG = [PDFactor(d.G[k, k], f"G[{k},{k}] of layer {k} (damped, γ={self.gamma:g})", strict, dtype,
                         inv_dtype=inv_dtype) for k in sel]
        self.A_inv = [e.inv() for e in eigA]
        self.G_inv = [e.inv() for e in eigG]
        self.psi_A, self.psi_G, self.sigma_inv = [], [], []
        for i, (k, l) in enumerate(zip(sel[:-1], sel[1:])):
            self.psi_A.append(low.A[k, l] @ self.A_inv[i + 1])
            self.psi_G.append(low.G[k, l] @ self.G_inv[i + 1])
            # Σ_{k|l} = Ā_kk⊗G_kk − (Ψ^Ā Ā_lk)⊗(Ψ^G G_lk), with Ψ^Ā Ā_lk = P Pᵀ, P = Ā_kl L⁻ᵀ (Ā_ll = L Lᵀ)
            P = torch.linalg.solve_triangular(eigA[i + 1].L, d.A[k, l].T, upper=False).T
            Q = torch.linalg.solve_triangular(eigG[i + 1].L, d.G[k, l].T, upper=False).T
            name = f"Σ_{{{k}|{l}}}, the Schur complement of layers {k} | {l} (γ={self.gamma:g})"
            self.sigma_inv.append(FactoredKroneckerSumInverse(eigA[i], eigG[i], P, Q, name, dtype))
        for name in ("A_inv", "G_inv", "psi_A", "psi_G"):
            setattr(self, name, [t.to(dtype) for t in getattr(self, name)])

    # u = Ξ v :  U_i = V_i − Ψ^G_i V_{i+1} Ψ^Āᵀ_i
    def _xi(self, V):
        return [V[i] - chain(self.psi_G[i], V[i + 1], self.psi_A[i].T) for i in range(len(V) - 1)] + [V[-1]]

    # u = Ξᵀ v : U_i = V_i − Ψ^Gᵀ_{i−1} V_{i−1} Ψ^Ā_{i−1}
    def _xi_t(self, V):
        return [V[0]] + [V[i] - chain(self.psi_G[i - 1].T, V[i - 1], self.psi_A[i - 1]) for i in range(1, len(V))]

    def _lambda(self, V):
        out = [self.sigma_inv[i].apply(V[i]) for i in range(len(V) - 1)]
        return out + [self.G_inv[-1] @ V[-1] @ self.A_inv[-1]]

    def apply(self, mats):
        """Ξᵀ Λ Ξ applied in the operator's dtype; results in the inputs' dtypes."""
        mats = self._check(mats)
        dtype = self.A_inv[0].dtype
        out = self._xi_t(self._lambda(self._xi([V.to(dtype) for V in mats])))
        return [U.to(V.dtype) for U, V in zip(out, mats)]

    def dense(self, max_bytes=None) -> torch.Tensor:
        """Ξᵀ Λ Ξ assembled block by block from explicit Kronecker products (independent of :meth:`apply`).

        With Ψ_i = Ψ^Ā_i ⊗ Ψ^G_i on Ξ's block super-diagonal the product is block-tridiagonal:
        block (i, i) = Λ_i + Ψ_{i−1}ᵀ Λ_{i−1} Ψ_{i−1} and block (i, i+1) = −Λ_i Ψ_i; the other blocks are 0.
        """
        ref = self.A_inv[0]
        P = self.n_params
        check_dense_fits(P, ref.dtype, ref.device, max_bytes=max_bytes, what="dense F̂⁻¹")
        sizes = [r * c for r, c in self.shapes]
        offs = block_offsets(sizes)
        lam = [s.dense() for s in self.sigma_inv] + [kron(self.A_inv[-1], self.G_inv[-1])]
        psi = [kron(pa, pg) for pa, pg in zip(self.psi_A, self.psi_G)]
        out = torch.zeros(P, P, dtype=ref.dtype, device=ref.device)
        n = len(sizes)
        for i in range(n):
            bi = slice(offs[i], offs[i + 1])
            diag = lam[i].clone()
            if i > 0:
                diag += psi[i - 1].T @ lam[i - 1] @ psi[i - 1]
            out[bi, bi] = 0.5 * (diag + diag.T)  # the off-diagonal blocks are each other's transposes already
            if i < n - 1:
                bj = slice(offs[i + 1], offs[i + 2])
                off = -lam[i] @ psi[i]
                out[bi, bj] = off
                out[bj, bi] = off.T
        return out

    def dense_approximation(self, max_bytes=None) -> torch.Tensor:
        """F̂ itself: the inverse of :meth:`dense` (it matches the damped F̃ on the tridiagonal blocks)."""
        return spd_inverse(self.dense(max_bytes=max_bytes), f"F̂⁻¹ (γ={self.gamma:g})")


def block_diagonal_inverse(factors: KroneckerFactors, gamma: float, layers=None, pi="trace"):
    """F̆⁻¹ of the damped factors (Section 3.2; factored Tikhonov, Appendix E.3). ``pi``: "trace" or a number."""
    return BlockDiagonalInverse(factors, gamma, layers, pi)


def block_tridiagonal_inverse(factors: KroneckerFactors, gamma: float, layers=None, pi="trace",
                              neighbours: str = "network"):
    """F̂⁻¹ of the damped factors (Section 3.3; factored Tikhonov, Appendix E.3). ``pi``: "trace" or a number;
    ``neighbours``: see :class:`BlockTridiagonalInverse`."""
    return BlockTridiagonalInverse(factors, gamma, layers, pi, neighbours)


def check_neighbours(layers: list[int], neighbours: str) -> None:
    """Refuse non-consecutive layers for the network's F̂ (Section 3.3) unless ``neighbours="selected"``."""
    if neighbours not in NEIGHBOURS:
        raise ValueError(f"neighbours must be one of {NEIGHBOURS}, got {neighbours!r}.")
    gaps = [(k, l) for k, l in zip(layers[:-1], layers[1:]) if l != k + 1]
    if neighbours == "network" and gaps:
        k, l = gaps[0]
        chain = "·".join([f"F̃[{k},{k + 1}]"] + [f"F̃[{m},{m}]⁻¹·F̃[{m},{m + 1}]" for m in range(k + 1, l)])
        raise ValueError(
            f"layers={layers} are not consecutive layers of the network (no layer between {k} and {l} is "
            f"selected). F̂ (Section 3.3) links layer k only to layers k ± 1 of the network, so its block "
            f"({k}, {l}) is {chain}, not F̃[{k},{l}]. Select "
            f"consecutive layers (e.g. {list(range(layers[0], layers[-1] + 1))}), or pass "
            "neighbours='selected' to treat consecutive selected layers as neighbours (a different "
            "approximation, not the paper's F̂ of the network)."
        )


def factor_eigs(factors: KroneckerFactors, layers=None) -> dict:
    """Eigendecompositions of the undamped diagonal factors, keyed ("Ā"|"G", k), for
    :class:`BlockDiagonalInverse`'s ``eigs`` (one decomposition serves every γ of a γ search)."""
    out = {}
    for k in factors.select(layers):
        out[("Ā", k)] = SymmetricEig(factors.A[k, k])
        out[("G", k)] = SymmetricEig(factors.G[k, k])
    return out


INVERSES = {"blockdiag": BlockDiagonalInverse, "tridiag": BlockTridiagonalInverse}


def make_inverse(kind: str | InverseKind, factors: KroneckerFactors, gamma: float, layers=None, pi="trace", eigs=None,
                 neighbours: str = "network"):
    """``kind``: "blockdiag" or "tridiag"; ``eigs`` (block-diagonal only) as in :class:`BlockDiagonalInverse`;
    ``neighbours`` (block-tridiagonal only) as in :class:`BlockTridiagonalInverse`."""
    kind = parse(InverseKind, kind, "inverse").value
    if neighbours not in NEIGHBOURS:
        raise ValueError(f"neighbours must be one of {NEIGHBOURS}, got {neighbours!r}.")
    if kind == "blockdiag":
        return BlockDiagonalInverse(factors, gamma, layers, pi, eigs=eigs)
    return BlockTridiagonalInverse(factors, gamma, layers, pi, neighbours)
