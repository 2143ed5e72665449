"""How much an image is like the images a run learned from: a familiarity in [0, 1].

Three signs per image, each from what a query computes anyway:

* ``distance``: mean squared distance of its pooled vector (unseen patches dropped) to its
  :data:`NEIGHBOURS` nearest training images; large = unlike any training image;
* ``seen``: share of its patches (key slots) whose pattern has a learned row; small = patterns
  never learned (noise, another kind of picture);
* ``variety``: how many distinct learned patterns it holds; small = too uniform (a flat colour).

Each sign is compared with the same sign of reference images: the images training held out
(or, when nothing was held out, up to :data:`REFERENCE_IMAGES` training images, each left out of
its own neighbours). A sign's p-value is the share of reference images at least as unusual in
its direction, and the image's ``strangeness`` is the smallest of the three, so an image unusual
in any one way stands out. The familiarity is the share of reference images whose own
strangeness is as small or smaller: a p-value calibrated on the reference, so about 1% of
images like the reference images score below 0.01. The reference signs are stored in the run's
``familiarity.npz`` (no pickle), one entry per reference image.
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NEIGHBOURS = 5  # training images whose mean distance is the ``distance`` sign
REFERENCE_IMAGES = 2000  # at most this many reference images
SIGNS = ("distance", "seen", "variety")
HIGH_IS_ODD = {"distance": True, "seen": False, "variety": False}
FORMAT = "patchhash-familiarity-v1"
UNFAMILIAR = 0.01  # below this an answer says the image is unlike the training images


def signs(seen_ids: np.ndarray, distances: np.ndarray) -> dict[str, np.ndarray]:
    """The signs of N images from the pattern id of each key slot (N x K, -1 = no learned row) and
    the squared distances to their nearest training images (N x at least NEIGHBOURS, nearest first)."""
    ids = np.sort(np.asarray(seen_ids), axis=1)
    seen = ids >= 0
    starts = seen.copy()
    starts[:, 1:] &= ids[:, 1:] != ids[:, :-1]
    d = np.asarray(distances, np.float64)[:, :NEIGHBOURS]
    return {
        "distance": d.mean(1) if d.shape[1] else np.zeros(len(ids)),
        "seen": seen.mean(1) if ids.shape[1] else np.ones(len(ids)),
        "variety": starts.sum(1).astype(np.float64),
    }


@dataclass
class Reference:
    """The reference images' signs (one entry per image, aligned) and where they came from."""

    values: dict[str, np.ndarray]
    source: str  # 'held-out', 'held-out, before the refit' or 'training, each left out'

    def __post_init__(self) -> None:
        self._sorted = {k: np.sort(np.asarray(v, np.float64)) for k, v in self.values.items()}
        self._strangeness = np.sort(self.strangeness(self.values))

    @property
    def images(self) -> int:
        return len(self.values["distance"])

    def strangeness(self, s: dict[str, np.ndarray]) -> np.ndarray:
        """The smallest of the signs' p-values against the reference (N floats in [0, 1])."""
        out = None
        n = self.images
        for name in SIGNS:
            ref, x = self._sorted[name], np.asarray(s[name], np.float64)
            if HIGH_IS_ODD[name]:  # share of reference images at least as large
                p = (n - np.searchsorted(ref, x, side="left")) / max(n, 1)
            else:  # share at least as small
                p = np.searchsorted(ref, x, side="right") / max(n, 1)
            out = p if out is None else np.minimum(out, p)
        return out

    def score(self, s: dict[str, np.ndarray]) -> np.ndarray:
        """Familiarity (N floats in [0, 1]) of images with signs ``s``: the share of reference images
        whose strangeness is at most theirs (see the module docstring)."""
        return np.searchsorted(self._strangeness, self.strangeness(s), side="right") / max(self.images, 1)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, format=np.array(FORMAT), source=np.array(self.source), **{k: np.asarray(v, np.float64) for k, v in self.values.items()})
        return buf.getvalue()

    @classmethod
    def load(cls, path: Path) -> "Reference | None":
        """The reference stored at ``path``; None when the run has none (trained before it was written).
        Raises ValueError for a file that is not one."""
        if not Path(path).exists():
            return None
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"{path} cannot be read ({e})") from None
        return cls.load_bytes(data, str(path))

    @classmethod
    def load_bytes(cls, data: bytes, name: str = "the familiarity reference") -> "Reference":
        """:meth:`load` of the saved form in memory."""
        path = name
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                if str(z["format"]) != FORMAT:
                    raise ValueError(f"format {z['format']}")
                values = {k: np.asarray(z[k], np.float64) for k in SIGNS}
                source = str(z["source"])
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path} is not a familiarity reference ({e})") from None
        if len({len(v) for v in values.values()}) != 1 or any(not np.isfinite(v).all() for v in values.values()):
            raise ValueError(f"{path} holds signs of different lengths or values that are not finite")
        return cls(values, source)


def describe(value: float | None) -> str:
    """A few words on a familiarity for people."""
    if value is None:
        return "familiarity unknown (the run was trained before it was measured)"
    if value < UNFAMILIAR:
        return f"familiarity {value:.3f}: unlike the images this run learned from; treat the answer with care"
    return f"familiarity {value:.2f}"
