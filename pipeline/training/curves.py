"""``curves.png``: loss and accuracy per epoch, training and validation."""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline import layout


def plot(history: list[dict], path: Path) -> None:
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
