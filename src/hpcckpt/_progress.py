"""Progress on a terminal for operations that run longer than about two seconds.

>>> bar = Progress(10, "export e3")      # silent unless stderr is a terminal
>>> bar.step(4); bar.close()
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def _after() -> float:
    return float(os.environ.get("HPCCKPT_PROGRESS_AFTER", "2"))


class Progress:
    """A one-line progress bar on stderr, only on a terminal and only past two seconds."""

    def __init__(self, total: int, label: str, quiet: bool = False):
        self.total, self.label, self.done, self.t0 = max(1, total), label, 0, time.monotonic()
        self.on, self.shown = sys.stderr.isatty() and not quiet, False

    def step(self, n: int = 1) -> None:
        self.done += n
        if self.on and time.monotonic() - self.t0 >= _after():
            width, self.shown = 30, True
            filled = width * min(self.done, self.total) // self.total
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                             f"{100 * min(self.done, self.total) // self.total}%")
            sys.stderr.flush()

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def watch(label: str, call: Callable[[], T], progress: Callable[[], tuple[int, int]]) -> T:
    """Run `call` (a core call that releases the GIL); on a terminal, past two seconds, show
    how far it is by polling `progress` -> (done, total)."""
    if not sys.stderr.isatty():
        return call()
    bar, stop = Progress(1, label), threading.Event()

    def show() -> None:
        while not stop.wait(0.2):
            done, total = progress()
            bar.total, bar.done = max(1, total), done
            bar.step(0)
    shower = threading.Thread(target=show, daemon=True)
    shower.start()
    try:
        result = call()
        if bar.shown:
            bar.done = bar.total
            bar.step(0)
        return result
    finally:
        stop.set()
        shower.join()
        bar.close()
