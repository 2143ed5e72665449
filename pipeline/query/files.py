"""Image files read for a run (a :class:`pipeline.query.run.Run`): decoded in its channel count, fitted or resized to its size, with a
note for each change. Below :mod:`pipeline.query.run` (a run is only passed in), so the run's own
methods can read files too."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import check_resize
from pipeline.data.images import FIT_RULE, MAX_PIXELS, BadImage, decode, file_channels, fit_array
from pipeline.data.sources import read_ref
from pipeline.errors import PipelineError


def read_image(run, path: Path | str, resize: tuple[int, int] | None = None, notes: list[str] | None = None) -> np.ndarray:
    """One image file as H x W x C uint8 in the run's channel count, resized to ``resize`` (default:
    the run's own ``--resize``, if it has one; else an image of another size than the run's is
    fitted to it by :func:`pipeline.data.images.fit_array`). A grayscale file on a colour run (or
    the reverse) is converted as docs/extract.md documents; ``notes`` is told of each change."""
    if resize is not None:
        check_resize(resize)
    if not Path(path).exists():
        raise PipelineError(f"{path} does not exist; check the path")
    try:
        data = read_ref(("file", str(path)))
    except BadImage as e:
        raise PipelineError(f"cannot read {path}: {e}") from None
    return image_from_bytes(run, data, str(path), resize, notes)


def image_from_bytes(run, data: bytes, name: str, resize: tuple[int, int] | None = None, notes: list[str] | None = None,
                     max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """:func:`read_image` of an encoded image already in memory (an upload); ``name`` names it in messages.
    Raises :class:`PipelineError` for bytes that are no image (or of more than ``max_pixels`` pixels)."""
    cfg = run.extract_config
    if resize is not None:
        check_resize(resize)
    try:
        img = decode(data, cfg.channels, resize or cfg.resize, max_pixels)
        own = file_channels(data)
    except BadImage as e:
        raise PipelineError(f"cannot read {name}: {e}") from None
    if own != cfg.channels and notes is not None:
        kinds = {1: "grayscale", 3: "colour"}
        notes.append(f"{name} is {kinds[own]} and the run {kinds[cfg.channels]}: converted "
                     + ("by repeating the gray channel" if cfg.channels == 3 else "to gray with Pillow's luma formula"))
    if img.shape[:2] != (run.height, run.width):
        if notes is not None:
            notes.append(f"{name} is {img.shape[0]}x{img.shape[1]} (height x width): fitted to the run's {run.height}x{run.width}, {FIT_RULE}")
        img = fit_array(img, (run.height, run.width))
    return img
