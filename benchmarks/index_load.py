"""Opening a run's pattern index memory-mapped (as pipeline.index.load does) against reading it whole.

    python benchmarks/index_load.py RUN --json

Each way in its own fresh process, so neither sees the other's page cache use as its own
memory: seconds to open and the growth of resident memory (VmRSS) right after.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

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
    ap.add_argument("run", type=Path)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    path = a.run / "patterns.faiss"
    res = {"index_mb": round(path.stat().st_size / 2**20, 1)}
    for name, flag in (("memory_mapped", "1"), ("read_whole", "0")):
        out = subprocess.run([sys.executable, "-c", _CHILD, str(path), flag], capture_output=True, text=True, check=True)
        res[name] = json.loads(out.stdout)
    print(json.dumps(res) if a.json else res)


if __name__ == "__main__":
    main()
