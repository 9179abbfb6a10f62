"""Screenshots of the `vlmalign inspect` views of a run, as in docs/inspect.md.

    vlmalign demo --out runs/demo
    python scripts/inspect_screenshots.py runs/demo --out docs/img

Writes the site (to a temporary folder unless --site names one), opens each view as it first
shows in headless Chromium (Debian's `chromium` and `chromium-driver`, driven by selenium), the
preferences view scrolled to its first kept pair, and saves OUT/inspect_<view>.png.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from vlmalign.inspect.site import build_site

VIEWS = ("prefs", "compare", "training", "annotate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders, as for vlmalign inspect")
    parser.add_argument("--out", default="docs/img", help="folder for the screenshots")
    parser.add_argument("--site", help="folder for the site (default: a temporary folder)")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000)
    args = parser.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        raise SystemExit("needs headless Chromium: apt-get install chromium chromium-driver")
    site = Path(args.site) if args.site else Path(tempfile.mkdtemp(prefix="inspect-site-"))
    index = build_site(args.runs, site)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={args.width},{args.height}"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        for view in VIEWS:
            browser.get("about:blank")
            browser.get(f"{index.as_uri()}#{view}" + ("?seed=1" if view == "annotate" else ""))
            WebDriverWait(browser, 10).until(lambda b: b.find_elements("css selector", "main > *"))
            if view == "prefs":  # bring the first question whose pair was kept to the top
                browser.execute_script("const row = document.querySelector('tr.chosen');"
                                       "if (row) row.closest('article').scrollIntoView();")
            path = out / f"inspect_{view}.png"
            browser.save_screenshot(str(path))
            print(f"{path}")
    finally:
        browser.quit()


if __name__ == "__main__":
    main()
