"""The HTML report in a real browser: Debian's Chromium driven by Playwright (never a
downloaded browser). Every image renders, nothing is fetched, nothing logs an error;
a screenshot is kept as a test artifact (test-artifacts/report.png)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.tiny_run import shared_run

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
# Quiet, offline Chromium: no sandbox (containers, root), no GPU, none of the background
# fetches (component updates, sync, field trials) that would show up as network requests.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def _browser_or_skip() -> str:
    path = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if path:
        return path
    why = "headless Chromium not installed (apt-get install chromium; .ci/run installs it)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{why}: the browser test must run in CI")
    pytest.skip(why)


@pytest.fixture(scope="module")
def report_html(tmp_path_factory):
    _browser_or_skip()
    path = shared_run(tmp_path_factory) / "report.html"
    assert path.is_file()
    return path


def test_report_renders_offline_in_chromium(report_html):
    from playwright.sync_api import sync_playwright

    url = report_html.resolve().as_uri()
    requests: list[str] = []
    console_errors: list[str] = []
    page_errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_browser_or_skip(), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.goto(url, wait_until="load")
            images = page.evaluate(
                "Array.from(document.images).map(i => ({w: i.naturalWidth, h: i.naturalHeight, done: i.complete, alt: i.alt}))"
            )
            headings = page.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.id)")
            banner = page.inner_text(".synthetic")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        finally:
            browser.close()
    assert len(images) >= 7  # LR finder, curves, per-class, confusion, augmentations, 2 galleries
    for img in images:
        assert img["done"] and img["w"] > 0 and img["h"] > 0, img
    from cifarlab.report.build import SECTIONS

    assert headings == [sid for sid, _ in SECTIONS]
    assert "SYNTHETIC" in banner
    outside = [u for u in requests if u != url and not u.startswith("data:")]
    assert not outside, f"network requests: {outside[:5]}"
    assert not console_errors and not page_errors, console_errors + page_errors
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000
