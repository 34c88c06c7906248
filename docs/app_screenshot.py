"""docs/app.png: the web page (chest_mnist.app) on a PneumoniaMNIST test X-ray, in headless
Chromium, as the README shows it.

    python -m chest_mnist.train experiment=pneumonia_cpu seed=1 paths.log_dir=/tmp/pneu_logs
    python docs/app_screenshot.py /tmp/pneu_logs/train/runs/<run> docs/app.png

Needs `chromium` (make browser) and playwright (the dev extra). The image is test image
`--index` of tests/data/pneumoniamnist.npz (a pneumonia case by default).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the tests' helpers are in ROOT
from tests.browser import launch_chromium, running_app  # noqa: E402

WIDTH = 900  # px of the saved picture: readable in a README, and small on disk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a training run directory or checkpoint")
    parser.add_argument("output", type=Path)
    parser.add_argument("--index", type=int, default=7, help="test image of PneumoniaMNIST")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp())
    images = np.load(ROOT / "tests" / "data" / "pneumoniamnist.npz")
    xray = folder / f"pneumoniamnist_test{args.index}.png"
    Image.fromarray(images["test_images"][args.index]).save(xray)
    label = int(images["test_labels"][args.index, 0])
    print(f"{xray.name}: label {label} ({'pneumonia' if label else 'normal'})")

    with running_app(args.run, folder / "app.log", timeout=120) as url, sync_playwright() as pw:
        browser = launch_chromium(pw)
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.goto(url)
        page.locator("input[type=file]").set_input_files([str(xray)])
        page.locator(".result .heatmap img").wait_for(timeout=60_000)
        time.sleep(1)  # the plot's and images' last paint
        page.screenshot(path=folder / "page.png", full_page=True)
        browser.close()

    picture = Image.open(folder / "page.png").convert("RGB")
    picture = picture.resize((WIDTH, round(picture.height * WIDTH / picture.width)), Image.LANCZOS)
    # 256 colours: a page of flat colours loses nothing visible, and the file is 4x smaller
    picture.quantize(256, method=Image.Quantize.MEDIANCUT).save(args.output, optimize=True)
    print(f"Wrote {args.output} ({args.output.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
