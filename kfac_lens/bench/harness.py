"""The machinery every benchmark shares: threads, device, timing, in-process peak memory, the table.

A benchmark is a :class:`Benchmark` record: a function that takes the parsed ``argparse.Namespace``
and returns a ``pandas.DataFrame``, an optional function that adds its own options, and its default
number of repeats. :func:`format_table` prints the result as a titled table with numbered notes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch

from ..memory import release_free_memory


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of ``kfac-lens bench``.

    ``run`` takes the parsed arguments (the common options plus those ``add_arguments`` adds) and
    returns the result table. ``repeats`` is the default of ``--repeats`` outside ``--quick``.
    """

    name: str
    run: Callable[[argparse.Namespace], pd.DataFrame]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    help: str = ""
    repeats: int = 3


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
    """``None`` → CPU; a CUDA device only when torch sees one (else ``ValueError``)."""
    if device is None:
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch.cuda.is_available() is False.")
    return dev


def load_average() -> float | None:
    """The 1-minute load average of the machine, or ``None`` where the OS does not report it."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
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
    release_free_memory()


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
    """What :func:`measure` returns per function."""

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
_FORMATS: dict[str, Callable[[float], str]] = {
    "seconds": lambda v: f"{v:.4f}",
    "ratio_to_gemm": lambda v: f"{v:.3f}",
    "peak_MB": lambda v: f"{v:.1f}",
    "max_rel_diff": lambda v: "" if pd.isna(v) else f"{v:.1e}",
    "target_s": lambda v: f"{v:.2f}",
    "peak_GB": lambda v: f"{v:.3f}",
    "target_GB": lambda v: f"{v:.2f}",
    "ratio_to_target": lambda v: f"{v:.3f}",
    "job_seconds": lambda v: f"{v:.1f}",
}


def add_zoo_data_arguments(parser, network: str, cases_help: str) -> None:
    """``--data`` (mnist or digits, for the zoo's ``network``) and ``--cases N`` (help: ``cases_help``), shared by
    the benchmarks that read a zoo network."""
    parser.add_argument("--data", choices=("mnist", "digits"), default="mnist",
                        help=f"the zoo {network}'s data set (default mnist)")
    parser.add_argument("--cases", type=int, default=None, metavar="N", help=cases_help)


def format_table(df: pd.DataFrame, title: str, notes: Sequence[str] = ()) -> str:
    """A titled, aligned plain-text table with numbered notes under it."""
    body = df.to_string(index=False, formatters={k: f for k, f in _FORMATS.items() if k in df.columns})
    width = max(len(line) for line in body.splitlines())
    lines = [title, "=" * max(width, len(title)), body]
    lines += [f"  [{i}] {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines)
