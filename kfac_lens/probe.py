"""Finding the curvature layers of any ``nn.Module``, and the modules kfac_lens refuses (docs/math.md §1).

The curvature layers are the ``nn.Linear`` and ``nn.Conv2d`` modules a forward pass calls, in the order
of their first call: :func:`probe_layers` runs the model once on an example input with forward hooks
to find them. :func:`check_modules` refuses, by name, the modules that make the Fisher ill-defined
(modules that mix cases, random ones) and the weight layers that are not yet supported;
:func:`fixed_parameters` names the parameters of every other module, which are held fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError

#: The modules whose weights kfac_lens analyses.
LAYER_TYPES = (nn.Linear, nn.Conv2d)

SUPPORTED = (
    "nn.Linear and nn.Conv2d layers (groups=1) inside any nn.Module; other modules must act on each case "
    "separately (parameter-free ones, or ones whose parameters are held fixed: LayerNorm, Embedding, ...)"
)

# Modules that mix statistics across the cases of a batch (the Fisher is then not a per-case average).
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass(frozen=True)
class ProbedLayer:
    """One layer found by :func:`probe_layers`: its name, module, calls and uses per case in one pass."""

    name: str
    module: nn.Module
    calls: int
    uses: int


def is_layer(mod: nn.Module) -> bool:
    """True for the modules whose weights kfac_lens analyses (``nn.Linear``, ``nn.Conv2d``)."""
    return isinstance(mod, LAYER_TYPES)


def check_module(name: str, mod: nn.Module) -> None:
    """Refuse one module by name when kfac_lens cannot read it (docs/math.md §1)."""
    if isinstance(mod, _NORMS) and (mod.training or not mod.track_running_stats
                                    or isinstance(mod, nn.modules.instancenorm._InstanceNorm)):
        raise UnsupportedModelError(
            f"module '{name}' ({type(mod).__name__}) mixes statistics across cases, so the Fisher is not a "
            "per-case average. Put it in eval mode with running statistics (model.eval()), or remove it; "
            f"kfac_lens reads {SUPPORTED}.")
    if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0 and mod.training:
        raise UnsupportedModelError(
            f"module '{name}' ({type(mod).__name__}, p={mod.p}) is random, so the Fisher is not defined for "
            "it. Remove it, set p=0, or put the model in eval mode.")
    if isinstance(mod, nn.modules.conv._ConvNd) and not isinstance(mod, nn.Conv2d):
        raise UnsupportedModelError(
            f"module '{name}' ({type(mod).__name__}) is a convolution kfac_lens does not analyse; it reads "
            f"{SUPPORTED}. Use nn.Linear or nn.Conv2d.")
    if isinstance(mod, nn.Conv2d) and mod.groups != 1:
        raise UnsupportedModelError(
            f"module '{name}' (Conv2d, groups={mod.groups}) is a grouped convolution; kfac_lens reads {SUPPORTED}.")


def check_modules(model: nn.Module) -> None:
    """:func:`check_module` on every submodule, and one owner per parameter among the layers."""
    owners: dict[int, dict[int, tuple[nn.Module, str]]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        check_module(name or type(model).__name__, mod)
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), {}).setdefault(id(mod), (mod, f"{name}.{pname}" if name else pname))
    for entries in owners.values():
        if len(entries) > 1 and any(is_layer(mod) for mod, _ in entries.values()):
            raise UnsupportedModelError(
                f"the parameters {sorted(n for _, n in entries.values())} are one tensor shared by several "
                "modules. kfac_lens reads tied weights as one nn.Linear / nn.Conv2d module called several times "
                "in forward: call the same module at each place instead of sharing its parameter.")


def check_cases_first(x: torch.Tensor, n: int, what: str) -> None:
    """Every layer input must hold the n cases in its first dimension: (N, D), (N, T, D) or (N, C, H, W)."""
    if x.ndim < 2 or x.shape[0] != n:
        raise UnsupportedModelError(
            f"{what} was called on an input of shape {tuple(x.shape)} whose first dimension is not the {n} "
            "cases; kfac_lens needs the case dimension first in every layer input, e.g. (N, D), (N, T, D) or "
            "(N, C, H, W).")


def probe_layers(model: nn.Module, example_input) -> tuple[list[ProbedLayer], tuple[int, ...]]:
    """Run ``model`` once on ``example_input`` and return its layers in the order of their first call,
    with the shape of the output. Uses per case count calls times positions (docs/math.md §1)."""
    names = {}
    for name, mod in model.named_modules():
        if is_layer(mod):
            names[id(mod)] = (name, mod)
    order: list[int] = []
    calls: dict[int, int] = {}
    uses: dict[int, int] = {}
    n = example_input.shape[0]

    def hook(mod, inputs, output):
        key = id(mod)
        if key not in calls:
            order.append(key)
            calls[key], uses[key] = 0, 0
        x = inputs[0]
        check_cases_first(x, n, f"layer '{names[key][0]}' ({type(mod).__name__})")
        calls[key] += 1
        if isinstance(mod, nn.Conv2d):
            uses[key] += output.shape[-1] * output.shape[-2]
        else:
            uses[key] += output[0].numel() // output.shape[-1]

    handles = [mod.register_forward_hook(hook) for _, mod in names.values()]
    try:
        with torch.no_grad():
            z = model(example_input)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(z, torch.Tensor):
        raise UnsupportedModelError(f"the model returned a {type(z).__name__}; kfac_lens needs one tensor of "
                                    "outputs (natural parameters) of shape (N, C).")
    found = [ProbedLayer(names[key][0], names[key][1], calls[key], uses[key]) for key in order]
    return found, tuple(z.shape)


def fixed_parameters(model: nn.Module, layer_modules) -> list[str]:
    """Names of the parameters that belong to no analysed layer (held fixed), with their module's type."""
    ids = {id(p) for mod in layer_modules for p in mod.parameters()}
    kinds = {f"{name}.{pn}" if name else pn: type(mod).__name__
             for name, mod in model.named_modules() for pn, _ in mod.named_parameters(recurse=False)}
    return [f"{n} ({kinds.get(n, '?')})" for n, p in model.named_parameters() if id(p) not in ids]
