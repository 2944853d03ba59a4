"""Benchmark ``fisher``: the dense exact Fisher against a per-case Jacobian baseline and one GEMM.

The exact Fisher (Section 2; docs/math.md §2) of the paper's example network's middle four layers
(P = 1680) is timed beside :func:`jacobian_fisher`, an independent ``vmap(jacrev)`` construction, and
beside one dense GEMM ``UᵀU`` of the size that any method forming one gradient row per (case, output
direction) must multiply. Run it as ``kfac-lens bench fisher``; ``--conv`` adds the same two rows for a
small CNN, whose convolutions have no per-case Kronecker shortcut (docs/math.md §1, §2).
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Sequence

import pandas as pd
import torch
from torch import nn

from .harness import Benchmark, format_table, load_average, measure, resolve_device, torch_threads

FISHER_WIDTHS = (256, 20, 20, 20, 20, 20, 10)   # the paper's example network (docs/math.md §9)
FISHER_LAYERS = (1, 2, 3, 4)                     # its middle 4 layers: W_2..W_5, P = 1680
FISHER_SIZES = (2000, 10000)
FISHER_QUICK_SIZES = (200,)

M_OURS = "ours: exact_fisher"
M_BASE = "baseline: vmap(jacrev)"
M_GEMM = "gemm: U.T @ U"
M_CONV = "ours: exact_fisher, CNN"
M_CONV_GEMM = "gemm: U.T @ U, CNN"
CONV_INPUT = (1, 12, 12)
CONV_CHECK_CASES = 200  # cases on which the CNN's Fisher is checked against the baseline (untimed)


def tanh_network(widths: Sequence[int] = FISHER_WIDTHS, seed: int = 0, dtype=torch.float64,
                 device="cpu") -> nn.Sequential:
    """An ``nn.Sequential`` of Linear/Tanh layers with a linear output, seeded."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        mods: list[nn.Module] = []
        for i in range(len(widths) - 1):
            mods.append(nn.Linear(widths[i], widths[i + 1]))
            if i < len(widths) - 2:
                mods.append(nn.Tanh())
        return nn.Sequential(*mods).to(dtype=dtype, device=device)
    finally:
        torch.random.set_rng_state(gen_state)


def conv_network(seed: int = 0, dtype=torch.float64, device="cpu") -> nn.Sequential:
    """Conv2d(1→8, 3×3, pad 1) → Tanh → Conv2d(8→8, 3×3, stride 2) → Tanh → Flatten → Linear(200→10), seeded
    (P = 2674, on 12×12 inputs)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, stride=2), nn.Tanh(),
                             nn.Flatten(), nn.Linear(200, 10)).to(dtype=dtype, device=device)
    finally:
        torch.random.set_rng_state(gen_state)


def jacobian_fisher(model: nn.Sequential, X: torch.Tensor, layers: Sequence[int],
                    chunk: int = 1000) -> torch.Tensor:
    """The baseline: ``F = (1/N) Σ_n J_nᵀ F_R(z_n) J_n`` from per-case Jacobians (categorical likelihood).

    ``J_n = ∂z_n/∂θ`` (C × P) for the selected layers comes from ``torch.func.vmap(jacrev)`` over the
    cases, ``chunk`` cases at a time. It is mapped to the paper layout with ``mats_to_vec``, and
    ``F_R = diag(p) − p pᵀ`` is built densely per case. Each chunk then adds ``Jᵀ (F_R J)``, which is
    one GEMM of shape (n·C × P)ᵀ (n·C × P). This is independent of kfac_lens's capture, likelihood
    square roots and block assembly.
    """
    from torch.func import functional_call, jacrev, vmap

    from ..nets import NetworkView, mats_to_vec

    view = NetworkView(model)
    sel = view.select(layers)
    names = view.parameter_names(sel)
    params = {n: p.detach() for n, p in model.named_parameters()}
    wrt = {n: params[n] for pair in names for n in pair if n is not None}
    P = view.n_params(sel)

    def z_of(theta, x):
        return functional_call(model, {**params, **theta}, (x[None],))[0]

    jac = vmap(jacrev(z_of), in_dims=(None, 0))
    F = torch.zeros(P, P, dtype=X.dtype, device=X.device)
    for start in range(0, X.shape[0], chunk):
        xb = X[start:start + chunk]
        J = jac(wrt, xb)
        mats = []
        for w_name, b_name in names:           # W_k = [weight, bias], shape (n, C, d_out, a_dim)
            Jw = J[w_name].flatten(3)         # a convolution's (out, in, kh, kw) → (out, in·kh·kw)
            mats.append(Jw if b_name is None else torch.cat([Jw, J[b_name][..., None]], dim=-1))
        Jn = mats_to_vec(mats)                 # (n, C, P) in the paper layout
        with torch.no_grad():
            p = torch.softmax(functional_call(model, params, (xb,)), dim=1)
        FR = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        FJ = torch.bmm(FR, Jn)
        n, C = Jn.shape[:2]
        F += Jn.reshape(n * C, P).T @ FJ.reshape(n * C, P)
    return F / X.shape[0]


def _with_grad(fn, *args, **kw):
    with torch.enable_grad():
        return fn(*args, **kw)


def rel_diff(A: torch.Tensor, B: torch.Tensor) -> float:
    """max |A − B| / max |B|."""
    return float((A - B).abs().max() / B.abs().max().clamp_min(torch.finfo(B.dtype).tiny))


def fisher_benchmark(sizes: Sequence[int] = FISHER_SIZES, device: str | torch.device = "cpu",
                     repeats: int = 3, baseline_max_cases: int | None = None, baseline_chunk: int = 1000,
                     threads: int | None = None, seed: int = 0, verbose: bool = True,
                     conv: bool = False) -> pd.DataFrame:
    """Time and measure the dense exact Fisher of the paper network's middle 4 layers (P = 1680).

    For each N in ``sizes`` there are three rows. ``ours`` is ``kfac_lens.exact_fisher``. ``baseline``
    is :func:`jacobian_fisher`. ``gemm`` is ``U.T @ U`` for a random U of shape (N·C × P), which is
    what a method that forms one gradient row per (case, output direction) has to multiply.
    ``ratio_to_gemm`` is seconds / gemm seconds at the same N. ``max_rel_diff`` is
    max|F_ours − F_baseline| / max|F_baseline| on the same cases. When N > ``baseline_max_cases``, the
    baseline runs on the first ``baseline_max_cases`` cases. Its seconds are then scaled by
    N / baseline_max_cases (``extrapolated`` = True), and its peak memory and max_rel_diff are those
    of the subset. The table is printed when ``verbose`` and returned. ``df.attrs`` holds the
    settings and the notes. ``conv`` adds two rows per N for :func:`conv_network` (all layers, P = 2674):
    ``ours`` on it and its own GEMM (N·C × P), with max_rel_diff against :func:`jacobian_fisher` on its first
    ``CONV_CHECK_CASES`` cases (untimed).
    """
    from .. import exact_fisher
    from ..nets import NetworkView

    dev = resolve_device(device)
    sizes = [int(n) for n in sizes]
    rows = []
    load_start = load_average()
    with torch_threads(threads) as n_threads, torch.no_grad():
        model = tanh_network(seed=seed, device=dev)
        view = NetworkView(model)
        P = view.n_params(FISHER_LAYERS)
        C = FISHER_WIDTHS[-1]
        gen = torch.Generator().manual_seed(seed)
        mem_how = ""
        for N in sizes:
            X = torch.rand(N, FISHER_WIDTHS[0], generator=gen, dtype=torch.float64).to(dev)

            n_base = N if baseline_max_cases is None else min(N, int(baseline_max_cases))
            Xb = X[:n_base]
            g = torch.Generator(device=dev).manual_seed(seed + 1)
            U = torch.randn(N * C, P, dtype=torch.float64, device=dev, generator=g)

            res = measure({
                M_OURS: functools.partial(exact_fisher, model, X, "categorical", layers=list(FISHER_LAYERS),
                                          progress=False),
                M_BASE: functools.partial(_with_grad, jacobian_fisher, model, Xb, FISHER_LAYERS,
                                          chunk=baseline_chunk),
                M_GEMM: functools.partial(torch.matmul, U.T, U),
            }, dev, repeats)
            del U
            ours, base, gemm = res[M_OURS], res[M_BASE], res[M_GEMM]
            mem_how = ours.memory_how
            F_ours = ours.result if n_base == N else exact_fisher(
                model, Xb, "categorical", layers=list(FISHER_LAYERS), progress=False)
            diff = rel_diff(F_ours, base.result)
            del F_ours, res

            scale = N / n_base
            rows += [
                {"N": N, "method": M_OURS, "seconds": ours.seconds, "peak_MB": ours.peak_mb,
                 "max_rel_diff": diff, "extrapolated": False},
                {"N": N, "method": M_BASE, "seconds": base.seconds * scale, "peak_MB": base.peak_mb,
                 "max_rel_diff": diff, "extrapolated": n_base < N},
                {"N": N, "method": M_GEMM, "seconds": gemm.seconds, "peak_MB": gemm.peak_mb,
                 "max_rel_diff": float("nan"), "extrapolated": False},
            ]
            for r in rows[-3:]:
                r["ratio_to_gemm"] = r["seconds"] / gemm.seconds
            del ours, base, gemm, X, Xb
            if conv:
                rows += _conv_rows(N, dev, repeats, seed, gen)
    df = pd.DataFrame(rows, columns=["N", "method", "seconds", "ratio_to_gemm", "peak_MB",
                                     "max_rel_diff", "extrapolated"])
    sync = ", CUDA synchronized" if dev.type == "cuda" else ""
    mem_what = ("It counts PyTorch CUDA tensors only." if dev.type == "cuda" else
                "This is the process RSS, not the tensors alone; inputs allocated before the run "
                "(X, and U for gemm) are not counted.")
    notes = [
        (f"seconds: wall clock{sync}, best of {max(int(repeats), 1)} timed rounds after one warm-up run of "
         "each method. A round runs the three methods in turn, so load from other processes hits them "
         "alike. ratio_to_gemm = seconds / gemm seconds at the same N. Extrapolated rows: subset "
         "seconds x N / subset size."),
        f"peak_MB: {mem_how}, in MiB, from one extra untimed run of each method. {mem_what}",
        (f"gemm: U.T @ U for a random U of shape (N*C x P) = (N*{C} x {P}), timed alone. U itself takes "
         f"N*{C * P * 8 / 2**20:.4f} MiB and is allocated before the run. This is the cost of any method "
         "that forms one gradient row per (case, output direction)."),
        (f"baseline: torch.func.vmap(jacrev) per-case Jacobians of z for the selected layers, "
         f"{baseline_chunk} cases per chunk, then sum of J^T F_R J as (n*C x P)^T (n*C x P) GEMMs."),
        ("max_rel_diff: max|F_ours - F_baseline| / max|F_baseline| on the same cases "
         "(extrapolated rows: on the subset that was run)."),
    ]
    if conv:
        notes.append(f"CNN rows: the exact Fisher of every layer of conv_network (P = 2674) on N random "
                     f"{'x'.join(map(str, CONV_INPUT))} inputs, timed with its own GEMM U.T @ U of shape "
                     f"(N*10 x 2674); max_rel_diff against the vmap(jacrev) baseline on the first "
                     f"{CONV_CHECK_CASES} cases (untimed).")
    load_end = load_average()
    if load_start is not None and load_end is not None:
        notes.append(f"machine: {os.cpu_count()} logical CPUs; 1-minute load average {load_start:.2f} at "
                     f"start, {load_end:.2f} at end. The end value includes this run's own threads. Other "
                     "processes on the CPUs slow the many small parallel regions of ours far more than "
                     "one big GEMM; compare with --threads 1 when the load is high.")
    title = (f"fisher: exact Fisher of layers {list(FISHER_LAYERS)} (P = {P}) of a "
             f"{'-'.join(map(str, FISHER_WIDTHS))} tanh net, float64, categorical | device={dev} "
             f"| torch threads={n_threads} | torch {torch.__version__}")
    df.attrs.update(title=title, notes=notes, device=str(dev), threads=n_threads, P=P,
                    repeats=max(int(repeats), 1), memory=mem_how)
    if verbose:
        print(format_table(df, title, notes), flush=True)
    return df


def _conv_rows(N: int, dev: torch.device, repeats: int, seed: int, gen: torch.Generator) -> list[dict]:
    """The rows of :func:`conv_network` at N cases: ours and one (N·C × P) GEMM, timed alike."""
    from .. import exact_fisher
    from ..nets import NetworkView

    model = conv_network(seed=seed, device=dev)
    P, C = NetworkView(model).n_params(), model[-1].out_features
    X = torch.rand(N, *CONV_INPUT, generator=gen, dtype=torch.float64).to(dev)
    U = torch.randn(N * C, P, dtype=torch.float64, device=dev,
                    generator=torch.Generator(device=dev).manual_seed(seed + 2))
    res = measure({M_CONV: functools.partial(exact_fisher, model, X, "categorical", progress=False),
                   M_CONV_GEMM: functools.partial(torch.matmul, U.T, U)}, dev, repeats)
    del U
    Xc = X[:CONV_CHECK_CASES]
    F = res[M_CONV].result if Xc.shape[0] == N else exact_fisher(model, Xc, "categorical", progress=False)
    diff = rel_diff(F, _with_grad(jacobian_fisher, model, Xc, range(len(NetworkView(model).layers))))
    ours, gemm = res[M_CONV], res[M_CONV_GEMM]
    return [{"N": N, "method": M_CONV, "seconds": ours.seconds, "ratio_to_gemm": ours.seconds / gemm.seconds,
             "peak_MB": ours.peak_mb, "max_rel_diff": diff, "extrapolated": False},
            {"N": N, "method": M_CONV_GEMM, "seconds": gemm.seconds, "ratio_to_gemm": 1.0, "peak_MB": gemm.peak_mb,
             "max_rel_diff": float("nan"), "extrapolated": False}]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=None, metavar="N",
                        help=f"numbers of cases (default {' '.join(map(str, FISHER_SIZES))}; "
                             f"--quick: {' '.join(map(str, FISHER_QUICK_SIZES))})")
    parser.add_argument("--baseline-max-cases", type=int, default=None, metavar="M",
                        help="run the baseline on at most M cases and scale its time linearly to N "
                             "(marked 'extrapolated' in the table)")
    parser.add_argument("--baseline-chunk", type=int, default=1000, metavar="B",
                        help="cases per vmap(jacrev) chunk in the baseline (default 1000)")
    parser.add_argument("--conv", action="store_true",
                        help="add rows for a small CNN (P = 2674; no per-case Kronecker shortcut) and its GEMM")


def run_from_args(args: argparse.Namespace) -> pd.DataFrame:
    sizes = args.sizes or (FISHER_QUICK_SIZES if args.quick else FISHER_SIZES)
    return fisher_benchmark(sizes=sizes, device=args.device, repeats=args.repeats,
                            baseline_max_cases=args.baseline_max_cases, baseline_chunk=args.baseline_chunk,
                            threads=args.threads, seed=args.seed, verbose=not args.no_print,
                            conv=getattr(args, "conv", False))


BENCHMARK = Benchmark("fisher", run_from_args, add_arguments,
                      help="dense exact Fisher (paper net, middle 4 layers) vs a vmap(jacrev) baseline vs one GEMM")
