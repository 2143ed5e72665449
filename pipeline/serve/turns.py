"""A lock that serves its waiters in the order they came (a ticket lock).

``threading.Lock`` is not fair: a thread that releases it and asks again at once (a request
answering its images one after another) can take it again ahead of threads that were
already waiting, so one large request could hold the run while a small one waits. With
:class:`Turns` each acquisition takes a ticket and the lock passes to tickets in order.
"""
from __future__ import annotations

import threading


class Turns:
    """A first-come, first-served mutual-exclusion lock; use as ``with turns: ...``."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._next = 0  # the ticket the next caller takes
        self._serving = 0  # the ticket that holds the lock

    def __enter__(self) -> "Turns":
        with self._cond:
            ticket = self._next
            self._next += 1
            self._cond.wait_for(lambda: self._serving == ticket)
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()
