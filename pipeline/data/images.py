"""Decoding image files (Pillow) into uint8 arrays with the documented channel conversion.

Supported modes: 1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr. 16-bit and float
modes (I, I;16, F) are refused rather than silently clipped.
"""
from __future__ import annotations

import io
import warnings
from functools import lru_cache

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.pixels import to_channels

_SUPPORTED = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"}
MAX_PIXELS = 1 << 26  # an image larger than 8192 x 8192 is refused from its header, before decoding
MAX_FILE_BYTES = 1 << 28  # an image file larger than 256 MiB is refused before it is read


class BadImage(Exception):
    """A file that is not a readable image; ``str()`` says why."""


@lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
    """File extensions Pillow can open (lower case, with the dot)."""
    return frozenset(ext.lower() for ext in Image.registered_extensions())


def is_image_name(name: str) -> bool:
    dot = name.rfind(".")
    return dot >= 0 and name[dot:].lower() in image_extensions()


def _to_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode not in _SUPPORTED:
        raise BadImage(f"unsupported image mode {mode!r}; convert it to 8-bit RGB or grayscale")
    if mode in ("1", "L"):
        return np.asarray(img.convert("L"))[..., None]
    has_alpha = mode in ("LA", "PA", "RGBA") or (mode == "P" and "transparency" in img.info)
    return np.asarray(img.convert("RGBA" if has_alpha else "RGB"))


def decode(data: bytes, channels: int | None, resize: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an encoded image into H x W x C uint8.

    ``channels`` None keeps the file's own (1 for gray, 3 for colour, alpha composited onto
    black); 1 or 3 converts. ``resize`` = (height, width) resizes with bilinear filtering.
    Raises :class:`BadImage` for anything unreadable.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))  # reads the header only
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise BadImage(f"is {w}x{h} = {w * h:,} pixels, more than the {MAX_PIXELS:,} decoded; shrink it first")
            img.load()
            if resize is not None and img.size != (resize[1], resize[0]):
                if img.mode not in _SUPPORTED:
                    raise BadImage(f"unsupported image mode {img.mode!r}; convert it to 8-bit RGB or grayscale")
                img = img.convert("RGBA" if "A" in img.mode else ("L" if img.mode in ("1", "L") else "RGB"))
                img = img.resize((resize[1], resize[0]), Image.Resampling.BILINEAR)
            arr = _to_array(img)
    except BadImage:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"not a readable image ({e.__class__.__name__}: {e})") from None
    arr = arr[None]
    if channels is None:
        channels = 1 if arr.shape[-1] == 1 else 3
    return to_channels(arr, channels)[0]


def file_channels(data: bytes) -> int:
    """The channels :func:`decode` gives a file by default (1 for gray, 3 for colour), read from
    its header alone; raises :class:`BadImage` for anything unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mode = Image.open(io.BytesIO(data)).mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"not a readable image ({e.__class__.__name__}: {e})") from None
    return 1 if mode in ("1", "L") else 3


def resize_array(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize one H x W x C uint8 array (C 1 or 3) to ``size`` = (height, width), bilinear, as for files."""
    if image.shape[:2] == tuple(size):
        return image
    mode = "L" if image.shape[-1] == 1 else "RGB"
    img = Image.fromarray(image[..., 0] if mode == "L" else image, mode)
    out = np.asarray(img.resize((size[1], size[0]), Image.Resampling.BILINEAR))
    return out[..., None] if mode == "L" else out


def encode_png(image: np.ndarray) -> bytes:
    """Encode one H x W x C (C 1 or 3) uint8 array as PNG."""
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
