"""Benchmark ``distributed``: strong scaling of the ``distributed=`` curvature and of data-parallel K-FAC.

Two jobs, each run on 1 and on 2 (``--ranks``) gloo processes on this machine, with the same total number
of threads (``--threads`` split evenly over the ranks), so that the table compares the engine and not the
core count:

- ``exact Fisher``: the dense exact Fisher (docs/math.md §2) of the full example network 256-20-20-20-20-20-10
  (P = 7030, docs/math.md §9) on N random cases (default 10,000), the cases sharded over the ranks. On one
  rank the table also gives its ratio to the floor of the block algorithm, one (N × P)ᵀ(N × P) GEMM
  (N·P² multiply-adds), timed in the same process.
- ``K-FAC iteration``: the time per iteration of data-parallel ``KFAC`` (Algorithm 2, block-diagonal and
  block-tridiagonal) on the quick autoencoder 784-250-100-30-100-250-784 at m = 1000 (random inputs in
  [0, 1]), inverse refreshes and γ searches included.

A machine with 2 cores cannot show a speed-up from 2 processes: read the table as the cost of the
all-reduces and of the duplicated work, not as a scaling claim. Run it as ``kfac-lens bench distributed``.
"""

from __future__ import annotations

import argparse
import os
import queue
import time
from datetime import timedelta

import pandas as pd
import torch

from .harness import Benchmark, format_table, load_average

EXAMPLE_SIZES = (256, 20, 20, 20, 20, 20, 10)
AUTOENCODER_SIZES = (784, 250, 100, 30, 100, 250, 784)


def _example_net():
    from torch import nn
    torch.manual_seed(0)
    mods = []
    for a, b in zip(EXAMPLE_SIZES[:-1], EXAMPLE_SIZES[1:]):
        mods += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*mods[:-1]).double()


def _fisher_job(rank: int, world: int, n_cases: int, repeats: int) -> dict:
    import torch.distributed as dist

    from .. import exact_fisher
    net = _example_net()
    X = torch.randn(n_cases, EXAMPLE_SIZES[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    shard = X[rank::world]
    best = float("inf")
    for _ in range(repeats + 1):  # (the first run warms up)
        dist.barrier()
        t0 = time.perf_counter()
        exact_fisher(net, shard, "categorical", distributed=True, progress=False)
        dist.barrier()
        best = min(best, time.perf_counter() - t0)
    out = {"seconds": best}
    if world == 1:
        P = sum((a + 1) * b for a, b in zip(EXAMPLE_SIZES[:-1], EXAMPLE_SIZES[1:]))
        U = torch.randn(n_cases, P, dtype=torch.float64)
        gemm = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            U.T @ U
            gemm = min(gemm, time.perf_counter() - t0)
        out["floor_seconds"] = gemm
    return out


def _kfac_job(rank: int, world: int, iterations: int, m: int) -> dict:
    import torch.distributed as dist

    from .. import KFAC
    from ..zoo import autoencoder_net, sparse_init_
    out = {}
    for inverse in ("blockdiag", "tridiag"):
        net = sparse_init_(autoencoder_net(list(AUTOENCODER_SIZES)), seed=0)
        opt = KFAC(net, "bernoulli", inverse, lambda_init=1.0, T2=10, T3=10, seed=0, distributed=True)
        g = torch.Generator().manual_seed(2)
        X = torch.rand(m, AUTOENCODER_SIZES[0], generator=g)
        x = X[rank::world]
        for _ in range(3):  # warm-up: k ≤ 3 refreshes the inverse every iteration
            opt.step(x, x)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iterations):
            opt.step(x, x)
        dist.barrier()
        out[inverse] = (time.perf_counter() - t0) / iterations
    return out


def _worker(rank: int, world: int, port: int, threads: int, jobs: dict, results) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), KFAC_LENS_QUIET="1")
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    try:
        out = {}
        if "fisher" in jobs:
            out["fisher"] = _fisher_job(rank, world, *jobs["fisher"])
        if "kfac" in jobs:
            out["kfac"] = _kfac_job(rank, world, *jobs["kfac"])
        results.put((rank, out))
    except Exception as exc:  # reported by the parent
        results.put((rank, f"{type(exc).__name__}: {exc}"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, threads: int, jobs: dict, timeout: float = 1800.0) -> dict:
    """Run ``jobs`` on ``world`` gloo processes with ``threads`` torch threads each; rank 0's results."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, threads, jobs, results)) for r in range(world)]
    for p in procs:
        p.start()
    collected = {}
    deadline = time.monotonic() + timeout
    try:
        while len(collected) < world:
            try:
                rank, out = results.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"the {world}-rank run did not finish within {timeout:.0f} s") from None
            collected[rank] = out
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    failed = {r: o for r, o in collected.items() if isinstance(o, str)}
    if failed:
        raise RuntimeError(f"benchmark ranks failed: {failed}")
    return collected[0]


def distributed_benchmark(ranks=(1, 2), n_cases: int = 10000, iterations: int = 20, m: int = 1000,
                          threads: int | None = None, repeats: int = 1, jobs=("fisher", "kfac"),
                          verbose: bool = True) -> pd.DataFrame:
    """The scaling table (see the module docstring); ``threads``: the total over the ranks (default: CPUs)."""
    total = int(threads or os.cpu_count() or 1)
    load_start = load_average()
    rows = []
    for world in ranks:
        per_rank = max(1, total // world)
        spec = {}
        if "fisher" in jobs:
            spec["fisher"] = (n_cases, repeats)
        if "kfac" in jobs:
            spec["kfac"] = (iterations, m)
        out = run_ranks(world, per_rank, spec)
        if "fisher" in out:
            rows.append({"job": f"exact Fisher (P = 7030, N = {n_cases})", "ranks": world,
                         "threads per rank": per_rank, "seconds": out["fisher"]["seconds"],
                         "floor_seconds": out["fisher"].get("floor_seconds", float("nan"))})
        for inverse, sec in out.get("kfac", {}).items():
            rows.append({"job": f"K-FAC {inverse} iteration (m = {m})", "ranks": world, "threads per rank": per_rank,
                         "seconds": sec, "floor_seconds": float("nan")})
    df = pd.DataFrame(rows)
    one = df[df["ranks"] == min(ranks)].set_index("job")["seconds"]
    df["speed-up vs 1 rank"] = [one[j] / s for j, s in zip(df["job"], df["seconds"])]
    df["ratio to GEMM floor"] = df["seconds"] / df["floor_seconds"]
    df = df.drop(columns="floor_seconds")
    notes = [
        f"{total} threads in all, split over the ranks; gloo on 127.0.0.1; best of {repeats} run(s) after a warm-up.",
        "exact Fisher floor: one (N x P)^T (N x P) GEMM in float64 (N*P^2 multiply-adds), timed on the 1-rank run.",
        "K-FAC: mean over the timed iterations after 3 warm-up ones, T2 = T3 = 10 (refreshes and γ searches "
        "included); random inputs in [0, 1].",
        f"machine: {os.cpu_count()} logical CPUs; 1-minute load average {_fmt(load_start)} at start, "
        f"{_fmt(load_average())} at end. With 2 cores, 2 ranks cannot run faster than 1: the table shows "
        "the engine's overhead.",
    ]
    df.attrs.update(notes=notes)
    if verbose:
        print(format_table(df, "distributed: torch.distributed (gloo) scaling", notes))
    return df


def _fmt(load: float | None) -> str:
    return "unknown" if load is None else f"{load:.2f}"


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="process counts (default: 1 2)")
    parser.add_argument("--cases", type=int, default=None, help="N for the exact Fisher (default 10000; --quick 500)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="timed K-FAC iterations (default 20; --quick 3)")
    parser.add_argument("--jobs", nargs="+", choices=("fisher", "kfac"), default=["fisher", "kfac"],
                        help="which jobs (default: both)")


def _run(args: argparse.Namespace) -> pd.DataFrame:
    cases = args.cases or (500 if args.quick else 10000)
    iterations = args.iterations or (3 if args.quick else 20)
    m = 100 if args.quick else 1000
    return distributed_benchmark(args.ranks, cases, iterations, m, args.threads, args.repeats, args.jobs,
                                 verbose=not args.no_print)


BENCHMARK = Benchmark("distributed", _run, _arguments,
                      help="exact Fisher (P = 7030) and data-parallel K-FAC on 1 and 2 gloo processes", repeats=1)
