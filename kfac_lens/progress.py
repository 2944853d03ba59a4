"""Progress bars for long computations: shown automatically where the work is long, unless ``KFAC_LENS_QUIET``
is set (the CLI's ``--quiet`` sets it), or forced on or off by the caller's ``progress`` argument."""

from __future__ import annotations

import os

from tqdm.auto import tqdm

#: Operators with at least this many rows get an automatic bar on their Lanczos runs and products.
LARGE_OPERATOR = 100_000


def shown(long: bool, progress: bool | None = None) -> bool:
    """Whether to show a bar: ``progress`` when given, else ``long`` unless ``KFAC_LENS_QUIET`` is set."""
    return (long and not os.environ.get("KFAC_LENS_QUIET")) if progress is None else bool(progress)


def progress_bar(iterable=None, *, total: int | None = None, desc: str, long: bool, progress: bool | None = None):
    """A transient tqdm bar over ``iterable`` (or of ``total`` steps to ``update``), shown as :func:`shown` says."""
    return tqdm(iterable, total=total, desc=desc, disable=not shown(long, progress), leave=False)
