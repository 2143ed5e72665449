"""Configuration of each stage: one frozen dataclass per stage, saved as JSON beside its output.

``ExtractConfig`` decides every key, so its fingerprint travels from the
shards into the run; loading checks it, so a run is never fed keys made a
different way.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ParameterError, PipelineError

HASH_VERSION = "patchhash-v1"  # bump when the key specification in docs/hashing.md changes

COLORS = ("auto", "gray", "rgb")
SHAPE_SETS = ("rect", "square")
POSITION_MODES = ("none", "grid", "offset", "coarse")  # canonical order of the key kinds per patch
POSITION_ALIASES = {"both": ("none", "grid")}
DEVICES = ("auto", "cpu", "cuda")


MAX_SIDE = 8192  # --resize bound, per side
MAX_LR = 1000.0
MAX_INIT_STD = 10.0
MAX_DIM = 4096
MAX_BATCH = 1 << 20


@dataclass(frozen=True)
class Bound:
    """The values a numeric setting takes: from ``lo`` to ``hi`` (either end open, or None = none),
    ``note`` saying what a special value means (e.g. "0 = auto"). A config checks its fields by these,
    and the CLI shows them in each option's help, so the two cannot disagree."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""

    def text(self) -> str:
        """The range in words: ``at least 1``, ``from 2 to 256``, ``in [0, 1)``."""
        def num(v: float | None, none: str) -> str:
            return none if v is None else str(v) if isinstance(v, int) else f"{v:g}"

        if self.lo_open or self.hi_open:
            return f"in {'(' if self.lo_open else '['}{num(self.lo, '-inf')}, {num(self.hi, 'inf')}{')' if self.hi_open else ']'}"
        if self.hi is None:
            return f"at least {num(self.lo, '')}"
        return f"from {num(self.lo, '')} to {num(self.hi, '')}"

    def check(self, name: str, value: float) -> None:
        """Raise :class:`ParameterError` for ``name`` = ``value`` outside the bound (NaN included)."""
        ok = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        ok = ok and (self.hi is None or (value < self.hi if self.hi_open else value <= self.hi))
        if not ok:
            raise ParameterError(name, f"{value} must be {self.text()}" + (f" ({self.note})" if self.note else ""))


def parse_size(text: str) -> tuple[int, int]:
    """``N`` or ``HxW`` as (height, width); ValueError saying how to write one otherwise."""
    try:
        nums = [int(p) for p in text.lower().split("x")]
    except ValueError:
        nums = []
    if len(nums) not in (1, 2):
        raise ValueError(f"{text!r} is not a size; write N or HxW, e.g. 3 or 2x4")
    return nums[0], nums[-1]


def check_resize(size: tuple[int, int]) -> tuple[int, int]:
    """A ``--resize`` (height, width) of at least 1 and at most :data:`MAX_SIDE` a side."""
    h, w = size
    if h < 1 or w < 1:
        raise ParameterError("resize", f"{h}x{w} must be at least 1x1")
    if h > MAX_SIDE or w > MAX_SIDE:
        raise ParameterError("resize", f"{h}x{w} is past {MAX_SIDE} pixels on a side; resize to a smaller size")
    return h, w


def physical_memory() -> int:
    """This machine's memory in bytes (0 when the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


VIEW_KINDS = ("levels", "norm", "grad")
CODE_WEIGHTS = ("triangle", "hard")
CODE_NORMS = ("none", "contrast")
CODE_POOLS = ("none", "grid", "coarse", "offset")
CODE_SIGNS = ("one", "both")
CODE_K_UNPOOLED = 5  # --code-k auto without pooling
MAX_SIGNED_ATOMS = 32767  # atoms per shape with --code-signs both: ids of both signs fit 16 bits
LARGE_CODE_VALUES = 64  # a code shape holding more values (h x w x channels) than this makes the code "large": the larger dictionary and a regularised table
CODE_FIELDS = ("code_shapes", "atoms", "code_k", "code_pool", "code_position", "code_weight", "code_norm", "whiten", "code_stride", "code_sample", "dictionary", "code_signs")


def parse_views(text: str, levels: int) -> list[tuple[str, int]]:
    """Parse ``'levels,norm:3'`` into (kind, levels) pairs; a bare kind uses ``levels``."""
    if text.strip().lower() == "none":
        return []
    out = []
    for part in text.split(","):
        kind, _, n = part.strip().lower().partition(":")
        try:
            lv = int(n) if n else levels
        except ValueError:
            lv = -1
        if kind == "grad" and not n:
            lv = 2
        if kind not in VIEW_KINDS or not 2 <= lv <= 256 or (kind == "grad" and lv != 2):
            raise ParameterError(
                "views", f"{text!r}: {part.strip()!r} is not a view; use levels or norm, optionally with :N levels (2..256), "
                "or grad, e.g. levels,norm:3,grad; or none (code view only)"
            )
        if (kind, lv) in out:
            raise ParameterError("views", f"{text!r} lists {kind}:{lv} twice")
        out.append((kind, lv))
    return out


def canonical_position(text: str, param: str = "position") -> str:
    """``'grid,none'`` -> ``'both'``; any list of POSITION_MODES in canonical order, each once."""
    parts = POSITION_ALIASES.get(text.strip().lower()) or [p.strip().lower() for p in text.split(",")]
    bad = [p for p in parts if p not in POSITION_MODES]
    if bad or not parts:
        raise ParameterError(
            param, f"{text!r}: {bad[0] if bad else text!r} is not a key kind; use one or more of "
            f"{', '.join(POSITION_MODES)} (or both = none,grid), e.g. grid,offset"
        )
    modes = tuple(m for m in POSITION_MODES if m in parts)
    if len(modes) != len(parts):
        raise ParameterError(param, f"{text!r} lists a key kind twice")
    return next((alias for alias, ms in POSITION_ALIASES.items() if ms == modes), ",".join(modes))


def modes_of(canonical: str) -> tuple[str, ...]:
    """The key kinds of a :func:`canonical_position` text, in canonical order."""
    return POSITION_ALIASES.get(canonical) or tuple(canonical.split(","))


def parse_shapes(text: str, param: str = "shapes") -> list[tuple[int, int]]:
    """Parse an explicit shape list ``'1x1,2x3,4'`` (N means NxN) into sorted unique (h, w) pairs."""
    shapes = set()
    for part in text.split(","):
        bits = part.strip().lower().split("x")
        try:
            nums = [int(b) for b in bits]
        except ValueError:
            nums = []
        if len(nums) not in (1, 2) or min(nums) < 1:
            raise ParameterError(
                param, f"{text!r}: {part.strip()!r} is not a shape; use "
                + ("rect, square, or " if param == "shapes" else "none, auto, or ")
                + "a list such as 1x1,2x2,1x3"
            )
        shapes.add((nums[0], nums[-1]))
    return sorted(shapes)


def parse_code_shapes(text: str) -> list[tuple[int, int, int]]:
    """Parse a code-shape list ``'6x6,6x6/2'`` into sorted unique (h, w, scale) triples: ``HxW/S``
    is an h x w patch of the image averaged over S x S pixel blocks (covering hS x wS pixels);
    without ``/S`` the scale is 1. Sorted by scale, then shape. Two shapes may not cover the same
    pixels (their keys would coincide)."""
    out = set()
    for part in text.split(","):
        shape, _, scale = part.strip().partition("/")
        try:
            s = int(scale) if scale else 1
        except ValueError:
            s = 0
        if s < 1 or s > 64:
            raise ParameterError("code_shapes", f"{text!r}: {part.strip()!r} has scale {scale!r}; a scale is a whole number from 1 to 64, as in 6x6/2")
        for h, w in parse_shapes(shape, "code_shapes"):
            out.add((h, w, s))
    listed = sorted(out, key=lambda t: (t[2], t[0], t[1]))
    covered = [(h * s, w * s) for h, w, s in listed]
    if len(set(covered)) != len(covered):
        raise ParameterError("code_shapes", f"{text!r} has two shapes covering the same pixels (such as 12x12 and 6x6/2); keep one of them")
    return listed


def code_shape_text(shapes: list[tuple[int, int, int]]) -> str:
    """The canonical text of code shapes (:func:`parse_code_shapes`'s inverse), 'none' for none."""
    return ",".join(f"{h}x{w}" + (f"/{s}" if s > 1 else "") for h, w, s in shapes) or "none"


def auto_batch(train_images: int) -> int:
    """The automatic batch size: 128 images, or fewer so that an epoch has at least 32 steps (at
    least 8): a small training set still gets enough updates per epoch."""
    return int(min(128, max(8, train_images // 32)))


def is_large_code(shapes: list[tuple[int, int, int]], channels: int) -> bool:
    """True when a code shape (h, w, scale) holds more than :data:`LARGE_CODE_VALUES` values (h x w x
    channels: 6x6 on RGB images at any scale, not 4x4 or 6x6 on gray ones)."""
    return any(h * w * channels > LARGE_CODE_VALUES for h, w, *_ in shapes)


def auto_code_position(config: "ExtractConfig") -> str:
    """``code_position`` auto: on a large code (:func:`is_large_code`, unpooled) the kinds of
    ``position`` plus ``none``, so each atom also has a key shared by every place it occurs (what it
    means anywhere) beside its keys per cell (what it means there); else ``same``. A large code
    spreads over many (atom, cell) rows, each seen by few images; the shared row pools them."""
    if config.has_code and config.large_code and not config.code_pooled and "none" not in config.position_modes:
        return canonical_position(config.position + ",none", "code_position")
    return "same"


PLAIN_LR = 1.0  # pipe train's lr auto on shards whose code is not large
LARGE_CODE_LR = 0.3  # ... on shards whose code is large (ExtractConfig.large_code)
LARGE_CODE_DROP = 0.3  # pipe train's drop 'image' on shards whose code is large

REPLAY = 2000  # pipe train --from: earlier original images per class a step trains on again
DISTILL = 1.0  # pipe train --from: weight of the earlier run's answers (distillation) in a step's loss


EXTRACT_BOUNDS = {
    "levels": Bound(2, 256),
    "stride": Bound(1, 65535),
    "grid": Bound(0, 255, note="0 = auto"),
    "seed": Bound(0, (1 << 32) - 1),
    "atoms": Bound(0, 65535, note="0 = auto"),
    "whiten": Bound(0, 1e6, hi_open=True, note="0 = no whitening"),
    "code_stride": Bound(1, 65535),
    "code_sample": Bound(1),
}


def check_code_k(code_k: int, atoms: int) -> None:
    """Refuse a ``code_k`` above the dictionary's ``atoms`` (the given count, or the resolved one of ``atoms`` 0)."""
    if not 0 <= code_k <= atoms:
        raise ParameterError("code_k", f"{code_k} must be from 1 to atoms ({atoms}), or 0 (auto)")


@dataclass(frozen=True)
class ExtractConfig:
    """How images become keys (see docs/hashing.md)."""

    levels: int = 4  # quantization levels per channel: value v -> floor(v * levels / 256) [4]
    color: str = "auto"  # 'gray', 'rgb', or 'auto' = taken from the source's first image [auto]
    max_h: int = 0  # tallest exact-view patch, in pixels; 0 = auto: the largest square whose possible contents number at most 2**24 (3 on gray, 2 on RGB at 4 levels) [auto]
    max_w: int = 0  # widest exact-view patch, in pixels; 0 = auto, with max_h [auto]
    shapes: str = "rect"  # 'rect' = every h x w up to the bounds; 'square' = h == w only; or a list 'HxW,HxW,...' [rect]
    stride: int = 1  # step between patch positions, in pixels, on both axes [1]
    position: str = "grid"  # key kinds per patch, a list of: 'none' (no location), 'grid' (grid cell), 'offset' (cell of the grid moved by half a cell), 'coarse' (cell of a grid half as fine); 'both' = none,grid [grid]
    grid: int = 0  # cells per side of the position grid; 0 = auto: cells of about 8 pixels, at least 3 per side (3 on 8x8, 4 on 32x32) [auto]
    seed: int = 0  # hash seed; a different seed gives unrelated keys [0]
    resize: tuple[int, int] | None = None  # (height, width) every image is resized to, or None to require equal sizes [None]
    code_shapes: str = "auto"  # shapes of the code view, a list 'HxW,HxW/S,...' (/S: on the image averaged over S x S blocks), 'none' (no code view) or 'auto' = chosen from the image size (docs/extract.md) [auto]
    atoms: int = 0  # dictionary atoms per code shape (FAISS k-means); 0 = auto: 4096 when a code shape holds more than 64 values (h x w x channels: 6x6 RGB), else 1024 [auto]
    code_k: int = 0  # nearest atoms kept per patch of the code view; 0 = auto: every atom when the code view is pooled, else 5 [auto]
    code_weight: str = "triangle"  # weight of a kept atom: 'triangle' (mean distance minus its distance, at least 0) or 'hard' (1) [triangle]
    code_norm: str = "contrast"  # how a code-view patch is scaled before whitening: 'contrast' (each patch's brightness and contrast normalised) or 'none' (pixels on [0, 1]) [contrast]
    whiten: float = 0.1  # ZCA regularisation added to the eigenvalues of the scaled patches' covariance; 0 = no whitening [0.1]
    code_stride: int = 1  # step between code-view patch positions, in pixels [1]
    code_sample: int = 200000  # patches per code shape sampled from the training images to fit the dictionary [200000]
    dictionary: str = ""  # SHA-256 of the dictionary the code view was made with (set by pipe extract) []
    code_position: str = "auto"  # key kinds of the code view's patches: 'same' (those of `position`), a list like `position`'s (e.g. grid,offset: overlapping cells on the code view alone), or 'auto' = those of `position` plus 'none' (a key without location) on a large code (6x6 on RGB), else same [auto]
    code_pool: str = "none"  # 'none' (a key per patch location and rank), or a position mode ('grid', 'coarse', 'offset') whose cells sum the code view's weights before anything is written (its keys then use that mode alone) [none]
    code_signs: str = "one"  # 'one': a patch keeps the atoms nearest to it; 'both': also those nearest to its negative, as atoms of their own (ids atoms..2*atoms-1) [one]
    views: str = "auto"  # exact views hashed side by side: 'levels' (--levels), 'norm' (contrast-stretched per image), each with optional ':N' levels, and 'grad' (ordinal: brighter than the right / lower neighbour); 'none'; 'auto' = levels,grad on gray images, levels on RGB [auto]

    def __post_init__(self) -> None:
        for name, bound in EXTRACT_BOUNDS.items():
            bound.check(name, getattr(self, name))
        if self.color not in COLORS:
            raise ParameterError("color", f"{self.color!r} is not one of {', '.join(COLORS)}")
        if self.shapes not in SHAPE_SETS:
            listed = parse_shapes(self.shapes)
            # an explicit list decides the bounds; it is stored in canonical order
            object.__setattr__(self, "shapes", ",".join(f"{h}x{w}" for h, w in listed))
            object.__setattr__(self, "max_h", max(h for h, _ in listed))
            object.__setattr__(self, "max_w", max(w for _, w in listed))
        if (self.max_h == 0) != (self.max_w == 0) or self.max_h < 0 or self.max_w < 0:
            raise ParameterError("max_size", f"{self.max_h}x{self.max_w} must be at least 1x1 (or auto)")
        if self.max_h >= 1 << 16 or self.max_w >= 1 << 16:
            raise ParameterError("max_size", "must be below 65536 on each side")
        object.__setattr__(self, "position", canonical_position(self.position))
        if self.code_position not in ("same", "auto"):
            object.__setattr__(self, "code_position", canonical_position(self.code_position, "code_position"))
        kinds = [("position", self.position_modes)] + ([("code_position", self.code_position_modes)] if self.code_position != "auto" else [])
        for name, modes in kinds:  # auto adds only 'none' to position's kinds
            if "offset" in modes and self.grid > 254:
                raise ParameterError("grid", f"{self.grid} is too fine for `{name}` offset, whose grid has one more cell per side; use 1 to 254")
        if self.code_shapes not in ("auto", "none"):
            object.__setattr__(self, "code_shapes", code_shape_text(parse_code_shapes(self.code_shapes)))
        if self.atoms == 1:
            raise ParameterError("atoms", "1 must be 0 (auto) or from 2 to 65535")
        if self.atoms:
            check_code_k(self.code_k, self.atoms)
        if self.code_pool not in CODE_POOLS:
            raise ParameterError("code_pool", f"{self.code_pool!r} is not one of {', '.join(CODE_POOLS)}")
        if self.code_pooled and self.code_position not in ("same", "auto"):
            raise ParameterError("code_position", f"{self.code_position!r} cannot key a pooled code view, whose keys are its `code_pool` kind "
                                 f"({self.code_pool}) alone; leave `code_position` same")
        if self.code_weight not in CODE_WEIGHTS:
            raise ParameterError("code_weight", f"{self.code_weight!r} is not one of {', '.join(CODE_WEIGHTS)}")
        if self.code_norm not in CODE_NORMS:
            raise ParameterError("code_norm", f"{self.code_norm!r} is not one of {', '.join(CODE_NORMS)}")
        if self.code_signs not in CODE_SIGNS:
            raise ParameterError("code_signs", f"{self.code_signs!r} is not one of {', '.join(CODE_SIGNS)}")
        if self.code_signs == "both" and self.atoms > MAX_SIGNED_ATOMS:
            raise ParameterError("atoms", f"{self.atoms} is more than {MAX_SIGNED_ATOMS} with `code_signs` both (an atom id and its negative's share 16 bits); use fewer atoms")
        if self.views != "auto":
            views = parse_views(self.views, self.levels)
            object.__setattr__(self, "views", ",".join(k if lv == self.levels or k == "grad" else f"{k}:{lv}" for k, lv in views) or "none")
        if self.resize is not None:
            h, w = check_resize(self.resize)
            object.__setattr__(self, "resize", (int(h), int(w)))

    @property
    def channels(self) -> int:
        if self.color == "auto":
            raise PipelineError("the color mode is still 'auto'; resolve it against a source first")
        return 1 if self.color == "gray" else 3

    @property
    def position_modes(self) -> tuple[str, ...]:
        """The key kinds emitted per patch, in canonical order."""
        return modes_of(self.position)

    @property
    def code_position_modes(self) -> tuple[str, ...]:
        """The key kinds emitted per patch of the code view (unpooled), in canonical order."""
        if self.code_position == "auto":
            raise PipelineError("the code view's key kinds are still 'auto'; resolve the config against the image size first")
        return self.position_modes if self.code_position == "same" else modes_of(self.code_position)

    @property
    def has_code(self) -> bool:
        """True when the config has a code view (its shapes resolved, not 'none')."""
        if self.code_shapes == "auto":
            raise PipelineError("the code shapes are still 'auto'; resolve them against a source first")
        return self.code_shapes != "none"

    @property
    def signs(self) -> int:
        """How many signs of a patch the code view codes: 1 (``one``) or 2 (``both``)."""
        return 2 if self.code_signs == "both" else 1

    @property
    def code_pooled(self) -> bool:
        """True when the code view's weights are summed per cell (``code_pool`` not 'none')."""
        return self.code_pool != "none"

    def code_shape_list(self) -> list[tuple[int, int, int]]:
        """The code view's shapes (h, w, scale), in canonical order (empty without a code view)."""
        return parse_code_shapes(self.code_shapes) if self.has_code else []

    @property
    def large_code(self) -> bool:
        """:func:`is_large_code` of this config's code shapes: ``--atoms auto`` and ``pipe train``'s
        automatic ``lr`` and ``drop`` follow it."""
        return is_large_code(self.code_shape_list(), self.channels)

    def view_list(self) -> list[tuple[str, int]]:
        """Every view (kind, levels), in the order their patches are stored."""
        if self.views == "auto":
            raise PipelineError("the views are still 'auto'; resolve them against a source first")
        return parse_views(self.views, self.levels)

    def shape_list(self) -> list[tuple[int, int]]:
        """Every patch shape (h, w), in canonical order: h ascending, then w ascending."""
        if self.max_h == 0:
            raise PipelineError("the largest patch is still 'auto'; resolve it against a source first")
        if self.shapes not in SHAPE_SETS:
            return parse_shapes(self.shapes)
        return [
            (h, w)
            for h in range(1, self.max_h + 1)
            for w in range(1, self.max_w + 1)
            if self.shapes == "rect" or h == w
        ]

    def check_image_size(self, height: int, width: int) -> None:
        if self.max_h > height or self.max_w > width:
            raise ParameterError(
                "max_size", f"{self.max_h}x{self.max_w} is larger than the {height}x{width} images; "
                f"use at most {height}x{width}"
            )
        for h, w, s in self.code_shape_list() if self.code_shapes != "auto" else []:
            if h * s > height or w * s > width:
                name = f"{h}x{w}" + (f"/{s} (covering {h * s}x{w * s} pixels)" if s > 1 else "")
                raise ParameterError("code_shapes", f"{name} is larger than the {height}x{width} images; use shapes covering at most {height}x{width}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["resize"] = list(self.resize) if self.resize else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExtractConfig":
        d = dict(d)
        d.setdefault("views", "levels")  # written before --views existed: one view, whatever today's default
        d.setdefault("code_shapes", "none")  # written before the code view existed
        d.setdefault("code_norm", "contrast")  # written before --code-norm existed: contrast normalisation
        d.setdefault("code_pool", "none")  # written before --code-pool existed: a key per location and rank
        d.setdefault("code_k", CODE_K_UNPOOLED)  # written before --code-k auto existed
        d.setdefault("code_signs", "one")  # written before --code-signs existed
        d.setdefault("code_position", "same")  # written before --code-position existed
        if d.get("resize") is not None:
            d["resize"] = tuple(d["resize"])
        return cls(**d)

    def fingerprint(self) -> str:
        """A short stable digest of everything that decides the keys."""
        if "auto" in (self.color, self.code_shapes, self.views) or 0 in (self.grid, self.max_h) or (self.code_shapes != "none" and (0 in (self.code_k, self.atoms) or self.code_position == "auto")):
            raise PipelineError("cannot fingerprint an extract config whose color, views, sizes, code shapes, atoms, k, code key kinds or grid are still 'auto'")
        if self.has_code and not self.dictionary:
            raise PipelineError("cannot fingerprint a code view without its dictionary's digest")
        d = self.to_dict()
        if not self.has_code:  # configs without a code view hash as before it existed
            for k in CODE_FIELDS:
                del d[k]
        if d.get("code_norm") == "contrast":  # contrast-normalised codes hash as before --code-norm existed
            del d["code_norm"]
        if d.get("code_pool") == "none":  # unpooled codes hash as before --code-pool existed
            del d["code_pool"]
        if d.get("code_signs") == "one":  # one-sign codes hash as before --code-signs existed
            del d["code_signs"]
        if d.get("code_position") == "same":  # a code view keyed like the exact views hashes as before --code-position existed
            del d["code_position"]
        if d["views"] == "levels":  # the single default view hashes as before views existed
            del d["views"]
        payload = json.dumps({"hash": HASH_VERSION, **d}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


OPTIMIZERS = ("adagrad", "rowwise-adagrad", "sparseadam", "sgd")
REFITS = ("auto", "off")
VOTES = ("auto", "mirror", "none")
BAGS = ("mean", "sum", "sqrt")


TRAIN_BOUNDS = {
    "min_count": Bound(1),
    "buckets": Bound(0, note="0 = drop rare keys"),
    "dim": Bound(1, MAX_DIM),
    "hidden": Bound(0, MAX_DIM * 16, note="0 = linear head"),
    "pooled_dropout": Bound(0.0, 1.0, hi_open=True),
    "epochs": Bound(1),
    "patience": Bound(0, note="0 = never stop early"),
    "batch_size": Bound(0, MAX_BATCH, note="0 = auto"),
    "lr": Bound(0.0, MAX_LR, note="0 = auto"),
    "head_lr": Bound(0.0, MAX_LR, lo_open=True),
    "init_std": Bound(0.0, MAX_INIT_STD),
    "vocab_mb": Bound(64),
    "cache_mb": Bound(0, note="0 = no cache"),
    "val_fraction": Bound(0.0, 1.0, hi_open=True),
    "nprobe": Bound(1, 1 << 20),
    "ef_search": Bound(1, 1 << 20),
}


@dataclass(frozen=True)
class TrainConfig:
    """How the pattern table and classifier head are trained."""

    min_count: int = 2  # a key seen at least this often in training gets its own row [2]
    buckets: int = 0  # shared rows for the rarer keys (key % buckets); 0 drops them [0]
    dim: int = 64  # embedding dimension [64]
    bag: str = "mean"  # pooling of an image's rows: 'mean', 'sum' or 'sqrt' (sum / sqrt(n)) [mean]
    hidden: int = 0  # 0 = linear head, else one hidden ReLU layer of this width [0]
    drop: str = "image"  # patch dropout: rate of an image's distinct rows dropped in training, 'auto' (learned), or 'image' = 0.3 when the shards' code is large (6x6 on RGB), else 0 [image]
    pooled_dropout: float = 0.0  # ordinary dropout on the pooled vector [0]
    optimizer: str = "adagrad"  # for the table: 'adagrad', 'rowwise-adagrad' (one accumulator per row), 'sparseadam' or 'sgd' [adagrad]
    epochs: int = 5  # most passes over the training part [5]
    patience: int = 3  # stop after this many epochs without a better validation accuracy; 0 = never [3]
    batch_size: int = 0  # images per step; 0 = auto: 128, or fewer so that an epoch has at least 32 steps (at least 8 images) [auto]
    lr: float = 0.0  # learning rate of the table; 0 = auto: 0.3 when the shards' code is large (6x6 on RGB), else 1.0 [auto]
    head_lr: float = 0.01  # Adam learning rate of the head [0.01]
    init_std: float = 0.001  # standard deviation of the table's initial values [0.001]
    vocab_mb: int = 4096  # memory for counting keys; past it the count is split into passes over key ranges [4096]
    cache_mb: int = 4096  # memory for keeping every image's bags after the first epoch; 0 = read the shards every epoch [4096]
    val_fraction: float = 0.1  # share of images held out for validation, chosen by a hash of image_id [0.1]
    refit: str = "auto"  # 'auto': when fewer than 500 images are held out, train again on every image for the epochs they chose; 'off' [auto]
    vote: str = "auto"  # how an image is scored: 'mirror' = as the bag of its own patches and its left-right mirror's, 'none' = its own alone, 'auto' = mirror when the shards hold each image's mirror (--augment with flip), else none [auto]
    seed: int = 0  # seed for initialisation, shuffling and dropout [0]
    device: str = "auto"  # 'auto' (CUDA when present), 'cpu' or 'cuda' [auto]
    index: str = "auto"  # pattern index: 'auto', 'flat', 'hnsw', 'ivf', 'ivfpq' or a FAISS factory string [auto]
    nprobe: int = 32  # inverted lists searched per query (IVF kinds) [32]
    ef_search: int = 64  # graph search breadth (HNSW kinds) [64]

    def __post_init__(self) -> None:
        for name, bound in TRAIN_BOUNDS.items():
            bound.check(name, getattr(self, name))
        if self.bag not in BAGS:
            raise ParameterError("bag", f"{self.bag!r} is not one of {', '.join(BAGS)}")
        if self.drop not in ("auto", "image"):
            try:
                rate = float(self.drop)
            except ValueError:
                rate = -1.0
            if not 0.0 <= rate < 1.0:
                raise ParameterError("drop", f"{self.drop!r} must be a rate in [0, 1), 'auto' or 'image'")
            object.__setattr__(self, "drop", repr(rate) if rate else "0")
        if self.optimizer not in OPTIMIZERS:
            raise ParameterError("optimizer", f"{self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        self.check_table(self.buckets, "`buckets`")
        if self.refit not in REFITS:
            raise ParameterError("refit", f"{self.refit!r} is not one of {', '.join(REFITS)}")
        if self.vote not in VOTES:
            raise ParameterError("vote", f"{self.vote!r} is not one of {', '.join(VOTES)}")
        if not self.index.strip():
            raise ParameterError("index", "must not be empty; give auto, flat, hnsw, ivf, ivfpq or a FAISS factory string")
        if self.device not in DEVICES:
            raise ParameterError("device", f"{self.device!r} is not one of {', '.join(DEVICES)}")

    def table_bytes(self, rows: int) -> int:
        """Memory for a table of ``rows`` rows while training: the vectors, their gradients and the
        optimizer's state (two more tables' worth at most)."""
        return int(rows) * self.dim * 4 * 4

    def check_table(self, rows: int, what: str) -> None:
        """Refuse a table that cannot fit in this machine's memory, before it is allocated."""
        need, have = self.table_bytes(rows), physical_memory()
        if have and need > have:
            raise PipelineError(
                f"{what} gives a table of {rows:,} rows x `dim` {self.dim}, which needs about {need / 2**30:.1f} GiB to train; "
                f"this machine has {have / 2**30:.1f} GiB: lower `dim`, `buckets` or raise `min_count`"
            )

    def resolved(self, train_images: int | None, large_code: bool, mirrored: bool = False) -> "TrainConfig":
        """These settings with the automatic ones fixed: the batch size for ``train_images`` training
        images (left automatic when None); the table's learning rate and patch dropout for shards whose code is large or not
        (:attr:`ExtractConfig.large_code`). A large code spreads the images over a large table
        (4,096 atoms in each of 16 cells on 32x32 RGB), which overfits them unless it learns
        slower and drops some of an image's rows. ``vote`` auto follows ``mirrored``: whether the shards
        hold each image's left-right mirror."""
        changes: dict[str, Any] = {}
        if self.vote == "auto":
            changes["vote"] = "mirror" if mirrored else "none"
        elif self.vote == "mirror" and not mirrored:
            raise ParameterError("vote", "mirror scores an image with its left-right mirror, which these shards do not hold; "
                                 "extract them with `augment` flip, or leave `vote` auto")
        if not self.batch_size and train_images is not None:
            changes["batch_size"] = auto_batch(train_images)
        if not self.lr:
            changes["lr"] = LARGE_CODE_LR if large_code else PLAIN_LR
        if self.drop == "image":
            changes["drop"] = repr(LARGE_CODE_DROP) if large_code else "0"
        return dataclasses.replace(self, **changes) if changes else self

    def for_shards(self, shards) -> "TrainConfig":
        """:meth:`resolved` for training on ``shards`` (a Shards, or a step's): their training
        images are counted only when the batch size is automatic."""
        return self.resolved(None if self.batch_size else shards.count_training(self.val_fraction), shards.config.large_code,
                             shards.mirror_variant > 0)

    def vote_variant(self, shards) -> int:
        """The variant number of the copy each held-out image of ``shards`` is scored with (its
        mirror, :func:`pipeline.data.augment.flip_variant`), 0 when it is scored alone."""
        if self.vote == "auto":
            raise PipelineError("the vote is still 'auto'; resolve it against the shards first (TrainConfig.for_shards)")
        return shards.mirror_variant if self.vote == "mirror" else 0

    @property
    def drop_rate(self) -> float | str:
        if self.drop == "image":
            raise PipelineError("the patch dropout is still 'image'; resolve it against the shards first (TrainConfig.resolved)")
        return "auto" if self.drop == "auto" else float(self.drop)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return cls(**d)
