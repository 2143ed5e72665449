"""Resident memory of a command over time, sampled from /proc, with the phases its output folder shows.

    python benchmarks/rss_trace.py --watch /tmp/run --out /tmp/run-rss.tsv -- pipe train SHARDS --out /tmp/run
    python benchmarks/rss_trace.py --smoke --json      # seconds: traces a Python that holds 200 MB (what CI runs)

Starts the command, reads the child's ``VmRSS`` and ``RssFile`` (memory-mapped files, such
as the model ``pipe train`` reloads) from ``/proc/PID/status`` every ``--every`` seconds,
and lists the files in ``--watch`` at each sample: a file appearing marks a phase (the
vocabulary, each epoch's ``model.pt``, ``patterns.parquet``, the index). Prints, per
phase, the samples' RSS range, then the child's peak RSS (``getrusage``, exact) and wall
time. Linux only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import proc_status_kb  # noqa: E402


def sample(pid: int) -> tuple[int, int] | None:
    """(VmRSS, RssFile) of ``pid`` in kB, or None once it is gone."""
    status = proc_status_kb(pid)
    return None if status is None else (status.get("VmRSS", 0), status.get("RssFile", 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--every", type=float, default=5.0, help="seconds between samples [5]")
    ap.add_argument("--watch", type=Path, default=None, help="folder whose files mark the phases")
    ap.add_argument("--out", type=Path, default=None, help="write every sample here (tab-separated)")
    ap.add_argument("--smoke", action="store_true", help="trace a Python that holds 200 MB for a second (checks that the benchmark runs)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    a = ap.parse_args()
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if a.smoke:
        a.every = 0.1
        cmd = [sys.executable, "-c", "import time; b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1)"]
    if not cmd:
        ap.error("give the command to trace after --, e.g. -- pipe train SHARDS --out RUN")
    t0 = time.time()
    try:
        child = subprocess.Popen(cmd)
    except OSError as e:
        ap.error(f"cannot start {cmd[0]!r}: {e.strerror}")
    rows = []
    due = t0
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)  # reaped here, so getrusage gives its peak
        if pid:
            break
        if time.time() >= due:
            due += a.every
            s = sample(child.pid)
            files = ",".join(sorted(p.name for p in a.watch.iterdir())) if a.watch and a.watch.is_dir() else ""
            if s is not None:
                rows.append((round(time.time() - t0, 1), s[0], s[1], files))
        time.sleep(0.05)
    code = os.waitstatus_to_exitcode(status)
    if a.out:
        a.out.write_text("".join(f"{t}\t{rss}\t{f}\t{files}\n" for t, rss, f, files in rows))
    phases: list[dict] = []
    for t, rss, f, files in rows:
        if not phases or phases[-1]["files"] != files:
            phases.append({"from_s": t, "files": files, "rss_mb": [rss >> 10, rss >> 10], "file_mb": f >> 10})
        p = phases[-1]
        p["rss_mb"] = [min(p["rss_mb"][0], rss >> 10), max(p["rss_mb"][1], rss >> 10)]
    peak = max(rows, key=lambda r: r[1]) if rows else (0, 0, 0, "")
    res = {"exit_code": code, "seconds": round(time.time() - t0, 1), "samples": len(rows),
           "max_rss_mb": usage.ru_maxrss >> 10,  # getrusage: the child's peak resident set
           "peak_sampled_mb": peak[1] >> 10, "peak_at_s": peak[0], "peak_file_mb": peak[2] >> 10, "phases": phases}
    if a.json:
        print(json.dumps(res))
    else:
        for p in phases:
            print(f"{p['from_s']:>8.1f} s  RSS {p['rss_mb'][0]:>6,}-{p['rss_mb'][1]:>6,} MB  (files mapped {p['file_mb']:,} MB)  {p['files']}")
        print(f"peak {res['max_rss_mb']:,} MB (getrusage); highest sample {res['peak_sampled_mb']:,} MB at {res['peak_at_s']} s "
              f"({res['peak_file_mb']:,} MB of it mapped files); {res['seconds']} s; exit code {code}")
    sys.exit(code)


if __name__ == "__main__":
    main()
