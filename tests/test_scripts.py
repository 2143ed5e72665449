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
