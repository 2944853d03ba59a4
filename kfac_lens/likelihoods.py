"""Predictive distributions r(y|z) and their output Fisher F_R (docs/math.md §2).

Each likelihood provides the per-case loss ``L(y, z) = −log r(y|z)``, its gradient in z, sampling
``y ∼ r(y|z)``, the product ``F_R v`` and one square root ``F_R = Σ_c q_c q_cᵀ`` (used for the exact
expectation over y). Losses are summed over output units and averaged over cases, so
``h(θ) = (1/N) Σ_n L(y_n, f(x_n, θ))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Likelihood:
    """Base class. ``z`` is always ``(N, C)``."""

    name: str = ""

    def check_targets(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def per_case_nll(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def nll(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """h = mean over cases of L(y, z)."""
        return self.per_case_nll(z, y).mean()

    def grad_z(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """∂L(y, z)/∂z per case, shape (N, C)."""
        raise NotImplementedError

    def sample(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def fisher_sqrt(self, z: torch.Tensor) -> torch.Tensor:
        """Q with shape (R, N, C) such that ``F_R(z_n) = Σ_r Q[r, n] Q[r, n]ᵀ``."""
        raise NotImplementedError

    def fisher_vp(self, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``F_R(z_n) v_n`` per case, for v of shape (N, C)."""
        raise NotImplementedError

    def fisher_output(self, z: torch.Tensor) -> torch.Tensor:
        """Dense F_R per case, (N, C, C); for tests and small problems."""
        Q = self.fisher_sqrt(z)
        return torch.einsum("rni,rnj->nij", Q, Q)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Categorical(Likelihood):
    """Softmax cross-entropy; targets are class indices. ``F_R = diag(p) − p pᵀ``, ``q_c = √p_c (e_c − p)``."""

    name = "categorical"

    def check_targets(self, z, y):
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.shape != z.shape[:1]:
            raise ValueError(
                f"categorical targets must be integer class indices of shape ({z.shape[0]},), got shape "
                f"{tuple(y.shape)} and dtype {y.dtype}; pass y.long() of class indices (not one-hot rows)."
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= z.shape[1]):
            raise ValueError(f"categorical targets must lie in 0..{z.shape[1] - 1}.")
        return y

    def per_case_nll(self, z, y):
        return F.cross_entropy(z, y, reduction="none")

    def grad_z(self, z, y):
        return torch.softmax(z, dim=1) - F.one_hot(y, z.shape[1]).to(z.dtype)

    def sample(self, z, generator=None):
        p = torch.softmax(z.detach(), dim=1)
        return torch.multinomial(p, 1, generator=generator).squeeze(1)

    def fisher_sqrt(self, z):
        p = torch.softmax(z.detach(), dim=1)
        eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
        # Q[c, n] = sqrt(p_nc) (e_c − p_n)
        return p.T.sqrt()[:, :, None] * (eye[:, None, :] - p[None, :, :])

    def fisher_vp(self, z, v):
        p = torch.softmax(z.detach(), dim=1)
        return p * v - p * (p * v).sum(1, keepdim=True)


def _check_float_targets(name: str, z: torch.Tensor, y: torch.Tensor) -> None:
    """Targets of a per-output likelihood: floating point, one per output unit."""
    if not y.dtype.is_floating_point:
        raise ValueError(f"{name} targets must be floating point, got dtype {y.dtype}; convert them with "
                         "y.float() (or y.double()).")
    if y.shape != z.shape:
        raise ValueError(f"{name} targets must have the network output's shape {tuple(z.shape)}, "
                         f"got {tuple(y.shape)}.")


class Bernoulli(Likelihood):
    """Sigmoid cross-entropy per output (autoencoders). Targets in [0, 1] (soft targets allowed for the loss).

    ``F_R = diag(p ⊙ (1 − p))``, ``q_c = √(p_c(1 − p_c)) e_c``.
    """

    name = "bernoulli"

    def check_targets(self, z, y):
        _check_float_targets(self.name, z, y)
        if y.numel() and (float(y.min()) < 0 or float(y.max()) > 1):
            raise ValueError("bernoulli targets must lie in [0, 1].")
        return y

    def per_case_nll(self, z, y):
        return F.binary_cross_entropy_with_logits(z, y, reduction="none").sum(1)

    def grad_z(self, z, y):
        return torch.sigmoid(z) - y

    def sample(self, z, generator=None):
        p = torch.sigmoid(z.detach())
        return torch.bernoulli(p, generator=generator)

    def fisher_sqrt(self, z):
        p = torch.sigmoid(z.detach())
        s = (p * (1 - p)).sqrt()
        eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
        return eye[:, None, :] * s[None, :, :]

    def fisher_vp(self, z, v):
        p = torch.sigmoid(z.detach())
        return p * (1 - p) * v


class Gaussian(Likelihood):
    """Unit-variance Gaussian, ``L = ½‖y − z‖² + const`` (reported without the constant). ``F_R = I``."""

    name = "gaussian"

    def check_targets(self, z, y):
        _check_float_targets(self.name, z, y)
        return y

    def per_case_nll(self, z, y):
        return 0.5 * ((z - y) ** 2).sum(1)

    def grad_z(self, z, y):
        return z - y

    def sample(self, z, generator=None):
        return z.detach() + torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)

    def fisher_sqrt(self, z):
        eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
        return eye[:, None, :].expand(z.shape[1], z.shape[0], z.shape[1]).clone()

    def fisher_vp(self, z, v):
        return v.clone()


LIKELIHOODS = {"categorical": Categorical, "bernoulli": Bernoulli, "gaussian": Gaussian}


def get_likelihood(likelihood: str | Likelihood) -> Likelihood:
    """Resolve a likelihood name ("categorical", "bernoulli", "gaussian") or instance."""
    if isinstance(likelihood, Likelihood):
        return likelihood
    if isinstance(likelihood, str) and likelihood.lower() in LIKELIHOODS:
        return LIKELIHOODS[likelihood.lower()]()
    raise ValueError(
        f"unknown likelihood {likelihood!r}; choose one of {sorted(LIKELIHOODS)} "
        "(softmax cross-entropy, sigmoid cross-entropy, unit-variance squared error)."
    )


__all__ = ["LIKELIHOODS", "Bernoulli", "Categorical", "Gaussian", "Likelihood", "get_likelihood"]
