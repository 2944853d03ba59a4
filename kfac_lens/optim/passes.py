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

from ..capture import Capture, backward_directions, forward, output_directions
from ..curvature.factors import KroneckerFactors, factors_from_captures
from ..errors import NonFiniteError
from ..likelihoods import Likelihood
from ..nets import NetworkView


@dataclass
class GradientPass:
    """The forward/backward pass on a mini-batch of m cases (Algorithm 1).

    - ``loss``: the mean NLL h_data(θ) as a 0-d tensor (kept on the device);
    - ``data_grad``: its gradient, one ``(d_out, a_dim)`` matrix per layer (no ℓ2 term);
    - ``a[k]``: the inputs of layer k, one row per case, with or without the homogeneous 1;
    - ``g[k]``: ∂h_data/∂s_k per case (None when the pass did not keep them);
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
        (then ``a`` holds ā, with the homogeneous 1)."""
        return None if self.g is None else (self.g[k].T, self.a[k])


def subset_statistics(view: NetworkView, likelihood: Likelihood, x1: torch.Tensor, layers: Sequence[int],
                      estimator: str, generator, pairs: str) -> KroneckerFactors:
    """New Ā and G on the subset S₁: ā_k from a forward pass on S₁, g_k from the extra backward pass with
    targets sampled from the model ("mc", Appendix D) or with F_R's square root ("exact")."""
    z, a, s = forward(view, x1, layers)
    V, w = output_directions(likelihood, z, estimator, None, 1, generator)
    g = backward_directions(z, s, layers, V.to(z.dtype))
    return factors_from_captures([Capture(a=a, g=g, weight=w, z=z.detach())], view, layers, pairs, estimator)


def gradient_pass(view: NetworkView, likelihood: Likelihood, x: torch.Tensor, y: torch.Tensor,
                  layers: Sequence[int]) -> GradientPass:
    """The forward/backward pass on (x, y): h_data, ∇h_data = Σ_cases g ā_kᵀ, and the per-case ā_k, g_k, z."""
    z, a, s = forward(view, x, layers)
    y = likelihood.check_targets(z.detach(), y)
    loss = likelihood.nll(z, y)
    grads = torch.autograd.grad(loss, [s[k] for k in layers])
    g = dict(zip(layers, grads))
    data_grad = [g[k].T @ a[k] for k in layers]
    return GradientPass(x, y, loss.detach(), data_grad, a, g, z.detach())


def checked_loss(loss: float, k: int) -> float:
    """``loss`` when finite, else a :class:`NonFiniteError` saying that training diverged at iteration k."""
    if not math.isfinite(loss):
        raise NonFiniteError(
            f"the loss is {loss} at iteration {k}; training has diverged. Lower lambda's decay (omega1 closer to "
            "1), raise lambda_init or check the data. The last good checkpoint is kept.")
    return loss
