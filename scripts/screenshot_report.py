"""Screenshot a cifarlab HTML report in Debian's headless Chromium (never a downloaded
browser), the way the README's example screenshot was made.

    python scripts/screenshot_report.py runs/X/report.html docs/example-report/screenshot.png [--height 2400]
    python scripts/screenshot_report.py runs/X/report.html gallery.png --from misclassified --height 1400

Needs the `dev` extra (playwright) and the `chromium` package (`.ci/run` installs it).
The page is loaded offline from the file; the screenshot covers --height pixels from the
top, or from the section heading named by --from (an id such as `curves`, `misclassified`).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("html", type=Path)
    p.add_argument("png", type=Path)
    p.add_argument("--width", type=int, default=1300)
    p.add_argument("--height", type=int, default=2400, help="pixels from the top to capture")
    p.add_argument("--from", dest="anchor", help="start at the element with this id instead of the top")
    args = p.parse_args(argv)
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # no sandbox: containers run as root; no GPU: headless servers have none
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.goto(args.html.resolve().as_uri(), wait_until="load")
            args.png.parent.mkdir(parents=True, exist_ok=True)
            clip = None
            if args.anchor:
                box = page.locator(f"#{args.anchor}").bounding_box()
                if box is None:
                    raise SystemExit(f"no element with id {args.anchor!r} in {args.html}")
                clip = {"x": 0, "y": box["y"] - 8, "width": args.width, "height": args.height}
            # full_page lets the clip reach below the first viewport
            page.screenshot(path=str(args.png), full_page=clip is not None, clip=clip)
        finally:
            browser.close()
    print(args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
