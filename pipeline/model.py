"""The model: a sparse EmbeddingBag of pattern vectors (one row per vocabulary key or tail bucket) and a head.

Only the rows of keys present in a batch receive gradient (``sparse=True``),
so an image updates exactly the patterns it contains. An image arrives as a
bag of distinct rows with counts (CSR: rows, offsets, counts), so a pattern
that occurs 40 times in an image costs one lookup with weight 40.

Options (all in :class:`pipeline.config.TrainConfig`):

* ``bag``: ``mean`` (counts / number of kept keys), ``sum`` (counts), or
  ``sqrt`` (counts / sqrt(number of kept keys));
* ``hidden``: 0 for a linear head, else one hidden ReLU layer of that width;
* ``drop``: patch dropout (DropConnect on the bag's rows): each distinct row of
  an image is dropped with probability p during training. A number fixes p;
  ``auto`` learns it with a relaxed Bernoulli (concrete dropout, Gal et al. 2017);
* ``pooled_dropout``: ordinary dropout on the pooled vector, for comparison.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.errors import ParameterError

BAGS = ("mean", "sum", "sqrt")


class ConcreteDrop(nn.Module):
    """Patch dropout with a learned rate: keep-gates from a relaxed Bernoulli whose logit is a parameter.

    The rate is pushed up by the regularizer ``-reg * H(p)`` scaled per kept feature, as in
    concrete dropout, and down by the training loss, so no rate has to be chosen by hand.
    """

    def __init__(self, init_rate: float = 0.1, temperature: float = 0.1, reg: float = 1e-3):
        super().__init__()
        self.logit = nn.Parameter(torch.tensor(math.log(init_rate / (1 - init_rate))))
        self.temperature = temperature
        self.reg = reg

    @property
    def rate(self) -> torch.Tensor:
        return torch.sigmoid(self.logit)

    def forward(self, weights: torch.Tensor) -> torch.Tensor:
        p = self.rate
        eps = 1e-7
        u = torch.rand_like(weights).clamp(eps, 1 - eps)
        drop = torch.sigmoid((torch.log(p + eps) - torch.log(1 - p + eps) + torch.log(u) - torch.log(1 - u)) / self.temperature)
        return weights * (1 - drop) / (1 - p)

    def penalty(self) -> torch.Tensor:
        """Negative entropy of the drop rate (minimised at p = 0.5), times the regularizer weight."""
        p = self.rate
        return self.reg * (p * torch.log(p) + (1 - p) * torch.log(1 - p))


def bag_totals(counts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per bag: the sum of its rows' counts (how many patches the image has in the table)."""
    sizes = offsets.diff()
    totals = torch.zeros(len(sizes), device=counts.device, dtype=counts.dtype)
    return totals.index_add_(0, torch.repeat_interleave(torch.arange(len(sizes), device=counts.device), sizes), counts)


def bag_divisor(totals: torch.Tensor, bag: str) -> torch.Tensor:
    """What a bag's summed vectors are divided by: its patch count (mean) or its square root (sqrt);
    ones for sum. An empty bag divides by 1."""
    if bag == "sum":
        return torch.ones_like(totals)
    per_bag = totals.clamp(min=1.0)
    return per_bag.sqrt() if bag == "sqrt" else per_bag


class PatchBagModel(nn.Module):
    """Weighted pool of the pattern vectors of an image's rows, then a linear (or one-hidden-layer) head."""

    def __init__(
        self,
        rows: int,
        dim: int,
        num_classes: int,
        bag: str = "mean",
        hidden: int = 0,
        drop: float | str = 0.0,
        pooled_dropout: float = 0.0,
        table: torch.Tensor | None = None,
    ):
        super().__init__()
        self.bag = bag
        # a given table (rows x dim) is used as it is: no initialisation, no copy
        self.table = nn.EmbeddingBag(rows, dim, mode="sum", sparse=True, _weight=table)
        if table is None:
            nn.init.normal_(self.table.weight, std=0.1)
        self.head = nn.Linear(dim, num_classes) if hidden == 0 else nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )
        self.auto_drop = ConcreteDrop() if drop == "auto" else None
        self.drop_rate = 0.0 if drop == "auto" else float(drop)
        self.pooled_dropout = nn.Dropout(pooled_dropout) if pooled_dropout > 0 else nn.Identity()

    def output_layer(self) -> nn.Linear:
        """The last linear layer (its rows are the class directions)."""
        return self.head if isinstance(self.head, nn.Linear) else self.head[-1]

    def weights(self, counts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Per-row weights of each bag from its counts, after patch dropout when training."""
        w = counts
        if self.training and self.auto_drop is not None:
            w = self.auto_drop(w)
        elif self.training and self.drop_rate > 0:
            keep = torch.rand_like(w) >= self.drop_rate
            w = w * keep / (1 - self.drop_rate)
        if self.bag == "sum":
            return w
        return w / torch.repeat_interleave(bag_divisor(bag_totals(counts, offsets), self.bag), offsets.diff())

    def pooled(self, rows: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows, offsets (N+1), counts -> N x dim."""
        return self.table(rows, offsets[:-1], per_sample_weights=self.weights(counts, offsets))

    def forward(self, rows: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled_dropout(self.pooled(rows, offsets, counts)))

    def forward_rows(self, rows: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training forward over the batch's distinct rows only: (logits, distinct rows, their vectors).

        The batch's distinct rows are gathered into a small dense leaf tensor, so backward
        yields one gradient row per distinct row (already coalesced) instead of one per
        occurrence; :func:`pipeline.training.optim.step_table` applies it to those rows alone.
        """
        unique, local = torch.unique(rows, return_inverse=True)
        sub = self.table.weight.detach().index_select(0, unique).requires_grad_(True)
        pooled = nn.functional.embedding_bag(local, sub, offsets[:-1], mode="sum", per_sample_weights=self.weights(counts, offsets))
        return self.head(self.pooled_dropout(pooled)), unique, sub

    def penalty(self) -> torch.Tensor | float:
        return self.auto_drop.penalty() if self.auto_drop is not None else 0.0


def pick_device(name: str) -> torch.device:
    """'auto' means CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ParameterError("device", "cuda was asked for but no CUDA device is available; use `device` auto or cpu")
    return torch.device(name)


def build_model(config: TrainConfig, rows: int, num_classes: int, state: dict | None = None) -> PatchBagModel:
    """The model a run's settings describe: its table initialised from N(0, ``init_std``) (what
    training starts from), or holding the tensors of ``state`` themselves (the best epoch's
    ``model.pt`` memory-mapped, or a run's weights): nothing is initialised or copied."""
    if state is None:
        model = PatchBagModel(rows, config.dim, num_classes, config.bag, config.hidden, config.drop_rate, config.pooled_dropout)
        nn.init.normal_(model.table.weight, std=config.init_std)
        return model
    table = state.get("table.weight")
    if not isinstance(table, torch.Tensor) or table.shape != (rows, config.dim):
        got = tuple(table.shape) if isinstance(table, torch.Tensor) else None
        raise RuntimeError(f"table.weight is {got}, expected {(rows, config.dim)}")
    model = PatchBagModel(rows, config.dim, num_classes, config.bag, config.hidden, config.drop_rate, config.pooled_dropout, table)
    model.load_state_dict(state, assign=True)
    return model
