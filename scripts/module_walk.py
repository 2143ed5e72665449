"""Which of the project's modules a command passes through, and where the path climbs back up the
layers (a module calling into a higher layer, or into the other package of its own layer).

    python scripts/module_walk.py            # the config through `pipe train`, an image through `pipe query`
    python scripts/module_walk.py --json

Each walk runs the real command in this process (on a small digits extract made first, not
traced) under ``sys.setprofile``. Counted: the modules of ``pipeline`` and ``cli`` in which a
function ran (calls made while importing are left out). A climb back is a call from a module of
one layer into a module of a higher layer, or of the other package of the same layer (training and
query), with the layers of tests/test_imports.py (shared < engines < data < extraction < table <
training = query < teach < serve < the public ``pipeline`` package < cli), counted once per
(caller module, called module) pair: a callback (a progress function, a generator handed down)
counts, as it is control coming back up.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = ("pipeline", "cli")
RANK = {"shared": 0, "engines": 1, "data": 2, "extraction": 3, "table": 4, "training": 5, "query": 5, "teach": 6, "serve": 7,
        "api": 8, "cli": 9}


def layer(module: str) -> str:
    """The layer of a module, as tests/test_imports.py names them."""
    parts = module.split(".")
    if parts[0] == "cli":
        return "cli"
    if len(parts) == 1:
        return "api"  # pipeline/__init__.py: the public, lazily importing package
    return parts[1] if parts[1] in RANK else "shared"


def climbs(caller: str, callee: str) -> bool:
    a, b = layer(caller), layer(callee)
    return RANK[b] > RANK[a] or (RANK[b] == RANK[a] and a != b)


def _module(frame) -> str | None:
    name = frame.f_globals.get("__name__", "")
    return name if name.split(".")[0] in OURS else None


def walk(argv: list[str]) -> dict:
    """Run ``pipe ARGV`` and trace it: visited modules and climb-back pairs."""
    from click.testing import CliRunner

    from cli.main import main

    visited: set[str] = set()
    up: set[tuple[str, str]] = set()

    def profile(frame, event, arg):
        if event != "call" or frame.f_code.co_name == "<module>":
            return
        mod = _module(frame)
        if mod is None:
            return
        f = frame.f_back
        while f is not None and _module(f) is None:  # the nearest frame of ours below this call
            f = f.f_back
        if f is not None and f.f_code.co_name == "<module>":
            return  # called while a module of ours is being imported
        visited.add(mod)
        if f is not None and climbs(_module(f), mod):
            up.add((_module(f), mod))

    sys.setprofile(profile)
    try:
        res = CliRunner().invoke(main, argv, catch_exceptions=False)
    finally:
        sys.setprofile(None)
    if res.exit_code != 0:
        raise SystemExit(f"pipe {' '.join(argv)} failed: {res.output}")
    return {"modules": sorted(visited), "climbs_back": sorted(f"{a} -> {b}" for a, b in up)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from click.testing import CliRunner

    from cli.main import main as pipe
    from pipeline.data.images import encode_png
    from pipeline.data.sources import open_source

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        run = CliRunner().invoke(pipe, ["--progress", "off", "extract", "digits", "--limit", "300", "--out", str(d / "s")], catch_exceptions=False)
        assert run.exit_code == 0, run.output
        img = next(open_source("digits", split="test").batches(1, 1)).images[0]
        (d / "x.png").write_bytes(encode_png(img))
        out = {
            "train": walk(["--progress", "off", "train", str(d / "s"), "--out", str(d / "r"), "--epochs", "1"]),
            "query": walk(["--progress", "off", "query", str(d / "r"), str(d / "x.png"), "--json"]),
        }
    summary = {k: {"module_count": len(v["modules"]), "climb_count": len(v["climbs_back"]), **v} for k, v in out.items()}
    if a.json:
        print(json.dumps(summary))
        return
    for k, v in summary.items():
        print(f"pipe {k}: {v['module_count']} modules, {v['climb_count']} climbs back")
        print("  modules: " + ", ".join(v["modules"]))
        for c in v["climbs_back"]:
            print(f"  climb back: {c}")


if __name__ == "__main__":
    main()
