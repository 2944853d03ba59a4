"""The documentation builds, strictly, and its references hold.

``mkdocs build --strict`` (the one command that builds the site: docs/math.md, the CLI page, the
notebooks and the API reference generated from the docstrings) runs here in a subprocess, so a broken
cross-reference, a missing page or a docstring that mkdocstrings cannot render fails the test suite.
A second build with one deliberately broken reference proves that the strictness is real. The builds
read the repository and write only under pytest's tmp_path; they need no network.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml
from notebook_run import RUN_TIMEOUT, executed

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CONFIG = ROOT / "mkdocs.yml"
BUILD_TIMEOUT = 300  # seconds; a build takes about 15 s on two cores
# The site shows the notebooks executed: the first test may be the one that executes them.
pytestmark = pytest.mark.timeout(RUN_TIMEOUT)

# The sections of docs/math.md that docstrings cite as "docs/math.md §N", with their anchors.
MATH_SECTIONS = {1: "layout", 2: "fisher", 3: "factors", 4: "damping", 5: "inverses", 6: "cumulants",
                 7: "quadratic-model", 8: "adaptation", 9: "setups"}


def _mkdocs_build(config: Path, site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
    )


def _report(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stdout + proc.stderr).splitlines()
    return "\n".join(line for line in lines if not line.startswith("INFO"))[-6000:]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built by the one docs command, ``docs/build.py`` (``mkdocs build --strict`` of the repository's
    mkdocs.yml), from the notebooks as this test session executes them (shared with test_notebooks.py)."""
    work = tmp_path_factory.mktemp("docs_build")
    (work / "executed" / "notebooks").mkdir(parents=True)
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nbformat.write(executed(path.name, tmp_path_factory), work / "executed" / "notebooks" / path.name)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(  # cwd: caches (mkdocs-jupyter's) go to tmp
        [sys.executable, str(DOCS / "build.py"), "--site", str(work / "site"), "--executed", str(work / "executed")],
        cwd=work, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert proc.returncode == 0, f"`docs/build.py` (mkdocs build --strict) failed:\n{_report(proc)}"
    return work / "site"


def test_docs_build_strict(site):
    """Every page is written: the mathematics, the CLI, the notebooks and the API reference."""
    for page in ["index.html", "math/index.html", "cli/index.html", "testing/index.html", "api/index.html",
                 "api/kfac_lens/index.html",
                 "api/curvature/fisher/index.html", "api/curvature/inverses/index.html", "api/optim/kfac/index.html"]:
        assert (site / page).is_file(), page
    notebooks = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    for name in notebooks:
        page = site / "notebooks" / name / "index.html"
        assert page.is_file(), f"notebook {name} is not rendered"
        # rendered with its outputs: the figures are inline PNG images
        assert 'src="data:image/png;base64,' in page.read_text(encoding="utf-8"), f"{name} has no figure output"


def test_math_page_has_every_section_anchor(site):
    html = (site / "math" / "index.html").read_text(encoding="utf-8")
    for number, anchor in MATH_SECTIONS.items():
        heading = re.search(rf'<h2 id="{re.escape(anchor)}">(.*?)</h2>', html, re.S)
        assert heading, f"docs/math.md has no heading with id {anchor!r}"
        assert f"§{number} " in heading.group(1), f"the #{anchor} heading is not §{number}"
    for anchor in ("dtype-policy", "estimators", "neighbours", "appendix-i", "condition-number"):
        assert f'id="{anchor}"' in html, anchor


def test_api_reference_links_to_the_documented_objects(site):
    """Cross-references resolved to real anchors: the math page links one hop to the API pages."""
    math = (site / "math" / "index.html").read_text(encoding="utf-8")
    for target in ("api/curvature/fisher/#kfac_lens.curvature.fisher.exact_fisher",
                   "api/curvature/inverses/#kfac_lens.curvature.inverses.BlockTridiagonalInverse",
                   "api/curvature/operators/#kfac_lens.curvature.operators.check_condition",
                   "api/optim/schedules/#kfac_lens.optim.schedules.levenberg_marquardt"):
        assert f'href="../{target}"' in math, target
    fisher = (site / "api" / "curvature" / "fisher" / "index.html").read_text(encoding="utf-8")
    assert 'id="kfac_lens.curvature.fisher.exact_fisher"' in fisher


def test_broken_reference_fails_the_build(tmp_path):
    """The same configuration with one extra page holding a broken reference must not build."""
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks")
    (tmp_path / "docs" / "broken.md").write_text(
        "# Broken\n\nThis links to [a function that does not exist][kfac_lens.no_such_function].\n",
        encoding="utf-8")
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    config["nav"].append({"Broken": "broken.md"})
    config.pop("watch", None)  # `mkdocs serve` only, and relative to the repository
    for plugin in config["plugins"]:
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            plugin["mkdocstrings"]["handlers"]["python"]["paths"] = [str(ROOT)]  # the package stays where it is
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False),
                                         encoding="utf-8")
    proc = _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site", cwd=tmp_path)
    output = _report(proc)
    assert proc.returncode != 0, "a broken cross-reference did not fail `mkdocs build --strict`"
    assert "kfac_lens.no_such_function" in output, output
    # ... and it failed for that reason alone
    warnings = [line for line in output.splitlines() if line.startswith("WARNING")]
    assert warnings and all("no_such_function" in line for line in warnings), output


def test_docs_examples_run(tmp_path, monkeypatch):
    """The Python examples of the documentation run as written."""
    monkeypatch.chdir(tmp_path)
    blocks = [(md, block) for md in sorted(DOCS.rglob("*.md"))
              for block in re.findall(r"```python\n(.*?)```", md.read_text(encoding="utf-8"), re.S)]
    assert blocks, "the documentation should hold at least one Python example"
    for md, block in blocks:
        namespace: dict = {}
        exec(compile(block, str(md.relative_to(ROOT)), "exec"), namespace)
        if "terms" in namespace:  # Appendix B holds to rounding for the exact Fisher
            t = namespace["terms"]
            assert float(t.residual.norm() / t.difference.norm()) < 1e-10


def repository_markdown_names() -> set[str]:
    """Names of the Markdown files of the repository (build outputs and environments left out)."""
    names = set()
    for _folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in ("site", "node_modules")]
        names.update(f for f in files if f.endswith(".md"))
    return names


def test_docs_do_not_point_outside_the_repository():
    """Every Markdown file the docs name is one of the repository's, and no relative link leaves it."""
    known = repository_markdown_names()
    for path in [CONFIG, *sorted(p for p in DOCS.rglob("*") if p.is_file())]:
        text = path.read_text(encoding="utf-8")
        for name in set(re.findall(r"[\w.-]+\.md\b", text)):
            assert name in known, f"{path.relative_to(ROOT)} names {name}, which is not in the repository"
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            if "://" not in target and not target.startswith("mailto:"):
                resolved = (path.parent / target).resolve()
                assert resolved.is_relative_to(ROOT.resolve()), f"{path.relative_to(ROOT)} links outside: {target}"


def test_docstring_references_to_math_sections_exist():
    """Every "docs/math.md §N" in the package and the tests names a section that docs/math.md has."""
    headings = set(re.findall(r"^## §(\d+) ", (DOCS / "math.md").read_text(encoding="utf-8"), re.M))
    assert headings == {str(n) for n in MATH_SECTIONS}
    for path in sorted([*(ROOT / "kfac_lens").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]):
        for number in re.findall(r"docs/math\.md §(\d+)", path.read_text(encoding="utf-8")):
            assert number in headings, f"{path.relative_to(ROOT)} cites docs/math.md §{number}, which does not exist"


def test_every_module_has_an_api_page():
    """Each module of the package is rendered by a `::: module` directive of docs/api/ (add a page and a
    nav entry in mkdocs.yml for a new module)."""
    package = ROOT / "kfac_lens"
    modules = {".".join(("kfac_lens", *p.relative_to(package).with_suffix("").parts)).removesuffix(".__init__")
               for p in package.rglob("*.py") if not p.name.startswith("_") or p.name == "__init__.py"}
    rendered = {m for md in (DOCS / "api").rglob("*.md")
                for m in re.findall(r"^::: ([\w.]+)$", md.read_text(encoding="utf-8"), re.M)}
    assert modules - rendered == set(), f"modules without an API page: {sorted(modules - rendered)}"
    assert rendered - modules == set(), f"API pages for modules that do not exist: {sorted(rendered - modules)}"
