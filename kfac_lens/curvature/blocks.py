"""The layer-block layout of a P×P curvature matrix: block offsets, slices and kinds (docs/math.md §1).

θ stacks the layers' parameters one after the other (the paper layout), so a P×P matrix over layers
with ``sizes`` parameters each splits into blocks (i, j). The kind of a block is how far it lies from
the diagonal, in the terms of Sections 3.2 and 3.3: the **diagonal** blocks (i = j) are what F̆ keeps,
the **tridiagonal** blocks (|i − j| = 1, the neighbouring layers) are what F̂ adds, and the
**off-tridiagonal** blocks (|i − j| ≥ 2) are what F̂ only approximates.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from enum import Enum

import torch

__all__ = [
    "BlockKind",
    "block_kind",
    "block_mass",
    "block_offsets",
    "block_pairs",
    "block_slices",
    "neighbour_share_chance",
    "off_tridiagonal_mask",
]


class BlockKind(str, Enum):
    """Where block (i, j) lies: on the diagonal, next to it, or further out (the value names it in tables)."""

    DIAGONAL = "diagonal"
    TRIDIAGONAL = "tridiagonal"
    OFF_TRIDIAGONAL = "off-tridiagonal"

    def __str__(self) -> str:
        return self.value


def block_kind(i: int, j: int) -> BlockKind:
    """The kind of block (i, j): diagonal (i = j), tridiagonal (|i − j| = 1) or off-tridiagonal."""
    d = abs(int(i) - int(j))
    return BlockKind.DIAGONAL if d == 0 else (BlockKind.TRIDIAGONAL if d == 1 else BlockKind.OFF_TRIDIAGONAL)


def block_offsets(sizes: Sequence[int]) -> list[int]:
    """``[0, s₀, s₀ + s₁, …, P]``: where each block starts, and P at the end."""
    return [0, *itertools.accumulate(int(s) for s in sizes)]


def block_slices(sizes: Sequence[int]) -> list[slice]:
    """The slice of θ each block occupies."""
    offs = block_offsets(sizes)
    return [slice(a, b) for a, b in itertools.pairwise(offs)]


def block_pairs(sizes: Sequence[int]) -> Iterator[tuple[int, int, slice, slice, BlockKind]]:
    """Every block (i, j), row by row, as ``(i, j, rows, cols, kind)``."""
    slices = block_slices(sizes)
    for i, si in enumerate(slices):
        for j, sj in enumerate(slices):
            yield i, j, si, sj, block_kind(i, j)


def off_tridiagonal_mask(sizes: Sequence[int], device=None) -> torch.Tensor:
    """Boolean P×P mask of the off-tridiagonal blocks (|i − j| ≥ 2)."""
    idx = torch.repeat_interleave(torch.arange(len(sizes)), torch.as_tensor([int(s) for s in sizes]))
    idx = idx.to(device)
    return (idx[:, None] - idx[None, :]).abs() >= 2


def block_mass(M: torch.Tensor, sizes: Sequence[int]) -> dict[str, float]:
    """Fractions of ``‖M‖_F²`` on the diagonal, tridiagonal and off-tridiagonal blocks (Section 3.3).

    ``neighbour_mass`` is the tridiagonal share (the blocks of neighbouring layers) and
    ``within_tridiagonal`` = diagonal + neighbours; ``neighbour_share_of_off_diagonal`` is the part of
    the off-diagonal-block mass that sits on the neighbouring blocks (1 for an exactly block-tridiagonal
    matrix, whatever the size of its diagonal). ``blockdiag_truncation_error`` and
    ``tridiag_truncation_error`` are ``‖M − trunc(M)‖_F / ‖M‖_F`` when everything outside the diagonal
    (resp. tridiagonal) blocks is zeroed: how far M is from being block-diagonal / block-tridiagonal.
    """
    sq = M.detach().to(torch.float64) ** 2
    mass = dict.fromkeys(BlockKind, 0.0)
    for _i, _j, si, sj, kind in block_pairs(sizes):
        mass[kind] += float(sq[si, sj].sum())
    diag, near, far = mass[BlockKind.DIAGONAL], mass[BlockKind.TRIDIAGONAL], mass[BlockKind.OFF_TRIDIAGONAL]
    total = sum(mass.values())
    off = near + far

    def share(x: float) -> float:
        return x / total if total else float("nan")

    return {
        "blockdiag_truncation_error": math.sqrt(off / total) if total else float("nan"),
        "tridiag_truncation_error": math.sqrt(far / total) if total else float("nan"),
        "diagonal_mass": share(diag),
        "neighbour_mass": share(near),
        "within_tridiagonal_mass": share(diag + near),
        "off_tridiagonal_mass": share(far),
        "neighbour_share_of_off_diagonal": near / off if off else float("nan"),
    }


def neighbour_share_chance(sizes: Sequence[int]) -> float:
    """The neighbour share of the off-diagonal-block mass a matrix with evenly spread mass would have.

    That is the fraction of the off-diagonal-block *entries* that lie on the neighbouring blocks
    (Σ_{|i−j|=1} s_i s_j / Σ_{i≠j} s_i s_j): 0.5 for four equal blocks, 1 for two. A
    ``neighbour_share_of_off_diagonal`` (:func:`block_mass`) near this level says nothing about
    tridiagonal structure. NaN for a single block.
    """
    s = [float(v) for v in sizes]
    n = len(s)
    near = sum(s[i] * s[j] for i in range(n) for j in range(n) if block_kind(i, j) is BlockKind.TRIDIAGONAL)
    off = sum(s[i] * s[j] for i in range(n) for j in range(n) if i != j)
    return near / off if off else float("nan")


def kron(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A ⊗ B`` (docs/math.md §3). ``torch.kron`` (2.13) raises on some non-contiguous inputs, such as a
    transposed factor block or an ``einsum`` result laid out by opt_einsum, so the inputs are made
    contiguous first."""
    return torch.kron(A.contiguous(), B.contiguous())
