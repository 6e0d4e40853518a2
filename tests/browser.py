"""Headless Chromium for the report tests: Debian's `chromium` driven by Playwright (its own
browser download is never used), started with the flags a closed, root-run machine needs."""

from __future__ import annotations

import os
import shutil

CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def missing_reason() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if chromium_path() is None:
        return "no Chromium on this machine (apt-get install chromium; .ci/run installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -e '.[test]')"
    return None


def open_page(path: str, screenshot: str | None = None, width: int = 1400) -> dict:
    """Load a local HTML file in headless Chromium; return what the tests check: every image's
    naturalWidth, the text of every table row, and the page title. Saves a full-page screenshot."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.goto("file://" + os.path.abspath(path), wait_until="load")
            info = page.evaluate("""() => ({
                title: document.title,
                images: Array.from(document.images).map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0})),
                rows: Array.from(document.querySelectorAll('tr')).map(r => r.innerText),
                svgs: document.querySelectorAll('svg').length,
                scripts: document.querySelectorAll('script').length,
            })""")
            if screenshot:
                page.screenshot(path=screenshot, full_page=True)
        finally:
            browser.close()
    return info
