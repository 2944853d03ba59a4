"""Exact-expectation curvature statistics of a Linear chain by backpropagating the output Fisher.

For an ``nn.Sequential`` of ``nn.Linear`` layers and elementwise activations (the paper's chain, Section 2),
the expectation over y of ``g_k g_lᵀ`` is a matrix that can be propagated backwards instead of the R
square-root directions of F_R (the idea of BackPACK's KFLR; Botev et al. 2017 for the Gauss-Newton). With
``D_k = diag(φ'_k)`` the derivative between layer k's output s_k and layer k+1's input, per case:

- ``M_L = D_L F_R D_L`` at the last layer (D_L: any activations after it; F_R = diag(p(1−p)) for Bernoulli);
- ``M_k = D_k W_{k+1}ᵀ M_{k+1} W_{k+1} D_k`` = E_y[g_k g_kᵀ] (docs/math.md §2);
- ``C_{k,l} = D_k W_{k+1}ᵀ C_{k+1,l}``, ``C_{l,l} = M_l``: E_y[g_k g_lᵀ] for k < l (kept transposed, one
  GEMM per step).

Then ``G[k, l] = E_n[C_{k,l}]`` (Section 3, exact expectation), ``diag(F)_k = E_n[diag(M_k) (ā_k²)ᵀ]`` and
EK-FAC's scaling (George et al. 2018) ``S_k = E_n[diag(Q_Gᵀ M_k Q_G) ((Q_Aᵀ ā_k)²)ᵀ]``: the same numbers as
the capture path, at about Σ d_k² d_{k+1} multiply-adds per case instead of R·P. Other networks keep the
capture path (:func:`supports_output_fisher` says which), and so do chains where R·P is the smaller
(:func:`output_fisher_is_cheaper`: wide classifiers, whose R is the number of classes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..capture import chunk_starts, n_directions
from ..distributed import CaseShards
from ..likelihoods import Likelihood
from ..nets import NetworkView
from .factors import KroneckerFactors, kronecker_factors, pair_list

#: Elementwise modules with their derivative φ'(x) from input x and output y (None: the identity).
ELEMENTWISE = {
    nn.Tanh: lambda x, y: 1 - y * y,
    nn.Sigmoid: lambda x, y: y * (1 - y),
    nn.ReLU: lambda x, y: (x > 0).to(y.dtype),
    nn.Identity: lambda x, y: None,
}
#: Likelihoods whose output Fisher F_R is diagonal (kept as a vector, never as C × C).
DIAGONAL_OUTPUT_FISHER = ("bernoulli", "gaussian")
BUDGET_ELEMS = 1 << 24  # numbers held per chunk of cases


@dataclass
class ChainStatistics:
    """What :func:`chain_statistics` computed, each averaged over the cases (None when not asked for)."""

    factors: KroneckerFactors | None
    diagonal: list[torch.Tensor] | None
    ekfac: list[torch.Tensor] | None


def supports_output_fisher(view: NetworkView) -> bool:
    """True when ``view`` is a chain of ``nn.Linear`` layers and :data:`ELEMENTWISE` modules only, where
    propagating the output Fisher is exact."""
    if view.is_general or not view.is_chain:
        return False
    mods = view.sequence
    linears = [m for m in mods if isinstance(m, nn.Linear)]
    if len({id(m) for m in linears}) != len(linears) or len(linears) != len(view.layers):
        return False
    return all(isinstance(m, nn.Linear) or type(m) in ELEMENTWISE for m in mods)


def output_fisher_is_cheaper(view: NetworkView, layers: Sequence[int], *, ekfac: bool = False) -> bool:
    """Whether :func:`chain_statistics` should cost fewer multiply-adds per case than the capture pass.

    Propagating the output Fisher costs about ``Σ_l (d_l² a_l + d_l a_l²)`` per case over the layers above the
    lowest selected one (d_l × a_l weights; plus ``d_k³`` per selected layer for EK-FAC's rotation); the
    capture pass backpropagates the R square-root directions of F_R, ``R·Σ_l d_l a_l``, and sums
    ``R·d_k²`` per selected layer into G. Cheaper for an autoencoder (R = 784: about 4× fewer on the quick
    one), much dearer for a wide classifier (R = 10 on 784-1000-1000-10: about 50× more). Both are exact."""
    if not supports_output_fisher(view):
        return False
    lo = min(layers)
    R = n_directions(view, "exact", 1)
    propagate = sum(L.d_out ** 2 * L.a_dim + L.d_out * L.a_dim ** 2 for L in view.layers[lo + 1:])
    propagate += sum(view.layers[k].d_out ** 3 for k in layers) if ekfac else 0
    capture = R * (sum(L.d_out * L.a_dim for L in view.layers[lo:]) + sum(view.layers[k].d_out ** 2 for k in layers))
    return propagate < capture


def chain_forward(view: NetworkView, X: torch.Tensor):
    """(ā_k per layer, D_k per layer as a (n, d_out) tensor or None for the identity, z)."""
    a_bar: list[torch.Tensor] = []
    derivs: list[torch.Tensor | None] = []
    h, d = X, None
    for mod in view.sequence:
        if isinstance(mod, nn.Linear):
            if a_bar:
                derivs.append(d)
            a_bar.append(torch.cat([h, torch.ones_like(h[:, :1])], 1) if mod.bias is not None else h)
            h, d = mod(h), None
            continue
        y = mod(h.clone() if getattr(mod, "inplace", False) else h)
        step = ELEMENTWISE[type(mod)](h, y)
        if a_bar and step is not None:
            d = step if d is None else d * step
        h = y
    derivs.append(d)
    return a_bar, derivs, h


def _output_fisher(lik: Likelihood, z: torch.Tensor, trailing: torch.Tensor | None) -> torch.Tensor:
    """M_L per case: (n, C) for a diagonal F_R, else (n, C, C)."""
    if lik.name in DIAGONAL_OUTPUT_FISHER:
        M = lik.fisher_vp(z, torch.ones_like(z))
        return M if trailing is None else M * trailing.square()
    M = lik.fisher_output(z)
    return M if trailing is None else trailing[:, :, None] * M * trailing[:, None, :]


def _times_weight(T: torch.Tensor, W: torch.Tensor, D: torch.Tensor | None, case_axis: int = 0) -> torch.Tensor:
    """``T W D`` per case as one GEMM over the stacked rows; T is (n, m, d_out), or (m, n, d_out) with
    ``case_axis=1``."""
    out = (T.reshape(-1, T.shape[-1]) @ W).reshape(*T.shape[:-1], W.shape[1])
    if D is None:
        return out
    return out.mul_(D[:, None, :] if case_axis == 0 else D[None, :, :])


def _ones_if_none(D: torch.Tensor | None, n: int, d: int, like: torch.Tensor) -> torch.Tensor:
    return like.new_ones(n, d) if D is None else D


def _summed_times_weight(T: torch.Tensor, W: torch.Tensor, D: torch.Tensor | None, case_axis: int) -> torch.Tensor:
    """``Σ_n T_n W D_n`` (the sum over the cases of :func:`_times_weight`) as one GEMM whose inner dimension
    runs over the cases too, ``[T_1 … T_n] · [W D_1; …; W D_n]``: no per-case products are written."""
    if D is None:
        return T.sum(case_axis) @ W
    n = D.shape[0]
    rows = (T if case_axis == 1 else T.transpose(0, 1)).reshape(T.shape[1 - case_axis], -1)  # (m, n·d_in)
    return rows @ (W[None] * D[:, None, :]).reshape(n * W.shape[0], W.shape[1])


def _add_cross_sums(G: dict, l: int, ks: list[int], top: int, T: torch.Tensor, axis: int, weights, derivs,
                    add) -> None:
    """Add ``Σ_n T_{k,l}`` to G[k, l] for the k of ``ks`` (descending), from T = T_{top,l}: T_{k,l} =
    T_{k+1,l} W_{k+1} D_k per case, and only the sum of the lowest one (:func:`_summed_times_weight`)."""
    for k in range(top, ks[-1] - 1, -1):
        if k < top and k == ks[-1]:
            add(G, (k, l), _summed_times_weight(T, weights[k + 1], derivs[k], axis).T)
            return
        if k < top:
            T = _times_weight(T, weights[k + 1], derivs[k], axis)
        if k in ks:
            add(G, (k, l), T.sum(axis).T)


def _diagonal_cross_sum(m: torch.Tensor, W: torch.Tensor, D: torch.Tensor | None) -> torch.Tensor:
    """``Σ_n diag(m_n) W D_n`` = ``W ⊙ (mᵀ D)``: G[l-1, l]ᵀ below a diagonal M_l, (C, d)."""
    return W * (m.T @ _ones_if_none(D, m.shape[0], W.shape[1], m))


def _diagonal_second_cross(m: torch.Tensor, W: torch.Tensor, D: torch.Tensor | None, W_next: torch.Tensor,
                           D_next: torch.Tensor | None) -> torch.Tensor:
    """T_{l-2,l} = diag(m) W D W_{l-1} D_{l-2} per case, laid out (C, n, d_{l-2}), as one GEMM
    ``W · [D_1 W_{l-1} … D_n W_{l-1}]`` (T_{l-1,l}, C·n·d_{l-1} numbers, is never formed)."""
    n, (d, J) = m.shape[0], W_next.shape
    D = _ones_if_none(D, n, d, m)
    T = (W @ (D.T[:, :, None] * W_next[:, None, :]).reshape(d, n * J)).reshape(W.shape[0], n, J)
    T.mul_(m.T[:, :, None])
    return T if D_next is None else T.mul_(D_next[None, :, :])


def _from_diagonal(m: torch.Tensor, W: torch.Tensor, D: torch.Tensor | None, blocks: int = 5) -> torch.Tensor:
    """M below a diagonal M_l = diag(m) (m of shape (n, C)): ``M = D Wᵀ diag(m) W D`` per case, (n, d, d).

    Each product runs over the output units with the cases side by side, ``Wᵀ (C, d) · [m_i W_i·]_(C, n·d)``, so
    nothing of size n·C·d is transposed, and only the ``blocks`` column blocks on and above the diagonal of the
    symmetric M are multiplied (about (blocks + 1)/(2·blocks) of the products), then mirrored."""
    n, C = m.shape
    d = W.shape[1]
    mt = m.T
    M = torch.empty(d, n, d, dtype=m.dtype, device=m.device)
    edges = [round(i * d / blocks) for i in range(blocks + 1)]
    for s, e in zip(edges, edges[1:]):
        if e > s:
            right = (mt[:, :, None] * W[:, None, s:e]).reshape(C, n * (e - s))
            M[:e, :, s:e] = (W[:, :e].T @ right).reshape(e, n, e - s)
    for s, e in zip(edges, edges[1:]):
        M[e:, :, s:e] = M[s:e, :, e:].transpose(0, 2)
    M = M.permute(1, 0, 2).contiguous()
    return M if D is None else M.mul_(D[:, :, None]).mul_(D[:, None, :])


def _diag(M: torch.Tensor) -> torch.Tensor:
    return M if M.ndim == 2 else torch.diagonal(M, dim1=1, dim2=2)


def _eigen_diag(M: torch.Tensor, QG: torch.Tensor) -> torch.Tensor:
    """diag(Q_Gᵀ M Q_G) per case, (n, d)."""
    if M.ndim == 2:
        return M @ QG.square()
    return (torch.matmul(M, QG) * QG).sum(1)


def default_chunk(view: NetworkView, likelihood: Likelihood, layers: Sequence[int]) -> int:
    """Cases per chunk so that the propagated matrices of a chunk stay near :data:`BUDGET_ELEMS` numbers."""
    d = sorted(L.d_out for L in view.layers[min(layers):])
    widest, second = d[-1], (d[-2] if len(d) > 1 else d[-1])
    out = widest if likelihood.name in DIAGONAL_OUTPUT_FISHER else widest * widest
    per_case = 2 * widest * second + 2 * second * second + out + sum(L.a_dim for L in view.layers)
    return max(1, BUDGET_ELEMS // per_case)


def chain_statistics(view: NetworkView, X: torch.Tensor, likelihood: Likelihood, layers: Sequence[int], *,
                     pairs: str | None = "tridiag", diagonal: bool = False, eigenbases=None,
                     chunk_size: int | None = None, shards: CaseShards | None = None,
                     progress: bool | None = None) -> ChainStatistics:
    """One pass over X (already checked) propagating M_k (module docstring) for the selected ``layers``.

    ``pairs``: the Kronecker factor pairs (:func:`~kfac_lens.curvature.factors.pair_list`), or None for no
    factors; ``diagonal``: diag(F) per layer; ``eigenbases``: ``{k: (Q_A, Q_G)}`` for EK-FAC's scaling. All
    exact over y, in the view's dtype; with ``shards`` the sums are over every rank's cases. ``progress``: as
    :func:`~kfac_lens.capture.chunk_starts`."""
    if not supports_output_fisher(view):
        raise ValueError("chain_statistics needs an nn.Sequential of nn.Linear layers and elementwise "
                         f"activations ({', '.join(t.__name__ for t in ELEMENTWISE)}); use the capture path.")
    sel = sorted(layers)
    if not sel or sel != list(layers):
        raise ValueError(f"layers must be a non-empty strictly increasing list, got {list(layers)}.")
    plist = pair_list(sel, pairs) if pairs is not None else []
    cross: dict[int, list[int]] = {l: sorted((k for k, ll in plist if ll == l and k != l), reverse=True)
                                   for l in range(len(view.layers))}
    chunk = default_chunk(view, likelihood, sel) if chunk_size is None else int(chunk_size)
    weights = [L.module.weight.detach() for L in view.layers]
    A: dict = {}
    G: dict = {}
    diag = {k: 0.0 for k in sel}
    scal = {k: 0.0 for k in sel}
    chosen = set(sel)
    lo = sel[0]

    def add(table, key, value):
        table[key] = value if key not in table else table[key] + value

    def accumulate() -> int:
        n = 0
        with torch.no_grad():
            for start in chunk_starts(X.shape[0], chunk, progress, "output Fisher"):
                a_bar, derivs, z = chain_forward(view, X[start:start + chunk])
                n += z.shape[0]
                for k, l in plist:
                    add(A, (k, l), a_bar[k].T @ a_bar[l])
                M = _output_fisher(likelihood, z, derivs[-1])
                for l in range(len(weights) - 1, lo - 1, -1):
                    if l in chosen:
                        if pairs is not None:
                            add(G, (l, l), torch.diag(M.sum(0)) if M.ndim == 2 else M.sum(0))
                        if diagonal:
                            diag[l] = diag[l] + _diag(M).T @ a_bar[l].square()
                        if eigenbases is not None:
                            QA, QG = eigenbases[l]
                            scal[l] = scal[l] + _eigen_diag(M, QG).T @ (a_bar[l] @ QA).square()
                    if l == lo:
                        break
                    # T_{k,l} = C_{k,l}ᵀ = M_l J_{l←k}, rows per case, so each step is one GEMM
                    ks = cross[l]
                    if M.ndim == 2:  # diagonal M_l = diag(m) (the output layer's); M_{l-1} symmetric
                        m = M
                        M = _from_diagonal(m, weights[l], derivs[l - 1])
                        if l - 1 in ks:
                            add(G, (l - 1, l), _diagonal_cross_sum(m, weights[l], derivs[l - 1]).T)
                        if ks and ks[-1] < l - 1:  # T_{l-2,l} as (C, n, d), without forming T_{l-1,l}
                            T = _diagonal_second_cross(m, weights[l], derivs[l - 1], weights[l - 1], derivs[l - 2])
                            _add_cross_sums(G, l, ks, l - 2, T, 1, weights, derivs, add)
                    else:
                        T = _times_weight(M, weights[l], derivs[l - 1])  # T_{l-1,l} = M_l W_l D_{l-1}
                        M = _times_weight(T.transpose(1, 2).contiguous(), weights[l], derivs[l - 1])  # M_{l-1}
                        if ks:
                            _add_cross_sums(G, l, ks, l - 1, T, 0, weights, derivs, add)
        return n

    n = accumulate() if shards is None else shards.run(accumulate, "the output-Fisher sums on this rank's cases")
    if shards is not None:
        n = shards.global_count(n, like=X)
        sums = list(A.values()) + list(G.values()) + [diag[k] for k in sel if diagonal] + \
            [scal[k] for k in sel if eigenbases is not None]
        shards.sum_(*sums)
    factors = None
    if pairs is not None:
        factors = KroneckerFactors({kl: t / n for kl, t in A.items()}, {kl: t / n for kl, t in G.items()}, sel,
                                   {k: view.layers[k].shape for k in sel}, n, "exact")
    return ChainStatistics(factors, [diag[k] / n for k in sel] if diagonal else None,
                           [scal[k] / n for k in sel] if eigenbases is not None else None)


def exact_factors(view: NetworkView, X: torch.Tensor, likelihood: Likelihood, layers: Sequence[int], pairs: str,
                  *, diagonal: bool = False, chunk_size: int | None = None, distributed=None):
    """``(factors, diag(F) per layer or None)``, exact over y: one :func:`chain_statistics` pass where
    :func:`output_fisher_is_cheaper`, else the captures (:func:`~kfac_lens.curvature.factors.kronecker_factors`;
    diag(F) is then None, left to the capture pass of
    :func:`~kfac_lens.curvature.approximations.build_approximations`). ``chunk_size`` caps the cases per chunk."""
    if not output_fisher_is_cheaper(view, layers):
        return kronecker_factors(view, X, likelihood, layers=layers, pairs=pairs, chunk_size=chunk_size,
                                 distributed=distributed), None
    shards = CaseShards(distributed)
    st = chain_statistics(view, X, likelihood, layers, pairs=pairs, diagonal=diagonal,
                          chunk_size=capped_chunk(view, likelihood, layers, chunk_size),
                          shards=shards if shards.active else None)
    return st.factors, st.diagonal


def capped_chunk(view: NetworkView, likelihood: Likelihood, layers: Sequence[int], chunk_size: int | None) -> int:
    """:func:`default_chunk`, or ``chunk_size`` when that is smaller (a cap on the cases held at once)."""
    chunk = default_chunk(view, likelihood, layers)
    return chunk if chunk_size is None else max(1, min(chunk, int(chunk_size)))
