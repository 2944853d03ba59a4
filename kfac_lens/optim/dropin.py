"""Drop-in use: K-FAC inside an ordinary PyTorch loop (``loss = loss_fn(model(x), y); loss.backward(); opt.step()``).

The torch loss module maps to a likelihood of :mod:`kfac_lens.likelihoods`, whose loss is summed over the C
output units and averaged over the m cases. With ``reduction="mean"`` the torch losses average over all
m·C entries instead, so ``torch loss = c · mean NLL``:

=========================  ============  ==============================================
torch loss                 likelihood    c
=========================  ============  ==============================================
``nn.CrossEntropyLoss``    categorical   1
``nn.BCEWithLogitsLoss``   bernoulli     1/C
``nn.MSELoss``             gaussian      2/C (the Gaussian NLL is ½‖z − y‖², MSE has no ½)
=========================  ============  ==============================================

K-FAC always minimises h = mean NLL + (η/2)‖θ‖² (Section 7): the gradient the user's backward pass leaves in
``.grad`` is divided by c, so λ, γ and η keep their meaning and the step equals ``step(x, y)``.

:class:`BatchRecorder` hooks the model and the loss module. During the user's forward pass (with autograd
on) it records the input x, the inputs ā_k of every Linear layer (for the Appendix J products on S₂) and
the output z; during the loss call, the targets y (for h(θ) and the Levenberg–Marquardt ratio ρ, E.5);
and it notes that the backward pass reached z.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..likelihoods import Likelihood
from ..nets import NetworkView
from .passes import GradientPass

SUPPORTED_LOSSES = ("nn.CrossEntropyLoss, nn.BCEWithLogitsLoss or nn.MSELoss with reduction='mean' (and no "
                    "weight, pos_weight or label_smoothing)")


@dataclass(frozen=True)
class TorchLoss:
    """A supported torch loss module: its likelihood name and ``nll_per_loss(C)`` = 1/c."""

    module: nn.Module
    likelihood: str

    def nll_per_loss(self, n_outputs: int) -> float:
        return {"categorical": 1.0, "bernoulli": float(n_outputs), "gaussian": n_outputs / 2.0}[self.likelihood]


def torch_loss(loss_fn) -> TorchLoss | None:
    """The :class:`TorchLoss` of a torch loss module, None for a likelihood name or object; a ``ValueError``
    naming the supported losses for any other module or setting."""
    if not isinstance(loss_fn, nn.Module):
        return None
    kinds = ((nn.CrossEntropyLoss, "categorical"), (nn.BCEWithLogitsLoss, "bernoulli"), (nn.MSELoss, "gaussian"))
    name = next((lik for cls, lik in kinds if type(loss_fn) is cls), None)
    problem = None if name else f"{type(loss_fn).__name__} is not supported"
    if name and getattr(loss_fn, "reduction", "mean") != "mean":
        problem = f"reduction={loss_fn.reduction!r}"
    for attr in ("weight", "pos_weight"):
        if name and getattr(loss_fn, attr, None) is not None:
            problem = f"{attr} is set"
    if name and getattr(loss_fn, "label_smoothing", 0.0) != 0.0:
        problem = f"label_smoothing={loss_fn.label_smoothing}"
    if problem:
        raise ValueError(f"K-FAC takes the loss as {SUPPORTED_LOSSES} (the categorical, bernoulli and gaussian "
                         f"likelihoods), or a likelihood name; got {loss_fn!r}: {problem}.")
    return TorchLoss(loss_fn, name)


@dataclass
class RecordedBatch:
    """What the user's forward, loss and backward passes left for one K-FAC step."""

    x: torch.Tensor
    y: torch.Tensor
    z: torch.Tensor
    inputs: dict[int, torch.Tensor]


class BatchRecorder:
    """Forward hooks on the model, its Linear layers and the loss module (see the module docstring)."""

    def __init__(self, view: NetworkView, loss: TorchLoss):
        self.view, self.loss = view, loss
        self._paused = 0
        self._clear()
        model = view.model
        self.handles = [model.register_forward_pre_hook(self._on_input),
                        model.register_forward_hook(self._on_output),
                        loss.module.register_forward_hook(self._on_loss)]
        # bound methods and a table keyed by the modules themselves, so that a deep copy of the optimizer (with
        # its model) records the copied model's passes
        self.layer_index = {L.module: L.index for L in view.layers}
        for L in view.layers:
            self.handles.append(L.module.register_forward_hook(self._on_layer))

    def _clear(self) -> None:
        self.x = self.z = self.y = None
        self.inputs: dict[int, torch.Tensor] = {}
        self.forwards = 0
        self.other_loss = False
        self.backward_seen = False

    def _active(self) -> bool:
        return not self._paused and torch.is_grad_enabled()

    @contextlib.contextmanager
    def paused(self):
        """Ignore the optimizer's own passes through the model."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _on_input(self, module, inputs):
        if module is self.view.model and self._active():
            forwards = self.forwards + 1
            self._clear()
            self.forwards, self.x = forwards, inputs[0].detach()

    def _on_layer(self, module, inputs, output):
        k = self.layer_index.get(module)
        if k is not None and self._active() and self.x is not None:
            self.inputs[k] = inputs[0].detach()

    def _on_output(self, module, inputs, output):
        if module is self.view.model and self._active() and self.x is not None:
            self.z = output
            if output.requires_grad:
                output.register_hook(self._on_output_grad)

    def _on_output_grad(self, grad):
        self.backward_seen = True

    def _on_loss(self, module, inputs, output):
        if not self._active() or module is not self.loss.module:
            return
        if self.z is not None and inputs[0] is self.z:
            self.y = inputs[1].detach()
        else:
            self.other_loss = True

    def take(self) -> RecordedBatch:
        """The recorded batch (and forget it), or a ``ValueError`` saying which part of the loop is missing."""
        loss_name = type(self.loss.module).__name__
        problem = None
        if self.forwards == 0:
            problem = "no forward pass of the model (with autograd on) since the last step"
        elif self.forwards > 1:
            problem = (f"{self.forwards} forward passes since the last step; K-FAC takes one mini-batch per step "
                       "(one forward, loss and backward pass, then step)")
        elif self.z is not None and self.z.ndim != 2:
            problem = (f"the model's output has shape {tuple(self.z.shape)}, one likelihood term per position, and "
                       "the drop-in step reads outputs of shape (N, C)")
        elif self.y is None:
            problem = (f"the {loss_name} given to KFAC was not called on the model's output "
                       + ("(it was called on another tensor)" if self.other_loss else ""))
        elif not self.backward_seen:
            problem = "no backward pass reached the model's output: call loss.backward() before opt.step()"
        elif len(self.inputs) != len(self.view.layers):
            problem = "the forward pass did not run every Linear layer of the model"
        if problem:
            self._clear()
            raise ValueError(f"opt.step() without arguments follows your loop: loss = loss_fn(model(x), y); "
                             f"loss.backward(); opt.step(), with the {loss_name} instance given to KFAC. Here: "
                             f"{problem}. Or call opt.step(x, y).")
        out = RecordedBatch(self.x, self.y, self.z.detach(), dict(self.inputs))
        self._clear()
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def recorded_pass(recorder: BatchRecorder, likelihood: Likelihood) -> GradientPass:
    """The :class:`GradientPass` of the user's forward, loss and backward pass: ∇(mean NLL) = ``.grad``/c,
    the recorded Linear inputs (without the homogeneous 1) and z, the mean NLL recomputed from z."""
    rec = recorder.take()
    view = recorder.view
    missing = [L.index for L in view.layers if any(p.grad is None for p in L.module.parameters())]
    if missing:
        raise ValueError(f"layers {missing} have no .grad: call loss.backward() before opt.step() (and keep "
                         "requires_grad on every Linear parameter).")
    y = likelihood.check_targets(rec.z, rec.y)
    scale = recorder.loss.nll_per_loss(rec.z.shape[1])
    data_grad = view.gradient_matrices()  # fresh matrices: scaled in place
    if scale != 1.0:
        data_grad = [G.mul_(scale) for G in data_grad]
    return GradientPass(rec.x, y, likelihood.nll(rec.z, y), data_grad, rec.inputs, None, rec.z)
