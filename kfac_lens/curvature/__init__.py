"""Curvature objects: the Fisher, Kronecker factors, damping, approximate inverses, cumulants, comparisons.

Precision: every function that reads a model takes ``dtype=`` (default ``torch.float64``; ``None`` means
the model's own dtype), computes in it on a cast copy of the model when needed, and returns results in
it; inputs and vectors of other dtypes are cast. Operators built from factors keep the factors' dtype.
"""

from .compare import block_errors, direction_errors, error_by_kind
from .cumulants import CumulantTerms, cumulant_terms
from .damping import ExactTikhonovInverse, exact_tikhonov_inverse, trace_pi
from .factors import KroneckerFactors, kronecker_factors
from .fisher import (
                     empirical_fisher,
                     exact_fisher,
                     fisher,
                     fisher_gram,
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

__all__ = [
                     "BlockDiagonalInverse",
                     "BlockTridiagonalInverse",
                     "CumulantTerms",
                     "ExactTikhonovInverse",
                     "KroneckerFactors",
                     "KroneckerSumInverse",
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
                     "jacobian_products",
                     "kronecker_factors",
                     "make_inverse",
                     "mc_fisher",
                     "trace_pi",
]
