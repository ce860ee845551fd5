"""Progress reporting for long work: pack, unpack, recursive copy, check.

Every long operation takes ``progress=``:

* ``None`` (the default): a bar on stderr when stderr is a terminal and ``tqdm`` is installed
  (the ``progress`` extra); nothing otherwise, so scripts and pipes stay quiet.
* ``False``: nothing.  ``True``: a bar even when stderr is not a terminal (needs ``tqdm``).
* a callable: called as ``progress(done, total)`` after each step, in the operation's unit.

The bars are tqdm's (sizes, rates, time left); xipfs draws none by hand.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

ProgressArg = bool | Callable[[int, int], Any] | None


class Progress:
    """Counts work done; the base class reports nowhere."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0

    def update(self, n: int) -> None:
        """Add ``n`` units of work done."""
        self.done += n

    def add_total(self, n: int) -> None:
        """The work turned out ``n`` units larger (or smaller, when negative)."""
        self.total += n

    def close(self) -> None:
        """The work is over (or abandoned)."""

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Callback(Progress):
    def __init__(self, total: int, callback: Callable[[int, int], Any]) -> None:
        super().__init__(total)
        self._callback = callback

    def update(self, n: int) -> None:
        self.done += n
        self._callback(self.done, self.total)


class _Bar(Progress):
    def __init__(self, total: int, bar: Any) -> None:
        super().__init__(total)
        self._bar = bar

    def update(self, n: int) -> None:
        self.done += n
        self._bar.update(n)

    def add_total(self, n: int) -> None:
        self.total += n
        self._bar.total = self.total
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def progress_bar(progress: ProgressArg, total: int, desc: str, unit: str = "B") -> Progress:
    """A :class:`Progress` for ``total`` units of work described by ``desc``, as ``progress`` asks.

    ``unit="B"`` shows sizes and rates in KiB/MiB/GiB; any other unit is counted as is.
    """
    if callable(progress) and not isinstance(progress, bool):
        return _Callback(total, progress)
    if progress is False or (progress is None and not _stderr_is_terminal()):
        return Progress(total)
    try:
        from tqdm import tqdm
    except ImportError:
        return Progress(total)
    scaled = unit == "B"
    bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=scaled, unit_divisor=1024 if scaled else 1000,
               file=sys.stderr, leave=False, dynamic_ncols=True, mininterval=0.2)
    return _Bar(total, bar)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
