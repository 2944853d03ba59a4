"""The layered view of an ``nn.Sequential`` and the paper's parameter layout (docs/math.md §1).

A network is read as Linear layers k = 0..ℓ−1 (0-based; the paper's layer i is k = i−1) with
parameter-free modules between them. Layer k computes ``s_k = W_k ā_k`` where ā_k is its input with a
homogeneous 1 appended (when the Linear has a bias), so ``W_k = [weight, bias]`` has the bias as its
last column. θ stacks ``vec(W_k)`` column-major: entry ``W_k[r, c]`` sits at offset ``c·d_out + r``.

:func:`mats_to_vec` / :func:`vec_to_mats` are the one function pair that owns that layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import UnsupportedModelError

# Parameter-free modules that would break the per-case picture K-FAC relies on.
_CASE_MIXING = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass(frozen=True)
class Layer:
    """One ``nn.Linear`` of the chain. ``index`` is its 0-based position among the Linear layers."""

    index: int
    module: nn.Linear

    @property
    def d_in(self) -> int:
        return self.module.in_features

    @property
    def d_out(self) -> int:
        return self.module.out_features

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
    """Read an ``nn.Sequential`` as the paper's chain of layers (docs/math.md §1).

    Raises :class:`UnsupportedModelError` (a ``ValueError``) for anything else, naming the module.
    """

    SUPPORTED = (
        "an nn.Sequential whose parameters all belong to nn.Linear layers, with parameter-free, "
        "per-case modules (Tanh, Sigmoid, ReLU, Identity, fixed transforms, ...) between them"
    )

    def __init__(self, model: nn.Module):
        if isinstance(model, NetworkView):
            model = model.model
        if not isinstance(model, nn.Sequential):
            raise UnsupportedModelError(
                f"kfac_lens reads {self.SUPPORTED}; got a {type(model).__name__}. "
                "Rewrite the model as an nn.Sequential."
            )
        self.model = model
        layers: list[Layer] = []
        flat = _flatten_sequential(model)
        self.sequence: tuple[nn.Module, ...] = tuple(mod for _, mod in flat)
        _refuse_reused_parameters(flat)
        for name, mod in flat:
            if isinstance(mod, nn.Linear):
                layers.append(Layer(len(layers), mod))
                continue
            if isinstance(mod, _CASE_MIXING):
                raise UnsupportedModelError(
                    f"module '{name}' ({type(mod).__name__}) mixes statistics across cases, so the Fisher "
                    f"is not a per-case average. kfac_lens reads {self.SUPPORTED}."
                )
            if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0:
                raise UnsupportedModelError(
                    f"module '{name}' ({type(mod).__name__}, p={mod.p}) is random, so the Fisher is not "
                    "defined for it. Remove it or set p=0."
                )
            n_par = sum(1 for _ in mod.parameters())
            if n_par:
                raise UnsupportedModelError(
                    f"module '{name}' ({type(mod).__name__}) has parameters but is not nn.Linear. "
                    f"kfac_lens reads {self.SUPPORTED}."
                )
        if not layers:
            raise UnsupportedModelError(f"the model has no nn.Linear layer; kfac_lens reads {self.SUPPORTED}.")
        self.layers: tuple[Layer, ...] = tuple(layers)
        _refuse_unusable_devices(model, flat)

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
        """Split a ``(..., d_out, a_dim)`` matrix of layer k into (weight, bias)."""
        layer = self.layers[k]
        if tuple(W.shape[-2:]) != layer.shape:
            raise ValueError(f"layer {k} expects a matrix of shape {layer.shape}, got {tuple(W.shape)}.")
        if layer.has_bias:
            return W[..., :-1], W[..., -1]
        return W, None

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
                            "integers (0-based positions among the nn.Linear layers).")
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
                "are used more than once in the forward pass (tied or shared weights). kfac_lens reads each "
                "Linear as one layer used once; give each use its own nn.Linear (copy.deepcopy) to analyse "
                "them as separate layers."
            )
        seen[id(mod)] = name


def _refuse_unusable_devices(model: nn.Module, flat) -> None:
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


def _linear_to_matrix(mod: nn.Linear, get) -> torch.Tensor:
    w = get(mod.weight)
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
