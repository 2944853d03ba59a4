"""The analysis model behind the figures and explorers: one network on one data set, computed once.

:class:`CurvatureStudy` holds the exact Fisher F (docs/math.md §2), the Kronecker factors and F̃
(§3), ∇h and an eigendecomposition of F. Everything that depends on the damping γ (§4: the damped F̃,
its exact inverse F̃⁻¹, the operators F̆⁻¹ and F̂⁻¹ of Sections 3.2 and 3.3, natural-gradient
directions, error tables) is memoised per γ. The matrices come from the curvature operators
(:mod:`kfac_lens.curvature`), never re-derived here: F̆ and F̂ are their ``dense_approximation``.

Results are keyed by :class:`Inverse`; the labels in the tables (``Inverse.label``) are the
vocabulary of the metrics files that ``kfac-lens figures`` writes. Drawing lives in
:mod:`kfac_lens.figures`.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from enum import Enum

import pandas as pd
import torch

from .curvature.blocks import block_slices, kron
from .curvature.compare import block_square_sums, direction_errors, error_by_kind
from .curvature.cumulants import CumulantTerms, cumulant_terms
from .curvature.factors import KroneckerFactors, check_approx, kronecker_factors
from .curvature.fisher import exact_fisher
from .curvature.inverses import BlockDiagonalInverse, BlockTridiagonalInverse
from .curvature.operators import spd_inverse
from .errors import SingularFactorError
from .likelihoods import get_likelihood
from .nets import NetworkView, mats_to_vec

__all__ = ["CurvatureStudy", "Inverse", "StudySubset", "layer_label"]


def layer_label(k: int) -> str:
    """The paper's 1-based name of 0-based Linear layer k: layer 1 → "W2"."""
    return f"W{int(k) + 1}"


class Inverse(Enum):
    """The three inverses of the damped F̃ that the study compares (Sections 3.2, 3.3; docs/math.md §5)."""

    BLOCK_DIAGONAL = "block-diagonal"  # F̆⁻¹
    BLOCK_TRIDIAGONAL = "block-tridiagonal"  # F̂⁻¹
    EXACT = "exact"  # F̃⁻¹, the exact inverse of the damped F̃

    @property
    def label(self) -> str:
        """Its name in the metrics tables, e.g. "F̂⁻¹ (block-tridiagonal)"."""
        return _LABELS[self][0]

    @property
    def direction_label(self) -> str:
        """The name of the direction (inverse)·∇h in the tables, e.g. "F̂⁻¹∇h"."""
        return _LABELS[self][1]


_LABELS = {
    Inverse.BLOCK_DIAGONAL: ("F̆⁻¹ (block-diagonal)", "F̆⁻¹∇h"),
    Inverse.BLOCK_TRIDIAGONAL: ("F̂⁻¹ (block-tridiagonal)", "F̂⁻¹∇h"),
    Inverse.EXACT: ("F̃⁻¹ (damped F̃, exact inverse)", "F̃⁻¹∇h"),
}


class CurvatureStudy:
    """Everything the figures and explorers need about one network on one data set, computed once.

    Parameters: ``model`` (an ``nn.Sequential``, a :class:`~kfac_lens.nets.NetworkView`, or any ``nn.Module``
    read by a probe pass on ``example_input``, default ``X[:2]``; docs/math.md §1), inputs ``X``, targets
    ``y`` (needed only for the gradient ∇h and the natural-gradient directions), ``likelihood``
    ("categorical", "bernoulli", "gaussian"), ``layers`` (0-based layer indices; the
    paper's Figures 5–6 use the middle four, ``[1, 2, 3, 4]``), ``pi`` (factored-Tikhonov π: "trace"
    or a number, Appendix E.6), ``approx`` ("expand" or "reduce", for layers used several times per case:
    a convolution's positions, tied weights; expand pairs two layers' uses only when their numbers agree).

    The model is snapshotted (deep-copied to float64) so later training does not change the study.
    Precomputed: ``F`` (exact Fisher, dense float64), ``factors`` (exact-estimator Kronecker factors,
    ``pairs="all"``), ``F_tilde`` (F̃), ``grad`` (∇h in the paper layout, or None without y); an
    eigendecomposition of F is computed on first need. γ-dependent quantities are memoised per γ
    (the ``cache_size`` most recent values), so an explorer's γ change recomputes only those.
    """

    def __init__(
        self,
        model,
        X,
        y=None,
        likelihood="categorical",
        layers=None,
        *,
        pi="trace",
        name: str | None = None,
        chunk_size: int | None = None,
        cache_size: int = 4,
        example_input=None,
        approx: str = "expand",
    ):
        t0 = time.perf_counter()
        view = _study_view(model, X, example_input)
        self.model = copy.deepcopy(view.model).to(torch.float64)
        example = view.example_input
        if example is not None and example.is_floating_point():
            example = example.to(torch.float64)
        self.view = NetworkView(self.model, example, warn=False)
        self.layers = self.view.select(layers)
        self.likelihood = get_likelihood(likelihood)
        X = torch.as_tensor(X)
        self.X = X.to(device=self.view.device, dtype=torch.float64)
        self.y = None if y is None else torch.as_tensor(y).to(self.view.device)
        self.pi = pi
        self.name = name or (type(self.model).__name__ if self.view.is_general
                             else f"{'-'.join(str(s) for s in self._arch())} net")
        self.cache_size = int(cache_size)
        self.approx = check_approx(approx)
        self.F = exact_fisher(self.view, self.X, self.likelihood, layers=self.layers, chunk_size=chunk_size)
        self.factors = kronecker_factors(
            self.view, self.X, self.likelihood, layers=self.layers, pairs="all", chunk_size=chunk_size,
            approx=self.approx,
        )
        self.F_tilde = self.factors.dense()
        self.grad = self._gradient() if self.y is not None else None
        self._init_caches()
        self.timings = {"precompute_s": time.perf_counter() - t0}

    # ------------------------------------------------------------------ construction helpers
    def _arch(self) -> list[int]:
        return [self.view.layers[0].d_in] + [lay.d_out for lay in self.view.layers]

    def _init_caches(self) -> None:
        self._gamma_cache: OrderedDict[float, dict] = OrderedDict()
        self._subsets: dict[tuple, CurvatureStudy] = {}
        self._cumulants: dict[tuple, CumulantTerms] = {}
        self._F_eig = None

    def _gradient(self) -> torch.Tensor:
        """∇h = ∇θ (1/N) Σ_n L(y_n, f(x_n, θ)) of the selected layers, paper layout (docs/math.md §1)."""
        mods = [self.view.layers[k].module for k in self.layers]
        params = []
        for m in mods:
            params.append(m.weight)
            if m.bias is not None:
                params.append(m.bias)
        with torch.enable_grad():
            z = self.model(self.X)
            y = self.likelihood.check_targets(
                z, self.y.to(z.dtype) if self.y.dtype.is_floating_point else self.y
            )
            h = self.likelihood.nll(z, y)
            grads = list(torch.autograd.grad(h, params))
        mats = []
        for m in mods:
            dw = grads.pop(0).reshape(m.weight.shape[0], -1)  # a convolution's weight.reshape(out, −1)
            if m.bias is not None:
                dw = torch.cat([dw, grads.pop(0)[:, None]], dim=1)
            mats.append(dw.detach())
        return mats_to_vec(mats)

    # ------------------------------------------------------------------ sizes and labels
    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [self.view.layers[k].shape for k in self.layers]

    @property
    def sizes(self) -> list[int]:
        return [r * c for r, c in self.shapes]

    @property
    def labels(self) -> list[str]:
        return [layer_label(k) for k in self.layers]

    @property
    def n_params(self) -> int:
        return sum(self.sizes)

    def __repr__(self) -> str:
        return (
            f"CurvatureStudy({self.name!r}, layers={self.layers}, P={self.n_params}, N={self.X.shape[0]}, "
            f"likelihood={self.likelihood.name!r})"
        )

    # ------------------------------------------------------------------ layer subsets
    def subset(self, layers: Sequence[int]) -> CurvatureStudy:
        """The study restricted to ``layers`` (a strictly increasing subset), sharing F, factors and ∇h."""
        sel = self.factors.select(layers)
        if sel == self.layers:
            return self
        key = tuple(sel)
        if key not in self._subsets:
            self._subsets[key] = StudySubset(self, sel)
        return self._subsets[key]

    # ------------------------------------------------------------------ γ memo
    def _memo(self, gamma: float, key: str, fn: Callable):
        g = float(gamma)
        slot = self._gamma_cache.get(g)
        if slot is None:
            slot = self._gamma_cache[g] = {}
            while len(self._gamma_cache) > self.cache_size:
                self._gamma_cache.popitem(last=False)
        else:
            self._gamma_cache.move_to_end(g)
        if key not in slot:
            slot[key] = fn()
        return slot[key]

    def damped_factors(self, gamma: float) -> KroneckerFactors:
        """Factors with factored Tikhonov damping γ on the diagonal factors (docs/math.md §4)."""
        return self._memo(gamma, "damped_factors", lambda: self.factors.damped(gamma, self.pi))

    def F_tilde_damped(self, gamma: float) -> torch.Tensor:
        """Damped F̃: F̃ with ``Ā_kk + πγI`` and ``G_kk + (γ/π)I`` on the diagonal blocks (γ = 0: F̃)."""
        if float(gamma) == 0.0:
            return self.F_tilde
        # F̃ with its diagonal blocks replaced: the cross blocks are undamped, so they are F̃'s own (not
        # memoised: one P×P copy, cheaper than kron over every block pair, and saves a P×P per cached γ)
        damped = self.damped_factors(gamma)
        M = self.F_tilde.clone()
        for k, where in zip(self.layers, block_slices(self.sizes)):
            M[where, where] = kron(damped.A[k, k], damped.G[k, k])
        return M

    def F_tilde_inverse(self, gamma: float) -> torch.Tensor:
        """F̃⁻¹ at damping γ: the exact inverse of the **damped** F̃ (Cholesky)."""
        return self._memo(
            gamma,
            "F_tilde_inverse",
            lambda: spd_inverse(self.F_tilde_damped(gamma), f"damped F̃ (γ={float(gamma):g})"),
        )

    def blockdiag_operator(self, gamma: float) -> BlockDiagonalInverse:
        """The F̆⁻¹ operator (Section 3.2) of the damped factors."""
        return self._memo(
            gamma, "blockdiag_op", lambda: BlockDiagonalInverse(self.factors, gamma, pi=self.pi)
        )

    def tridiag_operator(self, gamma: float) -> BlockTridiagonalInverse:
        """The F̂⁻¹ operator (Section 3.3) of the damped factors."""
        return self._memo(
            gamma, "tridiag_op", lambda: BlockTridiagonalInverse(self.factors, gamma, pi=self.pi)
        )

    def blockdiag_inverse(self, gamma: float) -> torch.Tensor:
        """Dense F̆⁻¹ (block-diagonal inverse, Section 3.2) at damping γ."""
        return self._memo(gamma, "blockdiag_inverse", lambda: self.blockdiag_operator(gamma).dense())

    def tridiag_inverse(self, gamma: float) -> torch.Tensor:
        """Dense F̂⁻¹ (block-tridiagonal inverse, Section 3.3) at damping γ."""
        return self._memo(gamma, "tridiag_inverse", lambda: self.tridiag_operator(gamma).dense())

    def inverse(self, which: Inverse, gamma: float) -> torch.Tensor:
        """The dense inverse ``which`` at damping γ."""
        return {
            Inverse.BLOCK_DIAGONAL: self.blockdiag_inverse,
            Inverse.BLOCK_TRIDIAGONAL: self.tridiag_inverse,
            Inverse.EXACT: self.F_tilde_inverse,
        }[Inverse(which)](gamma)

    def blockdiag_approximation(self, gamma: float) -> torch.Tensor:
        """F̆: the diagonal blocks of the damped F̃ (the operator's ``dense_approximation``)."""
        return self._memo(
            gamma, "blockdiag_approx", lambda: self.blockdiag_operator(gamma).dense_approximation()
        )

    def tridiag_approximation(self, gamma: float) -> torch.Tensor:
        """F̂ = (F̂⁻¹)⁻¹: equals the damped F̃ on the tridiagonal blocks (the operator's ``dense_approximation``)."""
        return self._memo(
            gamma, "tridiag_approx", lambda: self.tridiag_operator(gamma).dense_approximation()
        )

    def comparison_gamma(self, gamma: float | None = None) -> tuple[float, bool]:
        """γ for comparing F̃ with F̆ and F̂ (Figure 5), and whether it is a fallback.

        ``gamma`` when given; else 0 (undamped, as in the paper) unless the factors or the Schur
        complements are singular (or nearly so) there, in which case :meth:`default_small_gamma`.
        """
        if gamma is not None:
            return float(gamma), False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                self.tridiag_approximation(0.0)
                self.blockdiag_operator(0.0)
            return 0.0, False
        except (SingularFactorError, RuntimeWarning, torch.linalg.LinAlgError):
            self._gamma_cache.pop(0.0, None)
            return self.default_small_gamma(), True

    # ------------------------------------------------------------------ natural-gradient directions
    def _eig_F(self):
        if self._F_eig is None:
            s, E = torch.linalg.eigh(self.F)
            self._F_eig = (s.clamp_min(0.0), E)
        return self._F_eig

    def exact_natural_gradient(self, gamma: float) -> torch.Tensor:
        """``(F + γ² I)⁻¹ ∇h``, the reference direction.

        Factored Tikhonov with strength γ stands in for adding ``(λ + η) I`` to the curvature: K-FAC
        initialises and keeps γ ≈ √(λ+η) (Appendix E.3, E.6), and for a single block
        ``(Ā + πγI) ⊗ (G + γ/π I) = Ā⊗G + πγ I⊗G + (γ/π) Ā⊗I + γ² I``, whose isotropic part is γ² I.
        So the exact-F direction at comparable damping is ``(F + γ² I)⁻¹∇h``. Uses a cached eigh of F.
        """
        self._need_grad()

        def make():
            s, E = self._eig_F()
            den = s + float(gamma) ** 2
            if float(den.min()) <= 0:
                raise SingularFactorError("F + γ²I is singular at γ = 0; pass gamma > 0.")
            return E @ ((E.T @ self.grad) / den)

        return self._memo(gamma, "exact_ng", make)

    def _need_grad(self) -> None:
        if self.grad is None:
            raise ValueError(
                "natural-gradient directions need the gradient ∇h: build the CurvatureStudy with y=."
            )

    def directions(self, gamma: float) -> dict[Inverse, torch.Tensor]:
        """(inverse)·∇h for the three inverses at damping γ (F̃⁻¹ of the damped F̃)."""
        self._need_grad()

        def make():
            g = self.grad
            return {
                Inverse.BLOCK_DIAGONAL: self.blockdiag_operator(gamma) @ g,
                Inverse.BLOCK_TRIDIAGONAL: self.tridiag_operator(gamma) @ g,
                Inverse.EXACT: self.F_tilde_inverse(gamma) @ g,
            }

        return self._memo(gamma, "directions", make)

    def natural_gradients(self, gamma: float) -> dict[str, torch.Tensor]:
        """:meth:`directions` under their table names ``{"F̆⁻¹∇h", "F̂⁻¹∇h", "F̃⁻¹∇h"}``."""
        return {inv.direction_label: u for inv, u in self.directions(gamma).items()}

    def direction_table(self, gamma: float) -> pd.DataFrame:
        """Cosine / relative error of each direction against ``(F + γ² I)⁻¹∇h``.

        See :meth:`exact_natural_gradient` for why γ².
        """
        return self._memo(
            gamma,
            "direction_table",
            lambda: direction_errors(
                self.natural_gradients(gamma),
                self.exact_natural_gradient(gamma),
                reference_name="(F+γ²I)⁻¹∇h",
            ),
        )

    # ------------------------------------------------------------------ error tables
    def inverse_errors(self, gamma: float) -> pd.DataFrame:
        """Relative Frobenius errors of F̆⁻¹ and F̂⁻¹ against F̃⁻¹ (damped), overall and by block kind."""

        def make():
            ref = self.F_tilde_inverse(gamma)
            ref_sums = block_square_sums(ref, self.sizes)  # (shared by both comparisons)
            parts = [
                error_by_kind(self.inverse(inv, gamma), ref, self.sizes, name=inv.label, ref_sums=ref_sums)
                for inv in (Inverse.BLOCK_DIAGONAL, Inverse.BLOCK_TRIDIAGONAL)
            ]
            return pd.concat(parts, ignore_index=True).assign(gamma=float(gamma))

        return self._memo(gamma, "inverse_errors", make)

    def damping_metrics(self, gamma: float) -> pd.DataFrame:
        """The DampingExplorer table, one row per inverse (F̆⁻¹, F̂⁻¹, F̃⁻¹) at damping γ.

        Columns: ``rel_error_overall`` / ``rel_error_diagonal`` (relative Frobenius error against F̃⁻¹,
        the inverse of the damped F̃, over all / the diagonal blocks); ``cosine_vs_exact_ng``: cosine of
        the direction (inverse)·∇h with the exact ``(F + γ²I)⁻¹∇h`` (see :meth:`exact_natural_gradient`);
        ``cosine_vs_F_tilde_ng``: cosine with ``F̃⁻¹∇h`` (isolates the error of the approximate inverse
        from that of F̃ and of the damping). Cosines are NaN without ``y``.
        """

        def make():
            err = self.inverse_errors(gamma).pivot(index="comparison", columns="kind", values="rel_error")
            cos = cos_t = None
            if self.grad is not None:
                cos = self.direction_table(gamma).set_index("direction")["cosine"]
                dirs = self.natural_gradients(gamma)
                exact = dirs[Inverse.EXACT.direction_label]
                cos_t = direction_errors(dirs, exact).set_index("direction")["cosine"]
            rows = []
            for inv in Inverse:
                measured = inv.label in err.index
                row = {
                    "inverse": inv.label,
                    "gamma": float(gamma),
                    "rel_error_overall": float(err.loc[inv.label, "overall"]) if measured else 0.0,
                    "rel_error_diagonal": float(err.loc[inv.label, "diagonal"]) if measured else 0.0,
                }
                d = inv.direction_label
                row["cosine_vs_exact_ng"] = float(cos[d]) if cos is not None else float("nan")
                row["cosine_vs_F_tilde_ng"] = float(cos_t[d]) if cos_t is not None else float("nan")
                rows.append(row)
            return pd.DataFrame(rows).set_index("inverse")

        return self._memo(gamma, "damping_metrics", make)

    # ------------------------------------------------------------------ Appendix B
    def cumulants(self, k: int, l: int, **kw) -> CumulantTerms:
        """The Appendix B terms of block (k, l) (cached); ``kw`` goes to :func:`~kfac_lens.cumulant_terms`."""
        key = (int(k), int(l), tuple(sorted(kw.items())))
        if key not in self._cumulants:
            self._cumulants[key] = cumulant_terms(
                self.view, self.X, self.likelihood, int(k), int(l), y=self.y, **kw
            )
        return self._cumulants[key]

    def block_errors_of_F_tilde(self, k: int, l: int) -> dict[str, float]:
        """Block (k, l) of F and of F − F̃: their Frobenius norms and ‖F − F̃‖/‖F‖ on that block."""
        where = dict(zip(self.layers, block_slices(self.sizes)))
        F_b, Ft_b = self.F[where[k], where[l]], self.F_tilde[where[k], where[l]]
        ref, diff = float(F_b.norm()), float((F_b - Ft_b).norm())
        return {"F": ref, "difference": diff, "rel_error": diff / ref if ref else float("nan")}

    def default_small_gamma(self) -> float:
        """A γ too small to change the picture (1e-6 of the smallest per-layer factor scale √(mĀ·mG))."""
        scales = []
        for k in self.layers:
            A, G = self.factors.A[k, k], self.factors.G[k, k]
            scales.append(
                math.sqrt(
                    max(float(torch.trace(A)) / A.shape[0], 0.0)
                    * max(float(torch.trace(G)) / G.shape[0], 0.0)
                )
            )
        s = min(v for v in scales if v > 0) if any(v > 0 for v in scales) else 1.0
        return 1e-6 * s


def _study_view(model, X, example_input) -> NetworkView:
    """The view a study reads: a given view as is, an ``nn.Sequential`` in module order, any other module
    through a probe pass on ``example_input`` (default: the first two cases of X)."""
    if isinstance(model, NetworkView):
        return model if example_input is None else NetworkView(model.model, example_input)
    if example_input is None and isinstance(model, torch.nn.Module) and not isinstance(model, torch.nn.Sequential):
        example_input = torch.as_tensor(X)[:2]
    return NetworkView(model, example_input)


class StudySubset(CurvatureStudy):
    """A :class:`CurvatureStudy` restricted to some of its layers (:meth:`CurvatureStudy.subset`).

    It shares the parent's snapshot of the model, its data, and slices of its F, F̃ and ∇h; the factors
    are the parent's :meth:`~kfac_lens.curvature.factors.KroneckerFactors.restrict`. Only the
    γ-dependent pieces are its own.
    """

    def __init__(self, parent: CurvatureStudy, layers: Sequence[int]):
        sel = parent.factors.select(layers)
        self.model, self.view, self.likelihood = parent.model, parent.view, parent.likelihood
        self.X, self.y, self.pi, self.cache_size = parent.X, parent.y, parent.pi, parent.cache_size
        self.approx = parent.approx
        self.layers = sel
        self.name = f"{parent.name} [{', '.join(layer_label(k) for k in sel)}]"
        where = dict(zip(parent.layers, block_slices(parent.sizes)))
        idx = torch.cat([torch.arange(where[k].start, where[k].stop) for k in sel]).to(parent.F.device)
        self.F = parent.F[idx][:, idx]
        self.factors = parent.factors.restrict(sel)
        self.F_tilde = parent.F_tilde[idx][:, idx]
        self.grad = None if parent.grad is None else parent.grad[idx]
        self._init_caches()
        self.timings = {"precompute_s": 0.0}
