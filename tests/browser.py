"""The web page (`python -m chest_mnist.app`) started as a user starts it, and Debian's Chromium
driven by Playwright: shared by tests/test_app.py and docs/app_screenshot.py, so that the
README's picture is taken the way the tests look at the page."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this machine's closed network refuses what Chromium would otherwise fetch on its own
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class AppDidNotStart(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(ckpt_path: str | Path, log: Path, timeout: float = 120) -> Iterator[str]:
    """`python -m chest_mnist.app ckpt_path=... device=cpu` on a free local port, its output
    in `log`; yields the page's URL once it answers, and stops the app at the end.
    AppDidNotStart (with the log's end) if it exits or does not answer in `timeout` s."""
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "chest_mnist.app", f"ckpt_path={ckpt_path}", f"port={port}"]
            + ["device=cpu"],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AppDidNotStart(
                        f"the app did not start:\n{log.read_text()[-3000:]}"
                    ) from None
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def launch_chromium(playwright):
    """Headless Debian Chromium (Playwright's own browser download is not reachable here)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        raise FileNotFoundError(
            "chromium is not installed: make browser (apt-get install -y chromium)"
        )
    return playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
