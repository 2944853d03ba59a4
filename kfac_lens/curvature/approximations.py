"""Building the approximations of the exact Fisher F of a model as operators (apply, ``@`` on flat θ-vectors,
and ``.dense()``; the classes are in :mod:`~kfac_lens.curvature.approximation_operators`, the names in
:mod:`~kfac_lens.curvature.approximation_names`; both are importable from here too).

Names (:class:`Approximation`): ``"kfac"`` F̃ with every cross-layer block (Section 3), ``"kfac-blockdiag"``
F̆ (Section 3.2), ``"kfac-tridiag"`` F̂ (Section 3.3), ``"ekfac"`` eigenvalue-corrected K-FAC (George et al.
2018), ``"diagonal"`` diag(F), ``"blockdiag-exact"`` the exact diagonal blocks F_kk and ``"kfac-reduce"`` F̆
from KFAC-reduce factors (Eschenhagen et al. 2023; F̆ itself where every layer is used once per case). Each operator
has ``damped(gamma)`` and, where it is cheap, ``inverse()``. Damping: the Kronecker approximations use
factored Tikhonov (Appendix E.3) exactly as the inverse operators do; the others add ``γ² I`` (the
isotropic part of factored Tikhonov, see :func:`~kfac_lens.curvature.quality.compare_approximations`).

The EK-FAC scaling, diag(F) and F_kk are exact over y: by :mod:`.output_fisher` for a Linear chain where
that is cheaper (:func:`~kfac_lens.curvature.output_fisher.output_fisher_is_cheaper`), else from the capture
(square-root directions r of F_R, weight w): for layer k,
``F_kk = (w/N) Σ_n Σ_r vec(g_r āᵀ) vec(g_r āᵀ)ᵀ``, ``diag = (w/N) Σ_n (Σ_r g_r²)(ā²)ᵀ`` and, in the
eigenbases Q_A, Q_G of Ā_kk, G_kk, ``S = (w/N) Σ_n (Σ_r (Q_Gᵀ g_r)²)((Q_Aᵀ ā)²)ᵀ`` — never forming F.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..capture import analysis_view, check_inputs, iter_captures, layer_uses, n_directions
from ..distributed import CaseShards
from ..errors import DenseTooLargeError
from ..likelihoods import get_likelihood
from ..memory import available_bytes
from .approximation_names import APPROXIMATIONS, Approximation, parse_approximations
from .approximation_operators import (
    BlockDiagonalKronecker,
    BlockTridiagonalKronecker,
    CurvatureApproximation,
    DiagonalFisher,
    EigenvalueCorrectedKronecker,
    ExactBlockDiagonal,
    KroneckerFisher,
    ReduceBlockDiagonalKronecker,
)
# re-exported: these operators were defined here before approximation_operators was split off
from .approximation_operators import DenseBlocks, EigenbasisScaling, KroneckerPairs, Scaling  # noqa: F401
from .damping import check_gamma
from .factors import KroneckerFactors, compute_factors
from .output_fisher import capped_chunk, chain_statistics, exact_factors, output_fisher_is_cheaper


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
                         distributed=None, diagonal=None, pass_dtype: torch.dtype = torch.float64,
                         ) -> dict[Approximation, CurvatureApproximation]:
    """The undamped operators of ``approximations`` for ``model`` on X, in float64, sharing one set of
    Kronecker factors (exact expectation; pass ``factors`` to reuse some, ``diagonal`` diag(F) per layer) and
    one more pass for diag(F) and EK-FAC: over the output Fisher for a Linear chain where that is cheaper
    (:func:`~kfac_lens.curvature.output_fisher.output_fisher_is_cheaper`), else over the captures.
    ``pass_dtype``: the dtype of that output-Fisher pass (float32 about halves its time on a CPU, at ~1e-7
    relative rounding of its sums; the operators stay float64).

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
    if Approximation.KFAC_REDUCE in names:
        ops[Approximation.KFAC_REDUCE] = ReduceBlockDiagonalKronecker(
            reduce_factors(view, X, lik, sel, factors, chunk_size, shards), 0.0, pi, sel)
    wanted = {Approximation.EKFAC, Approximation.DIAGONAL, Approximation.BLOCKDIAG_EXACT} & set(names) - set(ops)
    keep = Approximation.BLOCKDIAG_EXACT in wanted
    eig = {k: (_eigenbasis(factors.A[k, k]), _eigenbasis(factors.G[k, k])) for k in sel} if wanted else {}
    if wanted and not keep and output_fisher_is_cheaper(view, sel, ekfac=Approximation.EKFAC in wanted):
        # one pass over the output Fisher, no captures
        pview = view.astype(pass_dtype)
        st = chain_statistics(pview, X.to(pass_dtype), lik, sel, pairs=None,
                              diagonal=Approximation.DIAGONAL in wanted,
                              eigenbases={k: (QA.to(pass_dtype), QG.to(pass_dtype)) for k, (QA, QG) in eig.items()}
                              if Approximation.EKFAC in wanted else None, shards=shards if
                              shards.active else None, chunk_size=capped_chunk(pview, lik, sel, chunk_size))
        diag = {k: t.double() for k, t in zip(sel, st.diagonal or [])}
        scal, N = {k: t.double() for k, t in zip(sel, st.ekfac or [])}, 1
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


def reduce_factors(view, X, likelihood, layers: Sequence[int], factors: KroneckerFactors, chunk_size=None,
                   shards: CaseShards | None = None) -> KroneckerFactors:
    """The KFAC-reduce factors (Eschenhagen et al. 2023) of "kfac-reduce", exact over y: ``factors`` itself when
    every layer in ``layers`` is used once per case (reduce and expand then coincide), else the diagonal pairs
    computed with ``approx="reduce"`` over the captures (``shards``: every rank's cases)."""
    uses = layer_uses(view, X)
    if all(uses[k] == 1 for k in layers):
        return factors
    active = shards is not None and shards.active
    return compute_factors(view, X, likelihood, list(layers), "exact", pairs="diag", chunk_size=chunk_size,
                           approx="reduce", shards=shards if active else None)


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
                "'kfac-blockdiag', 'kfac-reduce', 'ekfac', 'diagonal' or 'blockdiag-exact' for this network, or "
                "restrict layers= to layers with equal uses.")
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
    if kind in (Approximation.KFAC, Approximation.KFAC_BLOCKDIAG, Approximation.KFAC_TRIDIAG,
                Approximation.KFAC_REDUCE):
        return "factored Tikhonov (Ā + πγI, G + γ/π I)"
    return "+ γ² I"
