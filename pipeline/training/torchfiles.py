"""Tensor files (``model.pt``, ``checkpoint.pt`` while training; a finished run's ``model.safetensors``):
written atomically, read without unpickling.

``torch.load(weights_only=True)`` refuses anything but tensors and plain
containers; that refusal, a truncated file and a full disk each become one
:class:`PipelineError` line naming the file.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from pipeline import layout
from pipeline.table import weights
from pipeline.errors import PipelineError


def load(path: Path, fix: str, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """The tensors of ``path``; ``fix`` says what to do when it cannot be read."""
    if not path.is_file():
        raise PipelineError(f"{path} is missing; {fix}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise PipelineError(f"{path} holds objects other than tensors, which are never loaded; it was not written by pipe: {fix}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
        raise PipelineError(f"{path} is damaged or truncated ({first}); {fix}") from None


def save_weights(state: dict, path: Path) -> None:
    """Write a state dict's tensors as safetensors (read by :mod:`pipeline.table.weights`), atomically."""
    weights.save({k: v.detach().cpu().contiguous().numpy() for k, v in state.items()}, path)


def save(obj: Any, path: Path) -> None:
    """Write ``obj`` with ``torch.save``, atomically."""
    try:
        with layout.atomic(path) as tmp:
            torch.save(obj, tmp)
    except (RuntimeError, OSError) as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
        raise PipelineError(f"cannot write {path} ({first}); is the disk full? free space and run again with `resume`") from None
