"""Decoding image files (Pillow) into uint8 arrays with the documented conversion.

One rule, used by extract, query and serve alike, in this order:

1. only the formats of :data:`FORMATS` are opened (Pillow knows more, some with outside
   loaders such as Ghostscript; they are refused);
2. the EXIF orientation is applied, so the array is the picture a viewer shows;
3. transparency (an alpha channel, or a palette's transparent colour) is composited onto
   black, ``round(c * a / 255)``; gray with alpha stays gray;
4. then the image is resized (bilinear), where a size is asked for;
5. then converted to the channels asked for (:func:`to_channels`).

Supported modes: 1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr. 16-bit and float
modes (I, I;16, F) are refused rather than silently clipped.
Arrays follow the same conventions as files (so an image read from a file and the same
pixels read from an array give the same keys): gray -> rgb repeats the value in the three
channels; rgb -> gray is ``L = (19595 R + 38470 G + 7471 B + 32768) >> 16`` (ITU-R 601-2
luma, Pillow's integer formula); alpha is composited onto black, ``round(c * a / 255)``,
then dropped.
"""
from __future__ import annotations

import io
import warnings
from functools import lru_cache

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import PipelineError


_SUPPORTED = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"}
_GRAY = {"1", "L", "LA"}
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")  # the file formats read (PPM covers PGM and PBM)
MAX_PIXELS = 1 << 26  # an image larger than 8192 x 8192 is refused from its header, before decoding
MAX_FILE_BYTES = 1 << 28  # an image file larger than 256 MiB is refused before it is read


# ---------------------------------------------------------------- arrays

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


class BadImage(Exception):
    """A file that is not a readable image; ``str()`` says why."""


@lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
    """File extensions of the formats read (:data:`FORMATS`; lower case, with the dot)."""
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in FORMATS)


def is_image_name(name: str) -> bool:
    dot = name.rfind(".")
    return dot >= 0 and name[dot:].lower() in image_extensions()


def _open(data: bytes) -> Image.Image:
    """The image of ``data``, its header read (nothing decoded), in one of :data:`FORMATS`."""
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise BadImage(f"not an image in a format read here ({', '.join(FORMATS)})") from None


def _to_array(img: Image.Image) -> np.ndarray:
    """H x W x 1 (gray) or 3 (colour), transparency composited onto black."""
    mode = img.mode
    if mode not in _SUPPORTED:
        raise BadImage(f"unsupported image mode {mode!r}; convert it to 8-bit RGB or grayscale")
    alpha = mode in ("LA", "PA", "RGBA") or (mode in ("P", "L", "RGB") and "transparency" in img.info)
    if mode in _GRAY:
        if not alpha:
            return np.asarray(img.convert("L"))[..., None]
        la = np.asarray(img.convert("LA")).astype(np.uint32)
        return ((la[..., :1] * la[..., 1:] + 127) // 255).astype(np.uint8)
    if not alpha:
        return np.asarray(img.convert("RGB"))
    return drop_alpha(np.asarray(img.convert("RGBA"))[None])[0]


def decode(data: bytes, channels: int | None, resize: tuple[int, int] | None = None, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an encoded image into H x W x C uint8, by the rule of the module docstring.

    ``channels`` None keeps the file's own (1 for gray, 3 for colour); 1 or 3 converts.
    ``resize`` = (height, width) resizes with bilinear filtering. An image of more than
    ``max_pixels`` pixels is refused from its header, before decoding. Raises
    :class:`BadImage` for anything unreadable.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = _open(data)  # reads the header only
            w, h = img.size
            if w * h > max_pixels:
                raise BadImage(f"is {w}x{h} = {w * h:,} pixels, more than the {max_pixels:,} decoded; shrink it first")
            img.load()
            if "exif" in img.info or img.format == "TIFF":  # where an orientation can be recorded
                img = ImageOps.exif_transpose(img)
            arr = _to_array(img)
    except BadImage:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"not a readable image ({e.__class__.__name__}: {e})") from None
    if resize is not None:
        arr = resize_array(arr, resize)
    if channels is None:
        channels = 1 if arr.shape[-1] == 1 else 3
    return to_channels(arr[None], channels)[0]


def file_channels(data: bytes) -> int:
    """The channels :func:`decode` gives a file by default (1 for gray, 3 for colour), read from
    its header alone; raises :class:`BadImage` for anything unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mode = _open(data).mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"not a readable image ({e.__class__.__name__}: {e})") from None
    return 1 if mode in _GRAY else 3


def resize_array(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize one H x W x C uint8 array (C 1 or 3) to ``size`` = (height, width), bilinear, as for files."""
    if image.shape[:2] == tuple(size):
        return image
    mode = "L" if image.shape[-1] == 1 else "RGB"
    img = Image.fromarray(image[..., 0] if mode == "L" else image, mode)
    out = np.asarray(img.resize((size[1], size[0]), Image.Resampling.BILINEAR))
    return out[..., None] if mode == "L" else out


def fit_array(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One H x W x C uint8 image fitted to ``size`` = (height, width) by :data:`FIT_RULE`: scaled
    (bilinear, proportions kept) until it covers ``size``, then the centre ``size`` cut out."""
    h, w = image.shape[:2]
    th, tw = size
    if (h, w) == (th, tw):
        return image
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    big = resize_array(image, (nh, nw))
    y, x = (nh - th) // 2, (nw - tw) // 2
    return np.ascontiguousarray(big[y : y + th, x : x + tw])


THUMBNAIL_SIDE = 64  # training images larger than this are stored shrunk to fit it (a run's images.parquet)


def thumbnail(img: np.ndarray) -> np.ndarray:
    """``img`` (h x w x C uint8), shrunk (box filter, proportions kept) to at most :data:`THUMBNAIL_SIDE` a side."""
    h, w = img.shape[:2]
    if max(h, w) <= THUMBNAIL_SIDE:
        return img
    scale = THUMBNAIL_SIDE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    pil = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).resize(size, Image.Resampling.BOX)
    return np.asarray(pil).reshape(size[1], size[0], img.shape[2])


FIT_RULE = "scaled to cover it (proportions kept), then centre-cropped"


def encode_png(image: np.ndarray) -> bytes:
    """Encode one H x W x C (C 1 or 3) uint8 array as PNG."""
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
