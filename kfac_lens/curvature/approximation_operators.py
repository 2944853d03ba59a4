"""The approximations of the exact Fisher F as operators: apply (``@`` on flat θ-vectors), ``.dense()``,
``damped(gamma)`` and, where it is cheap, ``inverse()``.

- :class:`KroneckerFisher`: F̃, every block ``Ā_kl ⊗ G_kl`` (K-FAC, Martens & Grosse 2015, Section 3);
- :class:`BlockDiagonalKronecker`: F̆, its diagonal blocks (Section 3.2), and :class:`ReduceBlockDiagonalKronecker`,
  F̆ from KFAC-reduce factors for layers used several times per case (Eschenhagen et al. 2023);
- :class:`BlockTridiagonalKronecker`: F̂, the Gaussian chain that agrees with F̃ on the tridiagonal blocks
  (Section 3.3);
- :class:`EigenvalueCorrectedKronecker`: EK-FAC (George et al. 2018), F̆'s Kronecker eigenbasis with the
  exact second moments of the projected gradients as eigenvalues;
- :class:`DiagonalFisher` diag(F) and :class:`ExactBlockDiagonal` the exact diagonal blocks F_kk.

The Kronecker operators are damped by factored Tikhonov (Appendix E.3), the others by ``+ γ² I``. The
names are in :mod:`~kfac_lens.curvature.approximation_names`; the operators of a model are built by
:func:`~kfac_lens.curvature.approximations.build_approximations`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch

from ..errors import SingularFactorError
from ..memory import check_dense_fits
from ..nets import mats_to_vec, vec_to_mats
from .approximation_names import Approximation
from .blocks import kron
from .damping import check_gamma
from .factors import KroneckerFactors
from .fisher import dense_fisher_from_captures
from .inverses import BlockDiagonalInverse, BlockTridiagonalInverse, check_neighbours
from .operators import BlockOperator, spd_inverse


class CurvatureApproximation(BlockOperator):
    """Base class: an approximation of F on ``layers``, damped by ``gamma`` (0: undamped)."""

    kind: Approximation

    def damped(self, gamma: float) -> CurvatureApproximation:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self) -> BlockOperator | None:
        """A cheap operator for this (damped) approximation's inverse, or None when there is none."""
        return None

    @property
    def dtype(self) -> torch.dtype:
        return self._ref().dtype

    def astype(self, dtype: torch.dtype) -> CurvatureApproximation:
        """A copy whose tensors (also those in lists, tuples and dicts) are cast to ``dtype``, for cheaper
        products (float32 about halves their time on a CPU); what it was built from (``base``) is shared."""
        if dtype == self.dtype:
            return self
        out = copy.copy(self)
        for name, value in vars(self).items():
            setattr(out, name, _cast(value, dtype))
        return out


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------- Kronecker approximations
def _kron_dense(A: dict, G: dict, layers: Sequence[int], shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Block (k, l) = kron(A[k, l], G[k, l]), zero where the pair is missing."""
    ref = next(iter(A.values()))
    rows = []
    for k, (dk, ak) in zip(layers, shapes):
        row = []
        for l, (dl, al) in zip(layers, shapes):
            if (k, l) in A:
                row.append(kron(A[k, l], G[k, l]))
            else:
                row.append(torch.zeros(dk * ak, dl * al, dtype=ref.dtype, device=ref.device))
        rows.append(torch.cat(row, dim=1))
    return torch.cat(rows, dim=0)


class KroneckerPairs(CurvatureApproximation):
    """Σ over stored pairs of ``kron(A[k, l], G[k, l])``: ``U_k = Σ_l G[k, l] V_l A[k, l]ᵀ`` (cheaper order first)."""

    def __init__(self, A: dict, G: dict, layers: Sequence[int], shapes: Sequence[tuple[int, int]]):
        super().__init__(layers, shapes)
        self.A, self.G = A, G

    def _init_from_factors(self, factors: KroneckerFactors, gamma: float, pi, sel: Sequence[int], pairs) -> None:
        """Keep ``base``, ``gamma``, ``pi`` and the ``pairs`` of the factors, damped by factored Tikhonov γ."""
        self.base, self.gamma, self.pi = factors, check_gamma(gamma), pi
        damped = factors.damped(self.gamma, pi) if self.gamma > 0 else factors
        A, G = _tables(damped, sel, pairs)
        KroneckerPairs.__init__(self, A, G, sel, [factors.shapes[k] for k in sel])

    def apply(self, mats):
        mats = self._check(mats)
        out = []
        for k in self.layers:
            acc = None
            for l, V in zip(self.layers, mats):
                if (k, l) in self.A:
                    (dk, dl), (ak, al) = self.G[k, l].shape, self.A[k, l].shape
                    G, A = self.G[k, l], self.A[k, l]
                    term = (G @ V) @ A.T if dk * al * (dl + ak) <= dl * ak * (al + dk) else G @ (V @ A.T)
                    acc = term if acc is None else acc + term
            out.append(acc)
        return out

    def dense(self, max_bytes=None) -> torch.Tensor:
        ref = next(iter(self.A.values()))
        check_dense_fits(self.n_params, ref.dtype, ref.device, max_bytes=max_bytes, what=f"dense {self.kind}")
        return _kron_dense(self.A, self.G, self.layers, self.shapes)


def _tables(factors: KroneckerFactors, layers: Sequence[int], pairs: Iterable[tuple[int, int]]):
    A = {(k, l): factors.A[k, l] for k, l in pairs}
    G = {(k, l): factors.G[k, l] for k, l in pairs}
    A.update({(l, k): t.T for (k, l), t in list(A.items()) if k != l})
    G.update({(l, k): t.T for (k, l), t in list(G.items()) if k != l})
    return A, G


class KroneckerFisher(KroneckerPairs):
    """F̃ (Section 3): every block ``kron(Ā[k, l], G[k, l])``; damped by factored Tikhonov (Appendix E.3)."""

    kind = Approximation.KFAC

    def __init__(self, factors: KroneckerFactors, gamma: float = 0.0, pi="trace", layers=None):
        sel = factors.select(layers)
        missing = [(k, l) for i, k in enumerate(sel) for l in sel[i + 1:] if (k, l) not in factors.A]
        if missing:
            raise ValueError(f"'kfac' (F̃ with every cross-layer block) needs the factors of every pair; {missing} "
                             "are missing. Compute the factors with pairs='all'.")
        self._init_from_factors(factors, gamma, pi, sel, [(k, l) for i, k in enumerate(sel) for l in sel[i:]])

    def damped(self, gamma):
        return KroneckerFisher(self.base, gamma, self.pi, self.layers)


class BlockDiagonalKronecker(KroneckerPairs):
    """F̆ (Section 3.2): the diagonal blocks ``Ā_kk ⊗ G_kk``; inverse :class:`BlockDiagonalInverse`."""

    kind = Approximation.KFAC_BLOCKDIAG

    def __init__(self, factors: KroneckerFactors, gamma: float = 0.0, pi="trace", layers=None):
        sel = factors.select(layers)
        self._init_from_factors(factors, gamma, pi, sel, [(k, k) for k in sel])

    def damped(self, gamma):
        return type(self)(self.base, gamma, self.pi, self.layers)  # (also the KFAC-reduce subclass)

    def inverse(self):
        return BlockDiagonalInverse(self.base, self.gamma, self.layers, self.pi)


class ReduceBlockDiagonalKronecker(BlockDiagonalKronecker):
    """F̆ (Section 3.2) from KFAC-reduce factors (Eschenhagen et al. 2023): for a layer with U uses per case,
    ``A = E_n[â âᵀ]`` with ``â = (1/U) Σ_u ā_u`` and ``G = E_n[w Σ_r (Σ_u g_u)(Σ_u g_u)ᵀ]`` (docs/math.md §3);
    for a layer used once per case it is :class:`BlockDiagonalKronecker`. ``factors`` must be reduce factors
    (:func:`~kfac_lens.curvature.factors.compute_factors` with ``approx="reduce"``); damped by factored
    Tikhonov, inverse :class:`BlockDiagonalInverse`."""

    kind = Approximation.KFAC_REDUCE


class BlockTridiagonalKronecker(KroneckerPairs):
    """F̂ (Section 3.3) itself, every block a Kronecker product.

    F̂ is the Gaussian chain that agrees with the (damped) F̃ on the tridiagonal blocks, so for i < j
    ``F̂_ij = F̃_{i,i+1} F̃_{i+1,i+1}⁺ F̃_{i+1,i+2} ⋯ F̃_{j−1,j}`` and, as ``(A⊗G)(B⊗H) = AB⊗GH`` and
    ``(A⊗G)⁺ = A⁺⊗G⁺``, ``F̂_ij = kron(Â_ij, Ĝ_ij)`` with ``Â_ij = Ā_{i,i+1} Ā_{i+1,i+1}⁺ ⋯ Ā_{j−1,j}`` (and Ĝ
    alike). ⁺ is the inverse when γ > 0 and the Moore–Penrose pseudo-inverse at γ = 0 (the γ → 0 limit; the
    last layer's G is singular for a categorical output). Its inverse is :class:`BlockTridiagonalInverse`.
    """

    kind = Approximation.KFAC_TRIDIAG

    def __init__(self, factors: KroneckerFactors, gamma: float = 0.0, pi="trace", layers=None,
                 neighbours: str = "network"):
        sel = factors.select(layers)
        check_neighbours(sel, neighbours)
        self.base, self.gamma, self.pi, self.neighbours = factors, check_gamma(gamma), pi, neighbours
        d = factors.damped(self.gamma, pi) if self.gamma > 0 else factors
        A, G = {}, {}
        for table, out in ((d.A, A), (d.G, G)):
            pinv = [torch.linalg.pinv(table[k, k], hermitian=True) for k in sel]
            for i, k in enumerate(sel):
                out[k, k] = table[k, k]
                for j in range(i + 1, len(sel)):
                    step = table[sel[j - 1], sel[j]]
                    out[k, sel[j]] = step if j == i + 1 else out[k, sel[j - 1]] @ pinv[j - 1] @ step
                    out[sel[j], k] = out[k, sel[j]].T
        super().__init__(A, G, sel, [factors.shapes[k] for k in sel])

    def damped(self, gamma):
        return BlockTridiagonalKronecker(self.base, gamma, self.pi, self.layers, self.neighbours)

    def inverse(self):
        return BlockTridiagonalInverse(self.base, self.gamma, self.layers, self.pi, self.neighbours)


# ----------------------------------------------------------------------------- diagonal-in-a-basis operators
def _refuse_zero_scaling(scalings: Sequence[torch.Tensor], what: str) -> None:
    low = min(float(s.min()) for s in scalings)
    if not low > 0:
        raise SingularFactorError(f"{what} is singular (smallest diagonal entry {low:.3g}), so it has no inverse "
                                  "at this damping. Damp it: pass gamma > 0 (it adds γ² to every entry).")


class EigenbasisScaling(BlockOperator):
    """Per block ``U = Q_G [(Q_Gᵀ V Q_A) ⊙ S] Q_Aᵀ``, i.e. ``(Q_A⊗Q_G) diag(vec S) (Q_A⊗Q_G)ᵀ``."""

    def __init__(self, QA, QG, S, layers, shapes):
        super().__init__(layers, shapes)
        self.QA, self.QG, self.S = list(QA), list(QG), list(S)

    def apply_block(self, i, V):
        QA, QG = self.QA[i], self.QG[i]
        return QG @ ((QG.T @ V @ QA) * self.S[i]) @ QA.T

    def dense_block(self, i):
        K = kron(self.QA[i], self.QG[i])
        return (K * mats_to_vec([self.S[i]])) @ K.T


class EigenvalueCorrectedKronecker(EigenbasisScaling, CurvatureApproximation):
    """EK-FAC (George et al. 2018), block-diagonal: the Kronecker eigenbasis ``Q_A ⊗ Q_G`` of each F̆ block
    with the exact second moments ``S`` of the projected per-case gradients (exact expectation over y) as
    its eigenvalues — the best Frobenius fit to F_kk among matrices diagonal in that basis. Damped: S + γ²."""

    kind = Approximation.EKFAC

    def __init__(self, QA, QG, S, layers, shapes, gamma: float = 0.0):
        self.gamma = check_gamma(gamma)
        self.undamped = list(S)
        super().__init__(QA, QG, [s + self.gamma ** 2 for s in S], layers, shapes)

    def damped(self, gamma):
        return EigenvalueCorrectedKronecker(self.QA, self.QG, self.undamped, self.layers, self.shapes, gamma)

    def inverse(self):
        _refuse_zero_scaling(self.S, f"EK-FAC (γ = {self.gamma:g})")
        return EigenbasisScaling(self.QA, self.QG, [1.0 / s for s in self.S], self.layers, self.shapes)


class Scaling(BlockOperator):
    """Entrywise ``U_k = V_k ⊙ D_k``: the diagonal matrix diag(vec D)."""

    def __init__(self, D, layers, shapes):
        super().__init__(layers, shapes)
        self.D = list(D)

    def apply_block(self, i, V):
        return V * self.D[i]

    def dense_block(self, i):
        return torch.diag(mats_to_vec([self.D[i]]))


class DiagonalFisher(Scaling, CurvatureApproximation):
    """diag(F), the exact Fisher's diagonal, from the capture: ``(w/N) Σ_n (Σ_r g_r²)(ā²)ᵀ``. Damped: + γ²."""

    kind = Approximation.DIAGONAL

    def __init__(self, D, layers, shapes, gamma: float = 0.0):
        self.gamma = check_gamma(gamma)
        self.undamped = list(D)
        super().__init__([d + self.gamma ** 2 for d in D], layers, shapes)

    def damped(self, gamma):
        return DiagonalFisher(self.undamped, self.layers, self.shapes, gamma)

    def inverse(self):
        _refuse_zero_scaling(self.D, f"diag(F) (γ = {self.gamma:g})")
        return Scaling([1.0 / d for d in self.D], self.layers, self.shapes)


class DenseBlocks(BlockOperator):
    """Block-diagonal operator from dense P_k × P_k blocks (paper layout)."""

    def __init__(self, blocks, layers, shapes):
        super().__init__(layers, shapes)
        self.blocks = list(blocks)

    def apply_block(self, i, V):
        out = mats_to_vec([V]) @ self.blocks[i].T
        return vec_to_mats(out, [self.shapes[i]])[0]

    def dense_block(self, i):
        return self.blocks[i]


class ExactBlockDiagonal(CurvatureApproximation):
    """The exact diagonal blocks F_kk (+ γ² I), applied from stored captures without forming them:
    ``F_kk V = (w/N) Σ_n Σ_r (g_rᵀ V ā) g_r āᵀ``. ``inverse()`` by Cholesky when every block has at most
    ``max_block`` parameters, else None (solve iteratively)."""

    kind = Approximation.BLOCKDIAG_EXACT

    def __init__(self, captures, view, n_cases: int, layers, gamma: float = 0.0, max_block: int = 4096):
        super().__init__(layers, [view.layers[k].shape for k in layers])
        self.captures, self.view, self.n_cases = captures, view, n_cases
        self.gamma, self.max_block = check_gamma(gamma), max_block

    def damped(self, gamma):
        return ExactBlockDiagonal(self.captures, self.view, self.n_cases, self.layers, gamma, self.max_block)

    @property
    def dtype(self) -> torch.dtype:
        return self.view.dtype

    def astype(self, dtype: torch.dtype) -> ExactBlockDiagonal:
        """Itself: its products read the stored captures in their own dtype."""
        return self

    def apply_block(self, i, V):
        k = self.layers[i]
        out = self.gamma ** 2 * V
        for cap in self.captures:
            a, g = cap.a[k], cap.g[k]
            if a.ndim == 3:  # U uses per case: the per-case gradient is Σ_u g_u ā_uᵀ (docs/math.md §1)
                s = torch.einsum("rnuo,...oa,nua->...rn", g, V, a)
                out = out + torch.einsum("...rn,rnuo,nua->...oa", s, g, a) * (cap.weight / self.n_cases)
                continue
            s = torch.einsum("rnd,...nd->...rn", g, a @ V.transpose(-1, -2))  # g_rᵀ V ā per (r, n)
            out = out + torch.einsum("...rn,rnd->...nd", s, g).transpose(-1, -2) @ a * (cap.weight / self.n_cases)
        return out

    def dense(self, max_bytes=None) -> torch.Tensor:
        check_dense_fits(self.n_params, self.view.dtype, self.view.device, max_bytes=max_bytes,
                         what="dense exact block diagonal")
        return torch.block_diag(*[self.dense_block(i) for i in range(len(self.layers))])

    def dense_block(self, i):
        k = self.layers[i]
        P = self.shapes[i][0] * self.shapes[i][1]
        B = torch.zeros(P, P, dtype=self.view.dtype, device=self.view.device)
        dense_fisher_from_captures(self.captures, self.view, [k], self.n_cases, B)
        return B + self.gamma ** 2 * torch.eye(P, dtype=B.dtype, device=B.device)

    def inverse(self):
        if max(r * c for r, c in self.shapes) > self.max_block:
            return None
        blocks = []
        for i, k in enumerate(self.layers):
            blocks.append(spd_inverse(self.dense_block(i), f"the exact block F_{k}{k} + γ²I (γ = {self.gamma:g})",
                                      "Pass gamma > 0."))
        return DenseBlocks(blocks, self.layers, self.shapes)
