"""kfac_lens — see, on real networks, how good the K-FAC approximation of the Fisher is.

Martens & Grosse (2015), "Optimizing Neural Networks with Kronecker-factored Approximate Curvature".
Layers are 0-based indices of a model's nn.Linear layers; dense matrices use the paper's layout
(MATH.md §1): θ = [vec(W_1); …], W = [weight, bias], column-major vec.
"""

from .curvature import (
                        BlockDiagonalInverse,
                        BlockTridiagonalInverse,
                        CumulantTerms,
                        ExactTikhonovInverse,
                        KroneckerFactors,
                        KroneckerSumInverse,
                        block_diagonal_inverse,
                        block_errors,
                        block_tridiagonal_inverse,
                        cumulant_terms,
                        direction_errors,
                        empirical_fisher,
                        error_by_kind,
                        exact_fisher,
                        exact_tikhonov_inverse,
                        fisher,
                        fisher_gram,
                        fisher_vector_product,
                        jacobian_products,
                        kronecker_factors,
                        make_inverse,
                        mc_fisher,
)
from .errors import DenseTooLargeError, NonFiniteError, SingularFactorError, UnsupportedModelError
from .likelihoods import Bernoulli, Categorical, Gaussian, Likelihood, get_likelihood
from .nets import NetworkView, mats_to_vec, vec_to_mats

__version__ = "0.1.0"

__all__ = [
                        "Bernoulli",
                        "BlockDiagonalInverse",
                        "BlockTridiagonalInverse",
                        "Categorical",
                        "CumulantTerms",
                        "DenseTooLargeError",
                        "ExactTikhonovInverse",
                        "Gaussian",
                        "KroneckerFactors",
                        "KroneckerSumInverse",
                        "Likelihood",
                        "NetworkView",
                        "NonFiniteError",
                        "SingularFactorError",
                        "UnsupportedModelError",
                        "block_diagonal_inverse",
                        "block_errors",
                        "block_tridiagonal_inverse",
                        "cumulant_terms",
                        "direction_errors",
                        "empirical_fisher",
                        "error_by_kind",
                        "exact_fisher",
                        "exact_tikhonov_inverse",
                        "fisher",
                        "fisher_gram",
                        "fisher_vector_product",
                        "get_likelihood",
                        "jacobian_products",
                        "kronecker_factors",
                        "make_inverse",
                        "mats_to_vec",
                        "mc_fisher",
                        "vec_to_mats",
]
