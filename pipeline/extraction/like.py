"""``pipe extract SOURCE --like RUN_OR_SHARDS``: new images extracted exactly as an earlier run's
or shard directory's were, so their keys are the same keys.

Everything that makes a key is taken from the earlier directory: the extract config (views,
levels, patch shapes, positions, grid, seed, resize, code view settings), the code view's
dictionary (its ``dictionary.npz``, so the dictionary digest and with it the fingerprint
agree), the image size and channels, and the augmentation. Images of another size or
channel count are refused in one line, before anything is written.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline import layout
from pipeline.config import ExtractConfig
from pipeline.data import augment as augment_mod
from pipeline.data.sources import Source
from pipeline.errors import PipelineError

KINDS = {1: "grayscale", 3: "colour"}


@dataclass(frozen=True)
class Like:
    """The settings of an earlier run or shard directory that new keys must share."""

    root: Path
    config: ExtractConfig
    fingerprint: str
    height: int
    width: int
    augment: str
    dictionary: Path | None  # the code view's dictionary.npz; None without a code view

    @property
    def channels(self) -> int:
        return self.config.channels


def like(path: Path | str) -> Like:
    """The settings of the run or shard directory ``path``."""
    root = Path(path)
    if (root / layout.RUN_MANIFEST).exists():
        m = _manifest(root / layout.RUN_MANIFEST)
        config_entry, fingerprint = m.get("extract_config"), m.get("extract_fingerprint")
        augment = m.get("augment") or _shards_augment(m.get("shards"))
    elif (root / layout.MANIFEST).exists():
        m = _manifest(root / layout.MANIFEST)
        config_entry, fingerprint = m.get("config"), m.get("fingerprint")
        augment = m.get("augment")
    else:
        raise PipelineError(f"like {root} is neither a run (no {layout.RUN_MANIFEST}) nor a shard directory (no {layout.MANIFEST}); "
                            "give the run or shards whose settings the new images should share")
    try:
        config = ExtractConfig.from_dict(config_entry)
        height, width = int(m["height"]), int(m["width"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PipelineError(f"{root} does not record its extract settings ({e.__class__.__name__}: {e}); extract or train it again") from None
    if config.fingerprint() != fingerprint:
        raise PipelineError(f"{root}'s settings do not match its fingerprint; extract or train it again")
    dictionary = None
    if config.has_code:
        dictionary = root / layout.DICTIONARY
        layout.regular_file(dictionary, f"{root} lacks the dictionary its keys were made with; extract or train it again")
    if augment is None:
        augment = augment_mod.resolve("auto", config.channels)
    return Like(root, config, str(fingerprint), height, width, str(augment), dictionary)


def check_fits(source: Source, settings: Like, first_size: tuple[int, int]) -> None:
    """Refuse a source whose images are not of the earlier directory's size and channels."""
    own = source.first_channels()
    if own != settings.channels:
        raise PipelineError(f"{source.path}'s images are {KINDS[own]}, but {settings.root} was made from {KINDS[settings.channels]} "
                            "images; give images like those it learned from")
    if tuple(first_size) != (settings.height, settings.width):
        how = (f"{settings.root} resizes to {settings.height}x{settings.width}" if settings.config.resize else
               f"resize them to {settings.height}x{settings.width} first")
        raise PipelineError(f"{source.path}'s images are {first_size[0]}x{first_size[1]} (height x width), but {settings.root} "
                            f"was made from {settings.height}x{settings.width} images; {how}")


def _manifest(path: Path) -> dict:
    try:
        m = layout.read_json(path)
    except (ValueError, OSError) as e:
        raise PipelineError(f"{path} is not valid JSON ({e}); extract or train it again") from None
    if not isinstance(m, dict):
        raise PipelineError(f"{path} is not a manifest; extract or train it again")
    return m


def _shards_augment(shards: str | None) -> str | None:
    """The augmentation recorded by the shards a run was trained on, when they are still there."""
    if not shards or not (Path(shards) / layout.MANIFEST).is_file():
        return None
    try:
        return layout.read_json(Path(shards) / layout.MANIFEST).get("augment")
    except (ValueError, OSError, PipelineError):
        return None
