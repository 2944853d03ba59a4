"""One place that runs the forward and backward passes and records ā_k and g_k (Appendix A, Algorithm 1).

Everything that needs per-case activations or output gradients consumes a :class:`Capture`:
the exact / Monte-Carlo / empirical Fisher, the Kronecker factors, the cumulant terms and the optimizer.

A capture holds, for a chunk of n cases and the selected layers k:

- ``a[k]``: ā_k, shape (n, a_dim) — the layer input with the homogeneous 1 appended (bias layers);
- ``g[k]``: g_k = ∂L/∂s_k for R *directions* per case, shape (R, n, d_out);
- ``weight``: the scalar w with which each direction enters, so that for one case
  ``E_y[g gᵀ] = w Σ_r g_r g_rᵀ``.

Directions are what is backpropagated from the output: the columns of a square root of F_R (exact
expectation over y, w = 1), gradients of sampled targets (Monte-Carlo, w = 1/samples), or the
gradient of the training targets (empirical Fisher, w = 1).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import NonFiniteError
from .likelihoods import Likelihood
from .nets import NetworkView

ESTIMATORS = ("exact", "mc", "empirical")


@dataclass
class Capture:
    """Per-case quantities of one chunk of cases (see module docstring)."""

    a: dict[int, torch.Tensor]
    g: dict[int, torch.Tensor]
    weight: float
    z: torch.Tensor

    @property
    def n(self) -> int:
        return self.z.shape[0]


# ----------------------------------------------------------------------------- inputs
def as_view(model) -> NetworkView:
    return model if isinstance(model, NetworkView) else NetworkView(model)


def analysis_view(model, dtype: torch.dtype | None) -> NetworkView:
    """A view of ``model`` in ``dtype`` on the model's device; a cast copy when the dtype differs."""
    view = as_view(model)
    if dtype is None or dtype == view.dtype:
        return view
    return NetworkView(copy.deepcopy(view.model).to(dtype))


# Output modules that already apply the likelihood's own link (softmax / sigmoid), by likelihood name.
_LINK_MODULES = {"categorical": (nn.Softmax, nn.LogSoftmax), "bernoulli": (nn.Sigmoid,)}


def warn_if_link_applied_twice(view: NetworkView, likelihood: Likelihood) -> None:
    """Warn when the network ends in the nonlinearity that the likelihood applies itself (Section 2:
    the likelihood takes the *natural parameters* z, e.g. logits), so it would be applied twice."""
    last = view.sequence[-1]
    if isinstance(last, _LINK_MODULES.get(likelihood.name, ())):
        warnings.warn(
            f"the network ends in {type(last).__name__}, and the {likelihood.name} likelihood applies "
            f"{'softmax' if likelihood.name == 'categorical' else 'the sigmoid'} to the network output "
            "itself, so it would be applied twice and the Fisher would be that of another model. "
            f"Drop the final {type(last).__name__} so that the network outputs logits.",
            UserWarning, stacklevel=3)


def check_inputs(view: NetworkView, X, y=None, *, what: str = "X",
                 likelihood: Likelihood | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Move X (and y) to the model's device and dtype; reject bad shapes and non-finite values.

    With ``likelihood``, also warn when the network's last module applies the likelihood's link."""
    if likelihood is not None:
        warn_if_link_applied_twice(view, likelihood)
    if isinstance(X, np.ndarray):
        X = torch.from_numpy(X)
    if not isinstance(X, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor or numpy array, got {type(X).__name__}.")
    d_in = view.layers[0].d_in
    if X.ndim != 2 or X.shape[1] != d_in:
        raise ValueError(
            f"{what} must have shape (N, {d_in}) to feed the first Linear layer, got {tuple(X.shape)}. "
            "Flatten images to vectors first."
        )
    if X.shape[0] == 0:
        raise ValueError(f"{what} holds no cases (N = 0).")
    if X.dtype == torch.bool or X.is_complex():
        raise TypeError(f"{what} has dtype {X.dtype}; pass real numbers (e.g. {what}.float()).")
    if not all_finite(view.model.parameters()):
        bad = [k for k, L in enumerate(view.layers) if not all_finite(L.module.parameters())]
        raise NonFiniteError(f"the weights of layer(s) {bad} contain NaN or Inf; reload a good checkpoint "
                             "or re-initialise the model.")
    X = X.to(device=view.device, dtype=view.dtype)
    if not all_finite([X]):
        raise NonFiniteError(f"{what} contains NaN or Inf; clean or drop those cases first.")
    if y is not None:
        if isinstance(y, np.ndarray):
            y = torch.from_numpy(y)
        if not isinstance(y, torch.Tensor):
            raise ValueError(f"y must be a torch.Tensor or numpy array, got {type(y).__name__}.")
        if y.shape[0] != X.shape[0]:
            raise ValueError(f"X has {X.shape[0]} cases but y has {y.shape[0]}; they must match.")
        y = y.to(view.device)
        if y.dtype.is_floating_point:
            y = y.to(view.dtype)
            if not all_finite([y]):
                raise NonFiniteError("y contains NaN or Inf; clean or drop those cases first.")
    return X, y


def all_finite(tensors) -> bool:
    """True when no tensor holds NaN or Inf, with a single host sync. Tested entry by entry (a sum
    would overflow on huge but finite entries such as 1.7e308)."""
    flags = [torch.isfinite(t.detach()).all() for t in tensors if t.is_floating_point() or t.is_complex()]
    return not flags or bool(torch.stack(flags).all())


def positive_int(value, name: str, meaning: str = "") -> int:
    """``value`` as a positive Python int; a ``ValueError`` naming ``name`` otherwise (2.5, 0, True, "3")."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if isinstance(value, float) and value.is_integer():
        ok = True
    if not ok or int(value) < 1:
        extra = f" ({meaning})" if meaning else ""
        raise ValueError(f"{name} must be a positive integer{extra}, got {value!r}.")
    return int(value)


def make_generator(device: torch.device, generator: torch.Generator | None, seed: int | None):
    """The generator to sample with: ``generator`` if given, else one seeded with ``seed`` (or None)."""
    if generator is not None:
        return generator
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


# ----------------------------------------------------------------------------- forward / backward
def forward(view: NetworkView, X: torch.Tensor, layers: Sequence[int], *, track: bool = True):
    """Forward pass recording ā_k and s_k of the selected layers.

    Returns ``(z, a, s)``. With ``track`` the pre-activations ``s[k]`` are in the autograd graph (X is
    made a leaf that requires grad, so this works whatever the parameters' ``requires_grad``).
    """
    wanted = set(layers)
    a: dict[int, torch.Tensor] = {}
    s: dict[int, torch.Tensor] = {}
    handles = []

    def hook(k, layer):
        def fn(mod, inputs, output):
            inp = inputs[0].detach()
            if layer.has_bias:
                inp = torch.cat([inp, torch.ones_like(inp[:, :1])], dim=1)
            a[k] = inp
            s[k] = output
            # Hand the rest of the network a copy when it has an in-place module (ReLU(inplace=True)):
            # that would otherwise overwrite s_k, and autograd would give ∂L/∂φ(s_k) instead of ∂L/∂s_k.
            return output.clone() if (track and inplace) else None
        return fn

    inplace = any(getattr(mod, "inplace", False) for mod in view.sequence)

    for k in wanted:
        layer = view.layers[k]
        handles.append(layer.module.register_forward_hook(hook(k, layer)))
    try:
        with torch.enable_grad() if track else torch.no_grad():
            X_in = X.detach().requires_grad_(True) if track else X
            # An in-place first module must not write into X (or into a leaf that requires grad).
            z = view.model(X_in.clone() if inplace else X_in)
    finally:
        for h in handles:
            h.remove()
    if z.ndim != 2:
        raise ValueError(f"the network output must have shape (N, C), got {tuple(z.shape)}.")
    return z, a, s


def backward_directions(z: torch.Tensor, s: dict[int, torch.Tensor], layers: Sequence[int],
                        V: torch.Tensor, *, retain_graph: bool = False) -> dict[int, torch.Tensor]:
    """Backpropagate R output directions V (R, n, C) at once; returns g_k of shape (R, n, d_out)."""
    outs = [s[k] for k in layers]
    if V.shape[0] == 1:  # one direction (sampled or training targets): a plain backward pass, no vmap
        grads = torch.autograd.grad(z, outs, grad_outputs=V[0], retain_graph=retain_graph)
        return {k: g.detach()[None] for k, g in zip(layers, grads)}
    try:
        grads = torch.autograd.grad(z, outs, grad_outputs=V, is_grads_batched=True, retain_graph=retain_graph)
    except RuntimeError:
        # Modules that vmap cannot batch through: fall back to one backward pass per direction.
        per = [torch.autograd.grad(z, outs, grad_outputs=V[r], retain_graph=True) for r in range(V.shape[0])]
        grads = [torch.stack([p[i] for p in per]) for i in range(len(outs))]
    return {k: g.detach() for k, g in zip(layers, grads)}


def output_directions(likelihood: Likelihood, z: torch.Tensor, estimator: str, y: torch.Tensor | None,
                      samples: int, generator: torch.Generator | None) -> tuple[torch.Tensor, float]:
    """The directions V (R, n, C) to backpropagate and their weight w (see module docstring)."""
    zd = z.detach()
    if estimator == "exact":
        return likelihood.fisher_sqrt(zd), 1.0
    if estimator == "mc":
        V = torch.stack([likelihood.grad_z(zd, likelihood.sample(zd, generator)) for _ in range(int(samples))])
        return V, 1.0 / samples
    if estimator == "empirical":
        if y is None:
            raise ValueError("the empirical Fisher needs the training targets: pass y=.")
        return likelihood.grad_z(zd, likelihood.check_targets(zd, y))[None], 1.0
    raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}.")


def check_estimator(estimator: str, y, samples: int) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}.")
    if estimator == "empirical" and y is None:
        raise ValueError("the empirical Fisher needs the training targets: pass y=.")
    if estimator == "mc":
        positive_int(samples, "samples", "targets sampled per case")


def capture(view: NetworkView, X: torch.Tensor, likelihood: Likelihood, layers: Sequence[int],
            estimator: str = "exact", y: torch.Tensor | None = None, samples: int = 1,
            generator: torch.Generator | None = None) -> Capture:
    """Capture ā_k and g_k on one chunk of (already checked) cases."""
    z, a, s = forward(view, X, layers)
    if not all_finite([z]):
        raise NonFiniteError(
            "the network output is NaN or Inf on finite inputs: the forward pass overflows (in "
            f"{view.dtype}). Scale the inputs or the weights down, or analyse in float64 (dtype=torch.float64).")
    V, w = output_directions(likelihood, z, estimator, y, samples, generator)
    g = backward_directions(z, s, layers, V.to(z.dtype))
    return Capture(a=a, g=g, weight=w, z=z.detach())


def default_chunk(view: NetworkView, n_directions: int, extra_per_case: int = 0,
                  budget_elems: int = 1 << 24) -> int:
    """Cases per chunk so that a chunk's working set stays near ``budget_elems`` numbers."""
    widths = sum(L.d_out for L in view.layers) + view.layers[-1].d_out
    per_case = n_directions * widths + sum(L.a_dim for L in view.layers) + extra_per_case
    return max(1, budget_elems // max(per_case, 1))


def n_directions(view: NetworkView, estimator: str, samples: int) -> int:
    if estimator == "exact":
        return view.layers[-1].d_out
    return samples if estimator == "mc" else 1


def iter_captures(view: NetworkView, X: torch.Tensor, likelihood: Likelihood, layers: Sequence[int],
                  estimator: str = "exact", y: torch.Tensor | None = None, samples: int = 1,
                  generator: torch.Generator | None = None, chunk_size: int | None = None,
                  extra_per_case: int = 0, progress: bool | None = None, desc: str = "capture",
                  ) -> Iterator[Capture]:
    """Captures over chunks of cases, so that memory does not grow with N."""
    N = X.shape[0]
    if chunk_size is None:
        chunk_size = default_chunk(view, n_directions(view, estimator, samples), extra_per_case)
    chunk_size = positive_int(chunk_size, "chunk_size", "a number of cases per chunk, or None for automatic")
    n_chunks = math.ceil(N / chunk_size)
    # Automatic bars for long captures, unless KFAC_LENS_QUIET is set (the CLI's --quiet sets it).
    show = (n_chunks > 4 and not os.environ.get("KFAC_LENS_QUIET")) if progress is None else bool(progress)
    for start in tqdm(range(0, N, chunk_size), total=n_chunks, desc=desc, disable=not show, leave=False):
        sl = slice(start, start + chunk_size)
        yield capture(view, X[sl], likelihood, layers, estimator,
                      None if y is None else y[sl], samples, generator)
