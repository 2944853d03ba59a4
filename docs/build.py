"""Build the documentation site in one command: the notebooks executed, then ``mkdocs build --strict``.

    python docs/build.py [--site DIR] [--executed DIR] [--data digits|mnist]     (or: ./kfac-lens docs …)

The notebooks in ``notebooks/`` are committed without outputs. This script executes each one (nbclient,
one after the other, in a scratch folder, so nothing in the checkout is rewritten), hands the executed
copies to the build through ``$KFAC_LENS_DOCS_NOTEBOOKS`` (read by ``docs/_hooks/notebooks.py``) and
builds the site with warnings as errors, so the pages show every figure, table and number. ``--executed
DIR`` builds from notebooks already executed into DIR/notebooks/ (the test suite passes the ones it has just
run).
``--data`` chooses the notebooks' data: ``digits`` (offline, quick) or ``mnist`` (default: what each
notebook picks by itself). Needs the ``[dev]`` extras.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
ENV_VAR = "KFAC_LENS_DOCS_NOTEBOOKS"
CELL_TIMEOUT_S = 1800


def execute_notebooks(dest: Path, data: str | None = None) -> Path:
    """Execute every ``notebooks/*.ipynb`` into ``dest/notebooks/`` (each run in a scratch folder of its own);
    returns ``dest``."""
    import nbformat
    from nbclient import NotebookClient

    (dest / "notebooks").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # (Agg would hide the inline figures)
    if data is not None:
        env["KFAC_LENS_NOTEBOOK_DATA"] = data
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        work = Path(tempfile.mkdtemp(prefix=path.stem + "_", dir=dest))
        nb = nbformat.read(path, as_version=4)
        print(f"docs: executing {path.name} …", flush=True)
        NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", allow_errors=False,
                       resources={"metadata": {"path": str(work)}}).execute(env=env)
        nbformat.write(nb, dest / "notebooks" / path.name)
        shutil.rmtree(work, ignore_errors=True)
    return dest


def build(site: Path, executed: Path) -> int:
    """``mkdocs build --strict`` of the repository's mkdocs.yml into ``site``, notebooks from ``executed``."""
    missing = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb") if not (executed / "notebooks" / p.name).is_file())
    if missing:
        raise SystemExit(f"docs: --executed {executed} lacks {', '.join(missing)}; execute them first "
                         "(omit --executed).")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", **{ENV_VAR: str(executed.resolve())})
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
           "--site-dir", str(site.resolve())]
    return subprocess.call(cmd, env=env)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="docs/build.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", type=Path, default=ROOT / "site", help="output folder (default: site/)")
    parser.add_argument("--executed", type=Path, default=None,
                        help="build from the notebooks already executed into DIR/notebooks/")
    parser.add_argument("--data", choices=("digits", "mnist"), default=None,
                        help="the notebooks' data (default: each notebook's own choice)")
    args = parser.parse_args(argv)
    if args.executed is not None:
        return build(args.site, args.executed)
    with tempfile.TemporaryDirectory(prefix="kfac_lens_docs_") as tmp:
        return build(args.site, execute_notebooks(Path(tmp), args.data))


if __name__ == "__main__":
    sys.exit(main())
