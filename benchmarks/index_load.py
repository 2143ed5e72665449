"""Opening a run's pattern index memory-mapped (as pipeline.table.index.load does) against reading it whole.

    python benchmarks/index_load.py RUN --json
    python benchmarks/index_load.py --smoke --json     # seconds: a tiny digits run made first (what CI runs)

Each way in its own fresh process, so neither sees the other's page cache use as its own
memory: seconds to open and the growth of resident memory (VmRSS) right after.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import smoke_run  # noqa: E402

_CHILD = """
import json, sys, time, faiss
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) / 1024
path, mmap = sys.argv[1], sys.argv[2] == '1'
r0 = rss(); t = time.perf_counter()
idx = faiss.read_index(path, (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY) if mmap else 0)
print(json.dumps({"open_s": round(time.perf_counter() - t, 3), "rss_growth_mb": round(rss() - r0, 1), "vectors": idx.ntotal}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, nargs="?", help="a run directory (not with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="measure a tiny digits run made first")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if (a.run is None) != a.smoke:
        ap.error("give RUN, or --smoke")
    with tempfile.TemporaryDirectory() as work:
        if a.smoke:
            a.run = smoke_run(Path(work))[1]
        measure(a)


def measure(a) -> None:
    path = a.run / "patterns.faiss"
    res = {"index_mb": round(path.stat().st_size / 2**20, 1)}
    for name, flag in (("memory_mapped", "1"), ("read_whole", "0")):
        out = subprocess.run([sys.executable, "-c", _CHILD, str(path), flag], capture_output=True, text=True, check=True)
        res[name] = json.loads(out.stdout)
    print(json.dumps(res) if a.json else res)


if __name__ == "__main__":
    main()
