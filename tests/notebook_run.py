"""Execute each story notebook in notebooks/ at most once per test session and share the result.

Both tests/test_notebooks.py (the notebook runs, shows its figures, explorers and tables) and
tests/test_notebook_claims.py (the numbers behind its prose) need the executed notebook. Executing
one takes tens of seconds, so :func:`executed` runs it once, headlessly with nbclient, one notebook
after the other (never in parallel), from a scratch copy in a session temporary folder so that the
committed file is never rewritten, and caches the executed ``nbformat`` object (or the failure) for
every later caller in the same process.

The notebooks use the default zoo cache (~/.cache/kfac_lens/zoo or $KFAC_LENS_ZOO): the first run
trains the quick networks (about a minute each; a few minutes for the training comparison on two
cores), later runs load them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
CELL_TIMEOUT = 900  # s; generous, the first run may train a zoo network inside a cell
RUN_TIMEOUT = 4 * CELL_TIMEOUT  # for a test that may be the one executing a notebook
KEY_NUMBERS_TAG = "key-numbers"  # the tag of the cell that displays a notebook's key numbers as JSON

_RUNS: dict[str, nbformat.NotebookNode | BaseException] = {}


def kernel_env() -> dict[str, str]:
    """The test process's environment minus MPLBACKEND (exporting Agg into the kernel replaces the
    inline backend and the figures vanish from the outputs), with KFAC_LENS_NOTEBOOK_DATA=digits."""
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)
    env.setdefault("KFAC_LENS_NOTEBOOK_DATA", "digits")  # 05_your_own_network trains on the offline digits
    return env


def executed(name: str, tmp_path_factory: pytest.TempPathFactory) -> nbformat.NotebookNode:
    """The notebook ``notebooks/<name>`` executed top to bottom, once per session.

    The executed scratch copy is also written next to the copy it ran from (under pytest's session
    temporary folder), for a look when something is off. If the execution failed, the first caller
    gets the original error (a ``CellExecutionError`` names the cell) and later callers fail at once
    instead of executing the notebook again.
    """
    if name in _RUNS:
        run = _RUNS[name]
        if isinstance(run, BaseException):
            pytest.fail(f"{name} failed when it was executed earlier in this session: "
                        f"{type(run).__name__}: {str(run)[-2000:]}", pytrace=False)
        return run
    workdir = tmp_path_factory.mktemp(Path(name).stem)
    work = workdir / name
    shutil.copy(NOTEBOOK_DIR / name, work)
    nb = nbformat.read(work, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        startup_timeout=120,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    try:
        client.execute(env=kernel_env())  # raises CellExecutionError on the first failing cell
    except BaseException as exc:
        _RUNS[name] = exc
        raise
    finally:
        nbformat.write(nb, work)
    _RUNS[name] = nb
    return nb


def key_numbers(nb: nbformat.NotebookNode) -> dict:
    """The JSON dict that the cell tagged ``key-numbers`` displayed (its ``application/json`` output)."""
    cells = [c for c in nb.cells if KEY_NUMBERS_TAG in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {KEY_NUMBERS_TAG!r}, found {len(cells)}"
    data = [o["data"]["application/json"] for o in cells[0].get("outputs", [])
            if "application/json" in o.get("data", {})]
    assert len(data) == 1, f"the {KEY_NUMBERS_TAG!r} cell displayed {len(data)} JSON outputs, expected 1"
    return dict(data[0])
