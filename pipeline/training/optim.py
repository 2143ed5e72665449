"""Updates of the pattern table from the gradient of a batch's distinct rows, and of the dense head.

A batch touches a few hundred thousand distinct rows of a table of millions.
:meth:`pipeline.model.PatchBagModel.forward_rows` gives the gradient of exactly
those rows; the optimizers here change exactly those rows:

* ``adagrad``: lazy Adagrad written with index operations (one gather, one
  scatter of the accumulator, one scatter-add of the step), which touches only the
  batch's rows where ``torch.optim.Adagrad`` coalesces a sparse gradient first;
* ``rowwise-adagrad``: the same with one accumulator per row, the mean of the
  row's squared gradient (FBGEMM's and TorchRec's ``ROWWISE_ADAGRAD``): the
  optimizer state shrinks from a second table to one number per row;
* ``sparseadam`` and ``sgd``: torch's own ``SparseAdam`` and ``SGD``, handed the
  gradient as an already coalesced sparse tensor.
"""
from __future__ import annotations

import torch

from pipeline.training.table_kernels import CpuTableStep


class LazyAdagrad:
    """Adagrad on the rows a batch touches: ``acc[r] += g**2; w[r] -= lr * g / (sqrt(acc[r]) + eps)``.

    ``rowwise``: ``acc`` is one column, and ``acc[r] += mean(g**2)`` over the row's elements.
    """

    def __init__(self, weight: torch.Tensor, lr: float, eps: float = 1e-10, rowwise: bool = False):
        self.weight = weight
        self.lr = lr
        self.eps = eps
        self.rowwise = rowwise
        self.acc = weight.new_zeros((weight.shape[0], 1)) if rowwise else torch.zeros_like(weight)

    def step(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        sq = grad.square().mean(1, keepdim=True) if self.rowwise else grad * grad
        acc = self.acc.index_select(0, rows).add_(sq)
        self.acc.index_copy_(0, rows, acc)
        self.weight.index_add_(0, rows, grad.div(acc.sqrt_().add_(self.eps)).mul_(-self.lr))

    def state_dict(self) -> dict:
        return {"acc": self.acc, "lr": self.lr, "eps": self.eps}

    def load_state_dict(self, state: dict) -> None:
        if state["acc"].shape != self.acc.shape:
            raise ValueError(f"optimizer state of shape {tuple(state['acc'].shape)} does not fit {tuple(self.acc.shape)}")
        self.acc.copy_(state["acc"])
        self.lr, self.eps = state["lr"], state["eps"]


class TorchSparse:
    """A torch optimizer (SparseAdam, SGD) fed the distinct rows' gradient as a coalesced sparse tensor."""

    def __init__(self, param: torch.nn.Parameter, opt: torch.optim.Optimizer):
        self.param = param
        self.opt = opt

    def step(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        self.param.grad = torch.sparse_coo_tensor(rows[None], grad, self.param.shape, is_coalesced=True, check_invariants=False)
        self.opt.step()
        self.param.grad = None

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)


def table_optimizer(name: str, param: torch.nn.Parameter, lr: float):
    if name in ("adagrad", "rowwise-adagrad"):
        return LazyAdagrad(param.data, lr, rowwise=name == "rowwise-adagrad")
    if name == "sparseadam":
        return TorchSparse(param, torch.optim.SparseAdam([param], lr=lr))
    return TorchSparse(param, torch.optim.SGD([param], lr=lr))


def cpu_table_step(opt, device: torch.device):
    """The compiled CPU step for ``opt`` (:mod:`pipeline.training.table_kernels`) when it applies: Adagrad on the CPU."""
    if not isinstance(opt, LazyAdagrad) or device.type != "cpu":
        return None
    return CpuTableStep(opt.weight.numpy(), opt.acc.numpy(), opt.lr, opt.eps)
