"""The README's picture (docs/page.png): the page of a running service after it drew the
demo's red circle, in Debian's chromium through Playwright (as the page's tests drive it).

    make serve                                  # in one shell
    .venv/bin/python scripts/screenshot.py      # in another: writes docs/page.png
"""

import argparse
import shutil
import sys
import time

from playwright.sync_api import sync_playwright

PROMPT = "a red circle on a blue background"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/")
    parser.add_argument("--out", default="docs/page.png")
    parser.add_argument("--timeout-s", type=float, default=120)
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("`chromium` is not on PATH (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(args.url)
        page.wait_for_function("document.querySelectorAll('#model option').length >= 1")
        page.fill("#prompt", PROMPT)
        page.fill("#seed", "0")
        # Drawn twice, so that the history shows the demo's style adapter beside it.
        for lora in ("outline", ""):
            page.select_option("#lora", lora)
            page.click("#go")
            deadline = time.monotonic() + args.timeout_s
            page.wait_for_function("document.getElementById('stage').textContent !== 'Done'")
            while page.inner_text("#stage") != "Done":
                if time.monotonic() > deadline:
                    sys.exit(f"no image in {args.timeout_s} s: {page.inner_text('#status')}")
                time.sleep(0.1)
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
