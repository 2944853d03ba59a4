"""The mini-batch passes of one K-FAC iteration (Algorithm 2; Appendix G, tasks 1–4).

:class:`GradientPass` is what the forward/backward pass on the mini-batch S′ leaves behind: the loss, the
data gradient, and the per-case ā_k, g_k and z that the Appendix G low-rank form and the Appendix J
products on the subset S₂ reuse instead of running the network again.

:func:`split_gradient_pass` runs that pass as two chunks, ``[S₁ | rest]``: the forward on S₁ is shared by
the gradient and by the extra backward pass with targets sampled from the model (Appendix D) that gives
the new factor statistics, so S₁ is not pushed through the network a second time.
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
    """The forward/backward pass on a mini-batch of m cases (Algorithm 1), kept as one or two chunks of rows.

    - ``loss``: the mean NLL h_data(θ) as a 0-d tensor (kept on the device);
    - ``data_grad``: its gradient, one ``(d_out, a_dim)`` matrix per layer (no ℓ2 term);
    - ``a[c][k]``: the inputs of layer k in chunk c, one row per case, with or without the homogeneous 1;
    - ``g[c][k]``: ∂h_data/∂s_k per case (None when the pass did not keep them);
    - ``z[c]``: the network output (detached);
    - ``position``: row of case r in the chunks stacked (None: the rows are the cases in order).
    """

    x: torch.Tensor
    y: torch.Tensor
    loss: torch.Tensor
    data_grad: list[torch.Tensor]
    a: list[dict[int, torch.Tensor]]
    g: list[dict[int, torch.Tensor]] | None
    z: list[torch.Tensor]
    position: torch.Tensor | None = None

    def gather(self, parts: list[torch.Tensor], cases: torch.Tensor | None) -> torch.Tensor:
        """The rows of ``cases`` (None: all rows, stacked) of a quantity kept per chunk, without stacking the
        chunks (and without a host sync)."""
        rows = cases if cases is None or self.position is None else self.position[cases]
        if len(parts) == 1:
            return parts[0] if rows is None else parts[0][rows]
        if rows is None:
            return torch.cat(parts)
        n1 = parts[0].shape[0]
        first = (rows < n1)[:, None]
        return torch.where(first, parts[0][rows.clamp(max=n1 - 1)], parts[1][(rows - n1).clamp(min=0)])

    def layer_input(self, k: int, cases: torch.Tensor | None) -> torch.Tensor:
        return self.gather([chunk[k] for chunk in self.a], cases)

    def output(self, cases: torch.Tensor | None) -> torch.Tensor:
        return self.gather(self.z, cases)

    def low_rank_pieces(self, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(g columns, ā rows) with ``data_grad[k] = g_cols @ a_rows`` (Appendix G), when the pass kept g
        (then ``a`` holds ā, with the homogeneous 1)."""
        if self.g is None:
            return None
        return self.gather([chunk[k] for chunk in self.g], None).T, self.layer_input(k, None)


def _statistics(view: NetworkView, likelihood: Likelihood, z, a, s, layers, estimator: str, generator,
                pairs: str, retain_graph: bool) -> KroneckerFactors:
    """Factor statistics of one chunk: ā_k from its forward pass, g_k from the extra backward pass with
    targets sampled from the model ("mc", Appendix D) or with F_R's square root ("exact")."""
    V, w = output_directions(likelihood, z, estimator, None, 1, generator)
    g = backward_directions(z, s, layers, V.to(z.dtype), retain_graph=retain_graph)
    cap = Capture(a=a, g=g, weight=w, z=z.detach())
    return factors_from_captures([cap], view, layers, pairs, estimator)


def subset_statistics(view: NetworkView, likelihood: Likelihood, x1: torch.Tensor, layers: Sequence[int],
                      estimator: str, generator, pairs: str) -> KroneckerFactors:
    """New Ā and G from a forward pass on the subset S₁ alone (when the gradient came from elsewhere)."""
    z, a, s = forward(view, x1, layers)
    return _statistics(view, likelihood, z, a, s, layers, estimator, generator, pairs, retain_graph=False)


def split_gradient_pass(view: NetworkView, likelihood: Likelihood, x: torch.Tensor, y: torch.Tensor,
                        S1: torch.Tensor, layers: Sequence[int], estimator: str, generator,
                        pairs: str) -> tuple[GradientPass, KroneckerFactors]:
    """The gradient on S′ and the factor statistics on S₁ ⊂ S′ from one forward pass over S′.

    The batch runs as two chunks, S₁ and the rest (in ascending case order). The extra backward pass on
    S₁ (Appendix D) goes first and keeps S₁'s graph for the gradient's backward pass. The loss is the mean
    over all m cases, so the gradient is that of the whole mini-batch.
    """
    m = x.shape[0]
    n1 = S1.shape[0]
    z1, a1, s1 = forward(view, x[S1], layers)
    y = likelihood.check_targets(z1.detach()[:1].expand(m, -1), y)  # once, for the whole batch
    new = _statistics(view, likelihood, z1, a1, s1, layers, estimator, generator, pairs, retain_graph=True)
    y1 = y[S1]
    if n1 == m:
        chunks = [(z1, a1, s1, y1)]
        order = S1
    else:
        keep = torch.ones(m, dtype=torch.bool, device=x.device)
        keep[S1] = False
        rest = torch.argsort(keep.to(torch.uint8), descending=True, stable=True)[:m - n1]
        z2, a2, s2 = forward(view, x[rest], layers)
        chunks = [(z1, a1, s1, y1), (z2, a2, s2, y[rest])]
        order = torch.cat([S1, rest])
    total = sum(likelihood.per_case_nll(zc, yc).sum() for zc, _, _, yc in chunks)
    loss = total / m
    grads = torch.autograd.grad(loss, [sc[k] for _, _, sc, _ in chunks for k in layers])
    L = len(layers)
    g = [dict(zip(layers, grads[c * L:(c + 1) * L])) for c in range(len(chunks))]
    a = [ac for _, ac, _, _ in chunks]
    data_grad = [g[0][k].T @ a[0][k] for k in layers]
    for gc, ac in zip(g[1:], a[1:]):
        data_grad = [G.addmm_(gc[k].T, ac[k]) for G, k in zip(data_grad, layers)]
    position = None
    if len(chunks) > 1 or not torch.equal(order, torch.arange(m, device=order.device)):
        position = torch.empty_like(order)
        position[order] = torch.arange(m, device=order.device)
    z = [zc.detach() for zc, _, _, _ in chunks]
    return GradientPass(x, y, loss.detach(), data_grad, a, g, z, position), new


def gradient_pass(view: NetworkView, likelihood: Likelihood, x: torch.Tensor, y: torch.Tensor,
                  layers: Sequence[int]) -> GradientPass:
    """The forward/backward pass on (x, y) in one chunk (no factor statistics)."""
    z, a, s = forward(view, x, layers)
    y = likelihood.check_targets(z.detach(), y)
    loss = likelihood.nll(z, y)
    grads = torch.autograd.grad(loss, [s[k] for k in layers])
    g = dict(zip(layers, grads))
    data_grad = [g[k].T @ a[k] for k in layers]
    return GradientPass(x, y, loss.detach(), data_grad, [a], [g], [z.detach()])


def checked_loss(loss: float, k: int) -> float:
    """``loss`` when finite, else a :class:`NonFiniteError` saying that training diverged at iteration k."""
    if not math.isfinite(loss):
        raise NonFiniteError(
            f"the loss is {loss} at iteration {k}; training has diverged. Lower lambda's decay (omega1 closer to "
            "1), raise lambda_init or check the data. The last good checkpoint is kept.")
    return loss
