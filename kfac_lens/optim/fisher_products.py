"""Appendix J on the subset S₂ from the gradient pass: ``J v`` for several v, and the Gram matrix ``[vᵢᵀ F vⱼ]``.

``J v`` is the linearised forward pass ``ṡ_k = W_k ȧ_k + V_k ā_k``, ``ȧ_{k+1} = φ'(s_k) ⊙ ṡ_k``. Its primal
quantities (ā_k and φ'(s_k)) are those of the gradient pass, so the network is not run again: for the
elementwise activations (Sigmoid, Tanh, ReLU, Identity) φ' is read off the next layer's input. Any other
module between the layers, and any network that is not a chain of Linear layers (convolutions, skip
connections, tied or sequence layers: docs/math.md §1), falls back to :func:`kfac_lens.jacobian_products`,
which runs the primal pass (forward-mode products through the whole module).
All tangents share one pass (batched), and everything runs in the model's dtype; the Gram's sum over the
cases is accumulated in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..curvature.fisher import jacobian_products, output_fisher_vp
from ..likelihoods import Likelihood
from ..nets import NetworkView
from .passes import GradientPass

GRAM_CHUNK = 2048  # cases per J-product pass in fisher_gram_from_pass

# φ'(s) as a function of φ(s), for the activations whose derivative the output determines.
DERIVATIVE_FROM_OUTPUT: dict[type, Callable[[torch.Tensor], torch.Tensor]] = {
    nn.Sigmoid: lambda out: out * (1 - out),
    nn.Tanh: lambda out: 1 - out * out,
    nn.ReLU: lambda out: (out > 0).to(out.dtype),
}


def linearisation_plan(view: NetworkView) -> list | None:
    """For each layer k, φ' of the modules that follow it (None: the identity), or None for the whole plan
    when some module between the layers is not one activation of :data:`DERIVATIVE_FROM_OUTPUT` (plus
    Identity modules), or for a view that is not a chain of Linear layers. Modules before the first layer do
    not depend on θ and may be anything."""
    if not view.is_chain:
        return None
    positions = {id(L.module): L.index for L in view.layers}
    plan: list = [None] * len(view.layers)
    current = None
    for mod in view.sequence:
        if id(mod) in positions:
            current = positions[id(mod)]
            continue
        if current is None or type(mod) is nn.Identity:
            continue
        fn = DERIVATIVE_FROM_OUTPUT.get(type(mod))
        if fn is None or plan[current] is not None:
            return None
        plan[current] = fn
    return plan


def jacobian_vector_products(view: NetworkView, batch: GradientPass, cases: torch.Tensor | None,
                             vectors: Sequence[Sequence[torch.Tensor]], plan: list | None):
    """(z, Jv) on the given cases (None: all), Jv of shape (T, n, C) (or (T, n, *output)) for T vectors."""
    if plan is None:
        x = batch.x if cases is None else batch.x[cases]
        z, Jvs = jacobian_products(view, x, list(vectors), dtype=None, checked=True)
        return z, torch.stack(Jvs)
    T = len(vectors)
    last = len(view.layers) - 1

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t if cases is None else t[cases]

    z = rows(batch.z)
    da = None
    with torch.no_grad():
        a = rows(batch.a[0])
        for L in view.layers:
            k = L.index
            n = a.shape[0]
            # the T tangents side by side, (n, T, d_out): one GEMM per layer for all of them
            V = torch.cat([v[k] for v in vectors]) if T > 1 else vectors[0][k]  # (T·d_out, a_dim)
            if a.shape[1] == L.a_dim:  # ā already carries the homogeneous 1
                ds = a @ V.T
            else:
                ds = torch.addmm(V[:, -1], a, V[:, :-1].T)
            ds = ds.view(n, T, L.d_out)
            if da is not None:
                ds.view(n * T, L.d_out).addmm_(da.view(n * T, L.d_in), L.module.weight.detach().T)
            a = rows(batch.a[k + 1]) if k < last else None
            if plan[k] is not None:  # φ'(s_k) from φ(s_k): the next layer's input, or z
                out = z if k == last else a[:, :view.layers[k + 1].d_in]
                ds.mul_(plan[k](out)[:, None, :])
            da = ds
    return z, da.transpose(0, 1)


def fisher_gram_from_pass(view: NetworkView, likelihood: Likelihood, batch: GradientPass,
                          cases: torch.Tensor | None, vectors: Sequence[Sequence[torch.Tensor]],
                          plan: list | None, chunk_size: int = GRAM_CHUNK) -> torch.Tensor:
    """``[vᵢᵀ F vⱼ]`` (float64, T×T) of the exact Fisher on the given cases: ``(Jvᵢ)ᵀ F_R (Jvⱼ)`` averaged.

    The cases go through in chunks of ``chunk_size`` (the tangents of all T vectors are held for one chunk at
    a time; a mini-batch's S₂ is one chunk)."""
    n_all = batch.x.shape[0] if cases is None else cases.numel()
    if n_all <= chunk_size:
        parts = [cases]
    else:
        every = torch.arange(n_all, device=batch.x.device) if cases is None else cases
        parts = list(every.split(chunk_size))
    total = None
    for part in parts:
        z, Jv = jacobian_vector_products(view, batch, part, vectors, plan)
        Jv = Jv.transpose(0, 1)  # (n, T, *output): contiguous on a chain
        n, T = Jv.shape[0], Jv.shape[1]
        FJ = torch.stack([output_fisher_vp(likelihood, z, Jv[:, t]) for t in range(T)], 1)
        # each case's (Jvᵢ)ᵀF_R(Jvⱼ) in the model's dtype, their sum over the cases in float64 (converting the
        # T·n·C products to float64 first would cost more than the whole Gram)
        per_case = torch.bmm(Jv.reshape(n, T, -1), FJ.reshape(n, T, -1).transpose(1, 2))
        chunk_sum = per_case.double().sum(0)
        total = chunk_sum if total is None else total + chunk_sum
        del z, Jv, FJ, per_case
    G = total / n_all
    return torch.triu(G) + torch.triu(G, 1).T  # symmetric by construction
