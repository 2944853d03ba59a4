"""Floating-point operations of a piece of work, for the benchmarks' cost bounds.

``kfac-lens bench optimizer`` sets K-FAC's per-iteration time beside its flops per iteration, both as ratios
to SGD-Nesterov's: the flop ratio is the time ratio K-FAC would have if all of its extra work ran at the
rate of SGD's own step, so a time target below it cannot be met by speeding up code alone (Section 8 of
the paper counts K-FAC's extra cost the same way).

Matrix products are counted by torch's :class:`~torch.utils.flop_counter.FlopCounterMode` (2mnk for an
m×k by k×n product); the dense factorisations it does not know are counted here by their textbook
formulas (Golub & Van Loan): Cholesky n³/3, the inverse from a Cholesky factor 2n³/3, a triangular solve
with k right-hand sides n²k, and a symmetric eigendecomposition with vectors 9n³. Element-wise work
(activations, the loss, the optimizers' updates) is not counted, for either method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _square_side(shape) -> int:
    return int(shape[-1])


def _batch(shape) -> int:
    return math.prod(int(s) for s in shape[:-2])


def cholesky_flops(a_shape, *args, out_shape=None, **kwargs) -> int:
    """Cholesky of an n×n matrix: n³/3."""
    n = _square_side(a_shape)
    return _batch(a_shape) * n ** 3 // 3


def cholesky_inverse_flops(l_shape, *args, out_shape=None, **kwargs) -> int:
    """The inverse from a Cholesky factor (LAPACK potri): 2n³/3."""
    n = _square_side(l_shape)
    return _batch(l_shape) * 2 * n ** 3 // 3


def triangular_solve_flops(a_shape, b_shape, *args, out_shape=None, left: bool = True, **kwargs) -> int:
    """A triangular n×n system with k right-hand sides: n²k (``left=False`` solves X A = B, from the right)."""
    n = _square_side(a_shape)
    k = int(b_shape[-1]) if left else int(b_shape[-2])
    return _batch(b_shape) * n * n * k


def symmetric_eig_flops(a_shape, *args, out_shape=None, **kwargs) -> int:
    """A symmetric eigendecomposition with eigenvectors: 9n³."""
    n = _square_side(a_shape)
    return _batch(a_shape) * 9 * n ** 3


FACTORISATION_FLOPS = {
    aten.linalg_cholesky_ex: cholesky_flops,
    aten.cholesky_inverse: cholesky_inverse_flops,
    aten.linalg_solve_triangular: triangular_solve_flops,
    aten._linalg_eigh: symmetric_eig_flops,
}


def count_flops(work: Callable[[], Any]) -> tuple[int, Any]:
    """(flops, result) of ``work()``: matrix products and the dense factorisations above."""
    with FlopCounterMode(display=False, custom_mapping=FACTORISATION_FLOPS) as counter:
        result = work()
    return int(counter.get_total_flops()), result
