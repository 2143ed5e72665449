"""``pipe serve``: a loaded run behind HTTP, and a page to look at its answers.

``make_app(run)`` gives a FastAPI application:

* ``GET /health``: ``{"status": "ok"}`` (the run is loaded before the server listens);
* ``GET /info``: the run's summary (what ``pipe info --json`` prints);
* ``POST /query``: multipart field ``images`` (one or more files) -> ``{"results": [...]}``,
  one object per image, each what ``pipe query --json`` prints for it (and ``"notes"``: what
  ``pipe query`` prints as ``note:`` lines, when there are any); query parameters ``k``,
  ``patches``, ``classifier`` and ``resize`` as in ``pipe query``;
* ``GET /pattern/{id}.png``: a learned pattern's pixels, enlarged (``brightness`` and ``contrast``:
  a code pattern drawn in a patch's, as ``patches`` give them);
* ``GET /training-image/{row}.png``: a thumbnail of an image-index image (``nearest_images[].row``);
* ``GET /class/{name or index}``: the patterns a class relies on most (:meth:`Run.class_patterns`);
* ``POST /learn`` (with ``--learn-into DIR``): multipart ``image`` (one file) and ``label`` (a class
  name, known or new) -> the run learns that image (:mod:`pipeline.serve.learning`) and answers it
  again; ``POST /save`` writes what it learned as a new run in ``DIR`` (also done at shutdown);
* ``GET /``: the page (``page.html``), which uses the endpoints above.

Every error is a JSON object ``{"error": "..."}`` with a 4xx status, and the server stays up.

What one request can cost is bounded: at most ``MAX_IMAGES`` images, ``k`` up to
``MAX_K`` and ``patches`` from 1 to ``MAX_PATCHES``, and images x k x patches at most
``MAX_WORK`` (which bounds the answer's size too); an upload decoding to more than
``MAX_UPLOAD_PIXELS`` pixels is refused from its header, and at most ``DECODERS`` uploads
decode at once. A run answers one image at a time (its vocabulary's scratch arrays are not
shared), so images queue on a first-come, first-served lock (:class:`Turns`) taken per image, not
per request: a large request cannot hold the run while others wait. Pictures are cached (bounded) so a page's many small
images cost one look-up each. :mod:`pipeline.serve.guards` adds the security headers and
refuses other hosts and cross-origin POSTs; a run whose files were replaced on disk after
loading is refused (503) rather than answered from a mix of two runs.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import socket
import threading
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path
from importlib import resources

import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.config import parse_size
from pipeline.errors import ParameterError, PipelineError
from pipeline.extraction.workers import machine_cores
from pipeline.query.report import query_one
from pipeline.query.run import Run, load
from pipeline.serve.guards import Guard, is_loopback  # noqa: F401 (is_loopback: for pipe serve)
from pipeline.serve import server
from pipeline.serve.server import run_server  # noqa: F401 (for pipe serve)
from pipeline.serve.learning import Learning
from pipeline.serve.limits import LimitBody
from pipeline.teach.save import check_out as check_learn_into  # noqa: F401 (for pipe serve)
from pipeline.serve.turns import Turns

MAX_UPLOAD_MB = 16  # default request-size limit
MAX_IMAGES = 64  # images per request
MAX_K = 32  # nearest patterns per patch and nearest training images per image
MAX_PATCHES = 50  # patches reported per image (every patch, patches=0, is for pipe query)
MAX_WORK = 4096  # images x k x patches: the look-ups, and entries of the answer, of one request
MAX_UPLOAD_PIXELS = 1 << 24  # an upload decoding to more (4096 x 4096) is refused from its header
DECODERS = 2  # uploads decoded at once
MAX_UPLOAD_LIMIT_MB = 1024  # the largest --max-upload-mb
PICTURE_SIDE = 96  # pictures of patterns and thumbnails are enlarged to about this many pixels a side


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def png_bytes(pixels: np.ndarray, side: int = PICTURE_SIDE) -> bytes:
    """``pixels`` (h x w x C uint8) as a PNG, enlarged by a whole factor (nearest neighbour) to about ``side``."""
    img = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    scale = max(1, side // max(pixels.shape[:2]))
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _parse_resize(text: str | None, run: Run) -> tuple[int, int] | None:
    """The upload size asked for: none, or the run's own image size (any other cannot be answered)."""
    if not text:
        return None
    try:
        size = parse_size(text)
    except ValueError as e:
        raise PipelineError(f"resize {e}") from None
    if size != (run.height, run.width):
        raise PipelineError(f"resize {text} is not the run's image size; pass resize={run.height}x{run.width} or leave it out")
    return size


def check_request(images: int, k: int, patches: int) -> None:
    """Refuse a query whose work is over the server's bounds (module docstring)."""
    if not 1 <= k <= MAX_K:
        raise PipelineError(f"k {k} must be between 1 and {MAX_K}")
    if not 1 <= patches <= MAX_PATCHES:
        raise PipelineError(f"patches {patches} must be between 1 and {MAX_PATCHES} (every patch, patches=0, is for pipe query)")
    if images * k * patches > MAX_WORK:
        raise PipelineError(f"{images} images x k {k} x patches {patches} = {images * k * patches:,} look-ups, more than the "
                            f"{MAX_WORK:,} one request may ask; send fewer images or a smaller k or patches")


def check_upload_mb(mb: float) -> None:
    """Refuse a request-size limit that is not a positive finite number of MiB (at most 1 GiB)."""
    if not (math.isfinite(mb) and 0 < mb <= MAX_UPLOAD_LIMIT_MB):
        raise ParameterError("max_upload_mb", f"{mb} must be a number of MiB above 0 and at most {MAX_UPLOAD_LIMIT_MB}")


MAX_WORKERS = 64


def app_from_env():
    """The application of one worker process of :func:`run_workers`, from the settings in
    ``$PATCHHASH_SERVE``: ``run``, ``unseen``, ``max_upload_mb``, ``loopback_only``."""
    spec = json.loads(os.environ[server.SPEC_ENV])
    logging.getLogger("uvicorn.error").addFilter(server.NoInvalidRequests())  # this process's logging is set up by now
    run = load(spec["run"], spec["unseen"])
    warm(run)
    return make_app(run, spec["max_upload_mb"], loopback_only=spec["loopback_only"])


def run_workers(spec: dict, host: str, port: int, workers: int) -> None:
    """Serve the run ``spec`` describes (see :func:`app_from_env`) from ``workers`` processes."""
    server.run_workers("pipeline.serve.app:app_from_env", spec, host, port, workers)


def check_workers(workers: int, learn_into: Path | str | None = None) -> int:
    """The number of worker processes: ``workers``, or one per core for 0; refuses a negative or
    absurd count, and more than one for a server that learns (each process would learn alone)."""
    if not 0 <= workers <= MAX_WORKERS:
        raise ParameterError("workers", f"{workers} must be 0 (one per core) to {MAX_WORKERS}")
    if learn_into is not None and workers != 1:
        raise ParameterError("learn_into", "needs one worker process (each would learn on its own); pass `workers` 1 or leave it out")
    return workers or machine_cores()


def check_port(host: str, port: int) -> None:
    """Refuse a host/port the server could not listen on, before the run is loaded."""
    if not 0 < port < 65536:
        raise ParameterError("port", f"{port} must be between 1 and 65535")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise PipelineError(f"cannot listen on {host}:{port} ({e.strerror}); pass another `port`, or stop what uses it") from None


def warm(run: Run) -> None:
    """Load the whole pattern table's metadata (so answers index it instead of decoding row groups)
    and answer one blank image, so that the indexes, the image table and the compiled kernels are
    loaded before the first real request."""
    run.table.metadata
    run.table.file, run.training_images.file, run.table.index, run.training_images.index  # every file opened now
    blank = np.zeros((run.height, run.width, run.extract_config.channels), np.uint8)
    query_one(run, blank, "warm-up")


def make_app(run: Run, max_upload_mb: float = MAX_UPLOAD_MB, max_images: int = MAX_IMAGES, loopback_only: bool = True,
             learn_into: Path | str | None = None):
    """The application serving ``run`` (see the module docstring); requests over ``max_upload_mb``
    MiB or with more than ``max_images`` images are refused. ``loopback_only``: the server
    listens on a loopback address, so requests naming another host are refused. ``learn_into``:
    ``POST /learn`` teaches the run, and what it learned is written there (else learning is off)."""
    learning = None if learn_into is None else Learning(run, learn_into)

    @asynccontextmanager
    async def lifespan(app):
        yield
        if learning is not None:
            with lock:
                learning.save_unsaved()

    app = FastAPI(title="patchhash", docs_url="/docs", redoc_url=None, lifespan=lifespan)
    lock = Turns()  # first come, first served: image by image, requests take turns
    decoders = threading.BoundedSemaphore(DECODERS)
    files = resources.files("pipeline.serve")
    page = files.joinpath("page.html").read_text(encoding="utf-8")
    script = files.joinpath("page.js").read_text(encoding="utf-8")

    @app.middleware("http")
    async def _same_run(request: Request, call_next):
        try:
            run.check_unchanged()
        except PipelineError as e:
            return _error(503, f"{e}; restart pipe serve")
        return await call_next(request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if where == "images" and first.get("type") == "missing":
            return _error(400, "no images: send one or more files in the multipart field 'images'")
        return _error(400, f"{where or 'request'}: {first.get('msg', 'invalid')}")

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/info")
    def info():
        with lock:  # a lesson may be changing the classes
            return {**run.summary(), "learning": None if learning is None else learning.status()}

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page

    @app.get("/page.js")
    def page_script():
        return Response(script, media_type="text/javascript")

    @app.post("/query")
    def query(
        images: list[UploadFile] = File(...),
        k: int = Query(5), patches: int = Query(5), classifier: str = Query("head"), resize: str | None = Query(None),
    ):
        if len(images) > max_images:
            return _error(413, f"{len(images)} images in one request; send at most {max_images}")
        try:
            check_request(len(images), k, patches)
            if classifier not in ("head", "knn"):
                raise PipelineError(f"classifier {classifier!r} is not one of head, knn")
            size = _parse_resize(resize, run)
        except PipelineError as e:
            return _error(400, str(e))
        decoded = []
        for f in images:
            try:
                decoded.append(decode(f, size))
            except PipelineError as e:
                return _error(400, str(e), image=f.filename or "upload")
        results, notes = [], []
        for name, img, said in decoded:
            with lock:  # per image, so that one request's images take turns with other requests'
                results.append(query_one(run, img, name, k=k, patches=patches, classifier=classifier)[0])
            notes += said
        return {"results": results, **({"notes": notes} if notes else {})}

    def decode(f: UploadFile, size: tuple[int, int] | None) -> tuple[str, np.ndarray, list[str]]:
        name = f.filename or "upload"
        notes: list[str] = []
        with decoders:
            return name, run.image_from_bytes(f.file.read(), name, size, notes, MAX_UPLOAD_PIXELS), notes

    @app.post("/learn")
    def learn(image: UploadFile = File(...), label: str = Form(...), k: int = Query(5), patches: int = Query(5)):
        if learning is None:
            return _error(403, "this server does not learn; start it with pipe serve RUN --learn-into NEW_DIR to teach it")
        try:
            check_request(1, k, patches)
            name, img, notes = decode(image, None)
            with lock:
                out = learning.learn(img, label, name, k, patches)
        except PipelineError as e:
            return _error(400, str(e))
        class_view.cache_clear()  # the head and the class counts changed
        return {**out, **({"notes": notes} if notes else {})}

    @app.post("/save")
    def save():
        if learning is None:
            return _error(403, "this server does not learn; start it with pipe serve RUN --learn-into NEW_DIR to teach it")
        try:
            with lock:
                return learning.save()
        except PipelineError as e:
            return _error(409, str(e))

    @lru_cache(maxsize=4096)
    def pattern_png(pid: int, like: tuple[float, float] | None = None) -> bytes | None:
        with lock:
            pixels = run.pattern_pixels(np.array([pid]), like)[0]
        return None if pixels is None else png_bytes(pixels)

    @lru_cache(maxsize=1024)
    def thumbnail_png(row: int) -> bytes | None:
        with lock:
            pixels = run.training_images.thumbnails(np.array([row]))[0]
        return None if pixels is None else png_bytes(pixels)

    @app.get("/pattern/{pid}.png")
    def pattern(pid: int, brightness: float | None = Query(None), contrast: float | None = Query(None)):
        if not 0 <= pid < run.vocab.size:
            return _error(404, f"pattern {pid} does not exist; the run has patterns 0..{run.vocab.size - 1}")
        like = None
        if brightness is not None or contrast is not None:
            if brightness is None or contrast is None or not (0 <= brightness <= 255 and 0 <= contrast <= 255):
                return _error(400, "brightness and contrast go together, each from 0 to 255 (a patch's mean and standard deviation)")
            like = (round(brightness, 1), round(contrast, 1))  # rounded: one cached picture per look a person can tell apart
        png = pattern_png(pid, like)
        return _error(404, f"pattern {pid} has no pixels in this run") if png is None else Response(png, media_type="image/png")

    @app.get("/training-image/{row}.png")
    def training_image(row: int):
        n = run.training_images.index_info.vectors
        if not 0 <= row < n:
            return _error(404, f"training image row {row} does not exist; the image index has rows 0..{n - 1}")
        png = thumbnail_png(row)
        if png is None:
            return _error(404, f"row {row} has no thumbnail (the training source was unreadable, or the run predates thumbnails)")
        return Response(png, media_type="image/png")

    @lru_cache(maxsize=256)
    def class_view(c: int, n: int) -> dict:
        with lock:
            ids, scores = run.class_patterns(c, n)
            rows = run.table.metadata_of(ids)
        return {
            "class": run.class_names[c],
            "patterns": [
                {"pattern_id": int(i), "score": float(s), "view": run.view_name(int(v)), "h": int(h), "w": int(w), "cell": int(cell), "count": int(cnt)}
                for i, s, v, h, w, cell, cnt in zip(ids, scores, rows["view"], rows["h"], rows["w"], rows["cell"], rows["count"])
            ],
        }

    @app.get("/class/{name}")
    def class_patterns(name: str, n: int = Query(24)):
        c = run.class_names.index(name) if name in run.class_names else int(name) if name.isdigit() else -1
        if not 0 <= c < len(run.class_names):
            return _error(404, f"class {name!r} does not exist; name one of {', '.join(run.class_names[:20])}"
                          f"{', ...' if len(run.class_names) > 20 else ''} or give its index 0..{len(run.class_names) - 1}")
        if not 1 <= n <= 256:
            return _error(400, f"n {n} must be between 1 and 256")
        return class_view(c, n)

    app.add_middleware(LimitBody, max_bytes=int(max_upload_mb * (1 << 20)))
    app.add_middleware(Guard, loopback_only=loopback_only)
    return app
