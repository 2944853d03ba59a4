// MathJax 3 configuration, read by MathJax when the reader's browser loads it (extra_javascript in
// mkdocs.yml); the build itself never fetches MathJax. This script runs at the end of <body>, so it can
// look at the page it configures.
//
// - Markdown pages: pymdownx.arithmatex (generic mode) wraps each formula in class="arithmatex" with
//   \( … \) or \[ … \] delimiters; only those elements are typeset, so a "$" in prose or in an API
//   docstring is never taken for math.
// - Notebook pages (mkdocs-jupyter, inside .jupyter-wrapper): the Markdown cells use Jupyter's $ … $ and
//   $$ … $$, nested in ordinary <p> and <li> elements, so the whole page is searched except the site's
//   header, navigation and footer (code cells and text outputs are <pre>, which MathJax always skips).
const isNotebook = document.querySelector(".jupyter-wrapper") !== null;

window.MathJax = {
  tex: {
    inlineMath: isNotebook ? [["$", "$"], ["\\(", "\\)"]] : [["\\(", "\\)"]],
    displayMath: isNotebook ? [["$$", "$$"], ["\\[", "\\]"]] : [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: isNotebook
    ? { ignoreHtmlClass: "tex2jax_ignore|mathjax_ignore|md-header|md-sidebar|md-footer" }
    : { ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex" },
};

// Typeset again whenever Material for MkDocs swaps the page content in place.
document$.subscribe(() => {
  if (window.MathJax && window.MathJax.typesetPromise) {
    MathJax.startup.output.clearCache();
    MathJax.typesetClear();
    MathJax.texReset();
    MathJax.typesetPromise();
  }
});
