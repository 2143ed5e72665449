"""Pixel conventions: channel conversion and quantization into one symbol per pixel.

Conversions match Pillow's, so an image read from a file and the same pixels
read from an array give the same keys:

* gray -> rgb: the value is repeated in the three channels;
* rgb -> gray: ``L = (19595 R + 38470 G + 7471 B + 32768) >> 16`` (ITU-R 601-2 luma,
  Pillow's integer formula);
* alpha: composited onto black, ``round(c * a / 255)``, then dropped.
"""
from __future__ import annotations

import numpy as np

from pipeline.errors import PipelineError


def as_nhwc(images: np.ndarray) -> np.ndarray:
    """Return ``images`` as uint8 N x H x W x C (C in 1, 3, 4); a single image gains N = 1 where unambiguous."""
    a = np.asarray(images)
    if a.dtype != np.uint8:
        raise PipelineError(f"images must be uint8 (0..255), got dtype {a.dtype}; convert with .astype(np.uint8)")
    if a.ndim == 3:  # N x H x W grayscale
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3, 4):
        raise PipelineError(
            f"images must be N x H x W or N x H x W x C with C in 1, 3, 4; got shape {tuple(np.shape(images))}"
        )
    return a


def drop_alpha(images: np.ndarray) -> np.ndarray:
    """Composite RGBA onto black and return RGB (other inputs pass through)."""
    if images.shape[-1] != 4:
        return images
    rgb = images[..., :3].astype(np.uint32)
    alpha = images[..., 3:4].astype(np.uint32)
    return ((rgb * alpha + 127) // 255).astype(np.uint8)


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Convert N x H x W x C uint8 images to 1 (gray) or 3 (rgb) channels."""
    images = drop_alpha(images)
    c = images.shape[-1]
    if c == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=-1)
    x = images.astype(np.uint32)
    gray = (19595 * x[..., 0] + 38470 * x[..., 1] + 7471 * x[..., 2] + 32768) >> 16
    return gray.astype(np.uint8)[..., None]


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
