"""Structured curvature operators: apply to per-layer matrices or flat θ-vectors, and export dense.

Per-layer matrices have shape ``(..., d_out, a_dim)`` (leading batch dims allowed); flat vectors use
the paper layout of docs/math.md §1 restricted to the operator's layers. :func:`check_condition` is the
one guard on inverting factors and Schur complements (Sections 3.2, 3.3, Appendix I).
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Sequence

import torch

from ..errors import IllConditionedWarning, SingularFactorError
from ..memory import check_dense_fits
from ..nets import mats_to_vec, vec_to_mats

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def cond_limits(dtype: torch.dtype) -> tuple[float, float]:
    """``(warn, refuse)`` thresholds on the condition number κ of a matrix whose inverse is kept in ``dtype``.

    An inverse loses up to log₁₀ κ digits (relative error ≲ κ·eps). Refuse when fewer than two are left,
    κ > 1/(100·eps) (float64 ≈ 4.5e13, float32 ≈ 8.4e4); warn when two thirds of them may be lost,
    κ > eps^(-2/3) (float64 ≈ 2.7e10, float32 ≈ 4.1e4).
    """
    eps = torch.finfo(dtype).eps
    refuse = 1.0 / (100.0 * eps)
    return min(eps ** (-2.0 / 3.0), refuse), refuse


def _outside_package_stacklevel() -> int:
    """The ``stacklevel`` that points a warning issued by our caller at the first frame outside kfac_lens."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def check_condition(kappa: float, name: str, dtype: torch.dtype, how: str = "",
                    way_out: str = "Increase gamma (factored Tikhonov damping, Appendix E.3).") -> float:
    """The one rule for factors and Schur complements (Sections 3.2, 3.3, Appendix I): raise
    :class:`SingularFactorError` when κ is not finite (not positive definite) or above
    ``cond_limits(dtype)[1]``; warn (:class:`~kfac_lens.errors.IllConditionedWarning`, a ``RuntimeWarning``)
    above ``cond_limits(dtype)[0]``. ``how``: how κ was measured; ``way_out`` ends both messages."""
    warn_at, refuse_at = cond_limits(dtype)
    what = f"condition number {kappa:.3g}" if math.isfinite(kappa) else "condition number ∞"
    what += f" ({how})" if how else ""
    if not (math.isfinite(kappa) and kappa <= refuse_at):
        raise SingularFactorError(
            f"{name} is singular or too ill-conditioned to invert in {dtype}: {what}, above the limit "
            f"{refuse_at:.2g} = 1/(100·eps) beyond which fewer than two digits of its inverse are right. "
            + way_out
        )
    if kappa > warn_at:
        warnings.warn(
            f"{name} is nearly singular: {what}, above {warn_at:.2g} = eps^(-2/3) of {dtype}, so its inverse "
            f"may be off by up to ~{kappa * torch.finfo(dtype).eps:.1g} (relative). {way_out}",
            IllConditionedWarning, stacklevel=_outside_package_stacklevel())
    return kappa


def cond1(M: torch.Tensor, M_inv: torch.Tensor) -> float:
    """κ₁ = ‖M‖₁‖M⁻¹‖₁ from an inverse already at hand (O(n²)); LAPACK's rcond norm; κ₂ ≤ κ₁ ≤ n·κ₂ for symmetric M."""
    return float(torch.linalg.matrix_norm(M, 1) * torch.linalg.matrix_norm(M_inv, 1))


SPD_WAY_OUT = "Pass gamma > 0 or a larger gamma (factored Tikhonov damping, Appendix E.3)."


def spd_cholesky(M: torch.Tensor, what: str, way_out: str = SPD_WAY_OUT) -> torch.Tensor:
    """The Cholesky factor L (``M = L Lᵀ``) of the symmetric part of a dense positive-definite M.

    Raises :class:`SingularFactorError` naming ``what`` and ending with ``way_out`` when M is not
    positive definite. The one dense SPD factorisation of the package: :func:`spd_inverse` and the
    dense comparisons (:mod:`.quality`) go through it.
    """
    L, info = torch.linalg.cholesky_ex(0.5 * (M + M.T))
    if int(info) != 0:
        raise SingularFactorError(
            f"{what} is not positive definite (Cholesky failed at column {int(info)}), so it cannot be "
            f"inverted. {way_out}"
        )
    return L


def spd_inverse(M: torch.Tensor, what: str, way_out: str = SPD_WAY_OUT) -> torch.Tensor:
    """``M⁻¹`` of a dense symmetric positive-definite M by Cholesky (:func:`spd_cholesky`).

    ``torch.cholesky_inverse`` fills both triangles from one, so the result is exactly symmetric.
    """
    return torch.cholesky_inverse(spd_cholesky(M, what, way_out))


class SymmetricEig:
    """Eigendecomposition ``M = E diag(s) Eᵀ`` of a symmetric PSD factor, with inverse and inverse root.

    Computed in float64 whatever M's dtype (factors of float32 models are often ill-conditioned), then
    cast back. ``check_singular`` raises :class:`SingularFactorError` when M is not positive definite
    to the precision of ``tol_dtype`` (default M's dtype): pass float64 when M was damped by γ > 0, so
    that only an undamped singular factor is refused.
    """

    def __init__(self, M: torch.Tensor, name: str = "factor", check_singular: bool = False,
                 tol_dtype: torch.dtype | None = None):
        dtype = M.dtype
        M64 = M.double()
        M64 = 0.5 * (M64 + M64.T)
        s, E = torch.linalg.eigh(M64)
        if check_singular:
            tol = M.shape[0] * torch.finfo(tol_dtype or dtype).eps * max(float(s.abs().max()), 1e-300)
            if float(s.min()) <= tol:
                rank = int((s > tol).sum())
                kappa = float(s.max() / s.min()) if float(s.min()) > 0 else math.inf
                raise SingularFactorError(
                    f"{name} is singular (numerical rank {rank} of {M.shape[0]} in {dtype}, condition number "
                    f"{kappa:.3g}), so it cannot be inverted at this damping. Increase gamma (pass gamma > 0; "
                    "factored Tikhonov damping, Appendix E.3) or use more cases."
                )
        self.s, self.E = s.to(dtype), E.to(dtype)
        self._s64, self._E64 = s, E

    def inv(self) -> torch.Tensor:
        return ((self._E64 / self._s64) @ self._E64.T).to(self.E.dtype)

    def inv_sqrt(self) -> torch.Tensor:
        return ((self._E64 / self._s64.sqrt()) @ self._E64.T).to(self.E.dtype)


class PDFactor:
    """A damped (positive-definite) factor through its Cholesky factor ``M = L Lᵀ``, in float64 (or ``work``).

    Gives ``M⁻¹`` and the whitener ``W = L⁻¹`` (``W M Wᵀ = I``), which is all Appendix I needs, at a
    fraction of an eigendecomposition's cost. Raises :class:`SingularFactorError` when M is not
    positive definite or its condition number κ₁ (:func:`cond1`) is above ``cond_limits(dtype)[1]``, and
    warns above ``cond_limits(dtype)[0]`` (:func:`check_condition`); ``dtype`` is the one the inverse is
    kept in (default M's). With ``strict`` (γ = 0) an undamped singular factor is named as such.
    ``work``: the dtype of the factorisation (float64 unless given; the result's own dtype suffices for an
    inverse kept in it, since κ is refused above 1/(100·eps) of that dtype); ``inv_dtype`` (default
    ``work``): the dtype M⁻¹ is formed in from L (the whitener keeps ``work``).
    """

    def __init__(self, M: torch.Tensor, name: str = "factor", strict: bool = False,
                 dtype: torch.dtype | None = None, work: torch.dtype = torch.float64,
                 inv_dtype: torch.dtype | None = None):
        if strict:
            SymmetricEig(M, name, check_singular=True)
        M64 = M.to(work)
        M64 = 0.5 * (M64 + M64.T)
        L, info = torch.linalg.cholesky_ex(M64)
        if int(info) != 0:
            check_condition(math.inf, name, dtype or M.dtype, f"not positive definite: Cholesky fails at column "
                                                              f"{int(info)}")
        self.L = L
        inv_dtype = inv_dtype or work
        self._inv = torch.cholesky_inverse(L.to(inv_dtype))
        self.cond = check_condition(cond1(M64.to(inv_dtype), self._inv), name, dtype or M.dtype, "1-norm")

    def inv(self) -> torch.Tensor:
        return self._inv

    def whitener(self) -> torch.Tensor:
        eye = torch.eye(self.L.shape[0], dtype=self.L.dtype, device=self.L.device)
        return torch.linalg.solve_triangular(self.L, eye, upper=False)


class BlockOperator:
    """A linear operator on the parameters of ``layers`` (0-based Linear indices).

    Subclasses implement :meth:`apply` (or the block-diagonal :meth:`apply_block`) and
    :meth:`dense` (or :meth:`dense_block`).
    """

    def __init__(self, layers: Sequence[int], shapes: Sequence[tuple[int, int]]):
        self.layers = list(layers)
        self.shapes = [tuple(s) for s in shapes]

    @property
    def n_params(self) -> int:
        return sum(r * c for r, c in self.shapes)

    def _check(self, mats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        mats = list(mats)
        if len(mats) != len(self.shapes):
            raise ValueError(f"expected {len(self.shapes)} per-layer matrices (layers {self.layers}), got {len(mats)}.")
        for k, M, s in zip(self.layers, mats, self.shapes):
            if tuple(M.shape[-2:]) != s:
                raise ValueError(f"layer {k} expects a matrix of shape {s}, got {tuple(M.shape)}.")
        return mats

    def apply(self, mats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Apply to per-layer matrices; returns per-layer matrices."""
        mats = self._check(mats)
        return [self.apply_block(i, V) for i, V in enumerate(mats)]

    def apply_block(self, i: int, V: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Apply to a flat θ-vector (paper layout), or to a batch (..., P)."""
        if v.shape[-1] != self.n_params:
            raise ValueError(f"expected vectors with {self.n_params} entries (layers {self.layers}), "
                             f"got {v.shape[-1]}.")
        return mats_to_vec(self.apply(vec_to_mats(v, self.shapes)))

    def __matmul__(self, other):
        if isinstance(other, torch.Tensor):
            if other.ndim == 2 and other.shape[0] == self.n_params:  # a P×m matrix of columns
                return self.matvec(other.T).T
            return self.matvec(other)
        return self.apply(other)

    def dense(self, max_bytes: int | None = None) -> torch.Tensor:
        """The P×P matrix in the paper layout (default: block diagonal from :meth:`dense_block`)."""
        ref = self._ref()
        check_dense_fits(self.n_params, ref.dtype, ref.device, max_bytes=max_bytes, what=type(self).__name__)
        return torch.block_diag(*[self.dense_block(i) for i in range(len(self.layers))])

    def dense_block(self, i: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _ref(self) -> torch.Tensor:
        for v in vars(self).values():
            if isinstance(v, torch.Tensor):
                return v
            if isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
                return v[0]
            if isinstance(v, list) and v and isinstance(v[0], SymmetricEig):
                return v[0].E
            if isinstance(v, dict) and v and isinstance(next(iter(v.values())), torch.Tensor):
                return next(iter(v.values()))
        raise RuntimeError("operator holds no tensor")
