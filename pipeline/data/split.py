"""Which images validate: a fixed share chosen by a hash of the image id, the same in every stage.

Training holds these images out (:mod:`pipeline.training.bags`), and the code view's
dictionary is fitted without the default share (:mod:`pipeline.extraction.stage`), so
the held-out accuracy is measured on images no stage has seen.
"""
from __future__ import annotations

import numpy as np

from pipeline.data import augment
from pipeline.fmix import fmix64

VAL_SALT = 0x5BD1E9955BD1E995
DEFAULT_VAL_FRACTION = 0.1  # TrainConfig.val_fraction's default


def is_validation(image_ids: np.ndarray, fraction: float) -> np.ndarray:
    """True for the images held out for validation: ``fmix64(id + VAL_SALT) % 10000 < fraction * 10000``.

    ``id`` is the original image's id, so augmented copies (:mod:`pipeline.data.augment`) fall
    on the same side as their image.
    """
    h = fmix64(augment.base_ids(np.asarray(image_ids)).astype(np.uint64) + np.uint64(VAL_SALT))
    return (h % np.uint64(10000)) < np.uint64(round(fraction * 10000))
