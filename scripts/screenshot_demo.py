"""Screenshot the `cifarlab demo` app of a run in Debian's headless Chromium (never a
downloaded browser), the way the README's screenshot of the app was made.

    python scripts/screenshot_demo.py runs/X                     # -> docs/demo-screenshot.png
    python scripts/screenshot_demo.py runs/X shot.png --image cat.jpg --also dog
    python scripts/screenshot_demo.py runs/X mistakes.png --tab misclassified --cam

Needs the `dev` and `demo` extras (playwright, gradio) and the `chromium` package
(`.ci/run` installs it). The app is served on a free localhost port for the shot and
stopped afterwards. Classify tab: the run's test image of --example (default: cat, if
the run has that class, else the first class) or --image FILE is uploaded and the
prediction with its Grad-CAM is captured.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
from pathlib import Path

WAIT_MS = 60_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _example_file(model, name: str | None, folder: Path) -> Path:
    from PIL import Image

    by_class = {label: image for image, label in model.examples}
    if not by_class:
        raise SystemExit("the run has no example images; pass --image FILE")
    if name is None:
        name = "cat" if "cat" in by_class else next(iter(by_class))
    if name not in by_class:
        raise SystemExit(f"no example of class {name!r}; the classes are: {', '.join(by_class)}")
    path = folder / f"{name}.png"
    Image.fromarray(by_class[name]).save(path)
    return path


def _classify(page, image: Path, also: str | None) -> None:
    page.locator("#upload input[type=file]").set_input_files(str(image))
    page.wait_for_function("() => (document.querySelector('#prediction')?.innerText || '').includes('%')", timeout=WAIT_MS)
    selectors = ["#overlay img"]
    if also:
        page.get_by_label("Also explain this class").click()
        page.get_by_role("option", name=also, exact=True).click()
        selectors.append("#class-overlay img")
    for sel in selectors:
        page.wait_for_function("s => { const i = document.querySelector(s); return !!i && i.complete && i.naturalWidth > 0; }",
                               arg=sel, timeout=WAIT_MS)


def _misclassified(page, cam: bool) -> None:
    page.get_by_role("tab", name="Misclassified").click()
    if cam:
        page.get_by_label("Grad-CAM (predicted | actual class)").check()
    # with CAM each picture is two overlays side by side: wait for that shape, not the first gallery
    page.wait_for_function(
        """ratio => { const imgs = [...document.querySelectorAll('#misclassified-gallery .thumbnail-item img')];
                   const busy = document.querySelector('#misclassified-gallery [data-testid=status-tracker]:not(.hide)');
                   return !busy && imgs.length > 0
                       && imgs.every(i => i.complete && i.naturalWidth > 0 && i.naturalWidth === ratio * i.naturalHeight); }""",
        arg=2 if cam else 1,
        timeout=WAIT_MS,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="a run directory, checkpoint or exported Space folder")
    p.add_argument("png", type=Path, nargs="?", default=Path("docs/demo-screenshot.png"))
    p.add_argument("--tab", choices=["classify", "misclassified", "run"], default="classify")
    p.add_argument("--image", type=Path, help="classify this file instead of a test image of the run")
    p.add_argument("--example", help="class of the run's test image to classify (default: cat, or the first class)")
    p.add_argument("--also", metavar="CLASS", help="also show the Grad-CAM for this class")
    p.add_argument("--cam", action="store_true", help="misclassified tab: with Grad-CAM")
    p.add_argument("--width", type=int, default=1300)
    p.add_argument("--height", type=int, default=950)
    p.add_argument("--data", help="the run's dataset, if it moved")
    args = p.parse_args(argv)
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    from cifarlab.demo.app import launch
    from cifarlab.demo.core import DemoModel

    model = DemoModel.load(args.source, device="cpu", data=args.data)
    app, url = launch(model, port=_free_port())
    try:
        with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
            # no sandbox: containers run as root; no GPU: headless servers have none
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page(viewport={"width": args.width, "height": args.height})
                page.goto(url, wait_until="load")
                if args.tab == "classify":
                    _classify(page, args.image or _example_file(model, args.example, Path(tmp)), args.also)
                elif args.tab == "misclassified":
                    _misclassified(page, args.cam)
                else:
                    page.get_by_role("tab", name="Run").click()
                    page.wait_for_selector("#run-info", timeout=WAIT_MS)
                args.png.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.png))
            finally:
                browser.close()
    finally:
        app.close(verbose=False)
    print(args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
