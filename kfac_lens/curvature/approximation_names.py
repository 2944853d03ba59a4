"""The names of the approximations of the exact Fisher F that the package compares (:class:`Approximation`).

Each name has an operator in :mod:`~kfac_lens.curvature.approximation_operators`, built by
:func:`~kfac_lens.curvature.approximations.build_approximations`; this module holds only the names and their
parsing, so that the operators and the builders can both use them.
"""

from __future__ import annotations

from enum import Enum


class Approximation(str, Enum):
    """The approximations of F that :func:`compare_approximations` knows, by name."""

    KFAC = "kfac"
    KFAC_BLOCKDIAG = "kfac-blockdiag"
    KFAC_TRIDIAG = "kfac-tridiag"
    EKFAC = "ekfac"
    DIAGONAL = "diagonal"
    BLOCKDIAG_EXACT = "blockdiag-exact"
    KFAC_REDUCE = "kfac-reduce"

    def __str__(self) -> str:
        return self.value


APPROXIMATIONS = tuple(a.value for a in Approximation)


def parse_approximations(approximations, name: str = "approximations") -> list[Approximation]:
    """A name, an :class:`Approximation` or a list of them as a list without repeats; ValueError otherwise."""
    items = [approximations] if isinstance(approximations, str) else list(approximations)
    out: list[Approximation] = []
    for a in items:
        try:
            parsed = Approximation(a.lower() if isinstance(a, str) else a)
        except ValueError:
            raise ValueError(f"{name}: unknown approximation {a!r}; choose from {list(APPROXIMATIONS)} "
                             f"(e.g. {name}=['kfac-blockdiag', 'ekfac']).") from None
        if parsed not in out:
            out.append(parsed)
    if not out:
        raise ValueError(f"{name} is empty; name at least one of {list(APPROXIMATIONS)}.")
    return out
