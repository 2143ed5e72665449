"""Running the application with uvicorn, with two changes to its defaults for a server that may
face hostile clients:

* a connection that sends nothing is closed after ``IDLE_S`` seconds, like a kept-alive one
  (uvicorn starts that timer only after a first response, so a silent connection stayed open);
* garbage sent instead of HTTP is answered 400 by uvicorn but not logged, so stray bytes
  cannot fill the log; and at most ``MAX_CONNECTIONS`` connections are served at once
  (more get 503).

With several workers, uvicorn's supervisor shares one listening socket among that many
processes, each loading the run itself (:func:`pipeline.serve.app.app_from_env`): a run answers one image at a
time per process, so the processes are what use more than one core. Their memory-mapped files
(weights, indexes) are shared pages.
"""
from __future__ import annotations

import json
import logging
import os

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

IDLE_S = 5  # seconds a connection may stay silent, before or between requests
MAX_CONNECTIONS = 64


class IdleClosingH11(H11Protocol):
    """uvicorn's h11 protocol with the keep-alive timer also started when a connection opens."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)


class NoInvalidRequests(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Invalid HTTP request" not in record.getMessage()


SPEC_ENV = "PATCHHASH_SERVE"  # how pipe serve tells its worker processes what to serve (JSON)


def _config(app, host: str, port: int, **kw) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level="warning", http=IdleClosingH11,
                          timeout_keep_alive=IDLE_S, limit_concurrency=MAX_CONNECTIONS, **kw)


def run_server(app, host: str, port: int) -> None:
    """Serve ``app`` on ``host:port`` in this process until interrupted."""
    config = _config(app, host, port)
    server = uvicorn.Server(config)
    logging.getLogger("uvicorn.error").addFilter(NoInvalidRequests())  # after Config, which sets up uvicorn's logging
    server.run()


def run_workers(factory: str, spec: dict, host: str, port: int, workers: int) -> None:
    """Serve from ``workers`` processes sharing ``host:port``, until interrupted: each builds its
    application by calling ``factory`` (an import string, ``module:function``), which reads
    ``spec`` back from ``$PATCHHASH_SERVE``."""
    from uvicorn.supervisors import Multiprocess

    os.environ[SPEC_ENV] = json.dumps(spec)
    config = _config(factory, host, port, factory=True, workers=workers)
    logging.getLogger("uvicorn.error").addFilter(NoInvalidRequests())
    sock = config.bind_socket()
    try:
        Multiprocess(config, sockets=[sock]).run()
    finally:
        sock.close()
