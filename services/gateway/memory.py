"""Gives memory freed after a burst back to the system, and frees garbage while it is still fresh.

Two things keep a gateway's RSS up after a flash crowd although Python no longer uses the memory:
- Garbage in reference cycles (asyncio's socket transports hold a bound method of themselves on
  CPython 3.11: every connection; some requests leave their tasks, gRPC calls and HTTP protocol
  objects in cycles). Objects that were alive during a young-generation collection only go at the next full
  collection, which CPython runs once the long-lived objects have grown by a quarter: after a
  burst, minutes away on an idle gateway. Meanwhile new allocations fill the holes around them,
  so pymalloc cannot give their arenas back once they do go. `collect_now` runs a full
  collection every few seconds; the start-up objects (modules, classes, functions: ~85 000) are
  frozen first (`gc.freeze`), so a collection only walks what requests created and takes
  milliseconds.
- glibc's malloc keeps freed heap memory for reuse: `malloc_trim(0)` returns the free pages (also
  milliseconds). Elsewhere (musl, macOS) there is nothing to do.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc

_libc_name = ctypes.util.find_library("c")
_trim = getattr(ctypes.CDLL(_libc_name), "malloc_trim", None) if _libc_name else None


def release_free_memory() -> None:
    if _trim is not None:
        _trim(0)


def freeze_startup_objects() -> None:
    """Moves everything alive now out of the collector's sight: call once, before serving."""
    gc.collect()
    gc.freeze()


async def release_memory_periodically(period: float = 5.0) -> None:
    while True:
        await asyncio.sleep(period)
        gc.collect()
        # async generators found in cycles are closed by tasks the event loop runs next; let them
        await asyncio.sleep(0.5)
        release_free_memory()
