"""Benchmark ``explorer``: the time one γ move takes in :class:`kfac_lens.widgets.DampingExplorer`.

The explorer shows Figure 6 (Appendix C: F̃⁻¹ against F̆⁻¹ and F̂⁻¹ under factored Tikhonov
damping, Appendix E.3; docs/math.md §4, §5) on the paper's example network (docs/math.md §9), middle
four layers (P = 1680), on the cases its browser test page uses. The benchmark moves the γ slider as
a user would, to a new γ each time, with no browser in the loop: setting the slider runs the
explorer's redraw synchronously. It reports the best move's wall clock against the target of 0.3 s,
and the explorer's own split of that move (compute, draw, render), each as a share of the target.
Run it as ``kfac-lens bench explorer``.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import pandas as pd
import torch

from .harness import Benchmark, add_zoo_data_arguments, format_table, load_average, torch_threads

TARGET_S = 0.3            # one γ move, compute and render, on the example network
EXAMPLE_LAYERS = [1, 2, 3, 4]   # the middle four layers, W2..W5: P = 1680
BROWSER_CASES = 2000      # the cases the browser test page analyses
QUICK_CASES = 200
GAMMA_STEP = 0.05         # log10 step of the explorer's γ slider


def example_study(data: str = "mnist", cases: int = BROWSER_CASES, *, trained: bool = True, seed: int = 0,
                  progress: bool = False):
    """The study the explorer examines, and the γ to start from.

    ``trained``: the zoo's example network (trained once, then read from the cache) on its first
    ``cases`` training cases, starting at the γ K-FAC held. Otherwise a freshly initialised network of
    the same shape (P = 1680 in the middle layers) on ``cases`` 8×8 digits at γ = 0.01, which needs no
    training and no download. Returns ``(study, gamma)``.
    """
    from .. import zoo
    from ..data import load_dataset
    from ..study import CurvatureStudy

    if trained:
        entry = zoo.example_network("quick", data, progress=progress, seed=seed)
        X, y, gamma = entry.X[:cases], entry.y[:cases], float(entry.gamma)
        name = f"example net ({data})"
        model = entry.model
    else:
        ds = load_dataset("digits", "train")
        X, y, gamma = ds.X[:cases], ds.y[:cases], 1e-2
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = zoo.classifier([ds.X.shape[1], 20, 20, 20, 20, 20, 10])
        name = "untrained example-shaped net (digits)"
    return CurvatureStudy(model, X, y, "categorical", layers=EXAMPLE_LAYERS, name=name), gamma


def explorer_benchmark(study, gamma: float, repeats: int = 5, threads: int | None = None,
                       target_s: float = TARGET_S, verbose: bool = True) -> pd.DataFrame:
    """Time ``repeats`` γ moves of a :class:`~kfac_lens.widgets.DampingExplorer` on ``study``.

    The explorer is built at ``gamma`` (its first draw is reported in the notes, not timed as a move)
    and moved once untimed. Each timed move then goes to a γ not visited before (``gamma`` times
    10^(±0.05 k), alternating sides), so nothing the study memoises per γ is reused. A move that
    leaves the image unchanged or reports an error raises ``RuntimeError``. Rows: the best move's
    wall clock, the median move's, then each part of the explorer's ``timings`` for the best move.
    ``ratio_to_target`` is seconds / ``target_s``; for a part, it is its share of the target.
    """
    from ..widgets import DampingExplorer

    repeats = max(int(repeats), 1)
    load_start = load_average()
    with torch_threads(threads) as n_threads:
        t0 = time.perf_counter()
        explorer = DampingExplorer(study, gamma=gamma)
        first_s = time.perf_counter() - t0
        moves = []
        for k in range(repeats + 1):  # move 0 warms up
            g = float(gamma) * 10 ** (GAMMA_STEP * (k + 1) * (1 if k % 2 == 0 else -1))
            before = explorer.image.value
            t0 = time.perf_counter()
            explorer.set_gamma(g)  # moves the slider; its callback redraws
            seconds = time.perf_counter() - t0
            if explorer.image.value == before or not math.isclose(explorer.gamma, g, rel_tol=1e-9):
                raise RuntimeError(f"the explorer did not redraw at γ = {g:.4g}: {explorer.status.value}")
            if k > 0:
                moves.append((seconds, g, dict(getattr(explorer, "timings", {}) or {})))
    best_s, best_g, parts = min(moves, key=lambda m: m[0])
    median_s = sorted(m[0] for m in moves)[len(moves) // 2]
    rows = [{"step": "γ move (wall clock)", "seconds": best_s},
            {"step": "γ move, median of the moves", "seconds": median_s}]
    rows += [{"step": key.removesuffix("_s"), "seconds": float(v)} for key, v in parts.items()
             if key.endswith("_s") and key != "total_s"]
    df = pd.DataFrame(rows, columns=["step", "seconds"])
    df["target_s"] = float(target_s)
    df["ratio_to_target"] = df["seconds"] / float(target_s)
    P = getattr(study, "n_params", None)
    notes = [
        f"seconds: best of {repeats} γ moves (after one untimed move), each to a γ not visited before, "
        f"between {min(m[1] for m in moves):.3g} and {max(m[1] for m in moves):.3g}; the best was γ = {best_g:.3g}.",
        "The median row is the middle of the timed moves; the rows under it are the explorer's own split of "
        "the best move (its `timings`): compute is "
        "the γ-dependent inverses and metrics, draw updates the panels, render encodes the PNG. Their "
        f"ratio_to_target is their share of the {target_s:g} s budget.",
        f"first draw (building the explorer, not a move): {first_s:.3f} s, including whatever the study "
        "computes on first need; the study itself (F, F̃, the factors, ∇h) was built before.",
        f"torch threads={n_threads} | torch {torch.__version__}",
    ]
    load_end = load_average()
    if load_start is not None and load_end is not None:
        notes.append(f"machine: {os.cpu_count()} logical CPUs; 1-minute load average {load_start:.2f} at start, "
                     f"{load_end:.2f} at end. Other processes on the CPUs slow torch's parallel regions "
                     "badly; compare with --threads 1 when the load is high.")
    title = (f"explorer: one γ move in DampingExplorer, {study.name}, layers {list(study.layers)} "
             f"(P = {P}), {study.X.shape[0]} cases | target {target_s:g} s")
    df.attrs.update(title=title, notes=notes, first_draw_s=first_s, moves=[m[0] for m in moves],
                    P=P, threads=n_threads)
    if verbose:
        print(format_table(df, title, notes), flush=True)
    return df


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_zoo_data_arguments(parser, "example network", f"cases the study analyses (default {BROWSER_CASES}, as in "
                                                      f"the browser test; --quick: {QUICK_CASES})")


def run_from_args(args: argparse.Namespace) -> pd.DataFrame:
    if args.device != "cpu":
        raise SystemExit("kfac-lens bench explorer: the explorer runs on the CPU; drop --device.")
    cases = args.cases or (QUICK_CASES if args.quick else BROWSER_CASES)
    with torch_threads(args.threads):
        study, gamma = example_study(args.data, cases, trained=not args.quick, seed=args.seed,
                                     progress=not args.no_print)
    return explorer_benchmark(study, gamma, repeats=args.repeats, threads=args.threads,
                              verbose=not args.no_print)


BENCHMARK = Benchmark("explorer", run_from_args, add_arguments,
                      help="one γ move in DampingExplorer on the example network (P = 1680), against the 0.3 s target",
                      repeats=5)
