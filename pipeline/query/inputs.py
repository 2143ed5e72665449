"""What ``pipe evaluate`` and ``pipe query --batch`` read: a shard directory, or else an image source."""
from __future__ import annotations

from pathlib import Path

from pipeline import layout
from pipeline.data.sources import Source, open_source
from pipeline.errors import PipelineError
from pipeline.extraction.shards import Shards


def open_data(spec: str, split: str | None = None, limit: int | None = None, per_class: int | None = None, skip_bad: bool = False,
              holdout: float | None = None) -> Shards | Source:
    """Shards (a directory with a shard manifest) or else an image source (:func:`open_source`)."""
    if Path(spec).is_dir() and (Path(spec) / layout.MANIFEST).exists():
        given = [f"`{name}`" for name, v in (("split", split), ("limit", limit), ("per_class", per_class), ("skip_bad", skip_bad),
                                              ("holdout", holdout)) if v]
        if given:
            raise PipelineError(f"{spec} is a shard directory: {', '.join(given)} choose images of a source and do nothing here; "
                                "leave them out, or pass the image source instead")
        return Shards(spec)
    return open_source(spec, split, limit, per_class, skip_bad, holdout)
