"""Matrix-free ``F V`` for a Linear chain with the primal pass computed once (Appendix J, docs/math.md §2).

:func:`~kfac_lens.curvature.fisher.fisher_matrix_product` re-runs the primal forward pass (twice: the
linearised pass and the pullback) at every call, which dominates a single Lanczos step. For an
``nn.Sequential`` of ``nn.Linear`` layers and elementwise activations
(:func:`~kfac_lens.curvature.output_fisher.supports_output_fisher`), :class:`ChainFisherProduct` keeps ā_k and
the activation derivatives D_k of every case and applies, per column v (layer matrices V_k):

- forward: ``ṡ_k = W_k ȧ_k + V_k ā_k``, ``ȧ_{k+1} = D_k ṡ_k`` (ȧ = 0 below the first selected layer);
- output: ``u = F_R(z) D_L ṡ_L / N``;
- backward: ``g_L = D_L u``, ``g_{k−1} = D_{k−1} W_kᵀ g_k`` and ``(F v)_k = Σ_n g_k ā_kᵀ``.

The same numbers as ``fisher_matrix_product`` (up to rounding), about 4·N·P multiply-adds per column. The m
columns of V travel together: each layer is one GEMM over the stacked (case, column) rows (not m broadcast ones).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..likelihoods import Likelihood
from ..nets import NetworkView
from .output_fisher import DIAGONAL_OUTPUT_FISHER, chain_forward, supports_output_fisher

CACHE_CHUNK = 4096  # cases per cached block: with several threads, one block per pass (see __call__)
ONE_THREAD_ROWS = 1024  # cases per pass on one thread (the block's rows as views)


class ChainFisherProduct:
    """``F V`` (P × m) on the selected ``layers`` of a Linear chain; the primal pass on X is cached in the
    view's dtype (Σ_k (a_dim_k + d_out_k) numbers per case)."""

    def __init__(self, view: NetworkView, X: torch.Tensor, likelihood: Likelihood, layers: Sequence[int],
                 chunk_size: int = CACHE_CHUNK):
        if not supports_output_fisher(view):
            raise ValueError("ChainFisherProduct needs an nn.Sequential of nn.Linear layers and elementwise "
                             "activations; use fisher_matrix_product.")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer number of cases, got {chunk_size!r}.")
        self.view, self.lik, self.sel = view, likelihood, list(layers)
        self.shapes = [view.layers[k].shape for k in self.sel]
        self.weights = [L.module.weight.detach() for L in view.layers]
        self.n = X.shape[0]
        with torch.no_grad():
            self.cache = [chain_forward(view, X[i:i + chunk_size]) for i in range(0, X.shape[0], chunk_size)]

    @torch.no_grad()
    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        if not isinstance(V, torch.Tensor) or V.ndim != 2 or V.shape[0] != sum(r * c for r, c in self.shapes):
            raise ValueError(f"V must be a (P, m) tensor of flat θ-vectors for layers {self.sel}, got "
                             f"{tuple(getattr(V, 'shape', ()))}.")
        dtype = self.weights[0].dtype
        m, lo, depth = V.shape[1], self.sel[0], len(self.weights)
        # the m columns side by side, so each layer is one GEMM over the stacked (case, column) rows: V_kᵀ as
        # (a_dim, m·d_out) with entry [j, c·d_out + i] = (V_k of column c)[i, j]
        rights, start = {}, 0
        for k, (r, c) in zip(self.sel, self.shapes):
            rights[k] = V[start:start + r * c].to(dtype).reshape(c, r, m).transpose(1, 2).reshape(c, m * r)
            start += r * c
        out = {k: torch.zeros(c, m * r, dtype=dtype, device=V.device) for k, (r, c) in zip(self.sel, self.shapes)}
        # One thread runs 1024 cases at a time (cache-friendly, ~20% faster than 4096 at N = 10,000). Several threads
        # take a whole block: a product is then ~150 parallel regions instead of ~500, and each one waits for every
        # thread, which on a shared machine (another process on a core) made a column 10x slower at 1024 cases.
        rows = ONE_THREAD_ROWS if torch.get_num_threads() == 1 else None
        for a_bar, derivs, z in (part for block in self.cache for part in _row_slices(block, rows)):
            n = z.shape[0]
            sdot = None
            for k in range(lo, depth):
                if sdot is not None:  # ṡ_k = W_k ȧ_k (+ V_k ā_k below), ȧ_k = D_{k−1} ṡ_{k−1}
                    sdot = _scale(sdot, derivs[k - 1])
                    sdot = (sdot.reshape(n * m, -1) @ self.weights[k].T).reshape(n, m, -1)
                if k in rights:
                    term = (a_bar[k] @ rights[k]).reshape(n, m, -1)
                    sdot = term if sdot is None else sdot.add_(term)
            g = _scale(self._output_fisher(z, _scale(sdot, derivs[-1])), derivs[-1]) / self.n
            for k in range(depth - 1, lo - 1, -1):
                if k in rights:  # (F v)_k = Σ_n g_k ā_kᵀ, as (a_dim, m·d_out)
                    out[k].addmm_(a_bar[k].T, g.reshape(n, -1))
                if k > lo:
                    g = _scale((g.reshape(n * m, -1) @ self.weights[k]).reshape(n, m, -1), derivs[k - 1])
        return torch.cat([out[k].reshape(c, m, r).transpose(1, 2).reshape(c * r, m)
                          for k, (r, c) in zip(self.sel, self.shapes)], dim=0)

    def _output_fisher(self, z: torch.Tensor, sdot: torch.Tensor) -> torch.Tensor:
        """F_R(z_n) ṡ per case and column, sdot (n, m, C): one diagonal for all columns where F_R is diagonal."""
        if self.lik.name in DIAGONAL_OUTPUT_FISHER:
            return sdot * self.lik.fisher_vp(z, torch.ones_like(z))[:, None, :]
        return torch.stack([self.lik.fisher_vp(z, sdot[:, i]) for i in range(sdot.shape[1])], dim=1)


def _row_slices(block, rows: int | None):
    """The cached block (ā_k, D_k, z) as views of at most ``rows`` cases each (None: the whole block)."""
    a_bar, derivs, z = block
    n = z.shape[0]
    step = n if rows is None else rows
    for i in range(0, n, step):
        yield ([a[i:i + step] for a in a_bar], [None if d is None else d[i:i + step] for d in derivs],
               z[i:i + step])


def _scale(T: torch.Tensor, D: torch.Tensor | None) -> torch.Tensor:
    """T (n, m, d) times the per-case diagonal D (n, d), or T for the identity."""
    return T if D is None else T * D[:, None, :]


def cache_bytes(view: NetworkView, n_cases: int, dtype: torch.dtype) -> int:
    """Bytes the cached primal pass of :class:`ChainFisherProduct` holds: ā_k, D_k and z of every case."""
    per_case = sum(L.a_dim + L.d_out for L in view.layers) + view.output_dim
    return per_case * int(n_cases) * torch.empty((), dtype=dtype).element_size()
