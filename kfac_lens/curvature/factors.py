"""Kronecker factors Ā and G, including cross-layer ones, and F̃ (docs/math.md §3, Section 3 and Appendix D).

Conventions (0-based Linear-layer indices k, l):

- ``A[k, l] = E[ā_k ā_lᵀ]`` — the inputs of layers k and l with the homogeneous 1 appended;
- ``G[k, l] = E[g_k g_lᵀ]`` — the gradients of their outputs, expectation over x and y ∼ model;
- the F̃ block (k, l) is ``kron(A[k, l], G[k, l])``.

A layer with U uses per case (tied weights, (N, T, D) inputs, a convolution's positions) follows
Eschenhagen et al. (2023): ``approx="expand"`` (the default; KFC for convolutions, Grosse & Martens 2016)
treats each use as a case, ``A = E_n[(1/U) Σ_u ā_u ā_uᵀ]``, ``G = E_n[Σ_u w Σ_r g_u g_uᵀ]``;
``approx="reduce"`` averages ā and sums g over the uses first, ``A = E_n[â âᵀ]`` with ``â = (1/U) Σ_u ā_u``,
``G = E_n[w Σ_r (Σ_u g_u)(Σ_u g_u)ᵀ]``. This is curvlinops' ``KFACLinearOperator`` normalisation for a
layer called once per forward pass (docs/math.md §1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from ..capture import Capture, analysis_view, check_estimator, check_inputs, iter_captures, make_generator
from ..likelihoods import Likelihood, get_likelihood
from ..memory import check_dense_fits
from ..distributed import CaseShards
from ..nets import NetworkView, layer_indices
from ..options import FactorApprox, parse
from .blocks import kron

PAIRS = ("all", "tridiag", "diag")
APPROX = FactorApprox.choices()


def pair_list(layers: Sequence[int], pairs: str) -> list[tuple[int, int]]:
    """The (k, l), k ≤ l, factor pairs needed: all, tridiagonal (consecutive selected layers) or diagonal."""
    if pairs not in PAIRS:
        raise ValueError(f"pairs must be one of {PAIRS}, got {pairs!r}.")
    out = [(k, k) for k in layers]
    if pairs == "tridiag":
        out += list(zip(layers[:-1], layers[1:]))
    elif pairs == "all":
        out += [(k, l) for i, k in enumerate(layers) for l in layers[i + 1:]]
    return sorted(out)


class PairTable:
    """Symmetric table of factor blocks: ``T[k, l]`` is stored for k ≤ l and ``T[l, k] = T[k, l]ᵀ``."""

    def __init__(self, blocks: dict[tuple[int, int], torch.Tensor], name: str):
        self.blocks = blocks
        self.name = name

    def __getitem__(self, kl: tuple[int, int]) -> torch.Tensor:
        k, l = kl
        if (k, l) in self.blocks:
            return self.blocks[(k, l)]
        if (l, k) in self.blocks:
            return self.blocks[(l, k)].T
        have = sorted(self.blocks)
        raise KeyError(
            f"{self.name}[{k}, {l}] was not computed (have {have}). Compute the factors with "
            "pairs='all' (or 'tridiag' for neighbouring layers) and the layers you need."
        )

    def __contains__(self, kl) -> bool:
        k, l = kl
        return (k, l) in self.blocks or (l, k) in self.blocks

    def keys(self):
        return self.blocks.keys()

    def __repr__(self) -> str:
        return f"PairTable({self.name}, pairs={sorted(self.blocks)})"


class KroneckerFactors:
    """Ā and G factor blocks of a set of layers, with F̃ and the damped forms (Sections 3, E.3).

    ``layers`` are 0-based Linear indices; ``shapes[k] = (d_out, a_dim)`` as in :mod:`kfac_lens.nets`.
    """

    def __init__(self, A: dict, G: dict, layers: Sequence[int], shapes: dict[int, tuple[int, int]],
                 n_cases: int = 0, estimator: str = "exact"):
        self.A = A if isinstance(A, PairTable) else PairTable(dict(A), "A")
        self.G = G if isinstance(G, PairTable) else PairTable(dict(G), "G")
        self.layers = list(layers)
        self.shapes = dict(shapes)
        self.n_cases = n_cases
        self.estimator = estimator

    # ------------------------------------------------------------------ basics
    @property
    def pairs(self) -> list[tuple[int, int]]:
        return sorted(self.A.keys())

    @property
    def dtype(self) -> torch.dtype:
        return self.A[self.layers[0], self.layers[0]].dtype

    @property
    def device(self) -> torch.device:
        return self.A[self.layers[0], self.layers[0]].device

    def select(self, layers: Iterable[int] | None) -> list[int]:
        if layers is None:
            return list(self.layers)
        sel = layer_indices(layers)
        missing = [k for k in sel if k not in self.layers]
        if missing:
            raise ValueError(f"layers {missing} are not among these factors' layers {self.layers}.")
        if sel != sorted(set(sel)):
            raise ValueError(f"layers={sel} must be strictly increasing, without repeats.")
        return sel

    def n_params(self, layers: Iterable[int] | None = None) -> int:
        return sum(self.shapes[k][0] * self.shapes[k][1] for k in self.select(layers))

    def map(self, fn) -> KroneckerFactors:
        """Apply ``fn`` to every block (e.g. ``.to(device)``)."""
        return KroneckerFactors({kl: fn(t) for kl, t in self.A.blocks.items()},
                                {kl: fn(t) for kl, t in self.G.blocks.items()},
                                self.layers, self.shapes, self.n_cases, self.estimator)

    def to(self, *args, **kw) -> KroneckerFactors:
        return self.map(lambda t: t.to(*args, **kw))

    def restrict(self, layers: Iterable[int]) -> KroneckerFactors:
        """The factors of a subset of the layers (strictly increasing), sharing the blocks (no copies)."""
        sel = self.select(layers)
        keep = set(sel)
        return KroneckerFactors({kl: t for kl, t in self.A.blocks.items() if set(kl) <= keep},
                                {kl: t for kl, t in self.G.blocks.items() if set(kl) <= keep},
                                sel, {k: self.shapes[k] for k in sel}, self.n_cases, self.estimator)

    # ------------------------------------------------------------------ F̃
    def dense(self, layers: Iterable[int] | None = None, max_bytes: int | None = None) -> torch.Tensor:
        """F̃ in the paper layout: block (k, l) = ``kron(A[k, l], G[k, l])`` (Section 3)."""
        sel = self.select(layers)
        missing = [(k, l) for i, k in enumerate(sel) for l in sel[i + 1:] if (k, l) not in self.A]
        if missing:
            raise ValueError(
                f"dense F̃ over layers {sel} needs the cross factors of every pair, but {missing} were not "
                f"computed (these factors have pairs {self.pairs}). Compute them with pairs='all'."
            )
        P = self.n_params(sel)
        check_dense_fits(P, self.dtype, self.device, max_bytes=max_bytes, what="dense F̃")
        rows = [torch.cat([kron(self.A[k, l], self.G[k, l]) for l in sel], dim=1) for k in sel]
        return torch.cat(rows, dim=0)

    # ------------------------------------------------------------------ damping (Appendix E.3, E.6)
    def pi(self, k: int, pi: str | float = "trace") -> float:
        """π_k: the trace-norm choice ``sqrt((tr Ā/(dim Ā)) / (tr G/dim G))``, or a given number (e.g. 1)."""
        from .damping import trace_pi
        if pi == "trace":
            return trace_pi(self.A[k, k], self.G[k, k])
        number = isinstance(pi, (int, float)) and not isinstance(pi, bool)
        if number and math.isfinite(pi) and pi > 0:
            return float(pi)
        note = ", which is not finite" if number and not math.isfinite(pi) else ""
        raise ValueError(f"pi must be 'trace' or a positive number (e.g. 1), got {pi!r}{note}.")

    def damped(self, gamma: float, pi: str | float = "trace") -> KroneckerFactors:
        """Factors with each diagonal block replaced by ``Ā + π γ I`` and ``G + (γ/π) I``; cross blocks unchanged."""
        from .damping import check_gamma
        gamma = check_gamma(gamma)
        A = dict(self.A.blocks)
        G = dict(self.G.blocks)
        for k in self.layers:
            p = self.pi(k, pi)
            Akk, Gkk = self.A[k, k], self.G[k, k]
            A[(k, k)] = Akk + (p * gamma) * torch.eye(Akk.shape[0], dtype=Akk.dtype, device=Akk.device)
            G[(k, k)] = Gkk + (gamma / p) * torch.eye(Gkk.shape[0], dtype=Gkk.dtype, device=Gkk.device)
        return KroneckerFactors(A, G, self.layers, self.shapes, self.n_cases, self.estimator)

    # ------------------------------------------------------------------ running averages (Appendix D)
    @torch.no_grad()
    def ema_(self, new: KroneckerFactors, eps: float) -> KroneckerFactors:
        """In place: ``self ← ε·self + (1 − ε)·new`` for every block."""
        if set(self.A.keys()) != set(new.A.keys()):
            raise ValueError("EMA needs factors over the same layer pairs.")
        for table, other in ((self.A, new.A), (self.G, new.G)):
            for kl, t in table.blocks.items():
                t.mul_(eps).add_(other.blocks[kl], alpha=1.0 - eps)
        self.n_cases += new.n_cases
        return self

    def clone(self) -> KroneckerFactors:
        return self.map(lambda t: t.clone())

    def state_dict(self) -> dict:
        return {"A": {f"{k},{l}": t for (k, l), t in self.A.blocks.items()},
                "G": {f"{k},{l}": t for (k, l), t in self.G.blocks.items()},
                "layers": list(self.layers), "shapes": {int(k): tuple(v) for k, v in self.shapes.items()},
                "n_cases": self.n_cases, "estimator": self.estimator}

    @classmethod
    def from_state_dict(cls, sd: dict) -> KroneckerFactors:
        def parse(d):
            return {tuple(int(i) for i in key.split(",")): t for key, t in d.items()}
        return cls(parse(sd["A"]), parse(sd["G"]), sd["layers"], sd["shapes"], sd["n_cases"], sd["estimator"])

    def __repr__(self) -> str:
        return (f"KroneckerFactors(layers={self.layers}, pairs={len(self.pairs)}, N={self.n_cases}, "
                f"estimator={self.estimator!r}, dtype={self.dtype})")


def check_approx(approx: str | FactorApprox) -> str:
    """The :class:`~kfac_lens.options.FactorApprox` ``approx`` as its string."""
    try:
        return parse(FactorApprox, approx, "approx").value
    except ValueError:
        raise ValueError(f"approx must be one of {APPROX} (KFAC-expand or KFAC-reduce, Eschenhagen et al. 2023) "
                         f"for layers with several uses per case, got {approx!r}.") from None


def use_rows(cap: Capture, k: int, approx: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ā rows, g rows, U) of layer k: one row per case (per use for "expand"); U divides ā ā_ᵀ."""
    a, g = cap.a[k], cap.g[k]
    if a.ndim == 2:
        return a, g.reshape(-1, g.shape[-1]), 1
    if approx == "reduce":
        return a.mean(1), g.sum(2).reshape(-1, g.shape[-1]), 1
    return a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1]), a.shape[1]


def factors_from_captures(captures: Iterable[Capture], view: NetworkView, layers: Sequence[int],
                          pairs: str = "all", estimator: str = "exact", approx: str = "expand",
                          shards: CaseShards | None = None) -> KroneckerFactors:
    """Average ``ā_k ā_lᵀ`` and ``w Σ_r g_k g_lᵀ`` over the captured cases (and uses, by ``approx``); with
    ``shards``, over the cases of every rank (sums all-reduced, divided by the global N)."""
    plist = pair_list(list(layers), pairs)
    approx = check_approx(approx)
    A: dict = {}
    G: dict = {}

    def accumulate() -> int:
        n = 0
        for cap in captures:
            n += cap.n
            rows = {k: use_rows(cap, k, approx) for k in layers}
            for k, l in plist:
                (ak, gk, uk), (al, gl, ul) = rows[k], rows[l]
                if ak.shape[0] != al.shape[0] or uk != ul:
                    raise ValueError(
                        f"the cross factors A[{k}, {l}] under approx='expand' pair the uses of layers {k} and {l}, "
                        f"but they have {cap.a[k].shape[1] if cap.a[k].ndim == 3 else 1} and "
                        f"{cap.a[l].shape[1] if cap.a[l].ndim == 3 else 1} uses per case. Use approx='reduce' "
                        "or pairs='diag'.")
                a_kl = ak.T @ al
                if uk > 1:
                    a_kl /= uk
                g_kl = gk.T @ gl
                if cap.weight != 1.0:  # (one sampled target: w = 1, and no pass over the block)
                    g_kl = g_kl * cap.weight
                A[(k, l)] = a_kl if (k, l) not in A else A[(k, l)] + a_kl
                G[(k, l)] = g_kl if (k, l) not in G else G[(k, l)] + g_kl
        return n

    if shards is None:
        n = accumulate()
    else:
        n = shards.run(accumulate, "the Kronecker factors' sums over this rank's cases")
        n = shards.global_count(n)
        shards.sum_(*A.values(), *G.values())
    for kl in A:
        A[kl] /= n
        G[kl] /= n
    shapes = {k: view.layers[k].shape for k in layers}
    return KroneckerFactors(A, G, layers, shapes, n, estimator)


def compute_factors(view: NetworkView, X: torch.Tensor, likelihood: Likelihood, layers: Sequence[int],
                    estimator: str = "exact", y=None, samples: int = 1, generator=None, pairs: str = "all",
                    chunk_size: int | None = None, progress: bool | None = None,
                    approx: str = "expand", shards: CaseShards | None = None) -> KroneckerFactors:
    """Factors on already-checked inputs, in the view's own dtype (used by the optimizer)."""
    approx = check_approx(approx)
    caps = iter_captures(view, X, likelihood, layers, estimator, y, samples, generator, chunk_size,
                         progress=progress, desc="Kronecker factors")
    return factors_from_captures(caps, view, layers, pairs, estimator, approx, shards)


def kronecker_factors(model, X, likelihood: str | Likelihood, estimator: str = "exact", y=None,
                      samples: int = 1, generator: torch.Generator | None = None, seed: int | None = None,
                      layers=None, pairs: str = "all", dtype: torch.dtype | None = torch.float64,
                      chunk_size: int | None = None, progress: bool | None = None,
                      approx: str = "expand", distributed=None) -> KroneckerFactors:
    """Kronecker factors ``A[k, l]`` and ``G[k, l]`` of ``model`` on inputs X (Section 3, Appendix D).

    ``estimator``: "exact" (expectation over y exact), "mc" (``samples`` targets sampled from the
    model per case, with ``generator``/``seed``) or "empirical" (the training targets ``y``; not the
    Fisher's factors, for comparison only). ``pairs``: "all" (every cross-layer pair), "tridiag" or
    "diag". ``approx``: "expand" or "reduce" for layers with several uses per case (module docstring).
    ``distributed``: X (and y) are this rank's shard; every rank receives the factors of all cases
    (:mod:`kfac_lens.distributed`; rank r samples with its own seed).

    With ``estimator="exact"`` on a Linear chain where it is cheaper (an autoencoder, not a wide classifier:
    :func:`~kfac_lens.curvature.output_fisher.output_fisher_is_cheaper`), the factors come from propagating the
    output Fisher instead of the captures: the same numbers to rounding, in fewer operations.
    """
    from .output_fisher import capped_chunk, chain_statistics, output_fisher_is_cheaper  # (it imports this module)
    lik = get_likelihood(likelihood)
    estimator = check_estimator(estimator, y, samples)
    approx = check_approx(approx)
    shards = CaseShards(distributed)
    view = analysis_view(model, dtype)
    sel = view.select(layers)
    X, y = shards.run(lambda: check_inputs(view, X, y, likelihood=lik), "checking X and y")
    if estimator == "exact" and output_fisher_is_cheaper(view, sel):  # (each layer used once: approx is moot)
        return chain_statistics(view, X, lik, sel, pairs=pairs,
                                chunk_size=capped_chunk(view, lik, sel, chunk_size),
                                shards=shards if shards.active else None, progress=progress).factors
    gen = make_generator(view.device, generator, shards.seed(seed) if shards.active else seed)
    return compute_factors(view, X, lik, sel, estimator, y, samples, gen, pairs, chunk_size, progress, approx,
                           shards if shards.active else None)
