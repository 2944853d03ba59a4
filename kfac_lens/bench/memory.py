"""Benchmark ``memory``: the peak resident memory of the ``kfac-lens figures`` job, against 1.5 GB.

The job runs as a child process, exactly as a user starts it (``kfac-lens figures --quiet --out
<scratch folder>``; ``--fig`` picks the figures). Two readings are taken:

- the **process tree**: the summed RSS of the child and all its descendants, sampled every
  ``interval`` seconds (with psutil when it is installed, else from ``/proc`` for the child alone);
- the **kernel's peak** of the largest single process, ``ru_maxrss`` from ``os.wait4`` on the child,
  which no sampling interval can miss.

Run it as ``kfac-lens bench memory``. The zoo networks are read from the cache (trained on first use).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from .harness import Benchmark, format_table

TARGET_GB = 1.5     # GB = 10**9 bytes
GB = 10**9
QUICK_FIGURES = ("5",)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass
class ChildMemory:
    """What :func:`child_peak_rss` measured, in bytes and seconds."""

    tree_peak: int          # largest summed RSS of the child and its descendants over the samples
    process_peak: int       # the kernel's ru_maxrss of the child (largest single process), 0 if unknown
    seconds: float          # wall clock of the child
    samples: int
    how: str
    returncode: int


def _tree_rss_psutil(root) -> int:
    import psutil

    total = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _rss_proc(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def child_peak_rss(command: Sequence[str], interval: float = 0.05, timeout: float | None = None,
                   cwd: str | None = None, env: dict | None = None) -> ChildMemory:
    """Run ``command`` and measure its peak resident memory (see the module docstring).

    The child's output goes to a scratch file; a non-zero exit raises ``RuntimeError`` with its tail.
    ``timeout`` (seconds) stops the child with SIGKILL and raises ``TimeoutError``.
    """
    try:
        import psutil
    except ImportError:
        psutil = None
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        root = psutil.Process(proc.pid) if psutil is not None else None
        peak, samples = 0, 0
        status = rusage = None
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            rss = _tree_rss_psutil(root) if root is not None else _rss_proc(proc.pid)
            peak, samples = max(peak, rss), samples + 1
            if timeout is not None and time.perf_counter() - t0 > timeout:
                proc.kill()
                proc.wait()
                raise TimeoutError(f"{shlex.join(command)} ran longer than {timeout:g} s")
            time.sleep(interval)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        if proc.returncode != 0:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"{shlex.join(command)} exited with {proc.returncode}:\n{tail}")
    how = ("psutil: RSS of the child and its descendants" if root is not None
           else "/proc/PID/statm of the child alone (psutil is not installed)")
    return ChildMemory(peak, int(rusage.ru_maxrss) * 1024, seconds, samples,
                       f"{how}, every {interval:g} s", proc.returncode)


def figures_command(out: str, figs: Sequence[str] | None = None, data: str | None = None,
                    device: str | None = None, seed: int | None = None) -> list[str]:
    """The ``kfac-lens figures --quiet --out OUT`` command line, run by this Python interpreter."""
    cmd = [sys.executable, "-m", "kfac_lens.cli", "figures", "--quiet", "--out", str(out)]
    if figs:
        cmd += ["--fig", *figs]
    if data:
        cmd += ["--data", data]
    if device:
        cmd += ["--device", device]
    if seed is not None:
        cmd += ["--seed", str(int(seed))]
    return cmd


def memory_benchmark(command: Sequence[str] | None = None, figs: Sequence[str] | None = None,
                     data: str | None = None, device: str | None = "cpu", seed: int | None = None, repeats: int = 1,
                     target_gb: float = TARGET_GB, interval: float = 0.05, verbose: bool = True) -> pd.DataFrame:
    """Peak RSS of the figures job (or of ``command``), run ``repeats`` times; the largest peak is kept.

    Without ``command``, the job is ``kfac-lens figures --quiet`` into a scratch folder, with ``figs``,
    ``data``, ``device`` and ``seed`` passed through. Rows: the process-tree peak (sampled) and the kernel's
    single-process peak. ``ratio_to_target`` = peak_GB / ``target_gb`` (GB = 10⁹ bytes).
    """
    runs = []
    for _ in range(max(int(repeats), 1)):
        with tempfile.TemporaryDirectory(prefix="kfac_lens_bench_memory_") as out:
            cmd = list(command) if command is not None else figures_command(out, figs, data, device, seed)
            runs.append(child_peak_rss(cmd, interval=interval))
    tree = max(r.tree_peak for r in runs)
    single = max(r.process_peak for r in runs)
    seconds = max(r.seconds for r in runs)
    rows = [{"measure": "process tree, sampled", "peak_GB": tree / GB},
            {"measure": "largest process, kernel peak", "peak_GB": single / GB}]
    df = pd.DataFrame(rows)
    df["target_GB"] = float(target_gb)
    df["ratio_to_target"] = df["peak_GB"] / float(target_gb)
    df["job_seconds"] = seconds
    shown = (shlex.join(command) if command is not None else
             "kfac-lens " + shlex.join(figures_command("TMP", figs, data, device, seed)[3:]).replace("TMP", "<tmp>"))
    notes = [
        f"job: {shown}; the largest of {len(runs)} run(s); job_seconds is the longest run's wall clock.",
        f"process tree, sampled: {runs[0].how} ({sum(r.samples for r in runs)} samples); a spike shorter "
        "than the interval can be missed.",
        "largest process, kernel peak: ru_maxrss of the child from os.wait4 (its own high-water mark, "
        "or that of a descendant it waited for, whichever is larger).",
        f"GB = 10^9 bytes; ratio_to_target = peak_GB / {target_gb:g}.",
    ]
    title = f"memory: peak resident memory of {'the command' if command is not None else 'kfac-lens figures'}" \
            f" | target {target_gb:g} GB"
    df.attrs.update(title=title, notes=notes, runs=runs, command=shown)
    if verbose:
        print(format_table(df, title, notes), flush=True)
    return df


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import FIGURES

    parser.add_argument("--fig", nargs="+", choices=FIGURES, metavar="FIG", default=None,
                        help=f"figures the job draws, any of {' '.join(FIGURES)} (passed to kfac-lens figures; "
                             f"default: all; --quick: {' '.join(QUICK_FIGURES)})")
    parser.add_argument("--data", choices=("mnist", "digits"), default=None,
                        help="passed to kfac-lens figures (default mnist; --quick: digits)")
    parser.add_argument("--command", default=None, metavar="CMD",
                        help="measure this command line instead of the figures job (split like a shell)")


def run_from_args(args: argparse.Namespace) -> pd.DataFrame:
    command = shlex.split(args.command) if args.command else None
    figs = args.fig or (list(QUICK_FIGURES) if args.quick else None)
    data = args.data or ("digits" if args.quick else None)
    return memory_benchmark(command, figs=figs, data=data, device=args.device, seed=args.seed,
                            repeats=args.repeats, verbose=not args.no_print)


BENCHMARK = Benchmark("memory", run_from_args, add_arguments,
                      help="peak resident memory of `kfac-lens figures` (a child process), against the 1.5 GB target",
                      repeats=1)
