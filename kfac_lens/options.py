"""The string options of kfac_lens as enums (docs/math.md §2, §3, §5).

Every option that is one of a few names is a :class:`str` enum: pass the enum member or its string
(``Estimator.MC`` or ``"mc"``); members compare equal to their strings and print as them. :func:`parse`
turns a user's value into the member and refuses anything else with a ``ValueError`` that names the
argument and its choices.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

__all__ = ["Estimator", "FactorApprox", "InverseKind", "Option", "parse"]


class Option(str, Enum):
    """A named choice whose value is the string users pass."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def choices(cls) -> tuple[str, ...]:
        """The accepted strings, in declaration order."""
        return tuple(m.value for m in cls)


class Estimator(Option):
    """How the expectation over targets y in F = E[g gᵀ] is taken (Section 2; Appendix D)."""

    EXACT = "exact"  # exactly, through a square root of the output Fisher F_R (one backward pass per output)
    MC = "mc"  # one backward pass per sample of y ~ r(y|z): the paper's estimator (Appendix D)
    EMPIRICAL = "empirical"  # the training targets instead of model samples: not the Fisher (for comparison)


class InverseKind(Option):
    """K-FAC's approximate inverse of the damped F̃ (Sections 3.2, 3.3)."""

    BLOCKDIAG = "blockdiag"  # F̆⁻¹: the inverse of the block-diagonal F̆ (Section 3.2)
    TRIDIAG = "tridiag"  # F̂⁻¹: a block-tridiagonal inverse (Section 3.3)


class FactorApprox(Option):
    """Kronecker factors of a layer used several times per case (Eschenhagen et al. 2023; docs/math.md §3)."""

    EXPAND = "expand"  # uses as extra cases (KFC for convolutions, Grosse & Martens 2016)
    REDUCE = "reduce"  # the uses summed (inputs averaged) before the outer products


E = TypeVar("E", bound=Option)


def parse(kind: type[E], value, name: str) -> E:
    """``value`` (a member of ``kind`` or its string, any case) as the member; ValueError naming ``name``."""
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        try:
            return kind(value.lower())
        except ValueError:
            pass
    raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in kind.choices())} "
                     f"(or kfac_lens.options.{kind.__name__}), got {value!r}.")
