"""Griffe extension for the API reference: Sphinx roles and "docs/math.md §N" become links, reST tables tables.

The docstrings are written in Markdown-compatible reST-lite: double backticks (``x``) are valid Markdown
code spans, but Sphinx roles such as :func:`mats_to_vec` or :class:`~kfac_lens.nets.NetworkView` are not.
This extension, run by mkdocstrings-python once the package is loaded, replaces every role by an
*optional* cross-reference to the object it names, resolved the way Sphinx would (the object's own
members, then the enclosing class and module, then absolute dotted paths):

    :func:`mats_to_vec`  ->  <autoref identifier="kfac_lens.nets.mats_to_vec" optional>`mats_to_vec`</autoref>

mkdocs-autorefs turns it into a link when the object is rendered in the API reference, and into plain
code when it is not (a private helper, say) -- without a warning, so the strict build stays strict only
for the references the documentation writes itself. A role whose target cannot be resolved at all
becomes plain code.

A citation "docs/math.md §N" becomes a link to that section of the mathematics page (its heading's
anchor, read from docs/math.md). That link is *not* optional: citing a section the page does not
have fails ``mkdocs build --strict``.

reST "simple tables" (columns framed by lines of ``=====  ====``) become Markdown tables.

The docstrings in the source are not touched.
"""

from __future__ import annotations

import re
from pathlib import Path

import griffe

MATH_PAGE = Path(__file__).resolve().parents[1] / "math.md"
MATH_CITATION = re.compile(r"docs/math\.md §(\d+)")
MATH_HEADING = re.compile(r"^## §(\d+) .*\{ *#([\w-]+) *\}\s*$", re.M)

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):`(~?)([A-Za-z_][\w.]*)(?:\(\))?`")


RST_BORDER = re.compile(r"^ *=+(?: +=+)+ *$")


def rst_tables_to_markdown(text: str) -> str:
    """Rewrite reST simple tables as Markdown tables; anything that does not parse is left as it is.

    A table is a border line, rows, a border, and either the end of the table or (with a header) more
    rows and a closing border. Columns are the border's runs of ``=``; the last one runs to the end of
    the line. A row whose first cell is empty continues the row above it.
    """
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not RST_BORDER.match(lines[i]):
            out.append(lines[i])
            i += 1
            continue
        border = lines[i].rstrip()
        starts = [m.start() for m in re.finditer(r"=+", border)]
        groups: list[list[str]] = [[]]
        j = i + 1
        while j < len(lines):
            if lines[j].rstrip() == border:
                if j + 1 < len(lines) and lines[j + 1].strip() and not RST_BORDER.match(lines[j + 1]) \
                        and len(groups) == 1:
                    groups.append([])  # the header's underline: body rows follow
                    j += 1
                    continue
                break
            groups[-1].append(lines[j])
            j += 1
        if j >= len(lines) or not groups[-1]:
            out.append(lines[i])  # no closing border: not a table
            i += 1
            continue
        rows: list[list[str]] = []
        for line in [row for group in groups for row in group]:
            bounds = [*starts[1:], None]
            cells = [line[a:b].strip() if a < len(line) else "" for a, b in zip(starts, bounds)]
            if rows and not cells[0]:
                rows[-1] = [f"{old} {new}".strip() for old, new in zip(rows[-1], cells)]
            else:
                rows.append(cells)
        # Markdown needs a header row: the reST header, or else the first row stands in
        header, body = rows[0], rows[1:]
        out += ["", _table_row(header), "|" + "---|" * len(header), *(_table_row(r) for r in body), ""]
        i = j + 1
    return "\n".join(out)


def _table_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def math_anchors(text: str | None = None) -> dict[str, str]:
    """{"N": anchor} for the "## §N ... { #anchor }" headings of docs/math.md."""
    text = MATH_PAGE.read_text(encoding="utf-8") if text is None else text
    return dict(MATH_HEADING.findall(text))


def link_math_citations(text: str, anchors: dict[str, str]) -> str:
    """Turn each "docs/math.md §N" into an autorefs link to §N's heading (to "math-N" when §N is missing,
    which the strict build reports as a broken reference)."""
    return MATH_CITATION.sub(lambda m: f"[docs/math.md §{m.group(1)}][{anchors.get(m.group(1), 'math-' + m.group(1))}]",
                             text)


def _final(obj):
    """The object an alias points to (None when it leads outside the loaded packages)."""
    try:
        return obj.final_target if obj.is_alias else obj
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _member(scope, dotted: str):
    """``scope``'s member at the dotted path ``dotted`` (aliases followed), or None."""
    obj = scope
    for part in dotted.split("."):
        obj = _final(obj)
        if obj is None:
            return None
        try:
            obj = obj.members[part]
        except (KeyError, AttributeError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None
    return _final(obj)


def _resolve(name: str, where, collection):
    """Resolve a role's target as Sphinx does: from ``where`` outwards, then as an absolute path."""
    scope = where
    while scope is not None:
        found = _member(scope, name)
        if found is not None:
            return found
        scope = scope.parent
    head, _, rest = name.partition(".")
    try:
        top = collection[head]
    except KeyError:
        return None
    return _member(top, rest) if rest else _final(top)


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of the loaded package (see the module docstring).

    It also leaves out of the reference the attributes that are only assigned inside methods
    (``self.x = ...``) and have no docstring: they are implementation details, and listing each one with
    its assignment would bury the documented API. Documented ones, dataclass fields, class attributes
    and module constants stay.
    """

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        for obj in list(_walk(pkg)):
            if obj.is_class:
                methods = [(m.lineno or 0, m.endlineno or 0) for m in obj.members.values()
                           if not m.is_alias and m.is_function]
                for name, member in list(obj.members.items()):
                    if (not member.is_alias and member.is_attribute and member.docstring is None
                            and any(lo <= (member.lineno or -1) <= hi for lo, hi in methods)):
                        del obj.members[name]  # assigned in a method: self.x = ...
        anchors = math_anchors()
        for obj in _walk(pkg):
            if obj.docstring is None:
                continue
            text = obj.docstring.value
            if ":" in text:
                text = ROLE.sub(lambda m, o=obj: self._replace(m, o, loader), text)
            if "docs/math.md" in text:
                text = link_math_citations(text, anchors)
            if "==" in text:
                text = rst_tables_to_markdown(text)
            obj.docstring.value = text

    @staticmethod
    def _replace(match: re.Match, obj, loader: griffe.GriffeLoader) -> str:
        tilde, name = match.group(1), match.group(2)
        shown = name.rsplit(".", 1)[-1] if tilde else name
        target = _resolve(name, obj, loader.modules_collection)
        if target is None:
            return f"`{shown}`"
        return f'<autoref identifier="{target.path}" optional>`{shown}`</autoref>'


def _walk(obj):
    """The object and all its (non-alias) members, depth first."""
    yield obj
    for member in list(obj.members.values()):
        if not member.is_alias:
            yield from _walk(member)
