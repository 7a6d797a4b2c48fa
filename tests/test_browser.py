"""The built book, checked the way a reader meets it: in a real (headless) browser, offline.

`make test-browser` builds the book first (`make book-strict`), then runs this file. For every page
in `_toc.yml` it opens the page from `_build/html` (served on 127.0.0.1) in headless Chromium and
asserts that

- the page loads, and every resource it loads comes from the local server (no CDN, no network);
- every ``<img>`` has a non-zero natural width;
- math is typeset by MathJax (every ``.math`` element holds an ``mjx-container``, no TeX errors);
- every link into the site points at a file that exists, and at an anchor that exists in it;
- the browser console has no errors.

One screenshot per page is saved under ``_build/screenshots/`` for review.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make system-deps`` installs them).
Set ``FLBOOK_HTML_DIR`` to check a build in another folder.
"""

from __future__ import annotations

import functools
import html.parser
import http.server
import os
import re
import shutil
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HTML_DIR = Path(os.environ.get("FLBOOK_HTML_DIR", ROOT / "_build" / "html")).resolve()
SCREENSHOT_DIR = HTML_DIR.parent / "screenshots"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run",
    # Offline: any host other than the local server fails to resolve, so a page that needs the
    # network shows up as a failed request (and a console error), not as a silent download.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--window-size=1280,900", "--hide-scrollbars",
]
MAX_SCREENSHOT_HEIGHT = 8000   # px; long chapters are cut here (the top is what a reader sees first)
MATH_TIMEOUT_S = 30


# ---- the pages: read from _toc.yml, so new chapters are covered without touching this file --------

def _toc_files(node) -> list[str]:
    files = []
    if isinstance(node, dict):
        if "file" in node:
            files.append(node["file"])
        if "root" in node:
            files.append(node["root"])
        for key in ("parts", "chapters", "sections"):
            for child in node.get(key, []) or []:
                files.extend(_toc_files(child))
    return files


def toc_pages() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf8"))
    pages = []
    for f in _toc_files(toc):
        page = re.sub(r"\.(md|ipynb|rst)$", "", f)
        if page not in pages:
            pages.append(page)
    return pages


PAGES = toc_pages()


# ---- static checks on the HTML ----------------------------------------------------------------------

class _Ids(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("id", "name") and value:
                self.ids.add(value)


@functools.lru_cache(maxsize=None)
def anchors_in(path: Path) -> frozenset[str]:
    parser = _Ids()
    parser.feed(path.read_text(encoding="utf8", errors="replace"))
    return frozenset(parser.ids)


def require_build() -> None:
    if not (HTML_DIR / "index.html").is_file():
        pytest.fail(f"no built book in {HTML_DIR}: build it first with `make book-strict` "
                    "(or `jupyter-book build . --builder html`)", pytrace=False)


def test_every_toc_page_was_built():
    require_build()
    missing = [p for p in PAGES if not (HTML_DIR / f"{p}.html").is_file()]
    assert not missing, f"pages in _toc.yml with no HTML in {HTML_DIR}: {missing}"


_REMOTE_ASSET = re.compile(
    r"<(?:script|img|iframe|source|audio|video)\b[^>]*\bsrc=[\"'](?:https?:)?//[^\"']+[\"']"
    r"|<link\b[^>]*\brel=[\"'](?:stylesheet|preload|modulepreload|icon)[\"'][^>]*\bhref=[\"'](?:https?:)?//[^\"']+"
    r"|<link\b[^>]*\bhref=[\"'](?:https?:)?//[^\"']+[\"'][^>]*\brel=[\"'](?:stylesheet|preload|modulepreload|icon)",
    re.IGNORECASE)


def test_no_page_loads_assets_from_the_network():
    """Scripts, styles, images and fonts all come from _build/html (links to other sites are fine)."""
    require_build()
    offenders = {}
    for page in sorted(HTML_DIR.rglob("*.html")):
        hits = _REMOTE_ASSET.findall(page.read_text(encoding="utf8", errors="replace"))
        if hits:
            offenders[str(page.relative_to(HTML_DIR))] = hits[:3]
    assert not offenders, f"pages that load assets from the network: {offenders}"
    mathjax = HTML_DIR / "_static" / "mathjax" / "tex-chtml.js"
    assert mathjax.is_file(), f"the local MathJax copy is missing: {mathjax}"


# ---- the browser -------------------------------------------------------------------------------------

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@pytest.fixture(scope="module")
def base_url():
    require_build()
    handler = functools.partial(_QuietHandler, directory=str(HTML_DIR))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.fail("headless Chromium and chromedriver are needed: install Debian's `chromium` and "
                    "`chromium-driver` (`make system-deps` does, as root)", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager never runs, so nothing is downloaded.
    drv = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    drv.set_page_load_timeout(60)
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    try:
        yield drv
    finally:
        drv.quit()


def _wait(drv, script: str, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if drv.execute_script(script):
            return True
        time.sleep(0.1)
    return False


def _local_target(url: str, base_url: str) -> tuple[Path, str] | None:
    """The file (and fragment) a site-internal URL points at, or None for other sites."""
    if not url.startswith(base_url + "/"):
        return None
    parts = urllib.parse.urlsplit(url)
    path = urllib.parse.unquote(parts.path).lstrip("/")
    target = HTML_DIR / path
    if path == "" or path.endswith("/"):
        target = target / "index.html"
    return target, urllib.parse.unquote(parts.fragment)


def _screenshot(drv, page: str) -> Path:
    import base64

    height = drv.execute_script("return Math.max(document.body.scrollHeight, "
                                "document.documentElement.scrollHeight)")
    height = int(min(max(height, 900), MAX_SCREENSHOT_HEIGHT))
    # Lay the page out in one tall viewport (sticky sidebars stay in place), capture, restore.
    drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                        {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False})
    try:
        drv.execute_script("window.scrollTo(0, 0);")
        time.sleep(0.3)
        shot = drv.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    finally:
        drv.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    out = SCREENSHOT_DIR / (page.replace("/", "__") + ".png")
    out.write_bytes(base64.b64decode(shot["data"]))
    return out


@pytest.mark.parametrize("page", PAGES)
def test_page_in_browser(page, base_url, driver):
    url = f"{base_url}/{page}.html"
    driver.get_log("browser")  # drop messages left over from the previous page
    driver.get(url)
    assert _wait(driver, "return document.readyState === 'complete'", 30), f"{page}: did not finish loading"
    assert driver.title and "404" not in driver.title, f"{page}: no page at {url} (title {driver.title!r})"
    assert driver.find_elements("css selector", "main, article"), f"{page}: no main content"

    # Images: load lazy ones too, then every <img> must have decoded to a real picture.
    driver.execute_script("document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; });")
    _wait(driver, "return Array.from(document.images).every(i => i.complete);", 20)
    broken = driver.execute_script(
        "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
        ".map(i => i.getAttribute('src').slice(0, 120));")
    assert not broken, f"{page}: images that did not load: {broken}"

    # Math: every .math element is typeset by MathJax, without TeX errors.
    n_math = driver.execute_script("return document.querySelectorAll('.math').length;")
    if n_math:
        done = _wait(driver, "return Array.from(document.querySelectorAll('.math'))"
                             ".every(e => e.querySelector('mjx-container'));", MATH_TIMEOUT_S)
        untypeset = driver.execute_script(
            "return Array.from(document.querySelectorAll('.math'))"
            ".filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 80));")
        assert done and not untypeset, f"{page}: math not typeset by MathJax: {untypeset[:5]}"
        errors = driver.execute_script(
            "return Array.from(document.querySelectorAll('mjx-merror'))"
            ".map(e => (e.getAttribute('data-mjx-error') || e.textContent).slice(0, 120));")
        assert not errors, f"{page}: TeX errors in math: {errors}"

    # Offline: every resource the page loaded came from the local server.
    remote = driver.execute_script(
        "return performance.getEntriesByType('resource').map(r => r.name)"
        ".filter(n => !n.startsWith(arguments[0]) && !n.startsWith('data:'));", base_url)
    assert not remote, f"{page}: resources from the network: {remote}"

    # Internal links: the target file exists, and so does the anchor in it.
    hrefs = driver.execute_script(
        "return Array.from(document.querySelectorAll('a[href]')).map(a => a.href);")
    bad_links = []
    for href in sorted(set(hrefs)):
        target = _local_target(href, base_url)
        if target is None:
            continue
        path, fragment = target
        if not path.is_file():
            bad_links.append(f"{href} (no file {path.relative_to(HTML_DIR)})")
        elif fragment and path.suffix == ".html" and fragment not in anchors_in(path):
            bad_links.append(f"{href} (no anchor #{fragment})")
    assert not bad_links, f"{page}: broken internal links: {bad_links}"

    shot = _screenshot(driver, page)
    assert shot.stat().st_size > 0

    # Console: no errors (failed loads, JavaScript exceptions, MathJax errors).
    errors = [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not errors, f"{page}: console errors: {errors}"
