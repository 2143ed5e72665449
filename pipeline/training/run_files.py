"""The files training writes beside the table: tensor files (``model.pt``, ``checkpoint.pt`` while
training; a finished run's ``model.safetensors``), written atomically and read without unpickling,
and ``curves.png``.

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
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline import layout
from pipeline.errors import PipelineError
from pipeline.table import weights


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


def plot_curves(history: list[dict], path: Path) -> None:
    """Write the curves of ``history`` (metrics.jsonl rows) as a PNG, atomically. A bare
    ``Figure`` (no pyplot) leaves the caller's matplotlib backend alone."""
    ep = [r["epoch"] for r in history]
    fig = Figure(figsize=(9, 3.5))
    a, b = fig.subplots(1, 2)
    a.plot(ep, [r["train_loss"] for r in history], "o-", label="train")
    b.plot(ep, [r["train_accuracy"] for r in history], "o-", label="train")
    if history[-1]["val_loss"] is not None:
        a.plot(ep, [r["val_loss"] for r in history], "o-", label="validation")
        b.plot(ep, [r["val_accuracy"] for r in history], "o-", label="validation")
    a.set(title="loss", xlabel="epoch")
    b.set(title="accuracy", xlabel="epoch")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    fig.tight_layout()
    with layout.atomic(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
