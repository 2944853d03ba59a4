"""The layered view of a network and the paper's parameter layout (docs/math.md §1).

A network is read as layers k = 0..ℓ−1 (0-based; the paper's layer i is k = i−1): its ``nn.Linear`` and
``nn.Conv2d`` modules. Layer k computes ``s_k = W_k ā_k`` where ā_k is its input (for a convolution, one
im2col patch) with a homogeneous 1 appended when it has a bias, so ``W_k = [weight, bias]`` has the bias as
its last column; a convolution's weight is ``weight.reshape(out, −1)``. θ stacks ``vec(W_k)``
column-major: entry ``W_k[r, c]`` sits at offset ``c·d_out + r``.

An ``nn.Sequential`` is read in module order. Any other ``nn.Module`` needs an example input, on which
one probe pass finds the layers in the order of their first use (:mod:`kfac_lens.probe`); a layer used
several times per case (tied weights, positions of a sequence, a convolution's positions) contributes
the sum over its uses.

:func:`mats_to_vec` / :func:`vec_to_mats` are the one function pair that owns that layout.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import UnsupportedModelError
from .probe import SUPPORTED as GENERAL_SUPPORTED
from .probe import check_modules, fixed_parameters, is_layer, probe_layers


@dataclass(frozen=True)
class Layer:
    """One ``nn.Linear`` or ``nn.Conv2d`` layer. ``index`` is its 0-based position among the layers.

    ``name`` is its name in the model; ``uses`` its uses per case found by the probe pass (calls times
    positions; None when not probed)."""

    index: int
    module: nn.Module
    name: str = ""
    uses: int | None = None

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d)

    @property
    def d_in(self) -> int:
        """Width of the layer's input row: in_features, or in_channels·kh·kw for a convolution."""
        return math.prod(self.module.weight.shape[1:])

    @property
    def d_out(self) -> int:
        return self.module.weight.shape[0]

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None

    @property
    def a_dim(self) -> int:
        """Dimension of ā (input plus the homogeneous 1 when the layer has a bias)."""
        return self.d_in + int(self.has_bias)

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of W_k = [weight, bias]: (d_out, a_dim)."""
        return (self.d_out, self.a_dim)

    @property
    def n_params(self) -> int:
        return self.d_out * self.a_dim


def _flatten_sequential(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The modules of a (nested) Sequential in call order, *including* repeated uses of one module
    (``named_children`` would drop them)."""
    out = []
    for name, child in model._modules.items():
        if child is None:
            continue
        full = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            out.extend(_flatten_sequential(child, full + "."))
        else:
            out.append((full, child))
    return out


class NetworkView:
    """Read a network as the paper's layers (docs/math.md §1).

    ``NetworkView(seq)`` reads an ``nn.Sequential`` in module order, each layer used once.
    ``NetworkView(model, example_input=X[:2])`` reads any ``nn.Module``: one probe pass on the example
    input finds its ``nn.Linear`` and ``nn.Conv2d`` layers in the order of their first use; tied layers and
    layers applied to (N, T, D) inputs sum over their uses. Parameters of other modules are held fixed
    (named in a warning, unless ``warn=False``, and in :meth:`summary`). The output may be (N, C), or
    (N, T, C) with one likelihood term per position. Raises :class:`UnsupportedModelError` (a
    ``ValueError``) for what it cannot read, naming the module.
    """

    SUPPORTED = (
        "an nn.Sequential of nn.Linear / nn.Conv2d layers, each used once, with per-case modules (Tanh, ReLU, "
        "Flatten, fixed transforms, ...) between them, or, with NetworkView(model, example_input=X), any "
        f"nn.Module with {GENERAL_SUPPORTED}"
    )

    def __init__(self, model: nn.Module, example_input: torch.Tensor | None = None, *, warn: bool = True):
        if isinstance(model, NetworkView):
            if example_input is None:
                example_input = model.example_input
            model = model.model
        if not isinstance(model, nn.Module):
            raise UnsupportedModelError(f"kfac_lens reads {self.SUPPORTED}; got a {type(model).__name__}, "
                                        "which is not an nn.Module.")
        _refuse_unusable_devices(model)
        self.model = model
        self.example_input = None
        self.output_shape: tuple[int, ...] | None = None
        if example_input is None:
            self._read_sequential(model)
        else:
            self._read_general(model, example_input)
        if not self.layers:
            raise UnsupportedModelError(f"the model has no nn.Linear layer (nor nn.Conv2d) in use; kfac_lens reads "
                                        f"{self.SUPPORTED}.")
        self.fixed = tuple(fixed_parameters(model, [L.module for L in self.layers]))
        if self.fixed and warn:
            warnings.warn(f"kfac_lens analyses the nn.Linear and nn.Conv2d layers; the parameters "
                          f"{', '.join(self.fixed)} are held fixed (not part of θ).", UserWarning, stacklevel=2)

    def _read_sequential(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Sequential):
            raise UnsupportedModelError(
                f"kfac_lens reads {self.SUPPORTED}; got a {type(model).__name__} without an example input. "
                "Rewrite the model as an nn.Sequential, or pass NetworkView(model, example_input=X[:2]).")
        flat = _flatten_sequential(model)
        self._sequence: tuple[nn.Module, ...] | None = tuple(mod for _, mod in flat)
        _refuse_reused_parameters(flat)
        check_modules(model)
        self.layers: tuple[Layer, ...] = tuple(
            Layer(i, mod, name) for i, (name, mod) in enumerate((n, m) for n, m in flat if is_layer(m)))

    def _read_general(self, model: nn.Module, example_input) -> None:
        if isinstance(example_input, np.ndarray):
            example_input = torch.from_numpy(example_input)
        if not isinstance(example_input, torch.Tensor) or example_input.ndim == 0 or not len(example_input):
            raise ValueError("example_input must be a tensor holding at least one case (first dimension N ≥ 1), "
                             f"got {example_input!r}.")
        check_modules(model)
        params = list(model.parameters())
        if params and example_input.is_floating_point():
            example_input = example_input.to(device=params[0].device, dtype=params[0].dtype)
        elif params:
            example_input = example_input.to(params[0].device)
        self.example_input = example_input.detach()[:4]
        self._sequence = None
        found, self.output_shape = probe_layers(model, self.example_input)
        self.layers = tuple(Layer(i, p.module, p.name, p.uses) for i, p in enumerate(found))

    @property
    def is_general(self) -> bool:
        """True when the layers were found by a probe pass (``example_input=``), not in module order."""
        return self._sequence is None

    @property
    def is_chain(self) -> bool:
        """True for an ``nn.Sequential`` of ``nn.Linear`` layers read in module order (the paper's chain)."""
        return not self.is_general and not any(L.is_conv for L in self.layers)

    @property
    def sequence(self) -> tuple[nn.Module, ...]:
        """The modules of an ``nn.Sequential`` in call order (repeats included)."""
        if self._sequence is None:
            raise UnsupportedModelError(
                f"this view reads a {type(self.model).__name__} through a probe pass, so it has no module "
                "sequence; this code path supports an nn.Sequential read without example_input.")
        return self._sequence

    @property
    def output_dim(self) -> int:
        """C, the width of the network output (the last layer's d_out for a Sequential)."""
        return self.output_shape[-1] if self.output_shape else self.layers[-1].d_out

    def astype(self, dtype: torch.dtype) -> NetworkView:
        """A view of a copy of the model cast to ``dtype`` (self when the dtype already matches)."""
        if dtype is None or dtype == self.dtype:
            return self
        example = self.example_input
        if example is not None and example.is_floating_point():
            example = example.to(dtype)
        return NetworkView(copy.deepcopy(self.model).to(dtype), example, warn=False)

    def summary(self) -> str:
        """The layers with their names, types and shapes, and the parameters held fixed."""
        how = "layers in order of first use (probe pass)" if self.is_general else "layers in module order"
        lines = [f"{type(self.model).__name__}: {len(self.layers)} layers, P = {self.n_params()}; {how}",
                 f"{'k':>3}  {'name':<20} {'type':<8} {'weight':<18} {'W_k':<12} {'params':>8} {'uses':>6}"]
        for L in self.layers:
            uses = "?" if L.uses is None else str(L.uses)
            lines.append(f"{L.index:>3}  {L.name:<20} {type(L.module).__name__:<8} "
                         f"{str(tuple(L.module.weight.shape)):<18} {str(L.shape):<12} {L.n_params:>8} {uses:>6}")
        if self.fixed:
            lines.append("held fixed: " + ", ".join(self.fixed))
        return "\n".join(lines)

    # ----------------------------------------------------------------- selection and sizes
    def __len__(self) -> int:
        return len(self.layers)

    def select(self, layers: Iterable[int] | None = None) -> list[int]:
        """Validate a layer subset (0-based Linear indices); ``None`` means all layers."""
        if layers is None:
            return list(range(len(self.layers)))
        sel = layer_indices(layers)
        n = len(self.layers)
        bad = [k for k in sel if not 0 <= k < n]
        if bad:
            raise ValueError(f"layers={sel} names layer(s) {bad}, but the network has layers 0..{n - 1}.")
        if len(set(sel)) != len(sel) or sel != sorted(sel):
            raise ValueError(f"layers={sel} must be strictly increasing, without repeats.")
        if not sel:
            raise ValueError("layers=[] selects nothing; pass None for all layers.")
        return sel

    def shapes(self, layers: Iterable[int] | None = None) -> list[tuple[int, int]]:
        return [self.layers[k].shape for k in self.select(layers)]

    def n_params(self, layers: Iterable[int] | None = None) -> int:
        return sum(self.layers[k].n_params for k in self.select(layers))

    @property
    def device(self) -> torch.device:
        return self.layers[0].module.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].module.weight.dtype

    # ----------------------------------------------------------------- W_k = [weight, bias]
    def weight_matrices(self, layers: Iterable[int] | None = None) -> list[torch.Tensor]:
        """``[W_k]`` for the selected layers, detached (bias as last column)."""
        return [_linear_to_matrix(self.layers[k].module, lambda p: p.detach()) for k in self.select(layers)]

    def gradient_matrices(self, layers: Iterable[int] | None = None) -> list[torch.Tensor]:
        """``[DW_k]`` from the ``.grad`` fields (zeros where a grad is missing)."""

        def grad(p):
            return p.grad.detach() if p.grad is not None else torch.zeros_like(p)

        return [_linear_to_matrix(self.layers[k].module, grad) for k in self.select(layers)]

    @torch.no_grad()
    def set_weight_matrices(self, mats: Sequence[torch.Tensor], layers: Iterable[int] | None = None) -> None:
        for k, W in zip(self.select(layers), mats, strict=True):
            mod = self.layers[k].module
            weight, bias = self.split(k, W)
            mod.weight.copy_(weight)
            if bias is not None:
                mod.bias.copy_(bias)

    @torch.no_grad()
    def add_to_weights(self, mats: Sequence[torch.Tensor], layers: Iterable[int] | None = None,
                       alpha: float = 1.0) -> None:
        """θ ← θ + α·δ for δ given as per-layer matrices."""
        for k, D in zip(self.select(layers), mats, strict=True):
            mod = self.layers[k].module
            dw, db = self.split(k, D)
            mod.weight.add_(dw, alpha=alpha)
            if db is not None:
                mod.bias.add_(db, alpha=alpha)

    def split(self, k: int, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split a ``(..., d_out, a_dim)`` matrix of layer k into (weight, bias), the weight in the module's shape."""
        layer = self.layers[k]
        if tuple(W.shape[-2:]) != layer.shape:
            raise ValueError(f"layer {k} expects a matrix of shape {layer.shape}, got {tuple(W.shape)}.")
        weight, bias = (W[..., :-1], W[..., -1]) if layer.has_bias else (W, None)
        if layer.is_conv:  # back to (out, in, kh, kw)
            weight = weight.reshape(*W.shape[:-2], *layer.module.weight.shape)
        return weight, bias

    def parameter_names(self, layers: Iterable[int] | None = None) -> list[tuple[str, str | None]]:
        """Names (in ``model.named_parameters()``) of each selected layer's weight and bias."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        out = []
        for k in self.select(layers):
            mod = self.layers[k].module
            out.append((names[id(mod.weight)], names[id(mod.bias)] if mod.bias is not None else None))
        return out

    # ----------------------------------------------------------------- paper layout
    def flatten(self, mats: Sequence[torch.Tensor]) -> torch.Tensor:
        return mats_to_vec(mats)

    def unflatten(self, vec: torch.Tensor, layers: Iterable[int] | None = None) -> list[torch.Tensor]:
        return vec_to_mats(vec, self.shapes(layers))

    def block_slices(self, layers: Iterable[int] | None = None) -> list[slice]:
        """The slice of θ (restricted to ``layers``) that each selected layer occupies."""
        out, start = [], 0
        for d_out, a_dim in self.shapes(layers):
            out.append(slice(start, start + d_out * a_dim))
            start += d_out * a_dim
        return out


def layer_indices(layers, name: str = "layers") -> list[int]:
    """``layers`` as a list of Python ints; a ``TypeError`` naming the argument for anything else
    (a bare int, floats such as 1.2, bools, strings)."""
    if isinstance(layers, (int, str, bytes)) or (isinstance(layers, torch.Tensor) and layers.ndim == 0):
        raise TypeError(f"{name} must be a list of 0-based layer indices, e.g. {name}=[{layers!r}], "
                        f"got the single value {layers!r}.")
    try:
        items = list(layers)
    except TypeError:
        raise TypeError(f"{name} must be a list of 0-based layer indices such as [1, 2], "
                        f"got {type(layers).__name__}.") from None
    out = []
    for k in items:
        if isinstance(k, torch.Tensor) and k.ndim == 0 and not k.is_floating_point() and k.dtype != torch.bool:
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"{name}={items!r} holds {k!r} ({type(k).__name__}); layer indices must be "
                            "integers (0-based positions among the nn.Linear / nn.Conv2d layers).")
        out.append(int(k))
    return out


def layer_index(k, name: str) -> int:
    """One 0-based layer index given as ``name`` (e.g. ``k`` of a block), checked like :func:`layer_indices`."""
    if isinstance(k, (list, tuple)):
        raise TypeError(f"{name} must be a single integer layer index, got {k!r}.")
    return layer_indices([k], name)[0]


def _refuse_reused_parameters(flat: list[tuple[str, nn.Module]]) -> None:
    """A module with parameters that runs more than once in the chain (tied weights) would be read as
    one layer and its other uses dropped: refuse it by name."""
    seen: dict[int, str] = {}
    for name, mod in flat:
        if not any(True for _ in mod.parameters()):
            continue
        if id(mod) in seen:
            raise UnsupportedModelError(
                f"module '{name}' ({type(mod).__name__}) is the same module as '{seen[id(mod)]}': its weights "
                "are used more than once in the forward pass (tied or shared weights). An nn.Sequential is read "
                "in module order, each layer used once: give each use its own nn.Linear (copy.deepcopy) to "
                "analyse them as separate layers, or pass NetworkView(model, example_input=X[:2]) to read the "
                "tied layer as one layer that sums over its uses."
            )
        seen[id(mod)] = name


def _refuse_unusable_devices(model: nn.Module) -> None:
    """Parameters on the meta device hold no numbers, and layers on several devices cannot be chained."""
    devices = {p.device for p in model.parameters()}
    if any(d.type == "meta" for d in devices):
        raise UnsupportedModelError(
            "the model's parameters are on the 'meta' device, so they hold no values to analyse. "
            "Materialise it first: model.to_empty(device='cpu') followed by model.load_state_dict(...)."
        )
    if len(devices) > 1:
        raise UnsupportedModelError(
            f"the model's parameters are spread over several devices {sorted(map(str, devices))}; "
            "move it to one device with model.to(device)."
        )


def _linear_to_matrix(mod: nn.Module, get) -> torch.Tensor:
    w = get(mod.weight).reshape(mod.weight.shape[0], -1)
    if mod.bias is None:
        return w.clone()
    return torch.cat([w, get(mod.bias)[:, None]], dim=1)


def mats_to_vec(mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """[W_k] → θ: stack ``vec(W_k)`` column-major (docs/math.md §1). Leading batch dims are kept."""
    parts = [W.transpose(-1, -2).reshape(*W.shape[:-2], -1) for W in mats]
    return torch.cat(parts, dim=-1)


def vec_to_mats(vec: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """θ → [W_k], the inverse of :func:`mats_to_vec`. Leading batch dims are kept."""
    total = sum(r * c for r, c in shapes)
    if vec.shape[-1] != total:
        raise ValueError(f"expected a vector with {total} entries (the selected layers), got {vec.shape[-1]}.")
    out, start = [], 0
    batch = vec.shape[:-1]
    for r, c in shapes:
        piece = vec[..., start:start + r * c].reshape(*batch, c, r).transpose(-1, -2)
        out.append(piece)
        start += r * c
    return out
