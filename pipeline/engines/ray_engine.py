"""The Ray engine of ``pipe extract --engine ray``: the same shard tasks, run by Ray Data.

The driver lists the source in order and cuts it into the same :class:`ShardTask` ranges as
the local engine (the split depends only on the settings). A task carries file references
(an image folder's files, an uncompressed tar's members) that the worker reads itself, or
the bytes where only the driver can read them (a compressed tar's stream, in-memory arrays).
Windows of tasks become Ray datasets whose ``map_batches`` runs the function the caller
passes (extract passes :func:`pipeline.extraction.stage.write_shard`, the very function the
local engine runs), one task per batch, on as many Ray workers as the cluster gives. Each task reads, hashes and writes its
shard file and returns its record; the driver writes the manifest. So the shards and
manifest are the local engine's, file for file.

On a cluster (``--address``), ``--out`` and the source must be paths every node can reach
(a shared filesystem), and ``patchhash`` must be installed on every node.
"""
from __future__ import annotations

import json
import logging
import pickle
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from pipeline.errors import ParameterError, PipelineError


def _quiet() -> None:
    """Ray Data logs every dataset execution at INFO; the CLI's progress bar says enough."""
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


def require_ray():
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ParameterError("engine", "ray needs Ray: pip install 'patchhash[ray]' (or pip install 'ray[data]')") from None
    return ray


@contextmanager
def _session(workers: int, address: str | None):
    """Ray, connected: to the cluster at ``address``, or a local instance of ``workers`` CPUs
    started here and shut down on leaving (an already connected session is used as it is)."""
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    _quiet()
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def check_engine(engine: str) -> None:
    """``local`` or ``ray`` (with Ray installed); raises :class:`PipelineError` before anything is written."""
    if engine not in ("local", "ray"):
        raise ParameterError("engine", f"{engine!r} is not one of local, ray")
    if engine == "ray":
        require_ray()


def _run_batch(batch: dict) -> dict:
    """Run each pickled (function, task) pair of a Ray Data batch; the records come back as JSON."""
    records = []
    for b in batch["task"]:
        fn, task = pickle.loads(bytes(b))
        records.append(fn(task))
    return {"record": [json.dumps(r) for r in records]}


def _user_error(e: BaseException) -> PipelineError | None:
    """The PipelineError a worker raised, found in Ray's wrapping exceptions."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, PipelineError):
            return e
        cause = getattr(e, "cause", None)
        e = cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__)
    return None


def run_tasks(fn: Callable[[Any], dict], tasks: Iterator, workers: int, address: str | None, progress=None) -> list[dict]:
    """``fn(task)`` for every task on Ray (a local instance of ``workers`` CPUs, or the cluster at
    ``address``); ``fn`` is a module-level function (sent by reference) returning a JSON-able
    record with ``originals``, ``skipped`` and ``patches`` (what ``progress`` is told)."""
    with _session(workers, address) as ray:
        ray.data.DataContext.get_current().enable_progress_bars = False
        slots = max(1, int(ray.cluster_resources().get("CPU", workers)))
        records: list[dict] = []
        window: list = []
        for task in tasks:
            window.append(task)
            if len(window) >= 2 * slots:  # bounded memory: at most two tasks' images per worker in flight
                records += _run_window(ray, fn, window, slots, progress)
                window = []
        if window:
            records += _run_window(ray, fn, window, slots, progress)
        return records


def _run_window(ray, fn, window: list, slots: int, progress) -> list[dict]:
    ds = ray.data.from_items([{"task": pickle.dumps((fn, t))} for t in window], override_num_blocks=len(window))
    size = min(slots, len(window))
    if hasattr(ray.data, "TaskPoolStrategy"):  # Ray >= 2.51 replaced concurrency= by compute=
        ds = ds.map_batches(_run_batch, batch_size=1, compute=ray.data.TaskPoolStrategy(size=size), num_cpus=1)
    else:
        ds = ds.map_batches(_run_batch, batch_size=1, concurrency=size, num_cpus=1)
    out = []
    try:
        for row in ds.iter_rows():
            rec = json.loads(row["record"])
            if progress:
                progress(rec["originals"] + len(rec["skipped"]), rec["patches"])
            out.append(rec)
    except Exception as e:
        err = _user_error(e)
        if err is not None:
            raise PipelineError(str(err)) from None
        raise
    return out


class _Querier:
    """One Ray actor: loads the run once (``load(root, unseen)``), then answers batches with
    ``answer(run, keys, labels, image_ids, names, *args, weights)``."""

    def __init__(self, load: Callable, answer: Callable, root: str, unseen: str | None, args: tuple):
        import torch  # in the actor's own process

        torch.set_num_threads(1)  # one CPU per actor
        self.run = load(root, unseen)
        self.answer = answer
        self.args = args

    def table(self, keys, labels, image_ids, names, weights, vote_keys=None, vote_weights=None):
        return self.answer(self.run, keys, labels, image_ids, names, *self.args, weights, vote_keys, vote_weights)


def query_tables(load: Callable, answer: Callable, root: str, batches: Iterator, unseen: str | None, args: tuple,
                 workers: int, address: str | None) -> Iterator:
    """``answer``'s result tables of key batches (KeyBatch), in order, computed by ``workers`` Ray
    actors that each ``load`` the run once (both module-level functions, sent by reference)."""
    with _session(workers, address) as ray:
        actor = ray.remote(num_cpus=1)(_Querier)
        pool = [actor.remote(load, answer, root, unseen, args) for _ in range(workers)]
        pending: list = []
        for i, b in enumerate(batches):
            pending.append(pool[i % len(pool)].table.remote(b.keys, b.labels, b.image_ids, b.names, b.weights, b.vote_keys, b.vote_weights))
            if len(pending) >= 2 * len(pool):  # bounded: two batches per actor in flight
                yield _get(ray, pending.pop(0))
        while pending:
            yield _get(ray, pending.pop(0))


def _get(ray, ref):
    try:
        return ray.get(ref)
    except Exception as e:
        err = _user_error(e)
        if err is not None:
            raise PipelineError(str(err)) from None
        raise
