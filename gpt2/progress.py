"""Progress bars that read well on a terminal and in a log file.

On a terminal, tqdm redraws one line in place. Redirected to a file, that redraw is a stream of carriage
returns: one multi-kilobyte line. There, `progress_bar` writes a plain line at most every 30 s (and one at
the end) instead.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

LOG_INTERVAL_S = 30.0


class _Lines:
    """A file for tqdm that turns each in-place redraw (`\\r` + status) into a line of its own."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(**kwargs: Any):
    """`tqdm(**kwargs)` writing to stderr: redrawn in place on a terminal, a line per 30 s in a log file."""
    from tqdm import tqdm

    stream = kwargs.pop("file", sys.stderr)
    if not stream.isatty():
        kwargs.update(
            file=_Lines(stream),
            mininterval=max(kwargs.get("mininterval", 0.1), LOG_INTERVAL_S),
            ascii=True,
            dynamic_ncols=False,
            ncols=100,
        )
    return tqdm(**kwargs)
