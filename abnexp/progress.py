"""Telling the user what a slow first start is doing (the native kernels' build, the demo data).

A step that is slow only the first time (then cached) runs inside :func:`announced`: its message is
logged once the step has taken ``after`` seconds, and its duration when it ends, so a cached start
stays quiet and a cold one never looks like a hang.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("abnexp")


@contextmanager
def announced(message: str, done: str, after: float = 0.0) -> Iterator[None]:
    """Logs ``message`` (INFO, logger "abnexp") when the block has run ``after`` seconds (at once for
    0), and then ``done`` followed by the block's duration (" in 42 s"); nothing when the block ends
    sooner. An exception in the block propagates and logs no ``done`` line.

    Args:
        message: what is about to happen and why, e.g. "building the native kernels ...".
        done: the past tense of it, e.g. "native kernels built".
        after: seconds [s] of silence allowed before ``message`` (a cached step ends sooner).
    """
    start = time.perf_counter()
    said = threading.Event()

    def say() -> None:
        said.set()
        log.info(message)

    timer = threading.Timer(after, say) if after > 0 else None
    if timer is None:
        say()
    else:
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()
    if said.is_set():
        log.info("%s in %.0f s", done, time.perf_counter() - start)
