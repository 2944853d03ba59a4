"""MkDocs hook: fill ``<!-- kfac-lens-help: ARGS -->`` markers with the output of ``kfac-lens ARGS --help``.

The command-line page shows each subcommand's ``--help`` text as the installed CLI prints it, so the
page cannot drift from the argument parsers. The parsers run in-process (``kfac_lens.cli.main``);
a command whose help cannot be produced is a build warning, which ``mkdocs build --strict`` turns
into an error.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shlex
import sys
from pathlib import Path

MARKER = re.compile(r"^<!-- kfac-lens-help: (?P<args>[^>]*?) -->$", re.M)
WIDTH = "100"  # argparse wraps at $COLUMNS

log = logging.getLogger("mkdocs.hooks.cli_help")


def _help(args: str, root: Path) -> str | None:
    if str(root) not in sys.path:  # the checkout being documented, whatever else is installed
        sys.path.insert(0, str(root))
    from kfac_lens.cli import main

    out = io.StringIO()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            try:
                main([*shlex.split(args), "--help"])
            except SystemExit as exc:
                if exc.code not in (0, None):
                    return None
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return out.getvalue().rstrip() or None


def on_page_markdown(markdown: str, page, config, files) -> str:
    def replace(match: re.Match) -> str:
        args = match.group("args").strip()
        text = _help(args, Path(config.config_file_path).resolve().parent)
        if text is None:
            log.warning("%s: `kfac-lens %s --help` printed no help", page.file.src_uri, args)
            return match.group(0)
        return f"```text\n$ kfac-lens {args} --help\n{text}\n```"

    return MARKER.sub(replace, markdown)
