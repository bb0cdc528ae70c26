"""The demo app in a real browser: Debian's Chromium driven by Playwright (never a
downloaded browser), as tests/test_report_browser.py drives the report.

Upload an image -> the label chart and the Grad-CAM overlay appear; the Misclassified
tab shows its N images; a confusion cell in the Run tab filters them. Nothing is
fetched from anywhere but the app itself and nothing logs an error. Screenshots are
kept as test artifacts (test-artifacts/demo-*.png).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from tests.test_demo_app import CAPTION, free_port
from tests.test_report_browser import ARGS, ARTIFACTS, _browser_or_skip
from tests.tiny_run import shared_run

pytestmark = pytest.mark.browser

TIMEOUT_MS = 60_000  # waits for the page, not assertions about speed


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(model, url) of the app serving the shared tiny run, in this process."""
    _browser_or_skip()
    from cifarlab.demo.app import launch
    from cifarlab.demo.core import DemoModel

    model = DemoModel.load(shared_run(tmp_path_factory), device="cpu")
    app, url = launch(model, port=free_port())
    try:
        yield model, url
    finally:
        app.close(verbose=False)


def _cell(confusion: list[list[int]]) -> tuple[int, int]:
    """The off-diagonal confusion cell with the most mistakes."""
    cm = np.array(confusion)
    np.fill_diagonal(cm, -1)
    r, c = np.unravel_index(int(cm.argmax()), cm.shape)
    assert cm[r, c] > 0, "the tiny run made no mistakes to show"
    return int(r), int(c)


def _captions(page) -> list[str]:
    return page.eval_on_selector_all("#misclassified-gallery .caption-label", "els => els.map(e => e.innerText.trim())")


def _wait_gallery(page, n: int) -> None:
    page.wait_for_function(
        """n => { const imgs = [...document.querySelectorAll('#misclassified-gallery .thumbnail-item img')];
                  const busy = document.querySelector('#misclassified-gallery [data-testid=status-tracker]:not(.hide)');
                  return !busy && imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0); }""",
        arg=n,
        timeout=TIMEOUT_MS,
    )


def test_demo_in_chromium(demo, tmp_path):
    from playwright.sync_api import sync_playwright

    model, url = demo
    upload = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(upload)
    top1 = next(iter(model.predict(str(upload), top_k=1, show_cam=False)[0]))
    pool = len(model.misclassified(50))
    r, c = _cell(model.metrics["confusion"])
    actual, predicted = model.classes[r], model.classes[c]
    requests: list[str] = []
    console_errors: list[str] = []
    page_errors: list[str] = []
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_browser_or_skip(), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 950})
            page.on("request", lambda req: requests.append(req.url))
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.goto(url, wait_until="load")

            # Classify: upload -> label chart with the model's top-1, and the CAM overlay
            page.locator("#upload input[type=file]").set_input_files(str(upload))
            page.wait_for_function(
                "t => (document.querySelector('#prediction')?.innerText || '').includes(t)", arg=top1, timeout=TIMEOUT_MS
            )
            page.wait_for_function(
                "() => { const i = document.querySelector('#overlay img'); return !!i && i.complete && i.naturalWidth > 0; }",
                timeout=TIMEOUT_MS,
            )
            chart = page.inner_text("#prediction")
            overlay_size = page.eval_on_selector("#overlay img", "i => [i.naturalWidth, i.naturalHeight]")
            page.screenshot(path=str(ARTIFACTS / "demo-classify.png"), full_page=True)

            # Misclassified: the default count of the most confident mistakes
            page.get_by_role("tab", name="Misclassified").click()
            shown = min(10, pool)
            _wait_gallery(page, shown)
            all_captions = _captions(page)
            page.screenshot(path=str(ARTIFACTS / "demo-misclassified.png"), full_page=True)

            # Run: a click on a confusion cell filters the Misclassified tab
            page.get_by_role("tab", name="Run").click()
            page.locator(f"#confusion-table [data-testid='cell-{r}-{c + 1}']").click()
            page.wait_for_function(
                "want => [...document.querySelectorAll('#misclassified-gallery .caption-label')]"
                ".every(e => e.innerText.trim().startsWith(want))",
                arg=f"{actual} / {predicted} (",
                timeout=TIMEOUT_MS,
            )
            _wait_gallery(page, min(10, int(model.metrics["confusion"][r][c])))
            filtered = _captions(page)
            page.screenshot(path=str(ARTIFACTS / "demo-filtered.png"), full_page=True)
        finally:
            browser.close()

    lines = [line.strip() for line in chart.splitlines() if line.strip()]
    assert top1 in lines and len(re.findall(r"\d+%", chart)) == 3, chart  # top-3 chart with percentages
    assert overlay_size == [224, 224]
    assert len(all_captions) == shown and all(CAPTION.match(t) for t in all_captions), all_captions
    assert filtered and all(CAPTION.match(t).group("actual", "predicted") == (actual, predicted) for t in filtered), filtered
    host = urlsplit(url).netloc
    outside = [u for u in requests if not u.startswith(("data:", "blob:")) and urlsplit(u).netloc != host]
    assert not outside, f"requests off the app's host: {outside[:5]}"
    assert not page_errors and not console_errors, page_errors + console_errors
    assert (ARTIFACTS / "demo-classify.png").stat().st_size > 10_000
