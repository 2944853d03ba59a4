"""Curvature objects: the Fisher, Kronecker factors, damping, approximate inverses, cumulants, comparisons.

Precision: every function that reads a model takes ``dtype=`` (default ``torch.float64``; ``None`` means
the model's own dtype), computes in it on a cast copy of the model when needed, and returns results in
it; inputs and vectors of other dtypes are cast. Operators built from factors keep the factors' dtype.
"""

from .approximation_names import APPROXIMATIONS, Approximation
from .approximation_operators import (BlockDiagonalKronecker, BlockTridiagonalKronecker, CurvatureApproximation,
                                      DiagonalFisher, EigenvalueCorrectedKronecker, ExactBlockDiagonal,
                                      KroneckerFisher, ReduceBlockDiagonalKronecker)
from .approximations import approximation_operator, build_approximations
from .compare import block_errors, direction_errors, error_by_kind
from .cumulants import CumulantTerms, cumulant_terms
from .damping import ExactTikhonovInverse, exact_tikhonov_inverse, trace_pi
from .estimators import LanczosResult, RatioEstimate, conjugate_gradient, lanczos, relative_frobenius_errors
from .factors import KroneckerFactors, kronecker_factors
from .fisher import (
                     empirical_fisher,
                     exact_fisher,
                     fisher,
                     fisher_gram,
                     fisher_matrix_product,
                     fisher_vector_product,
                     jacobian_products,
                     mc_fisher,
)
from .inverses import (
                     BlockDiagonalInverse,
                     BlockTridiagonalInverse,
                     KroneckerSumInverse,
                     block_diagonal_inverse,
                     block_tridiagonal_inverse,
                     make_inverse,
)
from .quality import compare_approximation_blocks, compare_approximations, loss_gradient

__all__ = [
                     "APPROXIMATIONS",
                     "Approximation",
                     "BlockDiagonalInverse",
                     "BlockDiagonalKronecker",
                     "BlockTridiagonalInverse",
                     "BlockTridiagonalKronecker",
                     "CumulantTerms",
                     "CurvatureApproximation",
                     "DiagonalFisher",
                     "EigenvalueCorrectedKronecker",
                     "ExactBlockDiagonal",
                     "ExactTikhonovInverse",
                     "KroneckerFactors",
                     "KroneckerFisher",
                     "KroneckerSumInverse",
                     "LanczosResult",
                     "RatioEstimate",
                     "ReduceBlockDiagonalKronecker",
                     "approximation_operator",
                     "block_diagonal_inverse",
                     "block_errors",
                     "block_tridiagonal_inverse",
                     "build_approximations",
                     "compare_approximation_blocks",
                     "compare_approximations",
                     "conjugate_gradient",
                     "cumulant_terms",
                     "direction_errors",
                     "empirical_fisher",
                     "error_by_kind",
                     "exact_fisher",
                     "exact_tikhonov_inverse",
                     "fisher",
                     "fisher_gram",
                     "fisher_matrix_product",
                     "fisher_vector_product",
                     "jacobian_products",
                     "kronecker_factors",
                     "lanczos",
                     "loss_gradient",
                     "make_inverse",
                     "mc_fisher",
                     "relative_frobenius_errors",
                     "trace_pi",
]
