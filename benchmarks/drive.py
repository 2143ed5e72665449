"""One way to drive `pipe serve` and its page, shared by the benchmarks and the tests: start the
server as a real process on a free loopback port and wait until it answers /health; open the page
in Chromium (Playwright) and wait until an uploaded image is answered with every picture loaded."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, *flags: str, timeout_s: float = 120, quiet: bool = False) -> tuple[subprocess.Popen, str]:
    """``pipe serve RUN FLAGS...`` on a free loopback port, once it answers /health: (process, base URL).
    ``quiet`` drops its output (a long benchmark); else it is kept in the process's pipes.
    Raises RuntimeError (with the server's stderr) when it exits or does not answer in ``timeout_s``."""
    import httpx

    port = free_port()
    out = subprocess.DEVNULL if quiet else subprocess.PIPE
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", str(run), "--port", str(port), *flags],
                            cwd=ROOT, stdout=out, stderr=out, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pipe serve exited: {'' if quiet else proc.stderr.read()}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"pipe serve did not answer /health in {timeout_s:.0f} s")


def answered(p, exe: str, base: str, image: Path, height: int = 1400, timeout_ms: int = 60000):
    """(browser, page): the page at ``base`` in Chromium (``p``: Playwright's sync API), after it
    answered ``image`` and every picture it asked for arrived. Page functions are passed as
    functions: the page's policy forbids evaluating strings."""
    browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
    page = browser.new_page(viewport={"width": 1200, "height": height})
    page.goto(base + "/")
    page.wait_for_function("() => document.getElementById('info').textContent.includes('classes')")
    page.set_input_files("[data-testid=file]", str(image))
    page.wait_for_function("() => document.querySelectorAll('.patch-row').length > 0", timeout=timeout_ms)
    page.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=timeout_ms)
    return browser, page
