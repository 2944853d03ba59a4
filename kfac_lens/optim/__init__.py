"""Optimizers: K-FAC (Appendices D–H) and the first-order baselines, with a shared training loop."""

from .baselines import Adam, SGDNesterov
from .hyperparams import KFACHyperParameters, ResolvedHyperParameters
from .kfac import KFAC
from .proposals import Proposal
from .quadratic import SubspaceModel, alpha_star
from .schedules import (
                        ema_decay,
                        exponential_batch_sizes,
                        gamma_candidates,
                        levenberg_marquardt,
                        sutskever_momentum,
)
from .train import evaluate, load_checkpoint, save_checkpoint, train

__all__ = [
                        "KFAC",
                        "KFACHyperParameters",
                        "Adam",
                        "Proposal",
                        "ResolvedHyperParameters",
                        "SGDNesterov",
                        "SubspaceModel",
                        "alpha_star",
                        "ema_decay",
                        "evaluate",
                        "exponential_batch_sizes",
                        "gamma_candidates",
                        "levenberg_marquardt",
                        "load_checkpoint",
                        "save_checkpoint",
                        "sutskever_momentum",
                        "train",
]
