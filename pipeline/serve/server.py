"""Running the application with uvicorn, with two changes to its defaults for a server that may
face hostile clients:

* a connection that sends nothing is closed after ``IDLE_S`` seconds, like a kept-alive one
  (uvicorn starts that timer only after a first response, so a silent connection stayed open);
* garbage sent instead of HTTP is answered 400 by uvicorn but not logged, so stray bytes
  cannot fill the log; and at most ``MAX_CONNECTIONS`` connections are served at once
  (more get 503).
"""
from __future__ import annotations

import logging

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

IDLE_S = 5  # seconds a connection may stay silent, before or between requests
MAX_CONNECTIONS = 64


class IdleClosingH11(H11Protocol):
    """uvicorn's h11 protocol with the keep-alive timer also started when a connection opens."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)


class _NoInvalidRequests(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Invalid HTTP request" not in record.getMessage()


def run_server(app, host: str, port: int) -> None:
    """Serve ``app`` on ``host:port`` until interrupted."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", http=IdleClosingH11,
                            timeout_keep_alive=IDLE_S, limit_concurrency=MAX_CONNECTIONS)
    server = uvicorn.Server(config)
    logging.getLogger("uvicorn.error").addFilter(_NoInvalidRequests())  # after Config, which sets up uvicorn's logging
    server.run()
