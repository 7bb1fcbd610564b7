"""Helpers for tests of the buffer pool (here and in other plugins' tests)."""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator

from decodekit_kvcache.store import free_buffers


@contextlib.contextmanager
def without_garbage_collector() -> Iterator[None]:
    """An empty pool and no garbage collection inside: buffers must come back because their
    generation ended, not because a collection happened to break a reference cycle."""
    gc.collect()  # earlier tests' garbage returns its buffers now, not in the middle of the test
    free_buffers()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
