"""``kfac-lens`` command line: ``figures`` (the main job), ``inspect`` (your own network), ``train``, ``bench``,
``gpu-check`` and ``test``.

Environment variables: ``KFAC_LENS_DATA`` (where MNIST and the zoo cache live; default
``~/.cache/kfac_lens``), ``KFAC_LENS_QUIET`` (set: no automatic progress bars; ``--quiet`` sets it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

APPROXIMATION_CASES = 2000  # cases of the approximations-over-training figure (six dense comparisons)
FIGURES = ("5", "6", "7", "exact", "inverse", "cumulants", "training", "approximations")


def _device(name: str | None):
    import torch
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("kfac-lens: --device cuda was asked for but torch sees no CUDA device "
                         "(install a CUDA build of torch first, or use --device cpu).")
    return torch.device(name)


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def run_figures(args) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import pandas as pd

    from . import figures as F
    from . import zoo
    from .data import DataUnavailableError
    from .memory import release_free_memory, return_large_blocks_to_os
    from .study import CurvatureStudy

    t_start = time.perf_counter()
    return_large_blocks_to_os()  # the job's peak memory is what is live, not the heap's fragments
    if args.quiet:
        os.environ["KFAC_LENS_QUIET"] = "1"  # also silences the library's automatic progress bars
    device = _device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = list(dict.fromkeys(args.fig or FIGURES))
    progress = not args.quiet
    written, metrics = [], {}

    def save(drawn, name, figure_id):
        path = out / f"{name}.png"
        F.save_figure(drawn.figure, path)
        written.append(path)
        metrics[figure_id] = drawn.metrics.assign(figure=figure_id)
        _say(f"  wrote {path}", args.quiet)

    def example_figures():  # (a function, so that the study is freed before the next network)
        _say(f"example network ({args.data}, preset {args.preset}) on {device}", args.quiet)
        ex = zoo.example_network(args.preset, args.data, device=device, progress=progress,
                                 retrain=args.retrain, seed=args.seed)
        _say(f"  {ex}", args.quiet)
        n_cases = zoo.EXAMPLE_ANALYSIS_CASES[args.preset]
        X, y = ex.X[:n_cases], ex.y[:n_cases]
        study = (CurvatureStudy(ex.model, X, y, "categorical", layers=[1, 2, 3, 4])
                 if any(f in wanted for f in ("5", "6", "exact", "inverse")) else None)
        if "5" in wanted:
            save(F.figure5(study), "figure5", "5")
        if "6" in wanted:
            gamma = args.gamma if args.gamma is not None else ex.gamma
            save(F.figure6(study, gamma), "figure6", "6")
        if "exact" in wanted:
            save(F.figure_exact_vs_kfac(study), "figure_exact_vs_kfac", "exact")
        if "inverse" in wanted:
            gamma = args.gamma if args.gamma is not None else ex.gamma
            save(F.figure_inverse_structure(study, gamma), "figure_inverse_structure", "inverse")
        if "cumulants" in wanted:
            save(F.figure_cumulants(ex.model, X, "categorical", 2, 3), "figure_cumulants", "cumulants")
        if "approximations" in wanted:
            n = min(APPROXIMATION_CASES, len(X))
            history = F.approximation_history(ex, X[:n], y[:n], "categorical", layers=[1, 2, 3, 4],
                                              progress=progress)
            save(F.figure_approximations(history), "figure_approximations", "approximations")

    def figure7():
        _say(f"autoencoder ({args.data}, preset {args.preset}) on {device}", args.quiet)
        ae = zoo.autoencoder(args.preset, args.data, device=device, progress=progress, retrain=args.retrain,
                             seed=args.seed)
        _say(f"  {ae}", args.quiet)
        save(F.figure7(ae.optimizer, ae.X, ae.y, progress=progress), "figure7", "7")

    try:
        if any(f in wanted for f in ("5", "6", "exact", "inverse", "cumulants", "approximations")):
            example_figures()
            release_free_memory()
        if "7" in wanted:
            figure7()
            release_free_memory()
        if "training" in wanted:
            _say(f"training comparison ({args.data}, preset {args.preset}) on {device}", args.quiet)
            seeds = [args.seed + i for i in range(args.training_seeds)]
            baselines = not args.training_kfac_only
            hist = zoo.training_comparison(args.preset, args.data, device=device, progress=progress,
                                           retrain=args.retrain, seeds=seeds, iterations=args.training_iterations,
                                           baselines=baselines)
            labels = F.training_comparison_labels(args.preset, args.data, args.training_iterations)
            extra = tridiagonal_extra_progress(hist)
            if not baselines:
                progress_note = ("K-FAC's two inverses, block-tridiagonal's extra progress per iteration "
                                 f"{100 * extra:+.0f}%")
                labels["note"] = "; ".join(filter(None, [labels["note"], progress_note]))
            drawn = F.figure_training_curves(hist, **labels)
            drawn.metrics["tridiag_extra_progress"] = extra
            if args.training_iterations is not None:  # the metrics say how far K-FAC ran, against the preset
                drawn.metrics["kfac_iterations_run"] = args.training_iterations
                drawn.metrics["preset_iterations"] = zoo.AUTOENCODER_PRESETS[args.preset]["iterations"]
            save(drawn, "figure_training" if baselines else "figure_training_kfac",
                 "training" if baselines else "training_kfac")
    except DataUnavailableError as exc:
        print(f"kfac-lens: {exc}\nkfac-lens: to run offline, use --data digits.", file=sys.stderr)
        return 2
    if metrics:
        # one table per figure (metrics/figure5.csv, ..., metrics/training.csv), each with only the
        # columns that figure fills, and metrics.csv: their concatenation
        (out / "metrics").mkdir(exist_ok=True)
        for figure_id, df in metrics.items():
            path = out / "metrics" / f"{'figure' + figure_id if figure_id.isdigit() else figure_id}.csv"
            df.dropna(axis=1, how="all").to_csv(path, index=False)
            written.append(path)
        path = out / "metrics.csv"
        pd.concat(metrics.values(), ignore_index=True, sort=False).to_csv(path, index=False)
        written.append(path)
    return report_written("figures", written, out, t_start)


def tridiagonal_extra_progress(hist: dict) -> float:
    """Block-tridiagonal's extra progress per iteration over block-diagonal in a training comparison
    (:func:`kfac_lens.figures.extra_progress_per_iteration`), the median over its seeds; NaN without both."""
    import numpy as np

    from . import figures as F
    bd, td = hist.get("K-FAC block-diagonal"), hist.get("K-FAC block-tridiagonal")
    if bd is None or td is None:
        return float("nan")
    seeds = sorted(bd["seed"].unique()) if "seed" in bd.columns else [None]
    pick = (lambda h, s: h) if seeds == [None] else (lambda h, s: h[h["seed"] == s])
    return float(np.median([F.extra_progress_per_iteration(pick(bd, s), pick(td, s)) for s in seeds]))


def report_written(command: str, written, out, t_start: float) -> int:
    """Print what ``kfac-lens <command>`` wrote and how long it took; the command's exit status (0)."""
    print(f"kfac-lens {command}: wrote {len(written)} files to {Path(out).resolve()} "
          f"in {time.perf_counter() - t_start:.0f} s:")
    for p in written:
        print(f"  {p}")
    return 0


def run_inspect(args) -> int:
    """``kfac-lens inspect``: one user network's figures, metrics.csv and error table (kfac_lens.inspect_network)."""
    import matplotlib
    matplotlib.use("Agg")

    from . import inspect_network as I
    from .data import DataUnavailableError
    from .errors import UnsupportedModelError

    t_start = time.perf_counter()
    if args.quiet:
        os.environ["KFAC_LENS_QUIET"] = "1"
    device = _device(args.device)
    try:
        model = I.load_factory(args.model)
        I.load_weights(model, args.weights, device)
        inputs = I.load_inputs(args.data, model, args.cases, device)
        result = I.inspect_network(model, inputs, args.likelihood, layers=args.layers, gamma=args.gamma,
                                   approx=args.approx)
        written = I.write_outputs(result, args.out)
    except DataUnavailableError as exc:
        print(f"kfac-lens inspect: {exc}\nkfac-lens inspect: to run offline, use --data digits.", file=sys.stderr)
        return 2
    except (I.InspectError, UnsupportedModelError) as exc:
        print(f"kfac-lens inspect: {exc}", file=sys.stderr)
        return 2
    study = result.study
    print(study.view.summary())
    for note in result.notes:
        print(f"note: {note}")
    print(f"\nrelative Frobenius errors (F̃ against the exact F; the inverses against F̃⁻¹ at γ = {result.gamma:.3g}, "
          f"approx={study.approx}, N = {len(study.X)}):")
    print(result.summary.to_string(float_format=lambda v: f"{v:.3f}"))
    print()
    return report_written("inspect", written, args.out, t_start)


def run_train(args) -> int:
    from . import zoo
    device = _device(args.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    kw = dict(device=device, retrain=args.retrain, seed=args.seed)
    if world > 1:  # launched by torchrun: data-parallel K-FAC over the default process group
        if args.what == "comparison":
            raise SystemExit("kfac-lens train comparison runs SGD and Adam too and is not data-parallel; "
                             "run it in one process, or train 'example' or 'autoencoder' under torchrun.")
        import torch.distributed as dist
        if device.type == "cuda":
            device = torch_device_for_local_rank()
            kw["device"] = device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        kw["distributed"] = True
    try:
        if args.what == "example":
            e = zoo.example_network(args.preset, args.data, **kw)
        elif args.what == "autoencoder":
            e = zoo.autoencoder(args.preset, args.data, **kw)
        else:
            hist = zoo.training_comparison(args.preset, args.data, **kw)
            for name, h in hist.items():
                err = h["error"].dropna()
                print(f"{name:>26}: {len(h)} iterations, {h['time'].iloc[-1]:.1f} s, final error {err.iloc[-1]:.4g}")
            return 0
        if int(os.environ.get("RANK", "0")) == 0:
            print(e)
            print(f"cached at {e.path}" + (f" (data-parallel K-FAC on {world} processes)" if world > 1 else ""))
        return 0
    finally:
        if world > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def torch_device_for_local_rank():
    """``cuda:LOCAL_RANK`` (torchrun sets LOCAL_RANK), made the current device."""
    import torch
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def run_checkout_script(command: str, cmd: list[str]) -> int:
    """Run ``cmd`` in the source checkout this package is installed from (the tests and the docs sources
    ship with the repository, not with an installed wheel)."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    if not (root / "tests").is_dir() or not (root / "docs").is_dir():
        raise SystemExit(f"kfac-lens {command}: the tests and the docs ship with the repository, not with the "
                         f"installed package; run ./kfac-lens {command} from a clone.")
    return subprocess.call(cmd, cwd=root)


def run_tests(pytest_args: list[str]) -> int:
    """Run the test suite of a source checkout."""
    return run_checkout_script("test", [sys.executable, "-m", "pytest", *pytest_args])


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _common_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``figures`` and ``train``."""
    p.add_argument("--preset", choices=("quick", "paper"), default="quick",
                   help="network sizes and iteration counts: 'quick' (minutes on 2 CPU cores) or 'paper' "
                        "(the paper's 784-1000-500-250-30 autoencoder to iteration 500; use a GPU) "
                        "(default: %(default)s)")
    p.add_argument("--data", choices=("mnist", "digits"), default="mnist",
                   help="'mnist' (downloaded once and cached) or 'digits' (scikit-learn's bundled 8x8 digits, "
                        "works offline) (default: %(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to train and analyse (default: cuda when torch sees a GPU, else cpu)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the network initialisation, data subsets and K-FAC's sampling; each seed is "
                        "cached separately (default: %(default)s)")
    p.add_argument("--retrain", action="store_true", help="ignore the cached zoo networks and train again")


def main(argv=None) -> int:
    from . import __version__
    argv = list(sys.argv[1:] if argv is None else argv)
    # `bench` and `test` hand every argument (--help included) to their own parsers.
    if argv[:1] == ["bench"]:
        from . import bench
        return bench.main(argv[1:], prog="kfac-lens bench")
    if argv[:1] == ["test"]:
        return run_tests(argv[1:])
    if argv[:1] == ["docs"]:
        return run_checkout_script("docs", [sys.executable, "docs/build.py", *argv[1:]])
    if argv[:1] == ["gpu-check"]:
        from . import gpu_check
        return gpu_check.main(argv[1:])

    parser = argparse.ArgumentParser(prog="kfac-lens", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kfac-lens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    f = sub.add_parser("figures", help="regenerate the paper's Figures 5-7 and companion views",
                       description="Train (or load from the cache) the zoo networks and write the figures "
                                   "and their metrics.")
    f.add_argument("--fig", nargs="+", choices=FIGURES, metavar="FIG",
                   help=f"which figures, any of {' '.join(FIGURES)} (default: all)")
    _common_arguments(f)
    f.add_argument("--out", default="figures", help="output folder (default: %(default)s)")
    f.add_argument("--training-seeds", type=_positive_int, default=3, metavar="K",
                   help="seeds of the training comparison (--seed, --seed+1, …), drawn as the median with a "
                        "min–max band; each is trained once and cached (default: %(default)s)")
    f.add_argument("--training-iterations", type=_positive_int, default=None, metavar="K",
                   help="K-FAC iterations of the training comparison (default: the preset's, 150 quick, 500 paper); "
                        "fewer are named on the figure and in its metrics (to fit the paper preset on a CPU)")
    f.add_argument("--training-kfac-only", action="store_true",
                   help="train only K-FAC's two inverses (no equal-time baselines) and write "
                        "figure_training_kfac.png with block-tridiagonal's extra progress per iteration")
    f.add_argument("--gamma", type=float, default=None,
                   help="the γ of Figure 6 and the inverse-structure figure (default: the γ K-FAC held)")
    f.add_argument("--quiet", action="store_true", help="no progress messages or progress bars")
    f.set_defaults(func=run_figures)

    i = sub.add_parser("inspect", help="examine your own network: its exact Fisher against K-FAC's",
                       description="Rebuild a network from FILE.py:FACTORY, load its weights, and write its "
                                   "Figure 5, Figure 6, exact-vs-K-FAC and cumulant figures and metrics.csv; "
                                   "print the errors of F̃, F̆⁻¹ and F̂⁻¹. Inputs are tried flat (N, D), then as "
                                   "(N, 1, H, W) images.")
    i.add_argument("model", metavar="FILE.py:FACTORY",
                   help="a Python file and the callable in it that returns the nn.Module")
    i.add_argument("--weights", required=True, metavar="CKPT.pt",
                   help="torch.save'd state dict (plain, or under a 'model' key); loaded onto --device")
    i.add_argument("--data", required=True, metavar="mnist|digits|FILE.npz",
                   help="16x16 MNIST, scikit-learn's 8x8 digits (offline), or an .npz with X (and y)")
    i.add_argument("--likelihood", choices=("categorical", "bernoulli", "gaussian"), default="categorical",
                   help="the model's output distribution; the network outputs its natural parameters "
                        "(default: %(default)s)")
    i.add_argument("--layers", type=int, nargs="+", default=None, metavar="K",
                   help="0-based indices of the Linear/Conv2d layers in order of first use (default: all)")
    i.add_argument("--gamma", type=float, default=None,
                   help="the damping γ of Figure 6 and the inverses (default: 0.1·sqrt(tr F / P))")
    i.add_argument("--approx", choices=("expand", "reduce"), default=None,
                   help="K-FAC for layers used several times per case (default: expand when every selected "
                        "layer has as many uses per case, else reduce)")
    i.add_argument("--cases", type=int, default=500, help="the first N cases of the data (default: %(default)s)")
    i.add_argument("--out", default="inspect", help="output folder (default: %(default)s)")
    i.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to load and analyse (default: cuda when torch sees a GPU, else cpu)")
    i.add_argument("--quiet", action="store_true", help="no progress bars")
    i.set_defaults(func=run_inspect)

    t = sub.add_parser("train", help="train (or load from the cache) a zoo network",
                       description="Train (or load from the cache) one zoo network and print where it is cached.")
    t.add_argument("what", choices=("example", "autoencoder", "comparison"),
                   help="the example classifier, the K-FAC autoencoder, or the four-optimizer comparison")
    _common_arguments(t)
    t.set_defaults(func=run_train)

    sub.add_parser("bench", help="benchmarks that print ratio tables (kfac-lens bench --help)", add_help=False)
    sub.add_parser("gpu-check", help="exercise the CUDA paths: device tests, benchmarks and figures on the GPU "
                                     "(kfac-lens gpu-check --help)", add_help=False)
    sub.add_parser("docs", help="build the documentation site with the notebooks executed (docs/build.py; "
                               "--help lists its options)", add_help=False)
    sub.add_parser("test", help="run the test suite of a source checkout (arguments go to pytest)",
                   add_help=False)

    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
