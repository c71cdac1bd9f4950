"""Progress bars that suit where the output goes: a live tqdm bar on a terminal, and a plain line
now and then (every `every_s` seconds and at the end) when stderr is a file or a pipe, so that a
log holds a few readable lines rather than one carriage return per refresh."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class _LogLines(tqdm):
    """tqdm that writes its state as a line of its own: first, then every `every_s` seconds while
    it is refreshed, and last; nothing that only a terminal understands (carriage returns, cursor moves)."""

    def __init__(self, *args, every_s: float = 30.0, **kwargs):
        self._every_s, self._last_line, self._last_text = every_s, float("-inf"), None
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None, final: bool = False) -> bool:
        now = time.monotonic()
        text = msg or self.__str__()
        if (final and text == self._last_text) or (not final and now - self._last_line < self._every_s):
            return True
        self._last_line, self._last_text = now, text
        self.fp.write(text + "\n")
        self.fp.flush()
        return True

    def clear(self, nolock: bool = False) -> None:  # tqdm.write clears bars first: not in a log
        pass

    def moveto(self, n: int) -> None:
        pass

    def close(self) -> None:
        if self.disable:
            return
        self.display(final=True)
        self.disable = True  # tqdm's own close would redraw and end with a blank line
        self._decr_instances(self)

    @classmethod
    def write(cls, s: str, file=None, end: str = "\n", nolock: bool = False) -> None:
        fp = file or sys.stderr
        fp.write(s + end)
        fp.flush()


def progress(
    iterable=None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    every_s: float = 30.0,
    file=None,
    **kwargs,
) -> tqdm:
    """A progress bar over `iterable` (or updated by hand): live on a terminal, plain lines otherwise."""
    stream = file or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(
            iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, file=stream, **kwargs
        )
    return _LogLines(
        iterable, total=total, desc=desc, unit=unit, disable=disable, file=stream, every_s=every_s, ncols=100, **kwargs
    )
