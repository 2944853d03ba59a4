"""Matrix-free ``F V`` for a Linear chain with the primal pass computed once (Appendix J, docs/math.md §2).

:func:`~kfac_lens.curvature.fisher.fisher_matrix_product` re-runs the primal forward pass (twice: the
linearised pass and the pullback) at every call, which dominates a single Lanczos step. For an
``nn.Sequential`` of ``nn.Linear`` layers and elementwise activations
(:func:`~kfac_lens.curvature.output_fisher.supports_output_fisher`), :class:`ChainFisherProduct` keeps ā_k and
the activation derivatives D_k of every case and applies, per column v (layer matrices V_k):

- forward: ``ṡ_k = W_k ȧ_k + V_k ā_k``, ``ȧ_{k+1} = D_k ṡ_k`` (ȧ = 0 below the first selected layer);
- output: ``u = F_R(z) D_L ṡ_L / N``;
- backward: ``g_L = D_L u``, ``g_{k−1} = D_{k−1} W_kᵀ g_k`` and ``(F v)_k = Σ_n g_k ā_kᵀ``.

The same numbers as ``fisher_matrix_product`` (up to rounding), about 4·N·P multiply-adds per column.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..likelihoods import Likelihood
from ..nets import NetworkView, mats_to_vec, vec_to_mats
from .output_fisher import chain_forward, supports_output_fisher

CACHE_CHUNK = 1024  # cases per cached block


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
        mats = dict(zip(self.sel, vec_to_mats(V.T.to(dtype), self.shapes)))  # (m, d_out, a_dim) per layer
        lo, m = self.sel[0], V.shape[1]
        out = {k: 0.0 for k in self.sel}
        for a_bar, derivs, z in self.cache:
            sdot = None
            for k in range(lo, len(self.weights)):
                if sdot is not None:
                    sdot = sdot if derivs[k - 1] is None else sdot * derivs[k - 1]  # ȧ_k
                    sdot = sdot @ self.weights[k].T
                if k in mats:
                    term = torch.matmul(a_bar[k], mats[k].transpose(1, 2))  # V_k ā_k, (m, n, d_out)
                    sdot = term if sdot is None else sdot + term
            if derivs[-1] is not None:
                sdot = sdot * derivs[-1]
            g = torch.stack([self.lik.fisher_vp(z, s) for s in sdot]) / self.n
            if derivs[-1] is not None:
                g = g * derivs[-1]
            for k in range(len(self.weights) - 1, lo - 1, -1):
                if k in mats:
                    out[k] = out[k] + torch.matmul(g.transpose(1, 2), a_bar[k])
                if k > lo:
                    g = g @ self.weights[k]
                    g = g if derivs[k - 1] is None else g * derivs[k - 1]
        return mats_to_vec([out[k] if torch.is_tensor(out[k]) else
                            torch.zeros(m, *s, dtype=dtype, device=self.weights[0].device)
                            for k, s in zip(self.sel, self.shapes)]).T


def cache_bytes(view: NetworkView, n_cases: int, dtype: torch.dtype) -> int:
    """Bytes the cached primal pass of :class:`ChainFisherProduct` holds: ā_k, D_k and z of every case."""
    per_case = sum(L.a_dim + L.d_out for L in view.layers) + view.output_dim
    return per_case * int(n_cases) * torch.empty((), dtype=dtype).element_size()
