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

On the CPU, Adagrad's step runs in compiled (numba) loops: pool, group by row, lazy Adagrad.
A batch is a bag of distinct rows per image with a weight per row (CSR: rows,
offsets, weights). The torch path (:meth:`pipeline.model.PatchBagModel.forward_rows`)
sorts the batch's rows to find the distinct ones, copies their vectors out,
builds an autograd graph and copies the update back. These loops do the same
arithmetic without the copies and the sort:

* :func:`pipeline.table.pooling.pool`: ``out[i] = sum_j w[j] * table[rows[j]]`` over image i's rows,
  images split across threads (the one pooling kernel, shared with queries);
* :func:`group_rows`: the batch's distinct rows and, for each, where it occurs
  (a bitmap of the table's rows read in order, with a popcount rank; no sort);
* :func:`adagrad_rows`: for each distinct row r, its gradient
  ``g = sum over its occurrences j of w[j] * grad_pooled[image(j)]``, then
  ``acc[r] += g**2; table[r] -= lr * g / (sqrt(acc[r]) + eps)``, rows split
  across threads; only the batch's rows are read or written;
* :func:`weight_grads`: ``d loss / d w[j] = table[rows[j]] . grad_pooled[image(j)]``,
  needed only when the patch-dropout rate is learned.

Every output element is computed by one thread in a fixed order, so results do
not depend on the number of threads (the determinism test relies on it).
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from pipeline.table.pooling import pool


# ---------------------------------------------------------------- the compiled CPU step

_BLOCK = 256  # distinct rows per block of the update (a 64 KiB gradient buffer at dimension 64)


@njit(inline="always")
def _popcount(x):
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


@njit(inline="always")
def _rank(bits, prefix, r):
    """Position of row r among the set rows (rows below r that are set)."""
    word = r >> 6
    below = bits[word] & ((np.uint64(1) << np.uint64(r & 63)) - np.uint64(1))
    return prefix[word] + np.int64(_popcount(below))


@njit(cache=True, nogil=True)
def group_rows(rows, offsets, w, bits, prefix, uniq, bstart, occ_u, occ_image, occ_w):
    """Group a batch's occurrences by table row, cache-consciously; returns nu.

    Out: uniq[:nu], the distinct rows ascending; occurrences reordered into blocks of
    ``_BLOCK`` consecutive distinct rows (block b is bstart[b]:bstart[b+1]), each with
    its row's position (occ_u), image (occ_image) and weight (occ_w).

    A bitmap of the table's rows (1 bit each, so it stays in cache) marks the batch's
    rows; reading it in order yields them sorted, and a popcount rank maps a row to its
    position. Ascending rows make the update walk the table in address order, and blocks
    instead of one slot per row keep the reordering's writes sequential (one write stream
    per block rather than a random write per occurrence). ``bits`` is left all zero again.
    """
    for j in range(rows.size):
        r = rows[j]
        bits[r >> 6] |= np.uint64(1) << np.uint64(r & 63)
    nu = 0
    for word in range(bits.size):
        x = bits[word]
        prefix[word] = nu
        while x:
            low = x & (~x + np.uint64(1))
            uniq[nu] = (word << 6) + np.int64(_popcount(low - np.uint64(1)))
            nu += 1
            x ^= low
    blocks = (nu + _BLOCK - 1) // _BLOCK
    local = np.empty(rows.size, np.int32)
    bstart[: blocks + 1] = 0
    for j in range(rows.size):
        u = _rank(bits, prefix, rows[j])
        local[j] = u
        bstart[u // _BLOCK + 1] += 1
    for b in range(blocks):
        bstart[b + 1] += bstart[b]
    pos = bstart[:blocks].copy()
    n = offsets.size - 1
    for i in range(n):
        for j in range(offsets[i], offsets[i + 1]):
            u = local[j]
            p = pos[u // _BLOCK]
            occ_u[p] = u
            occ_image[p] = i
            occ_w[p] = w[j]
            pos[u // _BLOCK] = p + 1
    for u in range(nu):
        bits[uniq[u] >> 6] = 0
    return nu


@njit(cache=True, parallel=True, nogil=True, fastmath=True)
def adagrad_rows(table, acc, uniq, bstart, occ_u, occ_image, occ_w, gpooled, lr, eps, nu, rowwise):
    """Per block of distinct rows: sum each row's gradient in a small (cache-resident) buffer, then step.

    ``rowwise``: ``acc`` is N x 1 and grows by the mean of the row's squared gradient.
    """
    d = table.shape[1]
    blocks = (nu + _BLOCK - 1) // _BLOCK
    for b in prange(blocks):
        u0 = b * _BLOCK
        g = np.zeros((_BLOCK, d), np.float32)
        for t in range(bstart[b], bstart[b + 1]):
            wt = occ_w[t]
            i = occ_image[t]
            lu = occ_u[t] - u0
            for k in range(d):
                g[lu, k] += wt * gpooled[i, k]
        for lu in range(min(_BLOCK, nu - u0)):
            r = uniq[u0 + lu]
            if rowwise:
                sq = np.float32(0.0)
                for k in range(d):
                    sq += g[lu, k] * g[lu, k]
                s = acc[r, 0] + sq / d
                acc[r, 0] = s
                step = lr / (np.sqrt(s) + eps)
                for k in range(d):
                    table[r, k] -= step * g[lu, k]
            else:
                for k in range(d):
                    s = acc[r, k] + g[lu, k] * g[lu, k]
                    acc[r, k] = s
                    table[r, k] -= lr * g[lu, k] / (np.sqrt(s) + eps)


@njit(cache=True, parallel=True, nogil=True, fastmath=True)
def weight_grads(table, rows, offsets, gpooled, out):
    n = offsets.size - 1
    d = table.shape[1]
    for i in prange(n):
        for j in range(offsets[i], offsets[i + 1]):
            r = rows[j]
            s = np.float32(0.0)
            for k in range(d):
                s += table[r, k] * gpooled[i, k]
            out[j] = s
    return out


class CpuTableStep:
    """Pool and lazy-Adagrad update of a CPU table (float32, C-contiguous) in place.

    ``table`` and ``acc`` are numpy views of the model's weight and the optimizer's
    accumulator, so checkpoints and the torch path see the same numbers. An ``acc`` of one
    column is row-wise Adagrad.
    """

    def __init__(self, table: np.ndarray, acc: np.ndarray, lr: float, eps: float):
        if table.dtype != np.float32 or not table.flags.c_contiguous or acc.shape not in (table.shape, (table.shape[0], 1)):
            raise ValueError("the fused CPU step needs a C-contiguous float32 table and an accumulator of its shape or of one column")
        self._rowwise = acc.shape[1] != table.shape[1]
        self.table, self.acc, self.lr, self.eps = table, acc, np.float32(lr), np.float32(eps)
        words = (table.shape[0] + 63) // 64
        self._bits = np.zeros(words, np.uint64)
        self._prefix = np.zeros(words, np.int64)

    def pool(self, rows: np.ndarray, offsets: np.ndarray, w: np.ndarray) -> np.ndarray:
        out = np.empty((offsets.size - 1, self.table.shape[1]), np.float32)
        return pool(self.table, rows, offsets, w, out)

    def weight_grads(self, rows: np.ndarray, offsets: np.ndarray, gpooled: np.ndarray) -> np.ndarray:
        return weight_grads(self.table, rows, offsets, gpooled, np.empty(rows.size, np.float32))

    def update(self, rows: np.ndarray, offsets: np.ndarray, w: np.ndarray, gpooled: np.ndarray) -> int:
        """Apply one Adagrad step to the batch's distinct rows; returns how many there were."""
        n = rows.size
        uniq, bstart = np.empty(n, np.int64), np.empty(n // _BLOCK + 2, np.int64)
        occ_u, occ_image, occ_w = np.empty(n, np.int32), np.empty(n, np.int32), np.empty(n, np.float32)
        nu = group_rows(rows, offsets, w, self._bits, self._prefix, uniq, bstart, occ_u, occ_image, occ_w)
        adagrad_rows(self.table, self.acc, uniq, bstart, occ_u, occ_image, occ_w, gpooled, self.lr, self.eps, nu, self._rowwise)
        return nu


# ---------------------------------------------------------------- optimizers of the table

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
    """The compiled CPU step for ``opt`` (:class:`CpuTableStep`) when it applies: Adagrad on the CPU."""
    if not isinstance(opt, LazyAdagrad) or device.type != "cpu":
        return None
    return CpuTableStep(opt.weight.numpy(), opt.acc.numpy(), opt.lr, opt.eps)
