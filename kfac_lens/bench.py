"""Benchmarks that print ratio tables. Their numbers are reported, never asserted in tests.

Run them with ``python -m kfac_lens.bench NAME [options]`` (``--help`` lists them). Later the CLI will
run them as ``kfac-lens bench NAME``. Layout of this file:

1. Shared machinery: threads, timing, peak memory, and printing a table.
2. Benchmark ``fisher``: the dense exact Fisher against a per-case Jacobian baseline and one GEMM.
3. (Room for more benchmarks, such as ``optimizer``.)
4. Registry and command line: ``BENCHMARKS`` (name → :class:`Benchmark`), :func:`run` and :func:`main`.

To add a benchmark, write a section with a function that takes the parsed ``argparse.Namespace`` and
returns a ``pandas.DataFrame``. Add an optional function that adds its own options to the parser. Then
put a :class:`Benchmark` entry into ``BENCHMARKS``. The common options, ``--device``, ``--repeats``,
``--threads`` and ``--quick``, are already on every benchmark's parser.
"""

from __future__ import annotations

import argparse
import math
import contextlib
import ctypes
import functools
import gc
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

# ================================================================================================
# 1. Shared machinery
# ================================================================================================


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Use ``n`` intra-op threads inside the block and restore the old count after it. ``None`` keeps it.

    Yields the thread count in effect.
    """
    old = torch.get_num_threads()
    if n is not None and n != old:
        torch.set_num_threads(int(n))
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch.cuda.is_available() is False.")
    return dev


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- peak memory
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _hwm_bytes() -> int | None:
    """VmHWM (peak RSS) from /proc/self/status."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _release_free_heap() -> None:
    """Return freed heap memory to the OS, so that RSS starts each measurement from what is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class MemoryReading:
    """What :func:`peak_memory` measured: ``mb`` (MiB, 2**20 bytes) and how it was measured."""

    mb: float = float("nan")
    how: str = ""


@contextlib.contextmanager
def peak_memory(device: torch.device, interval: float = 0.002) -> Iterator[MemoryReading]:
    """The peak memory that the block adds. Read ``.mb`` from the yielded reading after the block.

    - CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated at the start. The peak
      statistics are reset on entry. This counts tensors from PyTorch's caching allocator only.
    - CPU: tracemalloc cannot see PyTorch's allocations, so this measures the **process RSS**. The
      baseline is the RSS at entry, taken after ``gc.collect()`` and ``malloc_trim(0)``. The peak is
      the larger of two readings. One is a background thread that reads ``/proc/self/statm`` every
      ``interval`` seconds. The other is the kernel's VmHWM, when it can be reset through
      ``/proc/self/clear_refs``, which catches spikes that fall between samples. The result is the
      "peak RSS delta". It includes allocator slack and thread stacks. It also drops memory that
      was freed earlier and is reused without growing the RSS.
    """
    device = torch.device(device)
    reading = MemoryReading()
    _release_free_heap()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        reading.how = "torch.cuda.max_memory_allocated delta"
        yield reading
        synchronize(device)
        reading.mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return

    base = _rss_bytes()
    hwm_ok = _reset_hwm() and _hwm_bytes() is not None
    peak = [base or 0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss = _rss_bytes()
            if rss is not None and rss > peak[0]:
                peak[0] = rss
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    reading.how = "peak RSS delta (statm sampling" + (" + VmHWM)" if hwm_ok else ")")
    try:
        yield reading
    finally:
        stop.set()
        thread.join()
    top = max(peak[0], _rss_bytes() or 0)
    if hwm_ok:
        top = max(top, _hwm_bytes() or 0)
    if base is not None:
        reading.mb = max(top - base, 0) / 2**20


# ----------------------------------------------------------------------------- timing
@dataclass
class Measurement:
    seconds: float            # best of the timed repeats
    peak_mb: float            # from a separate run (see measure)
    memory_how: str
    result: object = field(repr=False, default=None)


def measure(fns: dict[str, Callable[[], object]], device: torch.device,
            repeats: int) -> dict[str, Measurement]:
    """Warm up each of ``fns`` once, run each once under :func:`peak_memory`, then time them.

    The timed runs go round-robin, ``repeats`` rounds of every function in turn. A burst of load
    from other processes then hits all methods alike, and the ratios stay meaningful. No memory
    sampler runs beside the timed runs. ``seconds`` is the best round (wall clock, with the device
    synchronized). ``result`` is what the memory run returned.
    """
    out: dict[str, Measurement] = {}
    for fn in fns.values():
        fn()
        synchronize(device)
    for name, fn in fns.items():
        with peak_memory(device) as mem:
            result = fn()
            synchronize(device)
        out[name] = Measurement(float("inf"), mem.mb, mem.how, result)
    for _ in range(max(int(repeats), 1)):
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            out[name].seconds = min(out[name].seconds, time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------- printing
def format_table(df: pd.DataFrame, title: str, notes: Sequence[str] = ()) -> str:
    """A titled, aligned plain-text table with numbered notes under it."""
    fmt = {
        "seconds": lambda v: f"{v:.4f}",
        "ratio_to_gemm": lambda v: f"{v:.3f}",
        "peak_MB": lambda v: f"{v:.1f}",
        "max_rel_diff": lambda v: "" if pd.isna(v) else f"{v:.1e}",
    }
    body = df.to_string(index=False, formatters={k: f for k, f in fmt.items() if k in df.columns})
    width = max(len(line) for line in body.splitlines())
    lines = [title, "=" * max(width, len(title)), body]
    lines += [f"  [{i}] {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines)


# ================================================================================================
# 2. Benchmark "fisher": exact_fisher vs a per-case Jacobian baseline vs one GEMM
# ================================================================================================

FISHER_WIDTHS = (256, 20, 20, 20, 20, 20, 10)   # the paper's example network (docs/math.md §9)
FISHER_LAYERS = (1, 2, 3, 4)                     # its middle 4 layers: W_2..W_5, P = 1680
FISHER_SIZES = (2000, 10000)
FISHER_QUICK_SIZES = (200,)

M_OURS = "ours: exact_fisher"
M_BASE = "baseline: vmap(jacrev)"
M_GEMM = "gemm: U.T @ U"


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

    from .nets import NetworkView, mats_to_vec

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
            Jw = J[w_name]
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
                     threads: int | None = None, seed: int = 0, verbose: bool = True) -> pd.DataFrame:
    """Time and measure the dense exact Fisher of the paper network's middle 4 layers (P = 1680).

    For each N in ``sizes`` there are three rows. ``ours`` is ``kfac_lens.exact_fisher``. ``baseline``
    is :func:`jacobian_fisher`. ``gemm`` is ``U.T @ U`` for a random U of shape (N·C × P), which is
    what a method that forms one gradient row per (case, output direction) has to multiply.
    ``ratio_to_gemm`` is seconds / gemm seconds at the same N. ``max_rel_diff`` is
    max|F_ours − F_baseline| / max|F_baseline| on the same cases. When N > ``baseline_max_cases``, the
    baseline runs on the first ``baseline_max_cases`` cases. Its seconds are then scaled by
    N / baseline_max_cases (``extrapolated`` = True), and its peak memory and max_rel_diff are those
    of the subset. The table is printed when ``verbose`` and returned. ``df.attrs`` holds the
    settings and the notes.
    """
    from . import exact_fisher
    from .nets import NetworkView

    dev = resolve_device(device)
    sizes = [int(n) for n in sizes]
    rows = []
    load_start = _load_average()
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
    load_end = _load_average()
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


def _fisher_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=None, metavar="N",
                        help=f"numbers of cases (default {' '.join(map(str, FISHER_SIZES))}; "
                             f"--quick: {' '.join(map(str, FISHER_QUICK_SIZES))})")
    parser.add_argument("--baseline-max-cases", type=int, default=None, metavar="M",
                        help="run the baseline on at most M cases and scale its time linearly to N "
                             "(marked 'extrapolated' in the table)")
    parser.add_argument("--baseline-chunk", type=int, default=1000, metavar="B",
                        help="cases per vmap(jacrev) chunk in the baseline (default 1000)")


def _fisher_run(args: argparse.Namespace) -> pd.DataFrame:
    sizes = args.sizes or (FISHER_QUICK_SIZES if args.quick else FISHER_SIZES)
    return fisher_benchmark(sizes=sizes, device=args.device, repeats=args.repeats,
                            baseline_max_cases=args.baseline_max_cases, baseline_chunk=args.baseline_chunk,
                            threads=args.threads, seed=args.seed, verbose=not args.no_print)


# ================================================================================================
# 3. Benchmark "optimizer": K-FAC (both inverses) vs tuned SGD-Nesterov and Adam on the quick autoencoder
# ================================================================================================
SGD_LRS = (3e-3, 1e-2, 3e-2, 1e-1)
ADAM_LRS = (3e-4, 1e-3, 3e-3, 1e-2)
KFAC_LAMBDAS = (150.0, 10.0, 1.0)  # K-FAC's counterpart of a learning rate: the initial λ (Appendix E.5)


def _autoencoder_problem(data: str, seed: int):
    from . import zoo
    ds = zoo._autoencoder_data("quick", data, seed)
    sizes = zoo.AUTOENCODER_PRESETS["quick"]["sizes"] if data == "mnist" else [64, 48, 24, 8, 24, 48, 64]
    return ds.X, sizes


def _make_model(sizes, seed, device):
    from . import zoo
    return zoo.sparse_init_(zoo.autoencoder_net(sizes), seed=seed).to(device)


def _run_for(make_opt, sizes, X, Xeval, seconds, batch, eval_every, seed, device) -> pd.DataFrame:
    from .optim import train
    model = _make_model(sizes, seed, device)
    return train(model, make_opt(model), X, X, 10**7, batch_size=batch, eval_X=Xeval, eval_y=Xeval,
                 eval_every=eval_every, progress=False, seed=seed, time_limit=seconds)


def _error_at(h: pd.DataFrame, t: float) -> float:
    ev = h.dropna(subset=["error"])
    ev = ev[ev["time"] <= t]
    return float(ev["error"].iloc[-1]) if len(ev) else float("nan")


def _time_to(h: pd.DataFrame, target: float) -> float:
    ev = h.dropna(subset=["error"])
    hit = ev[ev["error"] <= target]
    return float(hit["time"].iloc[0]) if len(hit) else float("nan")


def _iterations_to(h: pd.DataFrame, target: float) -> float:
    ev = h.dropna(subset=["error"])
    hit = ev[ev["error"] <= target]
    return float(hit["iteration"].iloc[0]) if len(hit) else float("nan")


def _per_iteration_time(make_opt, sizes, X, m, iterations, seed, device) -> float:
    """Mean optimizer time per iteration at a fixed batch size m (refreshes and γ searches included)."""
    from .optim import train
    model = _make_model(sizes, seed, device)
    h = train(model, make_opt(model), X, X, iterations, batch_size=m, eval_every=10**9, progress=False, seed=seed)
    steady = h[h["iteration"] > 3]  # drop the first iterations (warm-up; K-FAC refreshes on k ≤ 3)
    return float(steady["step_time"].mean())


def optimizer_benchmark(budget_s: float = 60.0, tune_s: float = 10.0, data: str = "mnist",
                        device: str | torch.device = "cpu", threads: int | None = None, seed: int = 0,
                        verbose: bool = True) -> pd.DataFrame:
    """K-FAC (block-diagonal, block-tridiagonal; the paper's defaults and exponential batch schedule) against
    SGD-Nesterov and Adam (fixed batch 500, learning rate tuned on a grid for ``tune_s`` seconds each), each
    run for ``budget_s`` seconds of optimizer time on the quick autoencoder, in one process."""
    from .optim import KFAC, Adam, SGDNesterov, exponential_batch_sizes
    from . import zoo
    dev = resolve_device(device)
    p = zoo.AUTOENCODER_PRESETS["quick"]
    with torch_threads(threads) as n_threads:
        X, sizes = _autoencoder_problem(data, seed)
        X = X.to(dev)
        Xeval = X[: min(2000, X.shape[0])]
        n = X.shape[0]
        sched = exponential_batch_sizes(min(p["m1"], n), n, p["full_at"])
        eta = p["eta"]

        def kfac(kind, lam0):
            return lambda m: KFAC(m, "bernoulli", kind, lambda_init=lam0, eta=eta, seed=seed)

        # -- tuning: the baselines' learning rates and K-FAC's λ₀, the same budget for every candidate
        tuning = []
        best = {}
        grids = (("SGD-Nesterov", lambda v: (lambda m: SGDNesterov(m, "bernoulli", lr=v, eta=eta)), SGD_LRS, 500, 25),
                 ("Adam", lambda v: (lambda m: Adam(m, "bernoulli", lr=v, eta=eta)), ADAM_LRS, 500, 25),
                 ("K-FAC", lambda v: kfac("blockdiag", v), KFAC_LAMBDAS, sched, 2))
        for name, make, grid, bs, ev in grids:
            scores = {}
            for v in grid:
                h = _run_for(make(v), sizes, X, Xeval, tune_s, bs, ev, seed, dev)
                err = h["error"].dropna()
                scores[v] = float(err.iloc[-1]) if len(err) and math.isfinite(err.iloc[-1]) else float("inf")
                tuning.append({"method": name, "value": v, f"error after {tune_s:g} s": scores[v]})
            best[name] = min(scores, key=scores.get)
        lam0 = best.pop("K-FAC")
        # -- the main runs, side by side in this process
        methods = {
            "K-FAC block-diagonal": (kfac("blockdiag", lam0), sched, 2),
            "K-FAC block-tridiagonal": (kfac("tridiag", lam0), sched, 2),
            "SGD-Nesterov": (lambda m: SGDNesterov(m, "bernoulli", lr=best["SGD-Nesterov"], eta=eta), 500, 25),
            "Adam": (lambda m: Adam(m, "bernoulli", lr=best["Adam"], eta=eta), 500, 25),
        }
        hist = {name: _run_for(make, sizes, X, Xeval, budget_s, bs, ev, seed, dev)
                for name, (make, bs, ev) in methods.items()}
        sgd_best = float(hist["SGD-Nesterov"]["error"].dropna().min())
        t_sgd = _time_to(hist["SGD-Nesterov"], sgd_best)
        # -- per-iteration time at m = 1000
        m_fixed = min(1000, n)
        per_it = {name: _per_iteration_time(make, sizes, X, m_fixed, 43, seed, dev)
                  for name, (make, _, _) in methods.items()}
        # -- progress per iteration, tridiagonal vs block-diagonal
        hb, ht = hist["K-FAC block-diagonal"], hist["K-FAC block-tridiagonal"]
        k_common = int(min(hb["iteration"].max(), ht["iteration"].max()))
        target = float(hb[hb["iteration"] <= k_common]["error"].dropna().iloc[-1])
        it_b, it_t = _iterations_to(hb, target), _iterations_to(ht, target)

    rows = []
    for name, h in hist.items():
        t_hit = _time_to(h, sgd_best)
        rows.append({
            "method": name,
            "lr / λ₀": best.get(name, lam0 if name.startswith("K-FAC") else float("nan")),
            "iterations": int(h["iteration"].max()),
            f"error @ {budget_s / 4:g} s": _error_at(h, budget_s / 4),
            f"error @ {budget_s / 2:g} s": _error_at(h, budget_s / 2),
            f"error @ {budget_s:g} s": _error_at(h, budget_s),
            "s to SGD's best": t_hit,
            "ratio to SGD's time": t_hit / t_sgd if math.isfinite(t_hit) else float("nan"),
            f"s/iter @ m={m_fixed}": per_it[name],
            "iter-time ratio to SGD": per_it[name] / per_it["SGD-Nesterov"],
        })
    df = pd.DataFrame(rows)
    progress = (it_b / it_t - 1.0) if (math.isfinite(it_b) and math.isfinite(it_t) and it_t > 0) else float("nan")
    notes = [
        f"problem: quick autoencoder {'-'.join(map(str, sizes))} (Bernoulli loss, η = {eta:g}) on {n} {data} "
        f"cases; error = squared reconstruction error per case on the first {Xeval.shape[0]} training cases.",
        f"K-FAC: paper defaults (T1 = 5, T2 = T3 = 20, τ1 = 1/8, τ2 = 1/4, momentum) but λ₀ picked on the grid "
        f"{list(KFAC_LAMBDAS)} (150 is the paper's); exponential batch schedule m₁ = {p['m1']} reaching {n} at "
        f"k = {p['full_at']}. Baselines: batch 500, learning rate picked on the grids below.",
        f"tuning ({tune_s:g} s each; K-FAC's λ₀ with the block-diagonal inverse): " + "; ".join(
            f"{r['method']} {'λ₀' if r['method'] == 'K-FAC' else 'lr'}={r['value']:g}: "
            f"{r[f'error after {tune_s:g} s']:.4g}" for r in tuning),
        f"SGD-Nesterov's best error {sgd_best:.4g} was reached at {t_sgd:.1f} s; 'ratio to SGD's time' = "
        "(s to SGD's best) / that time (target for K-FAC ≤ 1/3).",
        f"s/iter: mean optimizer time per iteration over 40 iterations at fixed m = {m_fixed} (after 3 warm-up "
        "iterations), inverse refreshes and γ searches included (target for K-FAC ≤ 2× SGD).",
        f"progress per iteration: block-diagonal reached error {target:.4g} at iteration {it_b:g}, "
        f"block-tridiagonal at {it_t:g}: tridiagonal makes {100 * progress:+.0f}% more progress per iteration "
        "(the paper saw +25% to +40%).",
        f"time is optimizer wall-clock (evaluation excluded) | device={dev} | torch threads={n_threads}",
    ]
    title = "optimizer: K-FAC vs tuned SGD-Nesterov and Adam on the quick autoencoder"
    df.attrs.update(title=title, notes=notes, histories=hist, tuning=pd.DataFrame(tuning),
                    tridiag_progress=progress, sgd_best=sgd_best)
    if verbose:
        print(format_table(df, title, notes), flush=True)
    return df


def _optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", type=float, default=None, metavar="S",
                        help="optimizer seconds per method in the main runs (default 60; --quick: 4)")
    parser.add_argument("--tune", type=float, default=None, metavar="S",
                        help="seconds per learning-rate candidate (default 10; --quick: 1)")
    parser.add_argument("--data", choices=("mnist", "digits"), default=None,
                        help="default mnist (--quick: digits)")


def _optimizer_run(args: argparse.Namespace) -> pd.DataFrame:
    budget = args.budget or (4.0 if args.quick else 60.0)
    tune = args.tune or (1.0 if args.quick else 10.0)
    data = args.data or ("digits" if args.quick else "mnist")
    return optimizer_benchmark(budget_s=budget, tune_s=tune, data=data, device=args.device, threads=args.threads,
                               seed=args.seed, verbose=not args.no_print)



# ================================================================================================
# 4. Registry and command line
# ================================================================================================


@dataclass(frozen=True)
class Benchmark:
    """One registered benchmark. ``run`` takes the parsed arguments and returns the result table."""

    run: Callable[[argparse.Namespace], pd.DataFrame]
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


BENCHMARKS: dict[str, Benchmark] = {
    "fisher": Benchmark(
        run=_fisher_run,
        help="dense exact Fisher (paper net, middle 4 layers) vs a vmap(jacrev) baseline vs one GEMM",
        add_arguments=_fisher_arguments,
    ),
    "optimizer": Benchmark(
        run=_optimizer_run,
        help="K-FAC (both inverses) vs tuned SGD-Nesterov and Adam on the quick autoencoder, same process",
        add_arguments=_optimizer_arguments,
    ),
}


def build_parser(prog: str = "python -m kfac_lens.bench") -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    common.add_argument("--repeats", type=int, default=None,
                        help="timed runs per measurement after one warm-up; the best is reported "
                             "(default 3; --quick: 1)")
    common.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads during the benchmark (default: torch's current setting)")
    common.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    common.add_argument("--seed", type=int, default=0, help="seed for the network and the inputs")
    common.add_argument("--no-print", action="store_true", help="do not print the table")
    parser = argparse.ArgumentParser(prog=prog, description="kfac_lens benchmarks (ratio tables).")
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, bench in BENCHMARKS.items():
        p = sub.add_parser(name, parents=[common], help=bench.help, description=bench.help)
        if bench.add_arguments is not None:
            bench.add_arguments(p)
    return parser


def run(argv: Sequence[str] | None = None, prog: str = "python -m kfac_lens.bench") -> pd.DataFrame:
    """Parse ``argv`` (e.g. ``["fisher", "--quick"]``), run that benchmark and return its table."""
    args = build_parser(prog).parse_args(None if argv is None else list(argv))
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1.")
    return BENCHMARKS[args.benchmark].run(args)


def main(argv: Sequence[str] | None = None, prog: str = "python -m kfac_lens.bench") -> int:
    """Command-line entry: run the benchmark named in ``argv``, print its table and return 0."""
    run(argv, prog=prog)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
