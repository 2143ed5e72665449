"""Patch keys: a 2-D polynomial rolling hash over prefix sums, O(1) work per patch.

The exact specification (constants, order, mixing) is in docs/hashing.md; the
pure-Python reference :func:`reference_key` below is that specification in
code, and the tests hold the fast path to it.

For an image of symbols ``s`` (:func:`view_symbols`: one integer per pixel) every pixel gets a
pseudo-random 64-bit value ``r = fmix64(s + PIXEL_SALT * (seed + 1))``. The
content hash of the h x w patch at (y, x) is

    c = sum_{i<h, j<w} r[y+i, x+j] * A**i * B**j        (mod 2**64)

One prefix-sum table ``P`` of ``r[i, j] * A**i * B**j`` gives every patch's sum
with four look-ups; multiplying by ``A**-y * B**-x`` (A and B are odd, so they
are invertible mod 2**64) removes the dependence on where the patch sits. The
key is ``fmix64(c ^ fmix64(tag + TAG_SALT * (seed + 1)))`` with
``tag = kind << 48 | h << 32 | w << 16 | (cell + 1)``, where ``cell = -1`` when
the key ignores position and ``kind`` says which grid the cell belongs to
(0 = the grid, 1 = the grid moved by half a cell, 2 = the coarse grid).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from pipeline.extraction import kernels
from pipeline.fmix import MASK, fmix64, fmix64_int
from pipeline.extraction.codes import auto_atoms, auto_shapes
from pipeline.config import CODE_K_UNPOOLED, POSITION_MODES, ExtractConfig, auto_code_position, check_code_k, code_shape_text
from pipeline.errors import PipelineError

A = 0x9E3779B97F4A7C15  # row multiplier (odd)
B = 0xC2B2AE3D27D4EB4F  # column multiplier (odd)
PIXEL_SALT = 0x165667B19E3779F9
TAG_SALT = 0x27D4EB2F165667C5
CODE_SALT = 0x9FB21C651E98DF25  # the code view's content value: fmix64(atom + CODE_SALT * (seed + 1))
A_INV = pow(A, -1, 1 << 64)
B_INV = pow(B, -1, 1 << 64)


# ---------------------------------------------------------------- symbols: one integer per pixel, per view

def symbols(images: np.ndarray, levels: int) -> np.ndarray:
    """Quantize N x H x W x C uint8 images into one integer symbol per pixel.

    Each channel value v becomes ``q = (v * levels) >> 8`` in ``[0, levels)``, and the
    pixel's symbol is ``sum_c q_c * levels**c`` (channel 0 first).
    """
    q = (images.astype(np.uint64) * np.uint64(levels)) >> np.uint64(8)
    out = q[..., 0].copy()
    scale = np.uint64(1)
    for c in range(1, q.shape[-1]):
        scale = scale * np.uint64(levels)
        out += q[..., c] * scale
    return out


def view_symbols(images: np.ndarray, views: list[tuple[str, int]]) -> np.ndarray:
    """N x H x W x C uint8 images -> N x V x H x W symbols, one plane per view (kind, levels).

    ``levels`` quantizes the pixels as they are; ``norm`` first stretches each image's
    values linearly so its darkest value becomes 0 and its brightest 255 (all channels
    together, so colours keep their ratios), which makes the codes independent of the
    image's brightness and contrast. ``grad`` is an ordinal code (:func:`ordinal_symbols`).
    """
    out = np.empty((images.shape[0], len(views)) + images.shape[1:3], np.uint64)
    for v, (kind, levels) in enumerate(views):
        if kind == "grad":
            out[:, v] = ordinal_symbols(images)
            continue
        imgs = images
        if kind == "norm":
            flat = images.reshape(len(images), -1)
            lo = flat.min(1).astype(np.int32)[:, None, None, None]
            span = np.maximum(flat.max(1).astype(np.int32)[:, None, None, None] - lo, 1)
            imgs = ((images.astype(np.int32) - lo) * 255 // span).astype(np.uint8)
        out[:, v] = symbols(imgs, levels)
    return out


def ordinal_symbols(images: np.ndarray) -> np.ndarray:
    """Ordinal code per pixel: for each channel, is it brighter than its right neighbour, and than the one below.

    ``s = sum_c (b_right_c + 2 * b_below_c) * 4**c`` with ``b = 1`` when strictly brighter;
    the last column (row) compares with itself, so its bit is 0. Unchanged by any
    increasing change of brightness or contrast, so patches of it are shapes of the
    image's edges rather than its colours.
    """
    x = images.astype(np.int16)
    right = np.zeros_like(x, dtype=np.uint64)
    below = np.zeros_like(x, dtype=np.uint64)
    right[:, :, :-1] = x[:, :, :-1] > x[:, :, 1:]
    below[:, :-1] = x[:, :-1] > x[:, 1:]
    q = right + 2 * below
    out = q[..., 0].copy()
    for c in range(1, q.shape[-1]):
        out += q[..., c] * np.uint64(4**c)
    return out


# ---------------------------------------------------------------- reference (pure Python)

GRID_KINDS = {"grid": 0, "offset": 1, "coarse": 2}  # the ``kind`` of a position mode's tag


def tag_of(h: int, w: int, cell: int, mode: str = "grid") -> int:
    """The shape/position tag: ``kind << 48 | h << 32 | w << 16 | (cell + 1)``; ``cell = -1`` means 'no position'."""
    kind = GRID_KINDS[mode] if cell >= 0 else 0
    return (kind << 48) | (h << 32) | (w << 16) | (cell + 1)


def auto_grid(height: int, width: int) -> int:
    """``--grid auto``: cells of about 8 pixels, at least 3 per side: ``max(3, round(min(height, width) / 8))``
    (3 on 8x8 images, 4 on 32x32)."""
    return max(3, round(min(height, width) / 8))


def auto_views(channels: int) -> str:
    """``--views auto``: the levels and ordinal views on gray images, the levels view alone on colour ones
    (whose ordinal 2x2 patterns, 64 symbols a pixel, nearly never recur and would mostly add rows)."""
    return "levels,grad" if channels == 1 else "levels"


MAX_CONTENTS = 1 << 24  # --max-size auto: the most possible contents a patch of an exact view may have


def auto_max_size(views: list[tuple[str, int]], channels: int, height: int, width: int) -> int:
    """``--max-size auto``: the largest square side s whose possible contents, ``alphabet ** (s * s)`` for the
    views' largest per-pixel alphabet, number at most MAX_CONTENTS (so exact patterns can recur); at least 1,
    at most the image. 3 on gray images at 4 levels (4**9), 2 on RGB (64**4)."""
    alphabet = max([4**channels if kind == "grad" else lv**channels for kind, lv in views] or [2])
    s = 1
    while (s + 1) <= min(height, width) and alphabet ** ((s + 1) ** 2) <= MAX_CONTENTS:
        s += 1
    return s


def cells_per_side(mode: str, grid: int) -> int:
    """Cells per side of a position mode's partition: the grid, the grid moved by half a cell
    (one more cell, the outer ones half as wide), or the coarse grid (``ceil(grid / 2)``)."""
    return {"grid": grid, "offset": grid + 1, "coarse": (grid + 1) // 2}[mode]


def grid_cell(y: int, x: int, h: int, w: int, height: int, width: int, grid: int, mode: str = "grid") -> int:
    """The cell holding the patch's centre: row-major index into the partition of position mode ``mode``
    (``y`` and ``x`` may be integer arrays that broadcast).

    With the centre at ``c = y + h / 2``, the row is ``floor(c * g / height)`` on a g x g grid
    and ``floor(c * g / height + 1/2)`` on the grid moved by half a cell (likewise columns).
    """
    g = cells_per_side(mode, grid) if mode == "coarse" else grid
    moved = mode == "offset"  # + 1/2 cell, written as + height / (2 * height)
    cy = ((2 * y + h) * g + moved * height) // (2 * height)
    cx = ((2 * x + w) * g + moved * width) // (2 * width)
    return cy * cells_per_side(mode, grid) + cx


def reference_key(symbols: np.ndarray, y: int, x: int, h: int, w: int, cell: int, seed: int = 0, view: int = 0, mode: str = "grid") -> int:
    """The key of one patch, computed directly from its definition (slow; for tests and the spec).

    ``symbols`` is the H x W plane of view ``view``; ``mode`` names the grid of ``cell``.
    """
    y, x, h, w, cell = int(y), int(x), int(h), int(w), int(cell)
    salt = (PIXEL_SALT * (seed + 1)) & MASK
    if view:
        salt = fmix64_int(salt + view)
    c = 0
    for i in range(h):
        for j in range(w):
            s = int(symbols[y + i, x + j])
            r = fmix64_int(s + salt)
            c = (c + r * pow(A, i, 1 << 64) * pow(B, j, 1 << 64)) & MASK
    t = fmix64_int(tag_of(h, w, cell, mode) + TAG_SALT * (seed + 1))
    return fmix64_int(c ^ t)


def code_value(atom: int, seed: int = 0) -> int:
    """The code view's stand-in for a content hash: ``fmix64(atom + CODE_SALT * (seed + 1))``."""
    return fmix64_int(int(atom) + CODE_SALT * (seed + 1))


def reference_code_key(atom: int, h: int, w: int, cell: int, seed: int = 0, mode: str = "grid") -> int:
    """The key of a code-view patch of shape h x w assigned to ``atom`` in ``cell`` (the spec, in code):
    the exact keys' formula with :func:`code_value` in place of the content hash."""
    t = fmix64_int(tag_of(h, w, cell, mode) + TAG_SALT * (seed + 1))
    return fmix64_int(code_value(atom, seed) ^ t)


# ---------------------------------------------------------------- fast path (numpy)

_U = np.uint64


def _powers(base: int, n: int) -> np.ndarray:
    out = np.empty(n, dtype=np.uint64)
    v = 1
    for i in range(n):
        out[i] = v
        v = (v * base) & MASK
    return out


@dataclass(frozen=True)
class _Block:
    """One contiguous run of keys in the canonical order: one shape, one position mode, all locations."""

    h: int
    w: int
    mode: str  # a position mode: 'none', 'grid', 'offset' or 'coarse'
    view: int  # index into config.view_list(); len(view_list()) for the code view
    offset: int  # first key slot of the block
    patch_offset: int  # first patch of this shape in the patch order
    ny: int  # locations down: (height - h) // stride + 1
    nx: int  # locations across: (width - w) // stride + 1
    stride: int = 1  # step between locations
    rank: int = -1  # code view: which of a patch's nearest atoms (0 = nearest); -1 for exact views
    pooled: bool = False  # a pooled code view's block: rank r is atom r, and its ny x nx "locations" are the mode's cells


class KeyPlan:
    """Everything needed to hash images of one size under one :class:`ExtractConfig`.

    Two orders matter. The **patch order** lists every patch once: for each view of
    ``config.view_list()`` (a quantization of the image), for each shape of
    ``config.shape_list()``, every location (y, x) in row-major order (steps of
    ``config.stride``). Shards store one position-free *content key* per patch in that
    order. The **key order** (``slot`` numbers) is what training sees: for each view,
    for each shape, for each mode of ``config.position_modes``, every location;
    :meth:`expand` derives it from the content keys.

    View 0 hashes with the pixel salt of docs/hashing.md; view v > 0 with
    ``fmix64(salt + v)``, so the same symbols in two views give unrelated keys.

    A code view (``config.code_shapes``) comes after the exact views, as view
    ``len(views)``: for each code shape, for each rank r < ``code_k`` (the patch's
    r-th nearest atom; with ``code_signs`` both, ranks ``code_k``.. are its negative's,
    atom ids K + a), every location in steps of ``code_stride``. Its content
    values are :func:`code_value` of the atom id, stored in shards as atom ids with a
    weight each (:mod:`pipeline.extraction.codes`); coding images needs ``dictionary``.
    Its keys come in the modes of ``config.code_position_modes`` (those of
    ``position`` unless ``code_position`` gives its own; ``auto``: :func:`~pipeline.config.auto_code_position`).
    """

    def __init__(self, config: ExtractConfig, height: int, width: int, dictionary=None):
        if config.code_shapes == "auto":  # resolved the way pipe extract resolves it
            config = dataclasses.replace(config, code_shapes=code_shape_text(auto_shapes(height, width)))
        if config.grid == 0:
            config = dataclasses.replace(config, grid=auto_grid(height, width))
        if config.atoms == 0:
            config = dataclasses.replace(config, atoms=auto_atoms(config.code_shape_list(), config.channels))
            check_code_k(config.code_k, config.atoms)  # a given count was checked by the config
        if config.code_k == 0:
            config = dataclasses.replace(config, code_k=config.atoms if config.code_pooled else min(CODE_K_UNPOOLED, config.atoms))
        if config.code_position == "auto":
            config = dataclasses.replace(config, code_position=auto_code_position(config))
        if config.views == "auto":
            config = dataclasses.replace(config, views=auto_views(config.channels))
        if config.max_h == 0:
            side = auto_max_size(config.view_list(), config.channels, height, width)
            config = dataclasses.replace(config, max_h=side, max_w=side)
        config.check_image_size(height, width)
        self.config = config
        self.height = height
        self.width = width
        stride = config.stride
        blocks = []
        offset = 0
        patch_offset = 0
        shapes = config.shape_list()
        self.views = config.view_list()
        shape_offsets = []
        for view in range(len(self.views)):
            for h, w in shapes:
                ny, nx = (height - h) // stride + 1, (width - w) // stride + 1
                for mode in config.position_modes:
                    blocks.append(_Block(h, w, mode, view, offset, patch_offset, ny, nx, stride))
                    offset += ny * nx
                if view == 0:
                    shape_offsets.append(patch_offset)
                patch_offset += ny * nx
        self.exact_patches = patch_offset  # content keys stored per image in ``patch_keys``
        self.patches_per_view = patch_offset // max(1, len(self.views))
        self.code_view = len(self.views)
        self.code_shapes = config.code_shape_list()
        self.code_k = config.code_k if self.code_shapes else 0
        self.code_ranks = self.code_k * config.signs  # a patch's kept atoms: the k nearest, then (both signs) the negative's k
        self.atom_ids = config.atoms * config.signs  # ids a stored atom takes: K + a is atom a for the patch's negative
        cst = config.code_stride
        slots_per_shape = []
        self._pool_cells: list[np.ndarray] = []  # pooled: per code shape, the cell of each location
        self.n_pool_cells = cells_per_side(config.code_pool, config.grid) ** 2 if self.code_shapes and config.code_pooled else 0
        # the first rank of the negative's atoms (a pooled view's ranks are atom ids); 0 with one sign
        self.negative_from = 0 if config.signs == 1 else (config.atoms if self.n_pool_cells else self.code_k)
        for h, w, scale in self.code_shapes:
            # a scaled shape's blocks are in image pixels: the pixels a patch covers, every scale * cst
            h, w, st = h * scale, w * scale, cst * scale
            ny, nx = (height - h) // st + 1, (width - w) // st + 1
            if self.n_pool_cells:  # one slot per atom and cell: a block per atom whose "locations" are the cells
                side = cells_per_side(config.code_pool, config.grid)
                ys, xs = np.arange(ny)[:, None] * st, np.arange(nx)[None, :] * st
                self._pool_cells.append(grid_cell(ys, xs, h, w, height, width, config.grid, config.code_pool).ravel().astype(np.int64))
                for r in range(self.atom_ids):
                    blocks.append(_Block(h, w, config.code_pool, self.code_view, offset, patch_offset + r * side * side, side, side, st, r, True))
                    offset += side * side
                slots_per_shape.append(self.atom_ids * side * side)
            else:
                for mode in config.code_position_modes:
                    for r in range(self.code_ranks):
                        blocks.append(_Block(h, w, mode, self.code_view, offset, patch_offset + r * ny * nx, ny, nx, st, r))
                        offset += ny * nx
                slots_per_shape.append(self.code_ranks * ny * nx)
            patch_offset += slots_per_shape[-1]
        self.code_slots = patch_offset - self.exact_patches  # atom ids (and weights) stored per image
        self.blocks: list[_Block] = blocks
        self.keys_per_image = offset
        self.patches_per_image = patch_offset
        self.dictionary = dictionary
        if dictionary is not None and self.code_shapes and [(s.h, s.w, s.scale) for s in dictionary.shapes] != self.code_shapes:
            raise ValueError("the dictionary's shapes are not the config's code shapes")
        seed = config.seed
        base = (PIXEL_SALT * (seed + 1)) & MASK
        self._pixel_salts = [_U(base if v == 0 else fmix64_int(base + v)) for v in range(len(self.views))]
        self._tag_salt = (TAG_SALT * (seed + 1)) & MASK
        self._pow_a = _powers(A, height + 1)
        self._pow_b = _powers(B, width + 1)
        self._inv_a = _powers(A_INV, height + 1)
        self._inv_b = _powers(B_INV, width + 1)
        self._block_index = {(b.view, b.h, b.w, b.mode, max(b.rank, 0)): b for b in blocks}
        # code_value of every atom id, and the position-free key of every (code shape, atom id) at index shape * atom_ids + id
        self._code_values = fmix64(np.arange(self.atom_ids, dtype=np.uint64) + _U((CODE_SALT * (seed + 1)) & MASK))
        mix = np.array([self._mix(h * sc, w * sc, -1) for h, w, sc in self.code_shapes], dtype=np.uint64)
        self._code_content = fmix64((self._code_values[None, :] ^ mix[:, None]).ravel())
        self._code_shape_of_slot = np.repeat(np.arange(len(self.code_shapes)), slots_per_shape)
        self._shape_h = np.array([h for h, _ in shapes], dtype=np.int64)
        self._shape_w = np.array([w for _, w in shapes], dtype=np.int64)
        self._shape_offsets = np.array(shape_offsets, dtype=np.int64)
        self._shape_mix = np.array([self._mix(h, w, -1) for h, w in shapes], dtype=np.uint64)

    # -- hashing

    def _mix(self, h: int, w: int, cell: int, mode: str = "grid") -> int:
        """fmix64(tag + salt) for one shape and cell (-1 = no position) of position mode ``mode``."""
        return fmix64_int(tag_of(h, w, cell, mode) + self._tag_salt)

    def _cells(self, block: _Block) -> np.ndarray:
        """The cell of every location of a block: :func:`grid_cell` over arrays (ny x nx); a pooled
        block's locations are its cells."""
        if block.pooled:
            return np.arange(block.ny * block.nx).reshape(block.ny, block.nx)
        ys = np.arange(block.ny)[:, None] * block.stride
        xs = np.arange(block.nx)[None, :] * block.stride
        return grid_cell(ys, xs, block.h, block.w, self.height, self.width, self.config.grid, block.mode)

    @cached_property
    def _expansion(self) -> tuple[np.ndarray, np.ndarray]:
        """Per key slot: the patch it comes from and the tag delta to mix in (0 = copy)."""
        source = np.empty(self.keys_per_image, dtype=np.int64)
        delta = np.zeros(self.keys_per_image, dtype=np.uint64)
        for b in self.blocks:
            sl = slice(b.offset, b.offset + b.ny * b.nx)
            source[sl] = np.arange(b.patch_offset, b.patch_offset + b.ny * b.nx)
            if b.mode != "none":
                cells = self._cells(b).ravel()
                base = self._mix(b.h, b.w, -1)
                n_cells = cells_per_side(b.mode, self.config.grid) ** 2
                table = np.array([base ^ self._mix(b.h, b.w, int(c), b.mode) for c in range(n_cells)], dtype=np.uint64)
                delta[sl] = table[cells]
        return source, delta

    def symbols(self, images: np.ndarray) -> np.ndarray:
        """N x H x W x C uint8 images (already in the config's channel count) -> N x V x H x W symbols, one plane per view."""
        return view_symbols(images, self.views)

    def content_keys(self, syms: np.ndarray) -> np.ndarray:
        """One position-free key per patch of the exact views: N x V x H x W symbols (N x H x W with one
        view) -> N x exact_patches uint64."""
        if syms.ndim == 3 and len(self.views) == 1:
            syms = syms[:, None]
        if syms.ndim != 4 or syms.shape[1:] != (len(self.views), self.height, self.width):
            raise ValueError(f"symbols of shape {syms.shape[1:]} do not match the plan's {len(self.views)} x {self.height}x{self.width}")
        out = np.empty((syms.shape[0], self.exact_patches), dtype=np.uint64)
        for v, salt in enumerate(self._pixel_salts):
            kernels.content_keys(
                np.ascontiguousarray(syms[:, v], dtype=np.uint64), salt, self._pow_a, self._pow_b,
                self._inv_a, self._inv_b, self._shape_h, self._shape_w, self._shape_offsets + v * self.patches_per_view,
                self._shape_mix, self.config.stride, out,
            )
        return out

    def sign_rank(self, rank: int) -> tuple[bool, int]:
        """(whether a slot of ``rank`` holds an atom of its patch's negative, its rank among its own
        sign's atoms: the atom's id in a pooled view). Exact views' rank -1 stays as it is."""
        negative = 0 < self.negative_from <= rank
        return negative, rank - self.negative_from if negative else rank

    def atom_sign(self, atom: int) -> tuple[bool, int]:
        """(whether a code pattern's atom id, 0..2K-1 as :meth:`code_key_table` numbers them, is an
        atom of a patch's negative, its id among its own sign's atoms)."""
        negative = atom >= self.config.atoms
        return negative, atom - self.config.atoms if negative else atom

    def code_content(self, atoms: np.ndarray) -> np.ndarray:
        """Position-free code keys (N x code_slots uint64) of stored atom ids (N x code_slots)."""
        idx = self._code_shape_of_slot[None, :] * self.atom_ids + atoms.astype(np.int64)
        return self._code_content[idx]

    @property
    def mirrors_codes(self) -> bool:
        """Whether a mirrored image's code can be taken from its original's
        (:meth:`pipeline.extraction.codes.Dictionary.mirrored`): a mirror-closed dictionary, codes not pooled."""
        return self.dictionary is not None and not self.n_pool_cells and self.dictionary.can_mirror(self.width, self.config.code_stride)

    def codes(self, images: np.ndarray, mirror_of: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Atom ids (N x code_slots uint16) and weights (float32) of N x H x W x C uint8 images.

        ``mirror_of[i]`` >= 0 says image i is the left-right mirror of image ``mirror_of[i]`` (itself
        not a mirror): with :attr:`mirrors_codes` its code is then taken from that image's instead of
        computed, which spares the matrix products of every mirrored copy."""
        if self.dictionary is None:
            raise PipelineError("this key plan has a code view but no dictionary to code images with")
        c = self.config
        if mirror_of is not None and (mirror_of >= 0).any() and self.mirrors_codes:
            direct = mirror_of < 0
            if (mirror_of[~direct] >= len(images)).any() or (mirror_of[mirror_of[~direct]] >= 0).any():
                raise ValueError("a mirrored image's original must be an image of the batch that is not itself a mirror")
            atoms, weights = self.codes(images[direct])
            row = np.cumsum(direct) - 1  # an image's row among the directly coded ones
            src = row[mirror_of[~direct]]
            out_a = np.empty((len(images), atoms.shape[1]), atoms.dtype)
            out_w = np.empty((len(images), weights.shape[1]), weights.dtype)
            out_a[direct], out_w[direct] = atoms, weights
            out_a[~direct], out_w[~direct] = self.dictionary.mirrored(atoms[src], weights[src], self.height, self.width, c.code_stride, c.code_k, c.signs)
            return out_a, out_w
        if self.n_pool_cells:
            return self.dictionary.code(images, c.code_stride, c.code_k, c.code_weight, self._pool_cells, self.n_pool_cells, c.signs)
        return self.dictionary.code(images, c.code_stride, c.code_k, c.code_weight, signs=c.signs)

    def expand(self, content: np.ndarray, atoms: np.ndarray | None = None) -> np.ndarray:
        """Keys in key order (N x keys_per_image) from exact content keys (N x exact_patches) and,
        with a code view, the stored atom ids (N x code_slots)."""
        if content.ndim != 2 or content.shape[1] != self.exact_patches:
            raise ValueError(f"content keys of shape {content.shape} do not have {self.exact_patches} patches per row")
        if self.code_slots:
            if atoms is None or atoms.shape != (content.shape[0], self.code_slots):
                raise ValueError(f"a code view needs {self.code_slots} atom ids per image")
            content = np.concatenate([content, self.code_content(atoms)], axis=1)
        if self.config.position_modes == self.config.code_position_modes == ("none",):
            return np.ascontiguousarray(content)
        source, delta = self._expansion
        out = np.empty((content.shape[0], self.keys_per_image), dtype=np.uint64)
        return kernels.expand_keys(np.ascontiguousarray(content), source, delta, out)

    def expand_weights(self, code_weights: np.ndarray | None) -> np.ndarray | None:
        """Per-key weights in key order (N x keys_per_image float32; 1 for exact views) from the code
        view's stored weights (N x code_slots); None without a code view (every weight is 1)."""
        if not self.code_slots:
            return None
        source, _ = self._expansion
        full = np.ones((code_weights.shape[0], self.patches_per_image), np.float32)
        full[:, self.exact_patches :] = code_weights
        return np.ascontiguousarray(full[:, source])

    def keys(self, syms: np.ndarray) -> np.ndarray:
        """Keys of every exact-view patch in key order: N x H x W symbols -> N x keys_per_image uint64
        (a plan with a code view needs the images: :meth:`encode`)."""
        if self.code_slots:
            raise ValueError("a code view needs the images, not symbols; use encode()")
        return self.expand(self.content_keys(syms))

    def encode(self, images: np.ndarray, mirror_of: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Keys in key order and their weights (None when all are 1) of N x H x W x C uint8 images
        already in the config's channel count; ``mirror_of`` as :meth:`codes`."""
        content = self.content_keys(self.symbols(images))
        if not self.code_slots:
            return self.expand(content), None
        atoms, weights = self.codes(images, mirror_of)
        return self.expand(content, atoms), self.expand_weights(weights)

    def encode_with_mirrors(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`encode` of each image followed by its left-right mirror's: N x 2K keys and weights,
        the mirrors' codes taken from their originals' where :attr:`mirrors_codes` allows."""
        n = len(images)
        both = np.concatenate([images, images[:, :, ::-1]])
        keys, weights = self.encode(both, np.concatenate([np.full(n, -1, np.int64), np.arange(n)]))
        keys = np.concatenate([keys[:n], keys[n:]], axis=1)
        return keys, None if weights is None else np.concatenate([weights[:n], weights[n:]], axis=1)

    def image_keys(self, images: np.ndarray) -> np.ndarray:
        """Keys in key order of N x H x W x C uint8 images already in the config's channel count."""
        return self.encode(images)[0]

    # -- locations

    @cached_property
    def slot_table(self) -> dict[str, np.ndarray]:
        """Per slot: y, x, h, w, cell (-1 for position-free keys), view (``len(views)`` for the code view),
        mode (an index into ``config.POSITION_MODES``) and rank (code view: 0 = the patch's nearest
        atom; -1 for exact views), as int32 arrays."""
        cols = {k: np.empty(self.keys_per_image, dtype=np.int32) for k in ("y", "x", "h", "w", "cell", "view", "mode", "rank")}
        regions = {(h * sc, w * sc): self.pool_regions(i) for i, (h, w, sc) in enumerate(self.code_shapes)} if self.n_pool_cells else {}
        for b in self.blocks:
            sl = slice(b.offset, b.offset + b.ny * b.nx)
            if b.pooled:  # a cell's slot covers the pixels of every patch pooled into it
                for name, column in zip(("y", "x", "h", "w"), regions[(b.h, b.w)]):
                    cols[name][sl] = column
            else:
                yy, xx = np.meshgrid(np.arange(b.ny) * b.stride, np.arange(b.nx) * b.stride, indexing="ij")
                cols["y"][sl] = yy.ravel()
                cols["x"][sl] = xx.ravel()
                cols["h"][sl] = b.h
                cols["w"][sl] = b.w
            cols["cell"][sl] = -1 if b.mode == "none" else self._cells(b).ravel()
            cols["view"][sl] = b.view
            cols["mode"][sl] = POSITION_MODES.index(b.mode)
            cols["rank"][sl] = b.rank
        return cols

    def pattern_shape(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(h, w) of the patterns keyed at ``slots``: the patch's shape, which for a pooled code view
        is the code shape, not the cell the slot covers (:meth:`locate`)."""
        h, w = self._slot_shapes
        idx = np.asarray(slots, np.int64)
        return h[idx], w[idx]

    @cached_property
    def _slot_shapes(self) -> tuple[np.ndarray, np.ndarray]:
        """Per slot, the (h, w) of its block: built once, read by every answer."""
        h = np.empty(self.keys_per_image, np.int32)
        w = np.empty(self.keys_per_image, np.int32)
        for b in self.blocks:
            h[b.offset : b.offset + b.ny * b.nx], w[b.offset : b.offset + b.ny * b.nx] = b.h, b.w
        return h, w

    def pool_regions(self, shape: int) -> tuple[np.ndarray, ...]:
        """For a pooled code view, per cell of code shape ``shape``: (y, x, h, w) of the smallest
        rectangle holding every patch pooled into it (0 x 0 for a cell no patch falls in)."""
        h, w, scale = self.code_shapes[shape]
        h, w, st = h * scale, w * scale, self.config.code_stride * scale  # in image pixels
        nx = (self.width - w) // st + 1
        cells = self._pool_cells[shape]
        loc = np.arange(len(cells))
        ys, xs = loc // nx * st, loc % nx * st
        out = np.zeros((4, self.n_pool_cells), np.int64)
        for c in range(self.n_pool_cells):
            m = cells == c
            if m.any():
                y0, x0 = ys[m].min(), xs[m].min()
                out[:, c] = (y0, x0, ys[m].max() + h - y0, xs[m].max() + w - x0)
        return tuple(out)

    def code_key_table(self) -> dict[str, np.ndarray]:
        """Every key the code view can make: ``key`` (uint64) with its ``shape`` (index into
        ``code_shapes``), ``atom``, ``cell`` (-1 without position) and ``mode`` (index into POSITION_MODES)."""
        cols: dict[str, list] = {"key": [], "shape": [], "atom": [], "cell": [], "mode": []}
        atoms = np.arange(self.atom_ids, dtype=np.int64)
        modes = (self.config.code_pool,) if self.n_pool_cells else self.config.code_position_modes
        for i, (h, w, scale) in enumerate(self.code_shapes):
            for mode in modes:
                cells = [-1] if mode == "none" else range(cells_per_side(mode, self.config.grid) ** 2)
                for c in cells:
                    mix = _U(self._mix(h * scale, w * scale, int(c), mode))
                    cols["key"].append(fmix64(self._code_values ^ mix))
                    for name, value in (("shape", i), ("cell", c), ("mode", POSITION_MODES.index(mode))):
                        cols[name].append(np.full(len(atoms), value, np.int64))
                    cols["atom"].append(atoms)
        if not cols["key"]:
            return {"key": np.zeros(0, np.uint64), **{k: np.zeros(0, np.int64) for k in ("shape", "atom", "cell", "mode")}}
        return {k: np.concatenate(v) for k, v in cols.items()}

    def is_code(self, slots: np.ndarray) -> np.ndarray:
        """True for the slots of the code view."""
        return self.slot_table["view"][np.asarray(slots, np.int64)] == self.code_view

    def locate(self, slots: np.ndarray | int) -> dict[str, np.ndarray]:
        """Location (y, x, h, w, cell, view, mode) of each slot of the canonical order."""
        idx = np.asarray(slots, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.keys_per_image):
            raise IndexError(f"slot out of range 0..{self.keys_per_image - 1}")
        return {k: v[idx] for k, v in self.slot_table.items()}

    def slot_of(self, mode: str, y: int, x: int, h: int, w: int, view: int = 0, rank: int = 0) -> int:
        """The slot of the patch (y, x, h, w) in position mode ``mode`` of view ``view`` (and, in the
        code view, of its ``rank``-th nearest atom)."""
        b = self._block_index[(view, h, w, mode, rank)]
        st = b.stride
        if y % st or x % st or not (0 <= y // st < b.ny and 0 <= x // st < b.nx):
            raise IndexError(f"no {h}x{w} patch starts at ({y}, {x}) with stride {st}")
        return b.offset + (y // st) * b.nx + x // st

    def sub_slots(self, slot: int) -> np.ndarray:
        """Slots of every strictly smaller patch of the shape set inside the patch at ``slot``, same mode and view
        (none for the code view, whose keys are atoms, not contents built of parts)."""
        t = self.slot_table
        y, x, h, w, view = (int(t[k][slot]) for k in ("y", "x", "h", "w", "view"))
        if view == self.code_view:
            return np.zeros(0, np.int64)
        mode = POSITION_MODES[int(t["mode"][slot])]
        st = self.config.stride
        out = []
        for b in self.blocks:
            if b.mode != mode or b.view != view or b.h > h or b.w > w or (b.h, b.w) == (h, w):
                continue
            cols = [xx // st for xx in range(x, x + w - b.w + 1) if xx % st == 0]
            for yy in range(y, y + h - b.h + 1):
                if yy % st == 0:
                    out.extend(b.offset + (yy // st) * b.nx + c for c in cols)
        return np.asarray(out, dtype=np.int64)
