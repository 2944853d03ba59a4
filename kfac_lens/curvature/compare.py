"""Error metrics between curvature matrices and between update directions, as pandas tables.

Relative Frobenius error ``‖approx − ref‖_F / ‖ref‖_F`` overall and per block (Appendix C's
comparisons), and for directions the cosine and relative-norm error against a reference such as
the exact natural gradient F⁻¹∇h (Appendix C, footnote 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd
import torch

from .blocks import BlockKind, block_pairs


def _rel(diff: torch.Tensor, ref: torch.Tensor) -> float:
    r = float(ref.norm())
    return float(diff.norm()) / r if r > 0 else float("nan")


def block_errors(approx: torch.Tensor, ref: torch.Tensor, sizes: Sequence[int],
                 labels: Sequence | None = None, name: str = "approx") -> pd.DataFrame:
    """Relative Frobenius error of ``approx`` against ``ref`` overall and for every block (i, j).

    ``sizes`` are the block sizes (parameters per layer); ``labels`` name the layers (default 0..).
    Columns: comparison, block_row, block_col, kind (diagonal / tridiagonal / off-tridiagonal / overall),
    rel_error, abs_error, ref_norm.
    """
    if approx.shape != ref.shape or approx.shape[0] != sum(sizes):
        raise ValueError(f"shapes {tuple(approx.shape)} and {tuple(ref.shape)} must both be P×P with P = {sum(sizes)}.")
    labels = list(range(len(sizes))) if labels is None else list(labels)
    diff = approx - ref
    rows = [{"comparison": name, "block_row": "all", "block_col": "all", "kind": "overall",
             "rel_error": _rel(diff, ref), "abs_error": float(diff.norm()), "ref_norm": float(ref.norm())}]
    for i, j, bi, bj, kind in block_pairs(sizes):
        rows.append({"comparison": name, "block_row": labels[i], "block_col": labels[j], "kind": kind.value,
                     "rel_error": _rel(diff[bi, bj], ref[bi, bj]), "abs_error": float(diff[bi, bj].norm()),
                     "ref_norm": float(ref[bi, bj].norm())})
    return pd.DataFrame(rows)


def block_square_sums(M: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """The n × n table of ``‖M_ij‖²_F`` over the blocks (i, j) of sizes ``sizes``: one pass over M."""
    sq = M.square()
    rows = torch.stack([r.sum(0) for r in sq.split(list(sizes), 0)])
    return torch.stack([c.sum(1) for c in rows.split(list(sizes), 1)], 1)


def error_by_kind(approx: torch.Tensor, ref: torch.Tensor, sizes: Sequence[int], name: str = "approx",
                  diff: torch.Tensor | None = None, ref_sums: torch.Tensor | None = None) -> pd.DataFrame:
    """Relative Frobenius error pooled over block kinds: overall, diagonal, tridiagonal, off-tridiagonal.

    Computed from per-block sums of squares (:func:`block_square_sums`, one host transfer; no P×P masks);
    ``diff`` may pass a precomputed approx − ref, ``ref_sums`` the reference's table (shared by several
    comparisons against one reference).
    """
    n = len(sizes)
    d = approx - ref if diff is None else diff
    sums = torch.stack([block_square_sums(d, sizes),
                        block_square_sums(ref, sizes) if ref_sums is None else ref_sums]).double().cpu()
    num = dict.fromkeys(BlockKind, 0.0)
    den = dict.fromkeys(BlockKind, 0.0)
    for i, j, _bi, _bj, kind in block_pairs(sizes):
        num[kind] += float(sums[0, i, j])
        den[kind] += float(sums[1, i, j])

    def rel(a, b):
        return math.sqrt(a) / math.sqrt(b) if b > 0 else float("nan")

    rows = [{"comparison": name, "kind": "overall", "rel_error": rel(sum(num.values()), sum(den.values()))}]
    present = {BlockKind.DIAGONAL: n >= 1, BlockKind.TRIDIAGONAL: n >= 2, BlockKind.OFF_TRIDIAGONAL: n >= 3}
    rows += [{"comparison": name, "kind": k.value, "rel_error": rel(num[k], den[k])} for k in num if present[k]]
    return pd.DataFrame(rows)


def direction_errors(directions: Mapping[str, torch.Tensor], reference: torch.Tensor,
                     reference_name: str = "exact") -> pd.DataFrame:
    """Cosine and relative-norm error ``‖u − u_ref‖/‖u_ref‖`` of each update direction vs a reference."""
    ref = reference.reshape(-1)
    rn = float(ref.norm())
    rows = []
    for name, u in directions.items():
        u = u.reshape(-1).to(ref.dtype)
        un = float(u.norm())
        cos = float(u @ ref) / (un * rn) if un > 0 and rn > 0 else float("nan")
        rows.append({"direction": name, "reference": reference_name, "cosine": cos,
                     "rel_norm_error": float((u - ref).norm()) / rn if rn > 0 else float("nan"),
                     "norm_ratio": un / rn if rn > 0 else float("nan")})
    return pd.DataFrame(rows)
