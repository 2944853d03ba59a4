"""K-FAC on any ``nn.Module``: reading the model for the optimizer (docs/math.md §1, §3).

The optimizer reads an ``nn.Sequential`` in module order, and any other module through a probe pass on an
example input (:class:`~kfac_lens.nets.NetworkView`). On such a network K-FAC uses the Kronecker factors of
KFAC-expand (Eschenhagen et al. 2023), which for a convolution is KFC (Grosse & Martens 2016): each spatial
position is one use of the layer, ``A = E_n[(1/U) Σ_u ā_u ā_uᵀ]`` over its im2col patches and
``G = E_n[Σ_u g_u g_uᵀ]``. The exact-F products of Appendix J run through the whole module by forward mode
(:func:`kfac_lens.jacobian_products`), and the Appendix G low-rank form is used only for layers with one use
per case. An output of shape (N, T, C) has one likelihood term per position: h(θ) sums them over the
positions and averages over the cases (docs/math.md §2).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..likelihoods import Likelihood
from ..nets import NetworkView


def kfac_view(model, example_input=None) -> NetworkView:
    """The :class:`NetworkView` K-FAC preconditions: ``model`` itself when it is a view, an ``nn.Sequential``
    in module order, any other module through a probe pass on ``example_input``."""
    if isinstance(model, NetworkView):
        return model if example_input is None else NetworkView(model.model, example_input)
    if example_input is None and isinstance(model, nn.Module) and not isinstance(model, nn.Sequential):
        raise UnsupportedModelError(
            f"the optimizer reads a {type(model).__name__} through one probe pass that finds its nn.Linear and "
            "nn.Conv2d layers: pass a few cases of input, e.g. KFAC(model, loss, example_input=X[:2]), or a "
            "NetworkView(model, example_input=X[:2]) as the model.")
    return NetworkView(model, example_input)


def check_inverse_uses(view: NetworkView, inverse: str, uses: list[int | None] | None = None) -> None:
    """The tridiagonal inverse needs the cross factors of neighbouring layers, which KFAC-expand defines only
    for layers with the same number of uses per case (docs/math.md §3): refuse the pair by name otherwise.
    ``uses``: the uses per case of each layer (default: those of the view's probe pass, where known)."""
    if inverse != "tridiag":
        return
    uses = [L.uses for L in view.layers] if uses is None else uses
    for L, M in zip(view.layers[:-1], view.layers[1:]):
        u, v = uses[L.index], uses[M.index]
        if u is not None and v is not None and u != v:
            raise ValueError(
                f"inverse='tridiag' needs the cross factors A[{L.index}, {M.index}] of layers '{L.name}' and "
                f"'{M.name}', but they have {u} and {v} uses per case (e.g. a convolution's positions), "
                "and KFAC-expand (KFC) pairs uses only when their numbers agree. Use inverse='blockdiag' for "
                "this network.")


def check_output_targets(likelihood: Likelihood, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``likelihood.check_targets`` for an (N, C) output, or position by position for an (N, T, C) one."""
    if z.ndim == 2:
        return likelihood.check_targets(z, y)
    lead = tuple(z.shape[:-1])
    if tuple(y.shape[:len(lead)]) != lead:
        raise ValueError(f"the network output has shape {tuple(z.shape)}, one likelihood term per position, so y "
                         f"must have shape {lead} (plus C for per-output targets), got {tuple(y.shape)}.")
    flat = y.reshape(-1, *y.shape[len(lead):])
    return likelihood.check_targets(z.reshape(-1, z.shape[-1]), flat).reshape(y.shape)


def output_nll(likelihood: Likelihood, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """h_data: the mean over cases of the NLL, summed over the positions of an (N, T, C) output."""
    if z.ndim == 2:
        return likelihood.nll(z, y)
    flat = likelihood.per_case_nll(z.reshape(-1, z.shape[-1]), y.reshape(-1, *y.shape[z.ndim - 1:]))
    return flat.sum() / z.shape[0]
