"""Approximations of the exact Fisher F as operators: apply (``@`` on flat θ-vectors) and ``.dense()``.

Names (:class:`Approximation`): ``"kfac"`` F̃ with every cross-layer block (Section 3), ``"kfac-blockdiag"``
F̆ (Section 3.2), ``"kfac-tridiag"`` F̂ (Section 3.3), ``"ekfac"`` eigenvalue-corrected K-FAC (George et al.
2018), ``"diagonal"`` diag(F) and ``"blockdiag-exact"`` the exact diagonal blocks F_kk. Each operator
has ``damped(gamma)`` and, where it is cheap, ``inverse()``. Damping: the Kronecker approximations use
factored Tikhonov (Appendix E.3) exactly as the inverse operators do; the others add ``γ² I`` (the
isotropic part of factored Tikhonov, see :func:`~kfac_lens.curvature.quality.compare_approximations`).

The EK-FAC scaling, diag(F) and F_kk are exact over y: by :mod:`.output_fisher` for a Linear chain, else
from the capture (square-root directions r of F_R, weight w): for layer k,
``F_kk = (w/N) Σ_n Σ_r vec(g_r āᵀ) vec(g_r āᵀ)ᵀ``, ``diag = (w/N) Σ_n (Σ_r g_r²)(ā²)ᵀ`` and, in the
eigenbases Q_A, Q_G of Ā_kk, G_kk, ``S = (w/N) Σ_n (Σ_r (Q_Gᵀ g_r)²)((Q_Aᵀ ā)²)ᵀ`` — never forming F.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import Enum

import torch

from ..capture import analysis_view, check_inputs, iter_captures, layer_uses, n_directions
from ..errors import DenseTooLargeError, SingularFactorError
from ..likelihoods import get_likelihood
from ..memory import available_bytes, check_dense_fits
from ..nets import mats_to_vec, vec_to_mats
from .blocks import kron
from ..distributed import CaseShards
from .damping import check_gamma
from .factors import KroneckerFactors
from .fisher import dense_fisher_from_captures
from .inverses import BlockDiagonalInverse, BlockTridiagonalInverse, check_neighbours
from .operators import BlockOperator, spd_inverse
from .output_fisher import capped_chunk, chain_statistics, exact_factors, supports_output_fisher


class Approximation(str, Enum):
    """The approximations of F that :func:`compare_approximations` knows, by name."""

    KFAC = "kfac"
    KFAC_BLOCKDIAG = "kfac-blockdiag"
    KFAC_TRIDIAG = "kfac-tridiag"
    EKFAC = "ekfac"
    DIAGONAL = "diagonal"
    BLOCKDIAG_EXACT = "blockdiag-exact"

    def __str__(self) -> str:
        return self.value


APPROXIMATIONS = tuple(a.value for a in Approximation)


def parse_approximations(approximations, name: str = "approximations") -> list[Approximation]:
    """A name, an :class:`Approximation` or a list of them as a list without repeats; ValueError otherwise."""
    items = [approximations] if isinstance(approximations, str) else list(approximations)
    out: list[Approximation] = []
    for a in items:
        try:
            parsed = Approximation(a.lower() if isinstance(a, str) else a)
        except ValueError:
            raise ValueError(f"{name}: unknown approximation {a!r}; choose from {list(APPROXIMATIONS)} "
                             f"(e.g. {name}=['kfac-blockdiag', 'ekfac']).") from None
        if parsed not in out:
            out.append(parsed)
    if not out:
        raise ValueError(f"{name} is empty; name at least one of {list(APPROXIMATIONS)}.")
    return out


class CurvatureApproximation(BlockOperator):
    """Base class: an approximation of F on ``layers``, damped by ``gamma`` (0: undamped)."""

    kind: Approximation

    def damped(self, gamma: float) -> CurvatureApproximation:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self) -> BlockOperator | None:
        """A cheap operator for this (damped) approximation's inverse, or None when there is none."""
        return None


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
        self.base, self.gamma, self.pi = factors, check_gamma(gamma), pi
        damped = factors.damped(self.gamma, pi) if self.gamma > 0 else factors
        missing = [(k, l) for i, k in enumerate(sel) for l in sel[i + 1:] if (k, l) not in factors.A]
        if missing:
            raise ValueError(f"'kfac' (F̃ with every cross-layer block) needs the factors of every pair; {missing} "
                             "are missing. Compute the factors with pairs='all'.")
        A, G = _tables(damped, sel, [(k, l) for i, k in enumerate(sel) for l in sel[i:]])
        super().__init__(A, G, sel, [factors.shapes[k] for k in sel])

    def damped(self, gamma):
        return KroneckerFisher(self.base, gamma, self.pi, self.layers)


class BlockDiagonalKronecker(KroneckerPairs):
    """F̆ (Section 3.2): the diagonal blocks ``Ā_kk ⊗ G_kk``; inverse :class:`BlockDiagonalInverse`."""

    kind = Approximation.KFAC_BLOCKDIAG

    def __init__(self, factors: KroneckerFactors, gamma: float = 0.0, pi="trace", layers=None):
        sel = factors.select(layers)
        self.base, self.gamma, self.pi = factors, check_gamma(gamma), pi
        damped = factors.damped(self.gamma, pi) if self.gamma > 0 else factors
        A, G = _tables(damped, sel, [(k, k) for k in sel])
        super().__init__(A, G, sel, [factors.shapes[k] for k in sel])

    def damped(self, gamma):
        return BlockDiagonalKronecker(self.base, gamma, self.pi, self.layers)

    def inverse(self):
        return BlockDiagonalInverse(self.base, self.gamma, self.layers, self.pi)


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


# ----------------------------------------------------------------------------- building them
def _eigenbasis(M: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigh(0.5 * (M + M.T))[1]


def check_capture_memory(view, layers, n_cases: int, max_bytes: int | None = None) -> None:
    """Refuse (DenseTooLargeError) to keep the captures "blockdiag-exact" needs — R·N·Σd_out + N·Σa_dim
    numbers, R = the outputs, times the uses per case of each layer — when above ``max_bytes`` (default: half
    the free memory)."""
    R = view.output_dim
    need = 8 * n_cases * sum((R * view.layers[k].d_out + view.layers[k].a_dim) * (view.layers[k].uses or 1)
                             for k in layers)
    limit = available_bytes(view.device) // 2 if max_bytes is None else int(max_bytes)
    if need > limit:
        raise DenseTooLargeError(
            f"'blockdiag-exact' keeps the captured per-case gradients, about {need / 2**30:.2f} GiB here, "
            f"above the {limit / 2**30:.2f} GiB allowed. Drop it from approximations, restrict layers=, "
            "or use fewer cases.")


def build_approximations(model, X, likelihood, approximations=APPROXIMATIONS, layers=None, pi="trace",
                         neighbours: str = "network", chunk_size: int | None = None,
                         factors: KroneckerFactors | None = None, max_capture_bytes: int | None = None,
                         distributed=None, diagonal=None) -> dict[Approximation, CurvatureApproximation]:
    """The undamped operators of ``approximations`` for ``model`` on X, in float64, sharing one set of
    Kronecker factors (exact expectation; pass ``factors`` to reuse some, ``diagonal`` diag(F) per layer) and
    one more pass for diag(F) and EK-FAC: over the output Fisher for a Linear chain (:mod:`.output_fisher`),
    else over the captures.

    "blockdiag-exact" keeps the captures: see :func:`check_capture_memory` (``max_capture_bytes``).
    ``distributed``: X is this rank's shard and every operator is that of all ranks' cases; "blockdiag-exact"
    (which keeps this rank's per-case captures) is not available then."""
    names = parse_approximations(approximations)
    shards = CaseShards(distributed)
    if shards.active and Approximation.BLOCKDIAG_EXACT in names:
        raise ValueError("approximations: 'blockdiag-exact' keeps every case's captures in one process and is not "
                         "available with distributed=; drop it, or compute it on one process.")
    lik = get_likelihood(likelihood)
    view = analysis_view(model, torch.float64)
    sel = view.select(layers)
    X, _ = shards.run(lambda: check_inputs(view, X, likelihood=lik), "checking X")
    if Approximation.BLOCKDIAG_EXACT in names:
        check_capture_memory(view, sel, X.shape[0], max_capture_bytes)
    if factors is None:
        factors, diagonal = exact_factors(view, X, lik, sel, factor_pairs(view, sel, names, X), chunk_size=chunk_size,
                                          diagonal=Approximation.DIAGONAL in names, distributed=distributed)
    shapes = [view.layers[k].shape for k in sel]
    ops: dict[Approximation, CurvatureApproximation] = {}
    if diagonal is not None and Approximation.DIAGONAL in names:
        ops[Approximation.DIAGONAL] = DiagonalFisher(list(diagonal), sel, shapes)
    makers = {Approximation.KFAC: lambda: KroneckerFisher(factors, 0.0, pi, sel),
              Approximation.KFAC_BLOCKDIAG: lambda: BlockDiagonalKronecker(factors, 0.0, pi, sel),
              Approximation.KFAC_TRIDIAG: lambda: BlockTridiagonalKronecker(factors, 0.0, pi, sel, neighbours)}
    for name in names:
        if name in makers:
            ops[name] = makers[name]()
    wanted = {Approximation.EKFAC, Approximation.DIAGONAL, Approximation.BLOCKDIAG_EXACT} & set(names) - set(ops)
    keep = Approximation.BLOCKDIAG_EXACT in wanted
    eig = {k: (_eigenbasis(factors.A[k, k]), _eigenbasis(factors.G[k, k])) for k in sel} if wanted else {}
    if wanted and not keep and supports_output_fisher(view):  # one pass over the output Fisher, no captures
        st = chain_statistics(view, X, lik, sel, pairs=None, diagonal=Approximation.DIAGONAL in wanted,
                              eigenbases=eig if Approximation.EKFAC in wanted else None, shards=shards if
                              shards.active else None, chunk_size=capped_chunk(view, lik, sel, chunk_size))
        diag, scal, N = dict(zip(sel, st.diagonal or sel)), dict(zip(sel, st.ekfac or sel)), 1
    elif wanted:
        diag = {k: 0.0 for k in sel}
        scal = {k: 0.0 for k in sel}
        kept, uses = [], layer_uses(view, X)
        extra = n_directions(view, "exact", 1) * max(view.layers[k].n_params for k in sel) \
            if any(uses[k] > 1 for k in sel) else 0

        def accumulate():
            for cap in iter_captures(view, X, lik, sel, "exact", chunk_size=chunk_size, extra_per_case=extra,
                                     desc="exact blocks"):
                for k in sel:
                    a, g = cap.a[k], cap.g[k]
                    if a.ndim == 3:
                        _accumulate_uses(k, a, g, cap.weight, wanted, eig, diag, scal)
                        continue
                    if Approximation.DIAGONAL in wanted:
                        diag[k] = diag[k] + g.square().sum(0).T @ a.square() * cap.weight
                    if Approximation.EKFAC in wanted:
                        QA, QG = eig[k]
                        scal[k] = scal[k] + (g @ QG).square().sum(0).T @ (a @ QA).square() * cap.weight
                if keep:
                    kept.append(cap)

        shards.run(accumulate, "the exact diagonal and eigenbasis sums on this rank's cases")
        sums = ([diag[k] for k in sel] if Approximation.DIAGONAL in wanted else []) + \
            ([scal[k] for k in sel] if Approximation.EKFAC in wanted else [])
        shards.sum_(*sums)
        N = shards.global_count(X.shape[0], like=X)
        if keep:
            ops[Approximation.BLOCKDIAG_EXACT] = ExactBlockDiagonal(kept, view, N, sel)
    if Approximation.DIAGONAL in wanted:
        ops[Approximation.DIAGONAL] = DiagonalFisher([diag[k] / N for k in sel], sel, shapes)
    if Approximation.EKFAC in wanted:
        ops[Approximation.EKFAC] = EigenvalueCorrectedKronecker(
            [eig[k][0] for k in sel], [eig[k][1] for k in sel], [scal[k] / N for k in sel], sel, shapes)
    return {name: ops[name] for name in names}


def _accumulate_uses(k, a, g, weight, wanted, eig, diag, scal) -> None:
    """diag(F) and the EK-FAC scaling of a layer with U uses per case, from its per-case gradients
    Σ_u g_{r,u} ā_uᵀ (no Kronecker shortcut; docs/math.md §1)."""
    if Approximation.DIAGONAL in wanted:
        diag[k] = diag[k] + torch.einsum("rnuo,nua->rnoa", g, a).square().sum((0, 1)) * weight
    if Approximation.EKFAC in wanted:
        QA, QG = eig[k]
        scal[k] = scal[k] + torch.einsum("rnuo,nua->rnoa", g @ QG, a @ QA).square().sum((0, 1)) * weight


def factor_pairs(view, layers: Sequence[int], names, X=None) -> str:
    """The Kronecker factor pairs that ``names`` need: "all" for "kfac", else "tridiag" (also the reference
    preconditioner's), or "diag" when neighbouring layers have different numbers of uses per case, whose
    KFAC-expand cross factors are undefined (docs/math.md §3). A ``ValueError`` names the pair when "kfac" or
    "kfac-tridiag" needs such factors."""
    uses = layer_uses(view, X)
    names = parse_approximations(names)
    every = [(k, l) for i, k in enumerate(layers) for l in layers[i + 1:]]
    neighbours = list(zip(layers[:-1], layers[1:]))
    for name, pairs in ((Approximation.KFAC, every), (Approximation.KFAC_TRIDIAG, neighbours)):
        bad = [(k, l) for k, l in pairs if uses[k] != uses[l]]
        if name in names and bad:
            (k, l), Lk, Ll = bad[0], view.layers[bad[0][0]], view.layers[bad[0][1]]
            raise ValueError(
                f"approximations: '{str(name)}' needs the cross factors A[{k}, {l}] of layers '{Lk.name}' and "
                f"'{Ll.name}', which have {uses[k]} and {uses[l]} uses per case (a convolution's positions, tied or "
                "sequence layers); KFAC-expand defines cross factors only between layers with equal uses. Use "
                "'kfac-blockdiag', 'ekfac', 'diagonal' or 'blockdiag-exact' for this network, or restrict layers= "
                "to layers with equal uses.")
    if Approximation.KFAC in names:
        return "all"
    return "diag" if any(uses[k] != uses[l] for k, l in neighbours) else "tridiag"


def approximation_operator(name, model, X, likelihood, gamma: float = 0.0, layers=None, pi="trace",
                           neighbours: str = "network", chunk_size: int | None = None) -> CurvatureApproximation:
    """One approximation (by name) of the Fisher of ``model`` on X, damped by ``gamma`` (see module docstring)."""
    (kind,) = parse_approximations([name], "name")
    op = build_approximations(model, X, likelihood, [kind], layers, pi, neighbours, chunk_size)[kind]
    gamma = check_gamma(gamma)
    return op.damped(gamma) if gamma > 0 else op


def damping_summary(kind: Approximation) -> str:
    """How γ damps ``kind`` (for tables and messages)."""
    if kind in (Approximation.KFAC, Approximation.KFAC_BLOCKDIAG, Approximation.KFAC_TRIDIAG):
        return "factored Tikhonov (Ā + πγI, G + γ/π I)"
    return "+ γ² I"

