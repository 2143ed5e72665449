"""The model: a sparse EmbeddingBag of pattern vectors (one row per hashed key) and a linear head.

Only the rows of keys present in a batch receive gradient (``sparse=True``),
so an image updates exactly the patterns it contains.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def key_rows(keys: np.ndarray, rows: int) -> np.ndarray:
    """Hashing trick: the embedding row of each uint64 key is ``key % rows`` (int64)."""
    return (keys % np.uint64(rows)).astype(np.int64)


class PatchBagModel(nn.Module):
    """Mean of the pattern vectors of an image's keys, then a linear classifier."""

    def __init__(self, rows: int, dim: int, num_classes: int):
        super().__init__()
        self.table = nn.EmbeddingBag(rows, dim, mode="mean", sparse=True)
        self.head = nn.Linear(dim, num_classes)
        nn.init.normal_(self.table.weight, std=0.1)

    def pooled(self, rows: torch.Tensor) -> torch.Tensor:
        """rows: N x K int64 (equal-length bags) -> N x dim."""
        return self.table(rows)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(rows))


def pick_device(name: str) -> torch.device:
    """'auto' means CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from .errors import PipelineError

        raise PipelineError("--device cuda was asked for but no CUDA device is available; use --device auto or cpu")
    return torch.device(name)
