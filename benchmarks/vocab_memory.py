"""What stays resident after the vocabulary pass of ``pipe train``, and what giving memory back frees.

    python benchmarks/vocab_memory.py SHARDS --json
    python benchmarks/vocab_memory.py --smoke --json     # seconds: tiny digits shards made first (what CI runs)

Counts the vocabulary of ``SHARDS`` with the default train settings in this process, then
reports resident memory (``/proc/self/status``) and pyarrow's pool at each step: after the
count; after ``pyarrow``'s pool releases its unused pages; after glibc's ``malloc_trim``
(``pipeline.memory.release_read_pool`` and ``trim_heap``, the two steps of ``release_unused``, which ``pipe train`` now calls after
each pass over the shards). The vocabulary's own arrays are listed for comparison.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import proc_status_kb  # noqa: E402


def status() -> dict:
    kb = proc_status_kb()
    return {k: kb[k] >> 10 for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shards", type=Path, nargs="?")
    ap.add_argument("--smoke", action="store_true", help="seconds: tiny digits shards made first (checks that the benchmark runs)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if (a.shards is None) != a.smoke:
        ap.error("give SHARDS, or --smoke")
    with tempfile.TemporaryDirectory() as work:
        if a.smoke:
            import pipeline

            a.shards = Path(work) / "shards"
            pipeline.extract(pipeline.open_source("digits", limit=200), a.shards)
        measure(a)


def measure(a) -> None:
    import numpy as np
    import pyarrow as pa
    import torch  # noqa: F401  (loaded as in pipe train, so the baseline includes it)

    import pipeline
    from pipeline import TrainConfig, memory
    from pipeline.table import vocab

    pool = pa.default_memory_pool()
    steps = {"start": status()}
    shards = pipeline.open_shards(a.shards)
    cfg = TrainConfig()
    t = time.time()
    def training_keys():
        for b in shards.iter_batches():
            yield b.keys[~pipeline.is_validation(b.image_ids, cfg.val_fraction) & (b.labels >= 0)]

    v = vocab.build(training_keys, cfg.min_count, cfg.buckets, None, cfg.vocab_mb)
    seconds = round(time.time() - t, 1)
    gc.collect()
    steps["after_vocabulary"] = dict(status(), pyarrow_pool_max_mb=pool.max_memory() >> 20)
    memory.release_read_pool()
    steps["after_pyarrow_release"] = status()
    memory.trim_heap()
    steps["after_malloc_trim"] = status()
    arrays = {name: round(arr.nbytes / 2**20) for name, arr in vars(v).items() if isinstance(arr, np.ndarray)}
    res = {"shards": str(a.shards), "keys": int(v.size), "count_s": seconds, "pyarrow_backend": pool.backend_name,
           "vocabulary_arrays_mb": arrays, "steps_mb": steps}
    print(json.dumps(res) if a.json else json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
