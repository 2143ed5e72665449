"""pipe serve under attack: a real uvicorn process on a free loopback port, asked what a hostile
client or a hostile web page would ask it. Every request goes to 127.0.0.1 only."""
from __future__ import annotations

import concurrent.futures
import io
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from PIL import Image

import pipeline
from pipeline import TrainConfig
from pipeline.data.images import encode_png
from pipeline.serve import app as serving
from pipeline.serve.server import IDLE_S
from tests.conftest import ROOT, digits_images, free_port, start_server


@pytest.fixture(scope="module")
def served(digits_run, tmp_path_factory):
    """A server over a copy of the digits run (the copy can be replaced under it): (process, base URL, run dir)."""
    run = tmp_path_factory.mktemp("served") / "run"
    shutil.copytree(digits_run, run)
    proc, base = start_server(run)
    yield proc, base, run
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def digit_png() -> bytes:
    return encode_png(digits_images("test", 1)[0][0])


def _post(base: str, files, params: str = "", headers: dict | None = None, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{base}/query{params}", files=files, headers=headers or {}, timeout=timeout)


def _png(w: int, h: int, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ 2. one small request, bounded work

def test_2_the_work_of_one_request_is_bounded(served, digit_png):
    _, base, _ = served
    r = _post(base, {"images": ("a.png", digit_png)}, "?k=256&patches=0", timeout=10)
    assert r.status_code == 400 and "k 256 must be between 1 and 32" in r.json()["error"]
    r = _post(base, {"images": ("a.png", digit_png)}, "?k=5&patches=0", timeout=10)
    assert r.status_code == 400 and "patches 0 must be between 1 and 50" in r.json()["error"]
    many = [("images", (f"{i}.png", digit_png)) for i in range(64)]
    r = _post(base, many, "?k=32&patches=50", timeout=10)
    assert r.status_code == 400 and "more than the 4,096 one request may ask" in r.json()["error"]
    r = _post(base, {"images": ("a.png", digit_png)}, "?k=32&patches=50")
    assert r.status_code == 200
    top = r.json()["results"][0]["patches"]
    assert len(top) <= 50 and all(len(p["nearest"]) <= 32 for p in top)


def test_2_cross_origin_and_foreign_host_requests_are_refused(served, digit_png):
    _, base, _ = served
    files = {"images": ("a.png", digit_png)}
    r = _post(base, files, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "another origin" in r.json()["error"]
    r = _post(base, files, headers={"Origin": "null"})
    assert r.status_code == 403
    # DNS rebinding: the attacker's name resolved to 127.0.0.1, so the browser sends its Host
    r = httpx.get(f"{base}/info", headers={"Host": "evil.example"})
    assert r.status_code == 403 and "Host" in r.json()["error"]
    r = _post(base, files, headers={"Origin": base})  # the server's own page
    assert r.status_code == 200
    assert _post(base, files).status_code == 200  # a client that is not a browser sends no Origin


def test_2_the_run_lock_serves_waiters_in_the_order_they_came():
    """A request answering its images one after another releases the run's lock and asks again at
    once; requests that were already waiting go first (with ``threading.Lock`` the same thread
    may take it again ahead of them)."""
    import threading

    from pipeline.serve.turns import Turns

    turns, order = Turns(), []

    def waiter(name):
        with turns:
            order.append(name)

    def large():
        with turns:
            order.append("large 1")
            for name in ("b", "c", "d"):
                t = threading.Thread(target=waiter, args=(name,))
                t.start()
                threads.append(t)
                while turns._next < len(threads) + 1:  # it holds its ticket and waits
                    time.sleep(0.001)
        with turns:  # its next image
            order.append("large 2")

    threads: list = []
    main = threading.Thread(target=large)
    main.start()
    main.join(30)
    for t in threads:
        t.join(30)
    assert order == ["large 1", "b", "c", "d", "large 2"]


# ------------------------------------------------------------------ 13. decoding is bounded

def test_13_huge_uploads_are_refused_from_their_header(served):
    proc, base, _ = served
    big = _png(8192, 8192)  # a few KB that decode to 64 Mpixels

    def send(i):
        return _post(base, {"images": (f"big{i}.png", big)})

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(send, range(6)))
    for r in answers:
        assert r.status_code == 400 and "more than the 16,777,216 decoded" in r.json()["error"]
    assert httpx.get(f"{base}/health").status_code == 200


def test_13_a_resize_other_than_the_runs_is_refused_before_decoding(served, digit_png):
    _, base, _ = served
    r = _post(base, {"images": ("a.png", _png(16, 16))}, "?resize=8192x8192")
    assert r.status_code == 400 and r.json()["error"] == "resize 8192x8192 is not the run's image size; pass resize=8x8 or leave it out"
    r = _post(base, {"images": ("a.png", _png(16, 16))}, "?resize=8x8")
    assert r.status_code == 200


# ------------------------------------------------------------------ 14. only the documented formats are opened

def test_14_an_eps_upload_never_reaches_a_loader(served):
    _, base, _ = served
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"
    r = _post(base, {"images": ("x.eps", eps)})
    assert r.status_code == 400 and "not an image in a format read here (PNG, JPEG" in r.json()["error"]


# ------------------------------------------------------------------ 1. the page's headers

def test_1_every_answer_carries_a_policy_without_inline_script(served):
    _, base, _ = served
    for path in ("/", "/page.js", "/info", "/pattern/0.png"):
        r = httpx.get(base + path)
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
        assert r.headers["x-content-type-options"] == "nosniff"
    page = httpx.get(base + "/").text
    assert '<script src="/page.js"></script>' in page and "<script>" not in page
    assert "innerHTML" not in httpx.get(base + "/page.js").text


# ------------------------------------------------------------------ 16. connections and logs

def test_16_silent_connections_are_closed_and_stray_bytes_are_not_logged(digits_run):
    proc, base = start_server(digits_run)
    port = int(base.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=IDLE_S + 20) as s:
            t0 = time.monotonic()
            assert s.recv(1024) == b""  # the server closed it
            assert time.monotonic() - t0 < IDLE_S + 10
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"\x00\x01garbage that is not HTTP\r\n\r\n")
                s.recv(1024)
        assert httpx.get(base + "/health").status_code == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "Invalid HTTP request" not in err, err


def test_16_listening_beyond_this_machine_warns_of_no_authentication(digits_run):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", str(digits_run), "--host", "0.0.0.0", "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not any(ln.startswith("serving") for ln in lines):
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert any(ln.startswith("warning: listening on 0.0.0.0") and "no authentication" in ln for ln in lines), lines


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_12_a_nonsense_upload_limit_is_one_line_before_loading(digits_run, value):
    from click.testing import CliRunner

    from cli.main import main

    r = CliRunner().invoke(main, ["serve", str(digits_run), "--max-upload-mb", value], catch_exceptions=False)
    assert r.exit_code == 1 and r.stderr.strip().startswith("Error: --max-upload-mb ") and "must be a number of MiB above 0" in r.stderr, r.output
    assert "Traceback" not in r.output


# ------------------------------------------------------------------ 7. a run replaced under the server

def test_7_a_run_replaced_while_served_is_refused_not_mixed(served, digits_shards, digit_png):
    proc, base, run = served
    assert httpx.get(f"{base}/pattern/0.png").status_code == 200
    pipeline.train(pipeline.Shards(digits_shards), run, TrainConfig(epochs=1, dim=8, seed=7), overwrite=True)
    for r in (httpx.get(f"{base}/pattern/1.png"), _post(base, {"images": ("a.png", digit_png)}), httpx.get(f"{base}/class/0")):
        assert r.status_code == 503 and "was replaced on disk after it was loaded" in r.json()["error"], r.text
    assert proc.poll() is None


# ------------------------------------------------------------------ fuzzing from the server's own schema

@pytest.fixture(scope="module")
def fuzzed(digits_run):
    proc, base = start_server(digits_run)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def test_fuzzed_requests_get_no_server_error(fuzzed):
    """Every operation of the server's OpenAPI schema, with requests Schemathesis generates from
    it (valid and invalid), 15 an operation: no 5xx, and the server stays up."""
    from hypothesis import given

    schema = schemathesis.openapi.from_url(f"{fuzzed}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /query", "GET /pattern/{pid}.png", "GET /class/{name}", "GET /info"}
    calls = []
    for op in operations:
        @given(op.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            r = case.call(base_url=fuzzed, timeout=30)
            calls.append(r.status_code)
            assert r.status_code < 500, (case.method, case.path, r.status_code, r.text[:200])

        check()
    assert len(calls) >= 5 * len(operations) and any(c >= 400 for c in calls) and any(c == 200 for c in calls)
    assert httpx.get(f"{fuzzed}/health").status_code == 200
