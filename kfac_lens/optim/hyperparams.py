"""K-FAC's hyper-parameters as one typed record (Appendices D–H; docs/math.md §8).

:class:`KFACHyperParameters` holds what the user gave: each field a number (flag, string) or a callable of
the 1-based iteration k. :meth:`KFACHyperParameters.at` resolves every field at one k, in one place, into
a :class:`ResolvedHyperParameters` of plain typed values, and refuses values the paper's rules cannot use.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .schedules import HyperParameter, default_omega1, default_omega2, resolve

__all__ = ["KFACHyperParameters", "ResolvedHyperParameters"]


def _integer(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value:
        raise ValueError(f"{name} must be a positive integer (an iteration period), got {value!r}.")
    return int(value)


@dataclass(frozen=True)
class ResolvedHyperParameters:
    """The hyper-parameters at one iteration k, checked (the defaults are the paper's)."""

    eta: float  # ℓ2 strength (Section 7)
    T1: int  # λ rule period (Appendix E.5)
    T2: int  # γ search period, a multiple of T3 (Appendix E.6)
    T3: int  # inverse refresh period (Appendix G)
    omega1: float  # λ factor (E.5)
    omega2: float  # γ grid ratio (E.6)
    tau1: float  # factor-statistics subset (Appendix D)
    tau2: float  # exact-F products subset (E.4, F)
    momentum: bool  # Appendix F
    rescale: bool  # Appendix E.4
    pi: str | float  # factored Tikhonov π: "trace" or a positive number (E.3)
    eps_max: float  # EMA cap (Appendix D)
    low_rank: bool  # Appendix G's low-rank form (block-diagonal only)
    adapt_gamma: bool  # the E.6 rule
    adapt_lambda: bool  # the E.5 rule

    def __post_init__(self) -> None:
        if min(self.T1, self.T2, self.T3) < 1:
            raise ValueError(f"T1, T2, T3 must be positive integers, got {self.T1}, {self.T2}, {self.T3}.")
        if self.T2 % self.T3:
            raise ValueError(f"T2 = {self.T2} must be a multiple of T3 = {self.T3} (Appendix E.6), so that the γ "
                             "search happens on iterations where the inverse is recomputed.")
        for name in ("tau1", "tau2"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in (0, 1], got {getattr(self, name)}.")
        for name in ("omega1", "omega2"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in (0, 1), got {getattr(self, name)}.")
        if not self.eta >= 0:
            raise ValueError(f"eta must be ≥ 0, got {self.eta}.")
        if not 0 <= self.eps_max < 1:
            raise ValueError(f"eps_max must lie in [0, 1) (the cap of the EMA decay, Appendix D), got {self.eps_max}.")
        pi = self.pi
        if not (pi == "trace" or (isinstance(pi, (int, float)) and not isinstance(pi, bool) and pi > 0)):
            raise ValueError(f"pi must be 'trace' or a positive number, got {pi!r}.")


@dataclass
class KFACHyperParameters:
    """K-FAC's hyper-parameters as given: each a value or a callable of k (see :class:`~kfac_lens.KFAC`).

    ``omega1`` / ``omega2`` default (None) to the paper's (19/20)^T1 and (√(19/20))^T2 at each k.
    """

    eta: HyperParameter = 1e-5
    T1: HyperParameter = 5
    T2: HyperParameter = 20
    T3: HyperParameter = 20
    omega1: HyperParameter | None = None
    omega2: HyperParameter | None = None
    tau1: HyperParameter = 1 / 8
    tau2: HyperParameter = 1 / 4
    momentum: HyperParameter = True
    rescale: HyperParameter = True
    pi: HyperParameter = "trace"
    eps_max: HyperParameter = 0.95
    low_rank: HyperParameter = True
    adapt_gamma: HyperParameter = True
    adapt_lambda: HyperParameter = True

    def at(self, k: int) -> ResolvedHyperParameters:
        """Every hyper-parameter at the 1-based iteration ``k``, resolved and checked (ValueError)."""
        if k < 1:
            raise ValueError(f"k is the 1-based iteration, got {k}.")
        raw = {f.name: resolve(getattr(self, f.name), k) for f in fields(self)}
        if raw["omega1"] is None:
            raw["omega1"] = resolve(default_omega1(self.T1), k)
        if raw["omega2"] is None:
            raw["omega2"] = resolve(default_omega2(self.T2), k)
        for name in ("T1", "T2", "T3"):
            raw[name] = _integer(name, raw[name])
        for name in ("eta", "omega1", "omega2", "tau1", "tau2", "eps_max"):
            raw[name] = float(raw[name])
        for name in ("momentum", "rescale", "low_rank", "adapt_gamma", "adapt_lambda"):
            raw[name] = bool(raw[name])
        return ResolvedHyperParameters(**raw)
