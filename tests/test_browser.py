"""A real browser drives the DampingExplorer and the ApproximationExplorer served by Voila (docs/testing.md,
"Browser").

One Voila server per session serves scratch copies of ``tests/browser/*.ipynb`` on 127.0.0.1. Debian's
Chromium (``/usr/bin/chromium``, never a Playwright download) opens each page. On the DampingExplorer the
test moves the γ slider with the keyboard and checks that the kernel redrew the figure: the ``<img>``
``src`` changes, the pixels change, and the γ readout and the metrics table follow the slider. Then it
switches the inverse dropdown to one row and checks the image shrinks. On the ApproximationExplorer the
slider must redraw the spectrum and the error table, and choosing EK-FAC the matrix view. Screenshots are
written to ``test-artifacts/browser/``.

The fixture warms the zoo cache in this process first (``zoo.example_network("quick")``), so Voila's
kernel only loads the network; with a warm cache the whole test takes well under a minute.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
PAGES = Path(__file__).resolve().parent / "browser"
PAGE_NOTEBOOK = PAGES / "damping_explorer.ipynb"
APPROXIMATION_PAGE = PAGES / "approximation_explorer.ipynb"
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SERVER_START_S = 90  # Voila up and answering
WIDGET_READY_S = 180  # kernel start + the notebook's cell (load the network, build the study, first draw)
REDRAW_S = 90  # the kernel redraws after the slider moved


def _unavailable(reason: str):
    """Fail under CI (the project's test command installs Chromium), skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set; `./kfac-lens test` installs Debian's chromium as root)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium_ready():
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        _unavailable(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("the playwright Python package is not installed (pip install playwright)")
    return CHROMIUM


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _warm_zoo() -> str:
    """Train or load the quick example network here, so Voila's kernel only loads it. MNIST is fetched
    the first time; if no source works, fall back to the offline 8×8 digits variant."""
    from kfac_lens import zoo
    from kfac_lens.data import DataUnavailableError

    try:
        zoo.example_network("quick", "mnist", progress=False)
        return "mnist"
    except DataUnavailableError:
        zoo.example_network("quick", "digits", progress=False)
        return "digits"


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and its kernels: they share the process group started for this PID."""
    if proc.poll() is None:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    # kernels left in the group after the server exited
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture(scope="session")
def voila_url(chromium_ready, tmp_path_factory):
    """One Voila server on a free 127.0.0.1 port serving scratch copies of the explorer notebooks;
    yields the DampingExplorer page's URL (the others lie beside it) and stops the server (by its recorded
    PID/process group) at teardown."""
    data = _warm_zoo()
    serve = tmp_path_factory.mktemp("voila")
    for page in PAGES.glob("*.ipynb"):
        shutil.copy(page, serve / page.name)
    port = _free_port()
    log_path = serve / "voila.log"
    env = dict(os.environ, KFAC_LENS_BROWSER_DATA=data, JUPYTER_PLATFORM_DIRS="1")
    env.pop("MPLBACKEND", None)
    cmd = [sys.executable, "-m", "voila", "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1",
           "--show_tracebacks=True", str(serve)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=serve, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    pid = proc.pid
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Voila exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(base + "/", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Voila did not answer on {base} in {SERVER_START_S} s:\n"
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"{base}/voila/render/{PAGE_NOTEBOOK.name}"
    finally:
        _stop(proc)
        assert proc.poll() is not None, f"Voila (pid {pid}) is still running"


@pytest.fixture
def browser_page(voila_url):
    """A Chromium page (Debian's build) with outside requests blocked, and the list of its uncaught
    JavaScript errors."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1300, "height": 1800})
            pg = context.new_page()
            pg.route("https://**/*", lambda route: route.abort())  # CDN fonts cannot be reached here
            errors: list[str] = []
            pg.on("pageerror", lambda exc: errors.append(str(exc)))
            yield pg, errors
            pg.close()  # Voila shuts the page's kernel down
            context.close()
        finally:
            browser.close()


def _decode(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def _gamma_in_table(text: str) -> float:
    m = re.search(r"γ = ([0-9.eE+-]+)", text)
    assert m, f"no 'γ = …' in the metrics table text: {text[:300]!r}"
    return float(m.group(1))


def _caught_up(readout, caption):
    """A condition: the kernel drew the γ the slider now shows (later key presses queue more redraws)."""
    def drawn() -> bool:
        try:
            target = float(readout.inner_text().strip())
            return abs(_gamma_in_table(caption.inner_text()) - target) <= 0.01 * target
        except (AssertionError, ValueError):
            return False
    return drawn


def _wait(what: str, cond, timeout: float, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def test_damping_explorer_slider_redraws_in_a_real_browser(browser_page, voila_url):
    page, page_errors = browser_page
    t0 = time.perf_counter()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.goto(voila_url, wait_until="domcontentloaded", timeout=60_000)

    img = page.locator("img.widget-image").first
    handle = page.locator(".widget-slider .noUi-handle").first
    readout = page.locator(".widget-slider .widget-readout").first
    table = page.locator(".widget-html table.kfac-lens-metrics").first
    caption = page.locator(".widget-html", has=page.locator("table.kfac-lens-metrics")).first
    try:
        img.wait_for(state="visible", timeout=WIDGET_READY_S * 1000)
        handle.wait_for(state="visible", timeout=30_000)
        table.wait_for(state="visible", timeout=30_000)
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "damping_explorer_failed_load.png"), full_page=True)
        raise
    assert "Traceback" not in page.inner_text("body"), "the notebook raised in Voila's kernel"
    t_ready = time.perf_counter() - t0

    def img_src() -> str:
        return img.get_attribute("src") or ""

    src_before = img_src()
    assert src_before.startswith(("blob:", "data:image/png")), f"unexpected <img> src {src_before[:60]!r}"
    size_before = img.evaluate("e => [e.naturalWidth, e.naturalHeight]")
    shown_width = img.evaluate("e => e.clientWidth")
    assert size_before[0] > 300 and size_before[1] > 300, f"the figure did not load: {size_before}"
    readout_before = readout.inner_text().strip()
    table_before = table.inner_text()
    gamma_before = _gamma_in_table(caption.inner_text())
    assert float(readout_before) == pytest.approx(gamma_before, rel=0.01)
    shot_before = ARTIFACTS / "damping_explorer_before.png"
    page.screenshot(path=str(shot_before), full_page=True)
    img_before = img.screenshot()

    # Move the slider with the keyboard: 8 steps of 0.05 decades to the left (smaller γ).
    _move_slider_left(page, 8)

    _wait("the slider readout to change", lambda: readout.inner_text().strip() != readout_before, 10)
    _wait("the <img> src to change", lambda: img_src() != src_before, REDRAW_S)

    _wait("the metrics table to reach the slider's γ", _caught_up(readout, caption), REDRAW_S)
    # then until the image stops changing (the last queued redraw has arrived)
    last, stable_since = img_src(), time.monotonic()
    while time.monotonic() - stable_since < 1.5:
        time.sleep(0.25)
        now = img_src()
        if now != last:
            last, stable_since = now, time.monotonic()
        assert time.monotonic() - t0 < 300, "the image never settled"

    readout_after = readout.inner_text().strip()
    gamma_after = _gamma_in_table(caption.inner_text())
    table_after = table.inner_text()
    src_after = img_src()
    shot_after = ARTIFACTS / "damping_explorer_after.png"
    page.screenshot(path=str(shot_after), full_page=True)
    img_after = img.screenshot()
    (ARTIFACTS / "damping_explorer_img_before.png").write_bytes(img_before)
    (ARTIFACTS / "damping_explorer_img_after.png").write_bytes(img_after)

    # The slider moved down by about 8 × 0.05 decades, and the kernel followed it.
    assert gamma_after < gamma_before, (readout_before, readout_after)
    assert 0.3 <= np.log10(gamma_before / gamma_after) <= 0.5  # (the first step snaps to the 0.05 grid)
    assert float(readout_after) == pytest.approx(gamma_after, rel=0.01)
    assert src_after != src_before
    assert table_after != table_before, "the metrics table did not change"
    # ... and the pixels changed: the figure's title and panels, not just the URL.
    a, b = _decode(img_before), _decode(img_after)
    assert a.shape == b.shape, (a.shape, b.shape)
    changed = np.any(a != b, axis=-1).mean()
    assert changed > 0.005, f"only {changed:.4%} of the figure's pixels changed"
    assert a.std() > 10 and b.std() > 10, "a blank figure"
    page_a, page_b = _decode(shot_before.read_bytes()), _decode(shot_after.read_bytes())
    assert page_a.shape != page_b.shape or np.any(page_a != page_b)

    # One row only: the dropdown hides the block-diagonal row and the figure shrinks to fit.
    src_two_rows = src_after
    page.locator(".widget-dropdown select").first.select_option("block-tridiagonal")
    _wait("the one-row figure", lambda: img_src() != src_two_rows, REDRAW_S)
    _wait("the new image to load", lambda: img.evaluate("e => e.complete && e.naturalHeight > 0"), 10)
    size_one_row = img.evaluate("e => [e.naturalWidth, e.naturalHeight]")
    shot_one_row = ARTIFACTS / "damping_explorer_one_row.png"
    page.screenshot(path=str(shot_one_row), full_page=True)
    assert size_one_row[0] == size_before[0] and size_one_row[1] < 0.75 * size_before[1], (
        size_before, size_one_row)

    elapsed = time.perf_counter() - t0
    print(f"\nfigure PNG {size_before[0]}x{size_before[1]} px, shown {shown_width} px wide; "
          f"widget ready after {t_ready:.1f} s, test body {elapsed:.1f} s; γ {readout_before} -> "
          f"{readout_after}, {changed:.1%} of the figure's pixels changed; page errors: {page_errors}")
    for p in (shot_before, shot_after, shot_one_row):
        print(f"screenshot: {p}")


def _move_slider_left(page, steps: int = 8) -> None:
    handle = page.locator(".widget-slider .noUi-handle").first
    handle.focus()
    for _ in range(steps):
        page.keyboard.press("ArrowLeft")
        time.sleep(0.05)


def test_approximation_explorer_follows_the_slider_and_the_choice_in_a_real_browser(browser_page, voila_url):
    """The γ slider redraws the spectrum and the error table; choosing another approximation redraws the
    matrix view (the second image)."""
    page, page_errors = browser_page
    t0 = time.perf_counter()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.goto(voila_url.replace(PAGE_NOTEBOOK.name, APPROXIMATION_PAGE.name), wait_until="domcontentloaded",
              timeout=60_000)
    spectrum, matrices = page.locator("img.widget-image").nth(0), page.locator("img.widget-image").nth(1)
    readout = page.locator(".widget-slider .widget-readout").first
    caption = page.locator(".widget-html", has=page.locator("table.kfac-lens-metrics")).first
    try:
        matrices.wait_for(state="visible", timeout=WIDGET_READY_S * 1000)
        caption.wait_for(state="visible", timeout=30_000)
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "approximation_explorer_failed_load.png"), full_page=True)
        raise
    assert "Traceback" not in page.inner_text("body"), "the notebook raised in Voila's kernel"
    table_text = caption.inner_text()
    for name in ("kfac", "kfac-blockdiag", "kfac-tridiag", "ekfac", "diagonal", "blockdiag-exact"):
        assert name in table_text, f"{name} is missing from the error table"
    gamma_before, readout_before = _gamma_in_table(table_text), readout.inner_text().strip()
    assert float(readout_before) == pytest.approx(gamma_before, rel=0.01)
    src_spectrum, src_matrices = spectrum.get_attribute("src"), matrices.get_attribute("src")
    shot_spectrum = spectrum.screenshot()

    _move_slider_left(page)
    _wait("the slider readout to change", lambda: readout.inner_text().strip() != readout_before, 10)

    _wait("the error table to reach the slider's γ", _caught_up(readout, caption), REDRAW_S)
    _wait("the spectrum to be redrawn", lambda: spectrum.get_attribute("src") != src_spectrum, REDRAW_S)
    time.sleep(1.5)  # (any redraw still queued by the key presses)
    gamma_after = _gamma_in_table(caption.inner_text())
    assert 0.3 <= np.log10(gamma_before / gamma_after) <= 0.5, (gamma_before, gamma_after)
    assert caption.inner_text() != table_text, "the error table did not change"
    a, b = _decode(shot_spectrum), _decode(spectrum.screenshot())
    assert a.shape == b.shape and np.any(a != b, axis=-1).mean() > 0.005, "the spectrum's pixels did not change"
    page.screenshot(path=str(ARTIFACTS / "approximation_explorer_after_slider.png"), full_page=True)

    # The matrix view follows the first chosen approximation (γ moves leave it alone: F_a is undamped).
    assert matrices.get_attribute("src") == src_matrices
    page.locator(".widget-select-multiple select").first.select_option(["ekfac"])
    _wait("the matrix view of EK-FAC", lambda: matrices.get_attribute("src") != src_matrices, REDRAW_S)
    page.screenshot(path=str(ARTIFACTS / "approximation_explorer_ekfac.png"), full_page=True)
    assert not page_errors, page_errors
    print(f"\napproximation explorer: γ {gamma_before:.3g} -> {gamma_after:.3g}; test body "
          f"{time.perf_counter() - t0:.1f} s")

