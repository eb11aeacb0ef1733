"""Gives memory freed after a burst back to the system.

glibc's malloc keeps freed heap memory for reuse: after a flash crowd (thousands of connections,
their buffers and refusals) the gateway's RSS would stay near its peak although Python freed it.
`malloc_trim(0)` returns the free pages; it takes milliseconds, so the gateway calls it every few
seconds. Elsewhere (musl, macOS) there is nothing to do.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util

_libc_name = ctypes.util.find_library("c")
_trim = getattr(ctypes.CDLL(_libc_name), "malloc_trim", None) if _libc_name else None


def release_free_memory() -> None:
    if _trim is not None:
        _trim(0)


async def release_memory_periodically(period: float = 5.0) -> None:
    while True:
        await asyncio.sleep(period)
        release_free_memory()
