"""Output directories and files: who may write them (a lock) and what ``--overwrite`` may remove.

Every stage that writes holds an exclusive ``fcntl.flock`` on a lock file for
the whole job: ``OUT/.patchhash.lock`` for a directory, ``FILE.lock`` beside a
single output file. A second writer is refused at once; the kernel drops the
lock when its holder dies, so a killed job never blocks the next one.

``--overwrite`` replaces only a directory this project wrote (it holds one of
:data:`OWN_FILES`), never one that is, or holds, an input of the job or the
current directory.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from pipeline import layout
from pipeline.errors import ParameterError, PipelineError

LOCK = ".patchhash.lock"
# a directory holding one of these was written by pipe extract or pipe train (finished or not)
OWN_FILES = (layout.MANIFEST, layout.EXTRACT_JOB, layout.RUN_MANIFEST, layout.TRAIN_JOB)


def contents(out: Path) -> list[Path]:
    """What ``out`` holds, its own lock file left out."""
    return [p for p in out.iterdir() if p.name != LOCK] if out.is_dir() else []


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_out(out: Path, inputs: Iterable[Path | str] = ()) -> None:
    """Refuse an output directory that is a file, the current directory (or above it), or one
    that is or holds an input of the job (its files would be replaced)."""
    if out.exists() and not out.is_dir():
        raise ParameterError("out", f"{out} is a file; give a directory")
    target = out.resolve()
    if _inside(Path.cwd().resolve(), target):
        raise ParameterError("out", f"{out} is the current directory or holds it; give a directory of its own, e.g. {out / 'out'}")
    for given in inputs:
        inp = Path(given).resolve()
        if _inside(inp, target):
            raise ParameterError("out", f"{out} is or holds the input {given}; writing there would replace it: choose another `out`")


def check_file_out(out: Path, what: str) -> None:
    """Refuse an output file (``--out`` of pipe query --batch, a --png folder) that would land
    inside a run or shard directory: only the command that owns such a directory writes in it."""
    target = Path(out).resolve()
    for d in [target, *target.parents]:
        if d.is_dir() and any((d / name).exists() for name in OWN_FILES):
            raise PipelineError(f"{what} {out} is inside {d}, a directory pipe extract or pipe train wrote; "
                                "only they write there: choose a path outside it")


def _replace(out: Path) -> None:
    """Empty ``out`` (checked by :func:`prepare`) for a new job: only a directory this project
    wrote, and the lock file (held by the caller) stays."""
    held = contents(out)
    if held and not any((out / name).exists() for name in OWN_FILES):
        raise ParameterError(
            "out", f"{out} holds files pipe did not write (no {', '.join(OWN_FILES)}); `overwrite` replaces only shard and run "
            "directories: choose another `out`, or empty it yourself"
        )
    for p in held:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def check_prepare(out: Path, overwrite: bool, commit_file: str, what: str, inputs: Iterable[Path | str] = ()) -> None:
    """Refuse what :func:`prepare` would refuse, writing nothing: an output among the inputs, or a
    non-empty one without ``overwrite``."""
    check_out(out, inputs)
    if contents(out) and not overwrite:
        state = f"a finished {what}" if (out / commit_file).exists() else f"an unfinished {what} or other files"
        raise ParameterError("out", f"{out} already holds {state}; pass `overwrite` to replace it or choose another directory")


def prepare(out: Path, overwrite: bool, commit_file: str, what: str, inputs: Iterable[Path | str] = ()) -> None:
    """An empty output directory for a new job: an existing non-empty one is replaced only with
    ``overwrite`` (and only as :func:`_replace` allows)."""
    check_prepare(out, overwrite, commit_file, what, inputs)
    if contents(out):
        _replace(out)
    out.mkdir(parents=True, exist_ok=True)


@contextmanager
def locked(path: Path, what: str, file: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on output ``path`` for the block: a directory (created if missing), or
    with ``file`` a single output file (the lock sits beside it)."""
    folder = path.parent if file else path
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock") if file else path / LOCK
    fd = _acquire(lock, path, what)
    try:
        yield
    finally:
        try:
            if _same_file(lock, fd):
                lock.unlink()
            if created and not file and path.is_dir() and not any(path.iterdir()):
                path.rmdir()  # a job that failed before writing anything leaves nothing behind
        except OSError:
            pass
        os.close(fd)


def _same_file(lock: Path, fd: int) -> bool:
    try:
        return os.stat(lock).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _acquire(lock: Path, path: Path, what: str) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = _holder(lock)
            raise PipelineError(
                f"{path} is being written by another {what}{f' (pid {holder})' if holder else ''}; "
                "wait for it to finish, or choose another output"
            ) from None
        if _same_file(lock, fd):  # not a lock file its last holder removed after we opened it
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _holder(lock: Path) -> str:
    try:
        return lock.read_text().strip()
    except OSError:
        return ""
