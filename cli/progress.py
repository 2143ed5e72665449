"""Progress on stderr for the CLI: a tqdm bar redrawn in place on a terminal, plain lines (count,
rate, ETA) in a log, or none (``pipe --progress``). The library reports progress through callbacks;
these are what the commands hand it."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

LOG_EVERY_S = 30.0  # where stderr is a file or pipe: one progress line per this many seconds per bar


class _LineProgress(tqdm):
    """tqdm for logs: a plain line (count, rate, ETA) when the work starts, at most every
    LOG_EVERY_S after, and one when done, instead of carriage-return redraws that a file or
    pipe shows as one endless line."""

    def __init__(self, *a, **kw):
        self._printed = 0.0
        self._final = False
        super().__init__(*a, **kw, file=sys.stderr, mininterval=1.0, ascii=True)

    def clear(self, *a, **kw):  # nothing drawn in place, nothing to clear (tqdm.write calls this)
        pass

    def _line(self) -> None:
        self.fp.write(self.format_meter(**{**self.format_dict, "ncols": 0}).replace("||", "").strip() + "\n")
        self.fp.flush()
        self._printed = time.time()

    def display(self, msg=None, pos=None):
        if not self.n or self._final:
            return
        self._final = self.total is not None and self.n >= self.total
        if self._final or time.time() - self._printed >= LOG_EVERY_S:
            self._line()

    def close(self):
        if not self.disable and self.n and not self._final:
            self._final = True
            self._line()
        self.disable = True  # tqdm's own close would redraw the bar


MODE = {"mode": "auto"}  # set by the --progress option of the command group


def bar(total: int | None, unit: str, desc: str) -> tqdm:
    """A progress bar on stderr (--progress): redrawn in place on a terminal, plain lines in a log
    (any other stderr), or none."""
    mode = MODE["mode"]
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "lines"
    if mode == "bar":
        return tqdm(total=total, unit=unit, desc=desc, unit_scale=True, dynamic_ncols=True, file=sys.stderr, leave=False)
    return _LineProgress(total=total, unit=unit, desc=desc, unit_scale=True, disable=mode == "off")



def patches(bar: tqdm):
    """A progress callback of (images, patches) that moves ``bar`` by images and shows patches/s."""
    patches = [0]

    def progress(images: int, n: int) -> None:
        patches[0] += n
        bar.update(images)
        bar.set_postfix_str(f"{patches[0] / max(bar.format_dict['elapsed'], 1e-9) / 1e6:.1f}M patches/s", refresh=False)

    return progress
