"""MkDocs hook: render the repository's ``notebooks/*.ipynb`` as pages ``notebooks/<name>/``.

MkDocs only reads files under ``docs_dir``; the notebooks live in ``notebooks/`` at the repository root
(where the tests and JupyterLab use them). Rather than a symlink (which a Windows checkout may not
create), this hook adds each notebook to the build's file list straight from ``notebooks/``, before
mkdocs-jupyter turns ``.ipynb`` files into pages. Nothing is copied into ``docs/``.

With ``$KFAC_LENS_DOCS_NOTEBOOKS`` set to a folder (``docs/build.py`` does it), each notebook is taken from
its ``notebooks/`` subfolder instead: the same notebooks, executed, so that the pages show their outputs.
"""

from __future__ import annotations

import os
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File


@event_priority(100)  # before mkdocs-jupyter's on_files, which wraps every .ipynb it is given
def on_files(files, config):
    root = Path(config.config_file_path).resolve().parent
    executed = os.environ.get("KFAC_LENS_DOCS_NOTEBOOKS")
    for notebook in sorted((root / "notebooks").glob("*.ipynb")):
        uri = f"notebooks/{notebook.name}"
        if files.get_file_from_path(uri) is not None:
            continue
        src_dir = root
        if executed:  # a folder holding notebooks/<name>.ipynb, executed
            src_dir = Path(executed)
            if not (src_dir / uri).is_file():
                raise PluginError(f"KFAC_LENS_DOCS_NOTEBOOKS={executed} has no executed {uri}")
        f = File(uri, src_dir=str(src_dir), dest_dir=config.site_dir, use_directory_urls=config.use_directory_urls)
        files.append(f)
    return files
