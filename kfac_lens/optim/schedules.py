"""Adaptation rules and schedules (Appendices E.5, E.6, M; docs/math.md §8).

Hyper-parameters may be numbers or callables of the 1-based iteration k (:func:`resolve`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Union

# A number (or flag/string) or a callable of the iteration k.
HyperParameter = Union[float, int, bool, str, Callable[[int], object]]  # noqa: UP007 (a runtime alias)


def resolve(value: HyperParameter, k: int):
    """A hyper-parameter's value at iteration k: call it when it is a callable, else return it."""
    return value(k) if callable(value) else value


def default_omega1(T1: HyperParameter) -> Callable[[int], float]:
    """Appendix E.5's ω₁ = (19/20)^T₁ (T₁ a number or a callable of k)."""
    return lambda k: (19 / 20) ** resolve(T1, k)


def default_omega2(T2: HyperParameter) -> Callable[[int], float]:
    """Appendix E.6's ω₂ = (√(19/20))^T₂ (T₂ a number or a callable of k)."""
    return lambda k: math.sqrt(19 / 20) ** resolve(T2, k)


def levenberg_marquardt(lam: float, rho: float, omega1: float) -> float:
    """Appendix E.5: λ ← ω₁λ if ρ > 3/4; λ ← λ/ω₁ if ρ < 1/4; else unchanged. NaN ρ counts as a failure."""
    if not 0 < omega1 < 1:
        raise ValueError(f"omega1 must lie in (0, 1), got {omega1}.")
    if rho > 0.75:
        return lam * omega1
    if rho < 0.25 or math.isnan(rho):
        return lam / omega1
    return lam


def gamma_candidates(gamma: float, omega2: float) -> list[float]:
    """Appendix E.6: the candidates {γ, ω₂γ, γ/ω₂} tried every T₂ iterations (current γ first)."""
    if not 0 < omega2 < 1:
        raise ValueError(f"omega2 must lie in (0, 1), got {omega2}.")
    return [gamma, omega2 * gamma, gamma / omega2]


def ema_decay(k: int, eps_max: float = 0.95) -> float:
    """Appendix D: ε = min(1 − 1/k, 0.95) for the running factor estimates."""
    return min(1.0 - 1.0 / k, eps_max)


def exponential_batch_sizes(m1: int, n_cases: int, full_at: int = 500) -> Callable[[int], int]:
    """Appendix M: m_k = min(m₁ exp((k−1)/b), |S|) with b chosen so that m_{full_at} = |S|."""
    if m1 < 1 or n_cases < 1 or full_at < 2:
        raise ValueError("need m1 ≥ 1, n_cases ≥ 1 and full_at ≥ 2.")
    m1 = min(m1, n_cases)
    b = (full_at - 1) / math.log(n_cases / m1) if n_cases > m1 else math.inf

    def schedule(k: int) -> int:
        if b == math.inf:
            return n_cases
        return int(min(round(m1 * math.exp((k - 1) / b)), n_cases))

    return schedule


def sutskever_momentum(k: int, mu_max: float = 0.99) -> float:
    """Sutskever et al. (2013): μ_t = min(1 − 2^(−1 − log₂(⌊t/250⌋ + 1)), μ_max)."""
    return min(1.0 - 2.0 ** (-1.0 - math.log2(k // 250 + 1)), mu_max)
