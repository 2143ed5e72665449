"""Training-set augmentation at extract time: extra copies of each image, flipped or shifted.

``pipe extract --augment flip,shift:1`` writes, after each image, its variants:
``flip`` the left-right mirror, ``shift:N`` every translation by up to N pixels
down/up and left/right except none ((2N+1)**2 - 1 copies; the uncovered border
repeats the edge pixels). Variant v of image i gets the id ``i + v * VARIANT_STRIDE``
(v = 0 is the image itself), so:

* the validation split hashes the original id (:func:`base_ids`): an image and all
  its variants land on the same side, and validation scores originals only;
* pattern examples (``patterns.parquet``) point only at original images.
"""
from __future__ import annotations

import numpy as np

from pipeline.errors import ParameterError

VARIANT_STRIDE = 1 << 40  # image ids of originals stay below it


def resolve(spec: str, channels: int) -> str:
    """``'auto'`` -> ``'flip'`` for colour images, ``'none'`` for grayscale ones (other specs unchanged).

    Colour images are most often photographs, where a mirrored scene is the same scene;
    grayscale ones are as often glyphs (digits, letters), where a mirrored shape is another
    symbol. A heuristic on the image alone: pass ``--augment`` to decide yourself."""
    if spec != "auto":
        return spec
    return "flip" if channels == 3 else "none"


def parse(spec: str) -> list[tuple[str, int]]:
    """``'none'`` or a list such as ``'flip,shift:1'`` -> [(kind, n)], in the order variants are written."""
    if spec in ("", "none"):
        return []
    out = []
    for part in spec.split(","):
        kind, _, n = part.strip().lower().partition(":")
        try:
            num = int(n) if n else 1
        except ValueError:
            num = 0
        if kind not in ("flip", "shift") or num < 1 or (kind == "flip" and n):
            raise ParameterError("augment", f"{spec!r}: {part.strip()!r} is not an augmentation; use none, flip, shift or shift:N, e.g. flip,shift:1")
        out.append((kind, num))
    return out


def _copies(kind: str, n: int) -> int:
    """Variants one parsed part writes: 1 for flip, every translation by up to n but none for shift:n."""
    return 1 if kind == "flip" else (2 * n + 1) ** 2 - 1


def count(spec: str) -> int:
    """Variants written per image besides the image itself."""
    return sum(_copies(kind, n) for kind, n in parse(spec))


MAX_COPIES = 100  # variants per image: beyond this the shards grow past any use


def check_size(spec: str, height: int, width: int) -> None:
    """Refuse shifts that move an image by more than a quarter of its side, and more than
    :data:`MAX_COPIES` variants per image."""
    limit = max(1, min(height, width) // 4)
    for kind, n in parse(spec):
        if kind == "shift" and n > limit:
            raise ParameterError("augment", f"shift:{n} moves {height}x{width} images by more than a quarter of their side; use shift:{limit} or less")
    if count(spec) > MAX_COPIES:
        raise ParameterError("augment", f"{spec!r} makes {count(spec)} copies of every image, more than {MAX_COPIES}; use a smaller shift")


def flip_variant(spec: str) -> int:
    """The variant number v of the left-right mirror among ``spec``'s variants, 0 when there is none."""
    v = 1
    for kind, n in parse(spec):
        if kind == "flip":
            return v
        v += _copies(kind, n)
    return 0


def variants(image: np.ndarray, spec: str) -> list[np.ndarray]:
    """The variants of one H x W x C image, in id order (v = 1, 2, ...)."""
    out = []
    h, w = image.shape[:2]
    for kind, n in parse(spec):
        if kind == "flip":
            out.append(np.ascontiguousarray(image[:, ::-1]))
            continue
        padded = np.pad(image, ((n, n), (n, n), (0, 0)), mode="edge")
        for dy in range(-n, n + 1):
            for dx in range(-n, n + 1):
                if dy or dx:  # content moves by (dy, dx)
                    out.append(np.ascontiguousarray(padded[n - dy : n - dy + h, n - dx : n - dx + w]))
    return out


def base_ids(image_ids: np.ndarray) -> np.ndarray:
    """The original image's id of each (possibly augmented) image id."""
    return np.asarray(image_ids, dtype=np.int64) % VARIANT_STRIDE


def is_original(image_ids: np.ndarray) -> np.ndarray:
    return np.asarray(image_ids, dtype=np.int64) < VARIANT_STRIDE
