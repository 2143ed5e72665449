"""A finished run's weights, ``model.safetensors``: read memory-mapped with numpy, without torch.

The file is written with the ``safetensors`` library (:func:`save`);
its layout is that format's (an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the bytes). It is read here as ``numpy.memmap``
views rather than through the library, whose numpy reader copies every tensor: a query touches
a few hundred rows of a table that can be hundreds of MB, and the copy would be most of its cost.
Nothing is unpickled.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from pipeline import layout
from pipeline.errors import PipelineError

DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32, "U8": np.uint8, "BOOL": np.bool_}
MAX_HEADER = 1 << 26


def load(path: Path, fix: str) -> dict[str, np.ndarray]:
    """Every tensor of ``path`` as a read-only memory-mapped array; ``fix`` says what to do when it
    cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} is missing; {fix}")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than its header")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER, size - 8):
                raise ValueError("its header length runs past the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        out = {}
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            dtype = DTYPES.get(spec.get("dtype")) if isinstance(spec, dict) else None
            if dtype is None:
                raise ValueError(f"tensor {name!r} has an unsupported dtype {spec.get('dtype') if isinstance(spec, dict) else spec!r}")
            shape = tuple(int(d) for d in spec["shape"])
            lo, hi = (int(v) for v in spec["data_offsets"])
            count = int(np.prod(shape, dtype=np.int64))
            if not 0 <= lo <= hi <= size - 8 - n or hi - lo != count * np.dtype(dtype).itemsize:
                raise ValueError(f"tensor {name!r} does not fit in the file (truncated?)")
            out[name] = (np.memmap(path, dtype=dtype, mode="r", offset=8 + n + lo, shape=shape) if count
                         else np.zeros(shape, dtype))
        return out
    except (ValueError, KeyError, TypeError, OSError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path} is damaged or truncated ({e}); {fix}") from None


def save(tensors: dict[str, np.ndarray], path: Path) -> None:
    """Write ``tensors`` (name -> float32 array) as ``path`` in the safetensors format, atomically."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    try:
        with layout.atomic(path) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
    except (RuntimeError, OSError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
        raise PipelineError(f"cannot write {path} ({first}); is the disk full? free space and train again") from None
