"""MkDocs hook: render the repository's ``notebooks/*.ipynb`` as pages ``notebooks/<name>/``.

MkDocs only reads files under ``docs_dir``; the notebooks live in ``notebooks/`` at the repository root
(where the tests and JupyterLab use them). Rather than a symlink (which a Windows checkout may not
create), this hook adds each notebook to the build's file list straight from ``notebooks/``, before
mkdocs-jupyter turns ``.ipynb`` files into pages. Nothing is copied into ``docs/``.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File


@event_priority(100)  # before mkdocs-jupyter's on_files, which wraps every .ipynb it is given
def on_files(files, config):
    root = Path(config.config_file_path).resolve().parent
    for notebook in sorted((root / "notebooks").glob("*.ipynb")):
        uri = f"notebooks/{notebook.name}"
        if files.get_file_from_path(uri) is None:
            files.append(File(uri, src_dir=str(root), dest_dir=config.site_dir,
                              use_directory_urls=config.use_directory_urls))
    return files
