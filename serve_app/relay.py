"""Events put on a queue by running work, read until the work has ended."""

import asyncio
from collections.abc import AsyncIterator


async def relay(events: asyncio.Queue, work: asyncio.Future) -> AsyncIterator:
    """Each event of `events` as it comes, until `work` is done and every event it put
    there is out. The caller reads `work`'s result (or error) after."""
    getter = None
    try:
        while True:
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                break
            yield getter.result()
        while not events.empty():
            yield events.get_nowait()
    finally:
        if getter is not None and not getter.done():
            getter.cancel()
