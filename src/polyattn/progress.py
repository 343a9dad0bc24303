"""Progress bars and notes on stderr, one style for every command (training, evaluation, decoding, sampling).

On a terminal a bar redraws in place and a finished inner bar (an evaluation inside training) erases itself;
it appears only once its work has lasted a second, so quick steps do not flicker. Off a terminal (CI, a log
file) every redraw is a new line: bars then appear only for work that lasts more than 30 s, update every 30 s,
keep their last line, never move the cursor (no nesting), and `note` prints plainly instead of through tqdm,
which would print the training bar again after each message.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any


def interactive() -> bool:
    return sys.stderr.isatty()


def progress_bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str | None = None,
                 unit: str = "it", enabled: bool = True, leave: bool = False, **kwargs: Any):
    """A tqdm bar on stderr (`leave=False`: on a terminal it disappears when done, as an inner bar should)."""
    from tqdm import tqdm

    from .distributed import is_main

    enabled = enabled and is_main()  # one process of a distributed run shows progress
    if interactive():
        style = {"mininterval": 0.5, "delay": 0.0 if leave else 1.0, "leave": leave, "file": sys.stderr}
    else:
        style = {"mininterval": 30.0, "delay": 0.0 if leave else 30.0, "leave": True, "position": 0,
                 "file": _Lines(sys.stderr)}
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True,
                **{**style, **kwargs})


class _Lines:
    """Off a terminal: each of tqdm's redraws (`\\r` + the bar) becomes one plain line of the log."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def note(message: str) -> None:
    """One line on stderr that does not break a bar being drawn (tqdm.write on a terminal, print elsewhere)."""
    if interactive():
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


def clock(seconds: float) -> str:
    """A duration as the bars show one: 4:05, 1:02:03."""
    from tqdm import tqdm

    return tqdm.format_interval(seconds)
