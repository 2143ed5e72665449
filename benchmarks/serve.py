"""``pipe serve`` under load: warm latency of one image per request, then many clients at once.

    python benchmarks/serve.py --run /work/runs/cifar_run --json --out benchmarks/results/serve.json
    python benchmarks/serve.py --smoke --json      # seconds: a tiny digits run, 5 clients for 3 s (what CI runs)
    python benchmarks/serve.py --run RUN --screenshot docs/serve-page.png --requests 0 --seconds 0   # the page only

A real server (``pipe serve RUN`` on a free 127.0.0.1 port, its default worker processes: one per
core), and from this process:

* **latency**: ``--requests`` sequential ``POST /query`` of one image each (the first
  ``--requests`` images of ``--source``, PNG-encoded), after ``--warmup`` requests: p50, p95 and
  max in ms, beside one ``pipe query RUN IMAGE --json`` process for the same kind of image
  (``cli_single_s``: what answering costs without a server);
* **load**: ``--clients`` threads, each with its own connection, posting images back to back
  for ``--seconds``: requests, errors (any non-200 answer or failed connection), requests/s,
  p50 / p95 latency under load, and the server's resident memory (``/proc/PID/status`` VmRSS of
  the server and its worker processes, summed: pages they share are counted in each) sampled
  each second: at the start of the load, at its end, at most, and every 5 s;
* **load, one worker**: the same load on ``pipe serve RUN --workers 1`` (``throughput_ratio``:
  the default's requests/s over it).

Only ``pipe`` commands and HTTP are used.
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import CIFAR_TAR, ROOT, proc_status_kb, smoke_run  # noqa: E402
from benchmarks.drive import answered, start_server  # noqa: E402


def start(run: Path, workers: int = 0) -> tuple[subprocess.Popen, str]:
    try:
        return start_server(run, "--workers", str(workers), timeout_s=300, quiet=True)
    except RuntimeError as e:
        sys.exit(str(e))


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (worker processes), summed, in MB."""
    try:
        kids = [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    except OSError:
        kids = []
    total = 0.0
    for p in [pid, *kids]:
        try:
            total += proc_status_kb(p)["VmRSS"] / 1024
        except (OSError, KeyError):
            pass
    return total


def load(base: str, pid: int, images: list[bytes], clients: int, seconds: float) -> dict:
    """``clients`` threads posting images back to back for ``seconds``: counts, latency, memory."""
    import httpx

    stop = time.time() + seconds
    counts = {"requests": 0, "errors": 0}
    under: list[float] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        with httpx.Client(base_url=base, timeout=120) as c:
            i = seed
            while time.time() < stop:
                t = time.perf_counter()
                try:
                    ok = c.post("/query", files={"images": (f"{i}.png", images[i % len(images)], "image/png")}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    counts["requests"] += 1
                    counts["errors"] += not ok
                    under.append(time.perf_counter() - t)
                i += clients

    rss = [rss_mb(pid)]
    threads = [threading.Thread(target=client, args=(s,)) for s in range(clients)]
    t0 = time.time()
    for th in threads:
        th.start()
    while any(th.is_alive() for th in threads):
        time.sleep(1)
        rss.append(rss_mb(pid))
    took = time.time() - t0
    alive = httpx.get(base + "/health").status_code == 200
    return {"clients": clients, "seconds": round(took, 1), **counts, "requests_per_s": round(counts["requests"] / took, 1),
            **ms(under), "rss_start_mb": round(rss[0]), "rss_end_mb": round(rss[-1]), "rss_max_mb": round(max(rss)),
            "rss_every_5s_mb": [round(v) for v in rss[::5]], "healthy_after": alive}


def pngs(source: str, n: int, size: tuple[int, int]) -> list[bytes]:
    import pipeline
    from PIL import Image

    out = []
    for b in pipeline.open_source(source, limit=n).batches(256, None, size):
        for img in b.images:
            buf = io.BytesIO()
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
            out.append(buf.getvalue())
    return out


def screenshot(base: str, image: Path, out: Path) -> None:
    """The page at ``base`` after uploading ``image``, every picture loaded, as a full-page PNG."""
    import shutil

    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser, page = answered(p, shutil.which("chromium"), base, image, height=1000)
        page.wait_for_function("() => [...document.images].every(i => i.naturalWidth > 0)", timeout=60000)
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        browser.close()


def ms(values) -> dict:
    v = np.asarray(values) * 1000
    if not len(v):
        return {"p50_ms": None, "p95_ms": None, "max_ms": None}
    return {"p50_ms": round(float(np.percentile(v, 50)), 1), "p95_ms": round(float(np.percentile(v, 95)), 1), "max_ms": round(float(v.max()), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=None, help="the trained run to serve")
    ap.add_argument("--source", default=str(CIFAR_TAR), help="where the query images come from [the shared CIFAR-10 archive]")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--smoke", action="store_true", help="seconds: a tiny digits run, 20 requests, 5 clients for 3 s")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--screenshot", type=Path, default=None, help="also save the page, answering the first image, as this PNG (Debian's chromium, Playwright)")
    a = ap.parse_args()
    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.smoke:
            _, run = smoke_run(tmp / "work")
            a.source, a.requests, a.warmup, a.clients, a.seconds = "digits", 20, 2, 5, 3
        elif a.run is None:
            sys.exit("give --run RUN (a trained run directory), or --smoke")
        else:
            run = a.run
        info = json.loads(subprocess.run([sys.executable, "-m", "cli.main", "info", str(run), "--json"], cwd=ROOT, capture_output=True, text=True, check=True).stdout)
        size = (info["image"]["height"], info["image"]["width"])
        images = pngs(a.source, max(a.requests, 50), size)
        (tmp / "one.png").write_bytes(images[0])
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cli.main", "query", str(run), str(tmp / "one.png"), "--json"], cwd=ROOT, capture_output=True, check=True)
        cli_single = time.perf_counter() - t
        proc, base = start(run)
        try:
            if a.screenshot:
                screenshot(base, tmp / "one.png", a.screenshot)
            with httpx.Client(base_url=base, timeout=60) as c:
                for i in range(a.warmup):
                    c.post("/query", files={"images": ("w.png", images[i % len(images)], "image/png")}).raise_for_status()
                lat = []
                for i in range(a.requests):
                    t = time.perf_counter()
                    c.post("/query", files={"images": (f"{i}.png", images[i % len(images)], "image/png")}).raise_for_status()
                    lat.append(time.perf_counter() - t)
            loaded = load(base, proc.pid, images, a.clients, a.seconds)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        proc, base = start(run, workers=1)
        try:
            one = load(base, proc.pid, images, a.clients, a.seconds)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    res = {
        "run": str(run), "image": f"{size[0]}x{size[1]}", "patterns": info["patterns"],
        "latency": {"requests": len(lat), **ms(lat)}, "cli_single_s": round(cli_single, 2),
        "load": loaded, "load_one_worker": one,
        "throughput_ratio": round(loaded["requests_per_s"] / max(one["requests_per_s"], 1e-9), 2),
    }
    if a.out:
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    if a.json:
        print(json.dumps(res))
        return
    L, D = res["latency"], res["load"]
    print(f"warm latency over {L['requests']} requests: p50 {L['p50_ms']} ms, p95 {L['p95_ms']} ms (one pipe query process: {res['cli_single_s']} s)")
    print(f"{D['clients']} clients for {D['seconds']} s: {D['requests']} requests, {D['errors']} errors, {D['requests_per_s']} req/s, "
          f"p50 {D['p50_ms']} ms; server RSS {D['rss_start_mb']} -> {D['rss_end_mb']} MB (max {D['rss_max_mb']})")
    O = res["load_one_worker"]
    print(f"one worker: {O['requests_per_s']} req/s, p50 {O['p50_ms']} ms; the default answers {res['throughput_ratio']}x that")


if __name__ == "__main__":
    main()
