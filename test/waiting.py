"""Waiting on conditions with a deadline — the only way tests synchronise (never a bare sleep)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T]], timeout: float, what: str, interval: float = 0.1
) -> T:
    """Poll ``check`` until it returns a truthy value and return that value.

    Fails with an AssertionError naming ``what`` (and the last exception ``check`` raised, if any) after
    ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = await check()
            if value:
                return value
        except AssertionError as e:
            last_error = e
        if loop.time() > deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")
        await asyncio.sleep(interval)


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """:func:`eventually` for synchronous code (threads, subprocesses): poll ``check`` until truthy.

    Returns the truthy value; fails with an AssertionError naming ``what`` (and the last AssertionError
    ``check`` raised) after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except AssertionError as e:
            last_error = e
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)  # the poll interval, bounded by the deadline
