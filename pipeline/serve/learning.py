"""What a server started with ``--learn-into DIR`` was taught: the lessons, and writing them.

``POST /learn`` teaches the loaded run one image (:func:`pipeline.teach.learn.learn`: the
rows of that image's patterns and, for a new class, a head row change; nothing else), and the
next answer comes from the taught state. The run on disk is never touched: ``POST /save``, and
the server's shutdown when something is unsaved, write everything taught so far as a new run in
``DIR`` (:func:`pipeline.teach.save.save`), replacing what an earlier save of this server wrote.
"""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.query.report import query_one
from pipeline.teach.learn import Lesson, learn
from pipeline.teach.save import check_out, save

MAX_LESSONS = 1024  # images one server keeps to save; more: save, and serve the saved run


class Learning:
    """The lessons of one server process (one process serves a learning run)."""

    def __init__(self, run, into: Path | str):
        self.run = run
        self.into = check_out(into, run.root)
        self.lessons: list[Lesson] = []
        self.saved = 0  # lessons written by the last save

    def status(self) -> dict:
        return {"into": str(self.into), "lessons": len(self.lessons), "unsaved": len(self.lessons) - self.saved}

    def learn(self, image, label: str, name: str, k: int, patches: int) -> dict:
        """Teach the run ``image`` as ``label``; the lesson and the image's answer now. Call under the run's lock."""
        if len(self.lessons) >= MAX_LESSONS:
            raise PipelineError(f"this server was taught {MAX_LESSONS} images already; POST /save, then serve the saved run to teach it more")
        lesson = learn(self.run, image, label, name)
        self.lessons.append(lesson)
        answer = query_one(self.run, image, name, k=k, patches=patches)[0]
        return {
            "learned": {"image": name, "class": lesson.label, "new_class": lesson.new_class, "before": lesson.before,
                        "after": lesson.after, "steps": lesson.steps, "patterns_moved": lesson.rows},
            "result": answer, **self.status(),
        }

    def save(self) -> dict:
        """Write every lesson so far as a new run in ``into``. Call under the run's lock."""
        save(self.run, self.lessons, self.into)
        self.saved = len(self.lessons)
        return {"saved": str(self.into), **self.status()}

    def save_unsaved(self) -> None:
        """At shutdown: save when something was taught since the last save."""
        if len(self.lessons) > self.saved:
            log = logging.getLogger("uvicorn.error")
            log.warning("writing the %d taught image(s) into %s", len(self.lessons), self.into)
            self.save()
            log.warning("saved: serve it with pipe serve %s", self.into)
