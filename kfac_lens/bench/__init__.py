"""The benchmarks of ``kfac-lens bench``: each prints a table of ratios and returns it as a DataFrame.

Their numbers are reported, never asserted in tests. Run them as ``kfac-lens bench NAME [options]``
(or ``python -m kfac_lens.bench NAME``); ``--help`` lists them:

- ``fisher`` (:mod:`~kfac_lens.bench.fisher`): the dense exact Fisher against a per-case Jacobian
  baseline and one GEMM;
- ``optimizer`` (:mod:`~kfac_lens.bench.optimizer`): K-FAC against tuned SGD-Nesterov and Adam;
- ``cnn`` (:mod:`~kfac_lens.bench.cnn`): K-FAC against tuned SGD-Nesterov and Adam on notebook 05's CNN at
  equal optimizer CPU time;
- ``explorer`` (:mod:`~kfac_lens.bench.explorer`): one γ move of the DampingExplorer against 0.3 s;
- ``memory`` (:mod:`~kfac_lens.bench.memory`): the peak RSS of ``kfac-lens figures`` against 1.5 GB;
- ``distributed`` (:mod:`~kfac_lens.bench.distributed`): the exact Fisher and data-parallel K-FAC on 1 and 2
  ``torch.distributed`` processes;
- ``quality`` (:mod:`~kfac_lens.bench.quality`): matrix-free approximation errors (±5%) and the F̂⁻¹F
  spectrum on the quick autoencoder against 2 minutes.

:mod:`~kfac_lens.bench.harness` holds what they share. To add a benchmark, write a module with a
function that takes the parsed ``argparse.Namespace`` and returns a ``pandas.DataFrame``, an optional
function that adds its own options, and a ``BENCHMARK`` record
(:class:`~kfac_lens.bench.harness.Benchmark`); then list it in :data:`BENCHMARKS`. The common options
``--device``, ``--repeats``, ``--threads``, ``--quick``, ``--seed`` and ``--no-print`` are already on
every benchmark's parser.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import pandas as pd

from . import cnn, distributed, explorer, fisher, memory, optimizer, quality
from .cnn import cnn_benchmark
from .distributed import distributed_benchmark
from .explorer import explorer_benchmark
from .fisher import M_BASE, M_GEMM, M_OURS, fisher_benchmark
from .harness import Benchmark
from .memory import memory_benchmark
from .optimizer import ADAM_LRS, KFAC_LAMBDAS, SGD_LRS, optimizer_benchmark
from .quality import quality_benchmark

__all__ = [
    "ADAM_LRS", "BENCHMARKS", "KFAC_LAMBDAS", "M_BASE", "M_GEMM", "M_OURS", "SGD_LRS", "Benchmark",
    "build_parser", "cnn_benchmark", "distributed_benchmark", "explorer_benchmark", "fisher_benchmark", "main",
    "memory_benchmark", "optimizer_benchmark", "quality_benchmark", "run",
]

#: Every benchmark of ``kfac-lens bench``, by name.
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    fisher.BENCHMARK, optimizer.BENCHMARK, cnn.BENCHMARK, explorer.BENCHMARK, memory.BENCHMARK, distributed.BENCHMARK,
    quality.BENCHMARK)}

PROG = "python -m kfac_lens.bench"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The parser of ``kfac-lens bench``: one subcommand per benchmark, each with the common options."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    common.add_argument("--repeats", type=int, default=None,
                        help="timed runs per measurement after one warm-up; the best is reported "
                             "(default: the benchmark's own, 3 for most; --quick: 1)")
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


def run(argv: Sequence[str] | None = None, prog: str = PROG) -> pd.DataFrame:
    """Parse ``argv`` (e.g. ``["fisher", "--quick"]``), run that benchmark and return its table."""
    args = build_parser(prog).parse_args(None if argv is None else list(argv))
    if args.repeats is None:
        args.repeats = 1 if args.quick else BENCHMARKS[args.benchmark].repeats
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1.")
    return BENCHMARKS[args.benchmark].run(args)


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Command-line entry: run the benchmark named in ``argv``, print its table and return 0."""
    run(argv, prog=prog)
    return 0
