"""First-order baselines with the same ``step(x, y) -> stats`` interface as :class:`KFAC`.

- :class:`SGDNesterov`: the paper's baseline (Section 7): SGD with Nesterov momentum and the increasing
  μ schedule of Sutskever et al. (2013), μ_t = min(1 − 2^(−1−log₂(⌊t/250⌋+1)), μ_max).
- :class:`Adam`.
Both minimise h(θ) = mean NLL + (η/2)‖θ‖², and read any ``nn.Module`` given ``example_input=`` as K-FAC does
(:mod:`.general`).
"""

from __future__ import annotations

import time

import torch

from ..capture import check_inputs
from ..errors import NonFiniteError
from ..likelihoods import get_likelihood
from .general import check_output_targets, kfac_view, output_nll
from .schedules import resolve, sutskever_momentum


class _TorchBaseline:
    name = "baseline"

    def __init__(self, model, likelihood, eta=1e-5, example_input=None):
        self.view = kfac_view(model, example_input)
        self.model = self.view.model
        self.likelihood = get_likelihood(likelihood)
        self.eta = eta
        self.k = 1
        self.opt = self._make()

    def _make(self) -> torch.optim.Optimizer:  # pragma: no cover - abstract
        raise NotImplementedError

    def _before_step(self) -> dict:
        return {}

    def step(self, x, y) -> dict:
        t0 = time.perf_counter()
        x, y = check_inputs(self.view, x, y, what="the mini-batch x")
        extra = self._before_step()
        self.opt.zero_grad(set_to_none=True)
        z = self.model(x)
        loss = output_nll(self.likelihood, z, check_output_targets(self.likelihood, z.detach(), y))
        if not torch.isfinite(loss):
            raise NonFiniteError(f"the loss is {float(loss.detach())} at iteration {self.k}; lower the learning "
                                 "rate. The last good checkpoint is kept.")
        loss.backward()
        self.opt.step()
        out = {"iteration": self.k, "loss": float(loss.detach()), "batch_size": x.shape[0],
               "step_time": time.perf_counter() - t0, **extra}
        self.k += 1
        return out

    def state_dict(self) -> dict:
        return {"k": self.k, "opt": self.opt.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.k = int(sd["k"])
        self.opt.load_state_dict(sd["opt"])


class SGDNesterov(_TorchBaseline):
    """SGD + Nesterov momentum with Sutskever et al. (2013)'s schedule (``momentum`` may be a number or callable)."""

    name = "SGD-Nesterov"

    def __init__(self, model, likelihood, lr=0.01, momentum=None, mu_max=0.99, eta=1e-5, example_input=None):
        if not float(resolve(lr, 1)) > 0:  # lr may be a callable of k (resolved in _before_step)
            raise ValueError(f"lr must be positive, got {lr}.")
        self.lr = lr
        self.momentum = momentum if momentum is not None else (lambda k: sutskever_momentum(k, mu_max))
        super().__init__(model, likelihood, eta, example_input)

    def _make(self):
        return torch.optim.SGD(self.model.parameters(), lr=resolve(self.lr, 1), momentum=0.5, nesterov=True,
                               weight_decay=self.eta)

    def _before_step(self):
        mu = float(resolve(self.momentum, self.k))
        lr = float(resolve(self.lr, self.k))
        for g in self.opt.param_groups:
            g["momentum"], g["lr"] = mu, lr
        return {"mu": mu, "lr": lr}


class Adam(_TorchBaseline):
    """Adam (Kingma & Ba 2015) with ℓ2 strength η added to the gradient."""

    name = "Adam"

    def __init__(self, model, likelihood, lr=1e-3, betas=(0.9, 0.999), eta=1e-5, example_input=None):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}.")
        self.lr, self.betas = lr, betas
        super().__init__(model, likelihood, eta, example_input)

    def _make(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.lr, betas=self.betas, weight_decay=self.eta)
