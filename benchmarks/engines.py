"""Wall time of the local and Ray engines with 1 and 2 workers, on the shared CIFAR-10 archive.

    python benchmarks/engines.py --json

* extract: the first ``--per-class`` images of each class, default settings, into fresh
  shards with ``engine=local`` (1 and 2 worker processes) and ``engine=ray`` (a local Ray
  instance of 1 and 2 CPUs, started and stopped inside the timing, as ``pipe extract
  --engine ray`` does); the shards of every run are checked equal to the first. Then the same
  images written out as an image folder, extracted the same four ways: there the workers read
  the files themselves (the driver hands out file references), while from the ``.tar.gz`` the
  driver has to read the stream in order and ship the bytes.
* train: ``--epochs`` epochs on those shards with ``torchrun`` at 1 and 2 processes
  (``pipe train --nproc``, DDP over gloo) and with the single-process trainer; wall time
  (start-up and final step included) and the best held-out accuracy of each.
* batch query: ``--query-images`` images through the single-process run, locally and on
  1 and 2 Ray actors (each loads the run once; Ray start-up included).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import MEASURED_AUGMENT, bench_train, cifar_source, measured_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=300)
    ap.add_argument("--query-images", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="50 archive images, one Ray run per stage, 1 epoch (checks that the benchmark runs)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import pyarrow.parquet as pq

    engines = (("local", 1), ("local", 2), ("ray", 1), ("ray", 2))
    folder_engines = engines
    query_engines = (("local", 1), ("ray", 1), ("ray", 2))
    procs = (1, 2)
    if a.smoke:  # Ray once (the archive's extract); Ray queries and torchrun are the suite's own tests (test_query, test_train)
        a.per_class, a.query_images, a.epochs = 5, 20, 1
        engines, folder_engines, query_engines, procs = (("local", 1), ("ray", 1)), (("local", 1),), (("local", 1),), ()

    import pipeline

    work = Path(tempfile.mkdtemp(prefix="engines-"))
    try:
        src = cifar_source(None, per_class=a.per_class)
        res: dict = {"images": len(src), "extract_s": {}, "query_s": {}}
        first = None
        for engine, workers in engines:
            out = work / f"{engine}{workers}"
            t = time.perf_counter()
            m = pipeline.extract(src, out, measured_config(), engine=engine, workers=workers, augment=MEASURED_AUGMENT)
            res["extract_s"][f"{engine}_{workers}"] = round(time.perf_counter() - t, 2)
            if first is None:
                first = (out, m)
            else:
                assert all(pq.read_table(first[0] / r["file"]).equals(pq.read_table(out / r["file"])) for r in first[1]["shards"])
        folder = work / "folder"
        for _, raw in src.raw_images():
            f = folder / raw.name.split(":", 1)[1]
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(raw.data)
        fsrc = pipeline.open_source(str(folder))
        res["folder_extract_s"] = {}
        for engine, workers in folder_engines:
            out = work / f"folder-{engine}{workers}"
            t = time.perf_counter()
            pipeline.extract(fsrc, out, measured_config(), engine=engine, workers=workers, augment=MEASURED_AUGMENT)
            res["folder_extract_s"][f"{engine}_{workers}"] = round(time.perf_counter() - t, 2)
            shutil.rmtree(out)
        from pipeline.training.ddp import launch

        res["train_s"], res["train_val_accuracy"] = {}, {}
        for nproc in procs:
            t = time.perf_counter()
            m = launch(first[0], work / f"ddp{nproc}", bench_train(False, epochs=a.epochs), nproc)
            res["train_s"][f"torchrun_{nproc}"] = round(time.perf_counter() - t, 2)
            res["train_val_accuracy"][f"torchrun_{nproc}"] = m["final"]["val_accuracy"]
        t = time.perf_counter()
        # refit off: several processes never refit, so one process does not either
        m = pipeline.train(pipeline.open_shards(first[0]), work / "run", bench_train(False, epochs=a.epochs, refit="off"), overwrite=True)
        res["train_s"]["pipe_train"] = round(time.perf_counter() - t, 2)
        res["train_val_accuracy"]["pipe_train"] = m["final"]["val_accuracy"]
        run = pipeline.load(work / "run")
        q = cifar_source(a.query_images)
        for engine, workers in query_engines:
            t = time.perf_counter()
            pipeline.query_batch(run, q, work / f"q-{engine}{workers}.parquet", engine=engine, workers=workers)
            res["query_s"][f"{engine}_{workers}"] = round(time.perf_counter() - t, 2)
        print(json.dumps(res) if a.json else res)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
