"""Errors raised by kfac_lens.

Every one is a ``ValueError`` so that callers can catch bad input uniformly; each message names the
problem and the way out.
"""

from __future__ import annotations


class UnsupportedModelError(ValueError):
    """The model is not a chain of ``nn.Linear`` layers with parameter-free modules between them."""


class SingularFactorError(ValueError):
    """A Kronecker factor (or a Schur complement) cannot be inverted at the requested damping."""


class IllConditionedWarning(RuntimeWarning):
    """A factor (or a Schur complement) is invertible, but its inverse kept in its dtype may lose up to two
    thirds of that dtype's digits (condition number above eps^(-2/3))."""


class DenseTooLargeError(ValueError):
    """A dense P×P request would not fit in memory."""


class NonFiniteError(ValueError):
    """Inputs, parameters or a loss contain NaN or Inf."""


class DataUnavailableError(ValueError):
    """No source of a data set worked; the message says what was tried and how to get the data."""
