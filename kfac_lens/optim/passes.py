"""The mini-batch passes of one K-FAC iteration (Algorithm 2; Appendix G, tasks 1–4).

:class:`GradientPass` is what the forward/backward pass on the mini-batch S′ leaves behind: the loss, the
data gradient, and the per-case ā_k, g_k and z that the Appendix G low-rank form and the Appendix J
products on the subset S₂ reuse instead of running the network again. :func:`subset_statistics` is the
extra pass on S₁ with targets sampled from the model (Appendix D) that gives new factor statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..capture import Capture, LayerOutputs, backward_directions, forward, layer_uses, output_directions
from ..curvature.factors import KroneckerFactors, factors_from_captures
from ..errors import NonFiniteError
from ..likelihoods import Likelihood
from ..nets import NetworkView
from .general import check_inverse_uses, check_output_targets, output_nll


@dataclass
class GradientPass:
    """The forward/backward pass on a mini-batch of m cases (Algorithm 1).

    - ``loss``: the mean NLL h_data(θ) as a 0-d tensor (kept on the device);
    - ``data_grad``: its gradient, one ``(d_out, a_dim)`` matrix per layer (no ℓ2 term);
    - ``a[k]``: the inputs of layer k, one row per case, with or without the homogeneous 1 (not kept for a
      layer with several uses per case; docs/math.md §1);
    - ``g[k]``: ∂h_data/∂s_k per case, (n, U, d_out) for U uses (None when the pass did not keep them);
    - ``z``: the network output (detached).
    """

    x: torch.Tensor
    y: torch.Tensor
    loss: torch.Tensor
    data_grad: list[torch.Tensor]
    a: dict[int, torch.Tensor]
    g: dict[int, torch.Tensor] | None
    z: torch.Tensor

    def low_rank_pieces(self, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(g columns, ā rows) with ``data_grad[k] = g_cols @ a_rows`` (Appendix G), when the pass kept g
        (then ``a`` holds ā, with the homogeneous 1). None for a layer with several uses per case: its
        per-case gradient Σ_u g_u ā_uᵀ has rank up to U, so the trick does not apply."""
        if self.g is None or k not in self.a or self.a[k].ndim != 2:
            return None
        return self.g[k].T, self.a[k]


def subset_statistics(view: NetworkView, likelihood: Likelihood, x1: torch.Tensor, layers: Sequence[int],
                      estimator: str, generator, pairs: str) -> KroneckerFactors:
    """New Ā and G on the subset S₁: ā_k from a forward pass on S₁, g_k from the extra backward pass with
    targets sampled from the model ("mc", Appendix D) or with F_R's square root ("exact")."""
    if pairs == "tridiag" and not view.is_chain and any(L.uses is None for L in view.layers):
        check_inverse_uses(view, "tridiag", layer_uses(view, x1))  # (a Sequential with convolutions)
    z, a, s = forward(view, x1, layers)
    V, w = output_directions(likelihood, z, estimator, None, 1, generator)
    g = backward_directions(z, s, layers, V.to(z.dtype))
    return factors_from_captures([Capture(a=a, g=g, weight=w, z=z.detach())], view, layers, pairs, estimator)


def pass_statistics(view: NetworkView, likelihood: Likelihood, batch: GradientPass, S1: torch.Tensor,
                    layers: Sequence[int], estimator: str, generator, pairs: str, plan: list) -> KroneckerFactors:
    """:func:`subset_statistics` of the cases S₁ of ``batch`` from its stored ā_k and z (a forward pass on
    S₁ would recompute them at the same θ): only the backward pass with sampled targets (Appendix D) is
    run, by hand through the chain, ``g_k = (g_{k+1} W_{k+1}) ⊙ φ'(s_k)`` with φ' read off the next layer's
    input (``plan``: :func:`~kfac_lens.optim.fisher_products.linearisation_plan`, not None)."""
    z = batch.z[S1]
    V, w = output_directions(likelihood, z, estimator, None, 1, generator)
    a = {}
    for L in view.layers:
        rows = batch.a[L.index][S1]
        a[L.index] = rows if rows.shape[1] == L.a_dim else torch.cat([rows, torch.ones_like(rows[:, :1])], dim=1)
    g, d, last = {}, V.to(z.dtype), len(view.layers) - 1
    for L in reversed(view.layers):
        k = L.index
        if plan[k] is not None:  # φ'(s_k) from φ(s_k): z or the next layer's input
            d = d * plan[k](z if k == last else a[k + 1][:, :view.layers[k + 1].d_in])
        g[k] = d
        if k > 0:
            d = d @ L.module.weight.detach()
    return factors_from_captures([Capture(a=a, g=g, weight=w, z=z)], view, layers, pairs, estimator)


def can_reuse_pass(view: NetworkView, batch: GradientPass, plan: list | None) -> bool:
    """Whether :func:`pass_statistics` applies: a chain of Linear layers with a linearisation plan, whose
    pass kept every layer's ā (one row per case) and z."""
    return plan is not None and all(L.index in batch.a and batch.a[L.index].ndim == 2 for L in view.layers)


def gradient_pass(view: NetworkView, likelihood: Likelihood, x: torch.Tensor, y: torch.Tensor,
                  layers: Sequence[int]) -> GradientPass:
    """The forward/backward pass on (x, y): h_data, ∇h_data = Σ_cases g ā_kᵀ, and the per-case ā_k, g_k, z.

    A layer used several times per case (a convolution's positions, tied or sequence layers) takes its
    gradient from autograd on its parameters instead: its ā (im2col patches) would serve no later step, as
    neither the Appendix G form nor the chain's J-products apply to it (:mod:`.general`)."""
    params = {k: list(view.layers[k].module.parameters()) for k in layers}
    multi = [k for k in layers if several_uses(view, k)]
    if not all(p.requires_grad for k in multi for p in params[k]):
        multi = []
    kept = [k for k in layers if k not in multi]
    z, a, s = forward(view, x, kept)
    y = check_output_targets(likelihood, z.detach(), y)
    loss = output_nll(likelihood, z, y)
    outs = {k: s[k].outputs if isinstance(s[k], LayerOutputs) else [s[k]] for k in kept}
    outs.update({k: params[k] for k in multi})
    grads = iter(torch.autograd.grad(loss, [o for k in layers for o in outs[k]]))
    g, data_grad = {}, []
    for k in layers:
        got = [next(grads) for _ in outs[k]]
        if k in multi:  # [weight.reshape(out, −1), bias] (docs/math.md §1)
            w = got[0].reshape(got[0].shape[0], -1)
            data_grad.append(torch.cat([w, got[1][:, None]], dim=1) if len(got) > 1 else w)
        elif isinstance(s[k], LayerOutputs):
            g[k] = s[k].gradient_rows([t[None] for t in got])[0]  # (n, U, d_out)
            data_grad.append(torch.einsum("nuo,nua->oa", g[k], a[k]))
        else:
            g[k] = got[0]
            data_grad.append(g[k].T @ a[k])
    return GradientPass(x, y, loss.detach(), data_grad, a, g, z.detach())


def several_uses(view: NetworkView, k: int) -> bool:
    """True for a layer used more than once per case (by the probe pass; a convolution when not probed)."""
    L = view.layers[k]
    return L.uses > 1 if L.uses is not None else L.is_conv


def checked_loss(loss: float, k: int) -> float:
    """``loss`` when finite, else a :class:`NonFiniteError` saying that training diverged at iteration k."""
    if not math.isfinite(loss):
        raise NonFiniteError(
            f"the loss is {loss} at iteration {k}; training has diverged. Lower lambda's decay (omega1 closer to "
            "1), raise lambda_init or check the data. The last good checkpoint is kept.")
    return loss
