"""The README's Python example runs as printed, against a digits run where it expects one."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_python_example_runs(digits_run, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has no Python example"
    (tmp_path / "artifacts" / "digits").mkdir(parents=True)
    shutil.copytree(digits_run, tmp_path / "artifacts" / "digits" / "run")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert len(scope["labels"]) == len(scope["images"]) == 16 == len(scope["familiar"])
    assert scope["lookup"].ids.shape[1] == 5 and scope["near"].ids.shape == (16, 5)
