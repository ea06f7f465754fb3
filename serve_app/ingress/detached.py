"""Work that must outlive the request that starts it."""

import asyncio
import contextvars
from collections.abc import Coroutine


def detached(coro: Coroutine) -> asyncio.Task:
    """Run `coro` as a task outside the current request's context.

    Ray Serve counts the handle calls a request makes as its children and cancels them
    when that request is cancelled (its client left). A task started with ensure_future
    inherits the request's context, so its calls would be cancelled with it, even one
    made to record that the request ended. In a fresh context they are calls of their
    own. The caller keeps a reference to the task (the loop keeps only weak ones).
    """
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
