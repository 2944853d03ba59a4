"""One place that runs the forward and backward passes and records ā_k and g_k (Appendix A, Algorithm 1).

Everything that needs per-case activations or output gradients consumes a :class:`Capture`:
the exact / Monte-Carlo / empirical Fisher, the Kronecker factors, the cumulant terms and the optimizer.

A capture holds, for a chunk of n cases and the selected layers k:

- ``a[k]``: ā_k, shape (n, a_dim) — the layer input with the homogeneous 1 appended (bias layers);
- ``g[k]``: g_k = ∂L/∂s_k for R *directions* per case, shape (R, n, d_out);
- ``weight``: the scalar w with which each direction enters, so that for one case
  ``E_y[g gᵀ] = w Σ_r g_r g_rᵀ``.

A layer with several uses per case (called several times, applied to (N, T, D) inputs, or a
convolution's positions, whose ā are im2col patches) has ``a[k]`` of shape (n, U, a_dim) and ``g[k]`` of
shape (R, n, U, d_out), its U uses concatenated in call order (docs/math.md §1).

Directions are what is backpropagated from the output: the columns of a square root of F_R (exact
expectation over y, w = 1), gradients of sampled targets (Monte-Carlo, w = 1/samples), or the
gradient of the training targets (empirical Fisher, w = 1).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import NonFiniteError, UnsupportedModelError
from .likelihoods import Likelihood
from .nets import NetworkView
from .options import Estimator, parse
from .probe import check_cases_first, check_modules, probe_layers
from .progress import progress_bar

ESTIMATORS = Estimator.choices()


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
    """``model`` as a :class:`NetworkView` (an ``nn.Sequential`` read in module order; pass any other
    ``nn.Module`` as ``NetworkView(model, example_input=X[:2])``)."""
    return model if isinstance(model, NetworkView) else NetworkView(model)


def analysis_view(model, dtype: torch.dtype | None) -> NetworkView:
    """A view of ``model`` in ``dtype`` on the model's device; a cast copy when the dtype differs."""
    return as_view(model).astype(dtype)


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
    if likelihood is not None and not view.is_general:
        warn_if_link_applied_twice(view, likelihood)
    if isinstance(X, np.ndarray):
        X = torch.from_numpy(X)
    if not isinstance(X, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor or numpy array, got {type(X).__name__}.")
    d_in = view.layers[0].d_in
    if view.is_chain and (X.ndim != 2 or X.shape[1] != d_in):
        raise ValueError(
            f"{what} must have shape (N, {d_in}) to feed the first Linear layer, got {tuple(X.shape)}. "
            "Flatten images to vectors first."
        )
    if X.ndim == 0 or X.shape[0] == 0:
        raise ValueError(f"{what} holds no cases (N = 0).")
    if X.dtype == torch.bool or X.is_complex():
        raise TypeError(f"{what} has dtype {X.dtype}; pass real numbers (e.g. {what}.float()).")
    if not all_finite(view.model.parameters()):
        bad = [k for k, L in enumerate(view.layers) if not all_finite(L.module.parameters())]
        raise NonFiniteError(f"the weights of layer(s) {bad} contain NaN or Inf; reload a good checkpoint "
                             "or re-initialise the model.")
    keep_integers = not view.is_chain and not X.is_floating_point()  # e.g. token ids for an nn.Embedding
    X = X.to(device=view.device) if keep_integers else X.to(device=view.device, dtype=view.dtype)
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
    """True when no tensor holds NaN or Inf, with a single host sync. Tested through each tensor's largest
    and smallest entry (a sum would overflow on huge but finite entries such as 1.7e308)."""
    flags = []
    for t in tensors:
        if t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
            continue
        t = t.detach()
        if t.is_complex():
            flags.append(torch.isfinite(t).all())
        else:  # NaN propagates through amax/amin, ±Inf shows in one of them: two reductions, no temporaries
            flags.append(torch.isfinite(torch.stack([t.amax(), t.amin()])).all())
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
@dataclass
class LayerOutputs:
    """The outputs s of one layer's calls in a forward pass, to differentiate with respect to."""

    module: nn.Module
    outputs: list

    def gradient_rows(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-call gradients (R, n, *out_shape) → g of shape (R, n, U, d_out), uses in call order."""
        parts = []
        for g in grads:
            R, n = g.shape[:2]
            if isinstance(self.module, nn.Conv2d):
                parts.append(g.reshape(R, n, g.shape[2], -1).transpose(2, 3))
            else:
                parts.append(g.reshape(R, n, -1, g.shape[-1]))
        return torch.cat(parts, dim=2)


def layer_input_rows(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ā of one call (docs/math.md §1): (n, a_dim) for a 2-D Linear input, else (n, U, a_dim) — the
    positions of an (N, ..., D) input, or a convolution's im2col patches (channel-major, as weight.reshape)."""
    n = x.shape[0]
    if isinstance(mod, nn.Conv2d):
        if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
            x, pad = F.pad(x, mod._reversed_padding_repeated_twice, mode=mode), 0
        else:
            pad = mod.padding
        x = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=pad, stride=mod.stride).transpose(1, 2)
    elif x.ndim > 2:
        x = x.reshape(n, -1, x.shape[-1])
    if mod.bias is not None:
        x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
    return x


def forward(view: NetworkView, X: torch.Tensor, layers: Sequence[int], *, track: bool = True):
    """Forward pass recording ā_k and s_k of the selected layers with forward hooks.

    Returns ``(z, a, s)``. With ``track`` the pre-activations ``s[k]`` are in the autograd graph (X is
    made a leaf that requires grad, so this works whatever the parameters' ``requires_grad``). ``s[k]``
    is the output tensor of a layer used once per case, else a :class:`LayerOutputs`.
    """
    wanted = set(layers)
    calls: dict[int, list] = {k: [] for k in wanted}
    n = X.shape[0]
    check_modules(view.model)
    # Hand the rest of the network a copy of s_k when something may write into it in place
    # (ReLU(inplace=True), ``h += x`` in a forward): autograd would otherwise give ∂L/∂(the result).
    copy_out = track and (not view.is_chain or any(getattr(mod, "inplace", False) for mod in view.sequence))

    def hook(k, layer):
        def fn(mod, inputs, output):
            inp = inputs[0]
            check_cases_first(inp, n, f"layer {k} ('{layer.name}', {type(mod).__name__})")
            if track and not output.requires_grad:
                output = output.detach().requires_grad_(True)
            calls[k].append((layer_input_rows(mod, inp.detach()), output))
            return output.clone() if copy_out else output
        return fn

    handles = [view.layers[k].module.register_forward_hook(hook(k, view.layers[k])) for k in wanted]
    try:
        with torch.enable_grad() if track else torch.no_grad():
            X_in = X.detach().requires_grad_(True) if track and X.is_floating_point() else X
            # An in-place first module must not write into X (or into a leaf that requires grad).
            z = view.model(X_in.clone() if copy_out else X_in)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(z, torch.Tensor) or z.ndim < 2 or (view.is_chain and z.ndim != 2):
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"the network output must have shape (N, C) (or (N, T, C) for a general module, one "
                         f"likelihood term per position), got {shape}.")
    a: dict[int, torch.Tensor] = {}
    s: dict = {}
    for k in layers:
        got = calls[k]
        if not got:
            raise UnsupportedModelError(f"layer {k} ('{view.layers[k].name}') was not called in this forward "
                                        "pass; kfac_lens needs every layer used on every input.")
        if len(got) == 1 and got[0][0].ndim == 2:
            a[k], s[k] = got[0]
            continue
        a[k] = torch.cat([r if r.ndim == 3 else r[:, None] for r, _ in got], dim=1)
        s[k] = LayerOutputs(view.layers[k].module, [o for _, o in got])
    return z, a, s


def backward_directions(z: torch.Tensor, s: dict, layers: Sequence[int],
                        V: torch.Tensor, *, retain_graph: bool = False) -> dict[int, torch.Tensor]:
    """Backpropagate R output directions V (R, n, C) at once; returns g_k of shape (R, n, d_out), or
    (R, n, U, d_out) for a layer with several uses per case (``s[k]`` a :class:`LayerOutputs`)."""
    outs, spans = [], []
    for k in layers:
        parts = s[k].outputs if isinstance(s[k], LayerOutputs) else [s[k]]
        spans.append((len(outs), len(outs) + len(parts)))
        outs.extend(parts)
    if V.shape[0] == 1:  # one direction (sampled or training targets): a plain backward pass, no vmap
        grads = [g[None] for g in torch.autograd.grad(z, outs, grad_outputs=V[0], retain_graph=retain_graph)]
    else:
        try:
            grads = torch.autograd.grad(z, outs, grad_outputs=V, is_grads_batched=True,
                                        retain_graph=retain_graph)
        except RuntimeError:
            # Modules that vmap cannot batch through: fall back to one backward pass per direction.
            per = [torch.autograd.grad(z, outs, grad_outputs=V[r], retain_graph=True) for r in range(V.shape[0])]
            grads = [torch.stack([p[i] for p in per]) for i in range(len(outs))]
    out = {}
    for k, (i, j) in zip(layers, spans):
        got = [g.detach() for g in grads[i:j]]
        out[k] = s[k].gradient_rows(got) if isinstance(s[k], LayerOutputs) else got[0]
    return out


def output_directions(likelihood: Likelihood, z: torch.Tensor, estimator: str, y: torch.Tensor | None,
                      samples: int, generator: torch.Generator | None) -> tuple[torch.Tensor, float]:
    """The directions V (R, n, C) to backpropagate and their weight w (see module docstring).

    An output of shape (n, T, C) has one likelihood term per position (docs/math.md §2): exact directions
    are then those of each position on its own, V of shape (T·C, n, T, C)."""
    zd = z.detach()
    if zd.ndim > 2:
        n, C = zd.shape[0], zd.shape[-1]
        T = zd[0].numel() // C
        if y is not None:
            if tuple(y.shape[:zd.ndim - 1]) != tuple(zd.shape[:-1]):
                raise ValueError(f"the network output has shape {tuple(zd.shape)}, one likelihood term per "
                                 f"position, so y must have shape {tuple(zd.shape[:-1])} (plus C for per-output "
                                 f"targets), got {tuple(y.shape)}.")
            y = y.reshape(n * T, *y.shape[zd.ndim - 1:])
        V, w = output_directions(likelihood, zd.reshape(n * T, C), estimator, y, samples, generator)
        V = V.reshape(V.shape[0], n, T, C)
        if estimator == "exact":  # direction (t, r) lives at position t only
            eye = torch.eye(T, dtype=V.dtype, device=V.device)
            V = (eye[:, None, None, :, None] * V[None]).reshape(T * V.shape[0], n, T, C)
        return V.reshape(V.shape[0], *zd.shape), w
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


def check_estimator(estimator: str | Estimator, y, samples: int) -> str:
    """The :class:`~kfac_lens.options.Estimator` ``estimator`` as its string, checked with what it needs."""
    try:
        estimator = parse(Estimator, estimator, "estimator").value
    except ValueError:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS} "
                         "(or kfac_lens.options.Estimator).") from None
    if estimator == "empirical" and y is None:
        raise ValueError("the empirical Fisher needs the training targets: pass y=.")
    if estimator == "mc":
        positive_int(samples, "samples", "targets sampled per case")
    return estimator


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


def layer_uses(view: NetworkView, X: torch.Tensor | None = None) -> list[int]:
    """Uses per case of each layer: from the view's probe pass, else measured on the first case of X
    (a Sequential with convolutions), else 1."""
    if view.is_chain or X is None or all(L.uses is not None for L in view.layers):
        return [L.uses or 1 for L in view.layers]
    found, _ = probe_layers(view.model, X[:1])
    seen = {id(p.module): p.uses for p in found}
    return [seen.get(id(L.module), 1) for L in view.layers]


def default_chunk(view: NetworkView, n_directions: int, extra_per_case: int = 0,
                  budget_elems: int = 1 << 24, uses: Sequence[int] | None = None) -> int:
    """Cases per chunk so that a chunk's working set stays near ``budget_elems`` numbers."""
    uses = [L.uses or 1 for L in view.layers] if uses is None else uses
    widths = sum(L.d_out * u for L, u in zip(view.layers, uses)) + view.output_dim
    per_case = n_directions * widths + sum(L.a_dim * u for L, u in zip(view.layers, uses)) + extra_per_case
    return max(1, budget_elems // max(per_case, 1))


def n_directions(view: NetworkView, estimator: str, samples: int) -> int:
    if estimator == "exact":
        return view.output_dim * (math.prod(view.output_shape[1:-1]) if view.output_shape else 1)
    return samples if estimator == "mc" else 1


def chunk_starts(n_cases: int, chunk_size: int, progress: bool | None = None, desc: str = "capture"):
    """The first case of each chunk, behind a progress bar: automatic (shown for more than 4 chunks unless
    ``KFAC_LENS_QUIET`` is set, as the CLI's ``--quiet`` does), or forced on/off by ``progress``."""
    n_chunks = math.ceil(n_cases / chunk_size)
    return progress_bar(range(0, n_cases, chunk_size), total=n_chunks, desc=desc, long=n_chunks > 4,
                        progress=progress)


def iter_captures(view: NetworkView, X: torch.Tensor, likelihood: Likelihood, layers: Sequence[int],
                  estimator: str = "exact", y: torch.Tensor | None = None, samples: int = 1,
                  generator: torch.Generator | None = None, chunk_size: int | None = None,
                  extra_per_case: int = 0, progress: bool | None = None, desc: str = "capture",
                  ) -> Iterator[Capture]:
    """Captures over chunks of cases, so that memory does not grow with N."""
    N = X.shape[0]
    if chunk_size is None:
        chunk_size = default_chunk(view, n_directions(view, estimator, samples), extra_per_case,
                                   uses=layer_uses(view, X))
    chunk_size = positive_int(chunk_size, "chunk_size", "a number of cases per chunk, or None for automatic")
    for start in chunk_starts(N, chunk_size, progress, desc):
        sl = slice(start, start + chunk_size)
        yield capture(view, X[sl], likelihood, layers, estimator,
                      None if y is None else y[sl], samples, generator)
