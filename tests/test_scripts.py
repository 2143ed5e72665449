"""The scripts behind the README's two commands only import what the package has."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_every_pipeline_import_in_the_scripts_resolves():
    found = []
    for script in SCRIPTS.glob("*.sh"):
        for module, names in re.findall(r"from (pipeline[\w.]*) import ([\w, ]+)", script.read_text()):
            mod = importlib.import_module(module)
            for name in (n.strip() for n in names.split(",")):
                assert hasattr(mod, name) or importlib.util.find_spec(f"{module}.{name}"), f"{script.name}: {module}.{name}"
            found.append(module)
    assert found, "no pipeline import found in scripts/*.sh (the test would check nothing)"


def test_loadgroup_keeps_a_group_on_one_worker(tmp_path):
    """scripts/test.sh runs `-n 2 --dist loadgroup` so that a module marked with xdist_group (one
    costly fixture, e.g. tests/test_grow.py's chain of runs) runs on one worker; some pytest and
    pytest-xdist versions drop the grouping without a word, which this catches."""
    import subprocess
    import sys

    (tmp_path / "test_grouped.py").write_text(
        "import os, pytest\n"
        "pytestmark = pytest.mark.xdist_group('g')\n"
        + "".join(f"def test_{i}():\n    open({str(tmp_path / 'workers')!r}, 'a').write(os.environ['PYTEST_XDIST_WORKER'] + '\\n')\n"
                  for i in range(6))
    )
    (tmp_path / "test_other.py").write_text("".join(f"def test_{i}():\n    pass\n" for i in range(6)))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup", str(tmp_path)],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    workers = (tmp_path / "workers").read_text().split()
    assert len(workers) == 6 and len(set(workers)) == 1, workers
