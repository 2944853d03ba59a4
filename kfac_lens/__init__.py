"""kfac_lens — see, on real networks, how good the K-FAC approximation of the Fisher is.

Martens & Grosse (2015), "Optimizing Neural Networks with Kronecker-factored Approximate Curvature".
Layers are 0-based indices of a model's nn.Linear layers; dense matrices use the paper's layout
(docs/math.md §1): θ = [vec(W_1); …], W = [weight, bias], column-major vec.
"""

from . import curvature
from .curvature import *  # noqa: F403 — the curvature API (see kfac_lens.curvature.__all__)
from .errors import (DenseTooLargeError, IllConditionedWarning, NonFiniteError, SingularFactorError,
                     UnsupportedModelError)
from .likelihoods import Bernoulli, Categorical, Gaussian, Likelihood, get_likelihood
from .nets import NetworkView, mats_to_vec, vec_to_mats
from .optim import KFAC
from .options import Estimator, FactorApprox, InverseKind

__version__ = "0.1.0"

__all__ = [
    *curvature.__all__,
    "DenseTooLargeError", "IllConditionedWarning", "NonFiniteError", "SingularFactorError", "UnsupportedModelError",
    "Bernoulli", "Categorical", "Gaussian", "Likelihood", "get_likelihood",
    "NetworkView", "mats_to_vec", "vec_to_mats",
    "KFAC", "Estimator", "FactorApprox", "InverseKind",
]
